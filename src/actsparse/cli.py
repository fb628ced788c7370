"""The `actsparse` command line: one subcommand per step of the flow, each in `actsparse.commands`."""

from __future__ import annotations

import argparse
import functools
import importlib
import sys

from actsparse.commands import HelpFormatter

COMMANDS = ("profile", "sweep", "report", "calibrate", "bench")
"""Subcommand modules under actsparse.commands; each has `add_parser(subparsers)` and `run(args)`."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="actsparse", description=__doc__)
    # every subcommand's --help shows the defaults (a subcommand may still pass its own formatter_class)
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        parser_class=functools.partial(argparse.ArgumentParser, formatter_class=HelpFormatter),
    )
    for name in COMMANDS:
        module = importlib.import_module(f"actsparse.commands.{name}")
        module.add_parser(sub).set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:  # --help (0) or a usage error (2, message printed): an exit code, as below
        return 0 if exit.code is None else exit.code if isinstance(exit.code, int) else 2
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError) as err:
        from rich.console import Console

        Console(stderr=True).print(f"[bold red]error:[/] {err}", highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
