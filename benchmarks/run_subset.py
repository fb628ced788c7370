"""A run folder holding only the documents a `--limit N` sweep draws (the same seeded sample), copied from
a stored run over more documents: its report reads as that smaller sweep's would, without rerunning it.

    python benchmarks/run_subset.py RUN_DIR N OUT_DIR [--values 0.9,0.8] [--targets input,intermediate]

Scores, KL and per-document sparsity counts are the stored run's own; a sweep run at N may differ from them
only by the order of floating-point sums in its batches. Each point's per-layer sparsity is the full run's.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from actsparse.study.store import RunStore
from actsparse.tasks import get_task, select_docs


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("limit", type=int)
    parser.add_argument("out", type=Path)
    parser.add_argument("--values", default=None)
    parser.add_argument("--targets", default=None)
    args = parser.parse_args(argv)
    values = None if args.values is None else {float(v) for v in args.values.split(",")}
    targets = None if args.targets is None else set(args.targets.split(","))
    if (args.out / RunStore.FILENAME).exists():
        raise SystemExit(f"{args.out} already holds a run")
    with RunStore.open(args.run_dir, create=False) as store:
        settings = store.get_meta("settings") or {}
        items = list(store.items())
        meta = {k: store.get_meta(k) for k in ("provenance",)}
    seed = int(settings.get("seed") or 0)
    chosen = {t: set(select_docs(get_task(t), args.limit, seed)) for t in {k.task for k, _ in items}}
    with RunStore.open(args.out) as subset:
        subset.set_meta("settings", settings | {"limit": args.limit})
        for key, value in meta.items():
            if value is not None:
                subset.set_meta(key, value)
        for key, result in items:
            if not key.is_dense and ((values and key.value not in values) or (targets and key.target not in targets)):
                continue
            subset.put(key, dataclasses.replace(result, docs=[d for d in result.docs if d.doc_id in chosen[key.task]]))
    print(f"{args.out}: {args.limit} documents per task from {args.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
