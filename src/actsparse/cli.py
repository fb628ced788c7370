"""The `actsparse` command line: one subcommand per step of the flow, each in `actsparse.commands`."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("profile", "sweep", "report", "calibrate", "bench", "transfer", "sensitivity")
"""Subcommand modules under actsparse.commands; each has `add_parser(subparsers)` and `run(args)`."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="actsparse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"actsparse.commands.{name}")
        module.add_parser(sub).set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
