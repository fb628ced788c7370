"""The `actsparse` command line: one subcommand per step of the flow, each a module of `actsparse.cli`."""

from __future__ import annotations

import argparse
import errno
import importlib
import re
import sys
from typing import Any, NoReturn

from actsparse.cli.common import HelpFormatter, make_console

COMMANDS = (
    "profile",
    "sweep",
    "study",
    "report",
    "calibrate",
    "bench",
    "tasks",
    "models",
    "outliers",
    "compare",
    "transfer",
    "sensitivity",
)
"""Subcommand modules of actsparse.cli; each has `add_parser(subparsers)` and `run(args)`."""


class _Parser(argparse.ArgumentParser):
    """A usage error is one line that names the command and its --help, not the usage block first."""

    def error(self, message: str) -> NoReturn:
        message = re.sub(r"^argument (\S+): (?=\1\b)", "", message)  # 'argument --limit: --limit 0 ...' once
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _SubcommandParser(_Parser):
    """A subcommand's parser: its --help shows the defaults, unless it names another formatter_class."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="actsparse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_SubcommandParser)
    for name in COMMANDS:
        module = importlib.import_module(f"actsparse.cli.{name}")
        module.add_parser(sub).set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:  # --help (0) or a usage error (2, message printed): an exit code, as below
        return 0 if exit.code is None else exit.code if isinstance(exit.code, int) else 2
    args.argv = list(sys.argv[1:] if argv is None else argv)  # provenance: the command that reproduces a run
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError) as err:
        from rich.markup import escape

        make_console(stderr=True).print(f"[bold red]error:[/] {escape(error_line(err))}", highlight=False)
        return 2


def error_line(err: Exception) -> str:
    """The one line a failed command prints: what happened and, where the error leaves it out, what to do."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        where = f" to write {err.filename}" if err.filename else ""
        return (
            f"no space left on the device{where}: free space, then rerun the same command "
            "(a sweep resumes where it stopped; what it stored is kept)"
        )
    return " ".join(str(err).split())


if __name__ == "__main__":
    sys.exit(main())
