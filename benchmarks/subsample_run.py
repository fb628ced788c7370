"""Would a smaller sweep resolve one target against another? Draw random subsets of a stored run's
documents (and a subset of its values), summarise each, and print the paired difference of critical
sparsity of two targets with its 95 % interval, by the low-noise measure and by accuracy.

    python benchmarks/subsample_run.py RUN_DIR N VALUES DRAWS [A B RULE]
    e.g. python benchmarks/subsample_run.py runs/smollm2 60 0.9,0.8 5 intermediate input top_p
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import sys
import tempfile
from pathlib import Path

from actsparse.analysis import summarize
from actsparse.study.store import RunStore


def main(argv: list[str]) -> None:
    run, n, values, draws = argv[0], int(argv[1]), {float(v) for v in argv[2].split(",")}, int(argv[3])
    a, b, rule = argv[4:7] if len(argv) >= 7 else ["intermediate", "input", "top_p"]
    with RunStore.open(run, create=False) as store:
        items = [(k, r) for k, r in store.items() if k.is_dense or k.value in values]
        settings = store.get_meta("settings")
    for draw in range(draws):
        folder = Path(tempfile.mkdtemp())
        try:
            with RunStore.open(folder) as subset:
                subset.set_meta("settings", settings)
                chosen: dict[str, set[int]] = {}
                for key, result in items:
                    if key.task not in chosen:
                        chosen[key.task] = set(random.Random(draw).sample(sorted(d.doc_id for d in result.docs), n))
                    docs = [d for d in result.docs if d.doc_id in chosen[key.task]]
                    subset.put(key, dataclasses.replace(result, docs=docs))
                summary = summarize(subset, power=False)
            difference = summary["paired_differences"].get(f"{a} − {b} ({rule})", {})
            cells = []
            for measure in ("low_noise", "accuracy"):
                d = difference.get(measure)
                cells.append(
                    f"{measure}: –"
                    if d is None
                    else f"{measure}: {100 * d['value']:+.1f} [{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}] pts"
                )
            print(f"draw {draw}, {n} documents per task, values {sorted(values)}: " + "; ".join(cells))
        finally:
            shutil.rmtree(folder)


if __name__ == "__main__":
    main(sys.argv[1:])
