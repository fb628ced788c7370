"""`actsparse models`: the models available offline: the aliases shipped in PyPI packages (file, size,
quantisation, whether a converted copy is cached) and the folders already in the caches."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from actsparse.cli.common import disk_size, make_console


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("models", help="list the models available offline, with files, sizes and quantisation")
    p.add_argument("--json", type=Path, help="also write the list as JSON here")
    return p


def model_rows() -> list[dict[str, Any]]:
    """Aliases (available or not, and why), converted GGUF folders and Hugging Face hub snapshots."""
    import os

    from actsparse.models.loading import ALIASES, ModelNotAvailableError, _converted, cache_dir
    from actsparse.study.provenance import gguf_quantisation

    rows: list[dict[str, Any]] = []
    for alias, find in ALIASES.items():
        row: dict[str, Any] = {"model": alias, "kind": "alias"}
        try:
            path = find()
        except ModelNotAvailableError as err:
            rows.append(row | {"available": False, "error": str(err)})
            continue
        quant = gguf_quantisation(path) or {}
        converted = _converted(path)
        row |= {
            "available": True,
            "file": str(path),
            "bytes": disk_size(path),
            "quantisation": quant.get("file_type"),
            "converted": str(converted) if (converted / "done").exists() else None,
        }
        rows.append(row)
    known = {r.get("converted") for r in rows}
    for folder in sorted((cache_dir() / "converted").glob("*")):
        if (folder / "done").exists() and str(folder) not in known:
            rows.append({"model": str(folder), "kind": "folder", "available": True, "bytes": disk_size(folder)})
    hub = Path(
        os.environ.get("HF_HUB_CACHE")
        or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"
    )
    for repo in sorted(hub.glob("models--*")):
        name = repo.name.removeprefix("models--").replace("--", "/")
        rows.append({"model": name, "kind": "hub cache", "available": True, "bytes": disk_size(repo)})
    return rows


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

    rows = model_rows()
    table = Table(title="models available offline (--model takes these, a folder, or a .gguf file)")
    for column in ("model", "kind", "size", "quantisation", "converted copy cached", "file / why not"):
        table.add_column(column)
    for r in rows:
        size = f"{r['bytes'] / 1e6:.0f} MB" if r.get("bytes") else "–"
        where = r.get("file") or r.get("error") or ""
        cached = (
            "yes"
            if r.get("converted")
            else ("no (made on first load)" if r["kind"] == "alias" and r["available"] else "")
        )
        table.add_row(r["model"], r["kind"], size, r.get("quantisation") or "", cached, where)
    make_console().print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0
