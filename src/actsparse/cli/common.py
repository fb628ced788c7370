"""Subcommands of the `actsparse` CLI, one module each, and the small pieces they share."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from actsparse.models.loading import DEFAULT_MODEL

if TYPE_CHECKING:
    from rich.console import Console

LOG_WIDTH = 200
"""Columns of a table written to a file or a log (a terminal's own width otherwise)."""


def make_console(stderr: bool = False) -> Console:
    """A rich Console on stdout (or stderr) that wraps lines only in a terminal: written to a file or a log, a
    message stays one line and a table keeps whole rows."""
    from rich.console import Console

    if (sys.stderr if stderr else sys.stdout).isatty():
        return Console(stderr=stderr)
    return Console(stderr=stderr, soft_wrap=True, width=LOG_WIDTH)


def disk_size(path: Path) -> int:
    """Bytes of a file, or of every file under a folder (0 if it does not exist)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help, except where there is none (None, a flag) or the help names it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if any(action.default is none for none in (None, False, argparse.SUPPRESS)) or "default" in text:
            return text
        return super()._get_help_string(action)


def one_of(values: Iterable[str]) -> str:
    """'a, b or c': the valid values, for a help text."""
    values = list(values)
    return values[0] if len(values) == 1 else f"{', '.join(values[:-1])} or {values[-1]}"


def comma_list(text: str) -> list[str]:
    """The names of a comma-separated list (tasks, targets, rules), blanks dropped."""
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_limit(text: str) -> int | None:
    """An argparse type for `--limit`: a positive number of documents, or 'all' (None)."""
    if text.strip().lower() in ("all", "none"):
        return None
    try:
        limit = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--limit takes a number of documents or 'all', got {text!r}") from None
    if limit < 1:  # 0 once meant 'all', silently
        raise argparse.ArgumentTypeError(f"--limit {limit} would score no document: give a positive number, or 'all'")
    return limit


def model_reference(text: str) -> str:
    """An argparse type for `--model`: a mistyped alias is a usage error (exit 2), before any hub call."""
    from actsparse.models.loading import ModelNotAvailableError, check_reference

    try:
        check_reference(text)
    except ModelNotAvailableError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def run_folder(model: str, prefix: str = "") -> Path:
    """runs/PREFIX+NAME, the default run folder of a model: NAME is its alias, or the name of its folder, its .gguf
    file or its hub repository (so that two models' runs never share a folder by default)."""
    path = Path(model).expanduser()
    name = (path.resolve() if path.exists() else path).name  # `--model .` is a folder with a name too
    return Path("runs") / f"{prefix}{name.removesuffix('.gguf')}"


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    """`--model`, as every command that loads one takes it."""
    parser.add_argument(
        "--model", type=model_reference, default=DEFAULT_MODEL, help="alias, folder, .gguf file or hub id owner/name"
    )


def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    """`--seed`, `--batch-size` and `--resamples` of the commands that score a seeded sample of documents
    in fixed-size batches and bootstrap it (transfer, sensitivity)."""
    parser.add_argument("--seed", type=int, default=0, help="seed of the document sample and of the bootstrap")
    parser.add_argument("--batch-size", type=int, default=16, help="documents scored together")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the intervals")


def at_least(minimum: int, name: str) -> Callable[[str], int]:
    """An argparse type: an integer ≥ `minimum` (else a clear usage error, exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} takes a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{name} must be at least {minimum}, got {value}")
        return value

    return parse


def check_output_file(path: Path) -> None:
    """Refuse an output file that cannot be written (ValueError) before any model work; writes nothing there."""
    if path.is_dir():
        raise ValueError(f"{path} is a folder: give the path of a file to write")
    from actsparse.study.store import file_in_the_way

    folder = path.parent
    blocker = file_in_the_way(folder)
    if blocker is not None:
        raise ValueError(f"cannot write {path}: {blocker} is a file, not a folder")
    if not folder.is_dir():
        raise ValueError(f"cannot write {path}: the folder {folder} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ValueError(f"cannot write {path}: {err.strerror or err}") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"cannot write {path}: the file is read-only")


def read_text_file(path: Path, what: str) -> str:
    """The text of `path`; ValueError when it cannot be read or holds nothing but whitespace."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read {what} {path}: {getattr(err, 'strerror', None) or err}") from None
    if not text.strip():
        raise ValueError(f"{what} {path} is empty")
    return text


def parse_criterion(text: str) -> Any:
    """The `Criterion` of `--criterion` (task, agreement:0.99, kl:0.05), or None for the paper's own
    critical sparsity; ValueError (exit 2) for anything else, before any model work."""
    from actsparse.analysis.curves import Criterion

    criterion = Criterion.parse(text)
    return None if criterion.is_paper else criterion
