"""Progress of a sweep: a rich bar over documents in a terminal; under a pipe or a batch log, one plain
line per finished point (done/total, docs/s, ETA), which a log file keeps readable."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class SweepProgress:
    """`advance(n)` per scored batch of n documents, `point(label, docs, seconds)` per stored point.

    `plain=None` chooses by the stream: plain lines when it is not a terminal. `total_points` or
    `total_docs` may be 0 when unknown (bisection): the line then says so instead of an ETA.
    """

    def __init__(
        self,
        show: bool = True,
        total_points: int = 0,
        total_docs: int = 0,
        plain: bool | None = None,
        stream: TextIO | None = None,
        prefix: str = "sweep",
    ):
        self.stream = stream or sys.stdout
        self.show = show
        self.plain = (not _is_terminal(self.stream)) if plain is None else plain
        self.total_points, self.total_docs = total_points, total_docs
        self.prefix = prefix
        self.points = self.docs = 0
        self.busy = 0.0  # seconds spent in points
        self.start = time.perf_counter()
        self._rich: Any = None
        self._bar: Any = None

    def __enter__(self) -> SweepProgress:
        self.start = time.perf_counter()
        if self.show and not self.plain:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            columns = (
                TextColumn(f"[bold]{self.prefix}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("docs"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
            )
            self._rich = Progress(*columns, console=Console(file=self.stream))
            self._rich.__enter__()
            self._bar = self._rich.add_task(self.prefix, total=self.total_docs or None)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.__exit__(*exc)
            self._rich = None

    def advance(self, n: int) -> None:
        """n more documents scored (within a point)."""
        if self._rich is not None:
            self._rich.advance(self._bar, n)

    def point(self, label: str, docs: int, seconds: float) -> None:
        """A point is stored: count it, and print its line when plain."""
        self.points += 1
        self.docs += docs
        self.busy += seconds
        if not (self.show and self.plain):
            return
        rate = self.docs / self.busy if self.busy > 0 else 0.0  # model loading excluded
        total = str(self.total_points) if self.total_points else "?"
        line = f"{self.prefix} {self.points}/{total} {label}: {docs} docs in {seconds:.1f} s, {rate:.2f} docs/s"
        if self.total_docs and rate > 0:
            line += f", ETA {_duration(max(self.total_docs - self.docs, 0) / rate)}"
        elif not self.total_points:
            line += ", ETA unknown (bisection)"
        print(line, file=self.stream, flush=True)


def _is_terminal(stream: TextIO) -> bool:
    isatty: Callable[[], bool] | None = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


__all__ = ["SweepProgress"]
