"""`threshold` as a sweep rule: thresholds reaching a target sparsity on the calibration text, cached.

A calibration is stored in RUN_DIR/calibration/ under its (model, target, allocation, sparsity, text)
so that a resumed sweep reads it instead of recalibrating; the greedy allocation's error curves are
cached the same way per (model, target, text), since every target sparsity reuses them.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from actsparse.sparsity.spec import Thresholds
from actsparse.study.store import atomic_path

__all__ = ["cache_file", "cached_thresholds", "model_id"]


def model_id(model: nn.Module) -> str:
    """A short stable name of the model's weights source, for cache file names."""
    name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)
    return hashlib.sha256(name.encode()).hexdigest()[:10]


def cache_file(run_dir: Path, kind: str, *parts: Any) -> Path:
    """RUN_DIR/calibration/KIND-PART-PART....json."""
    name = "-".join([kind, *(f"{p:g}" if isinstance(p, float) else str(p) for p in parts)])
    return run_dir / "calibration" / f"{name}.json"


def _write(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(path)
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, path)


def cached_thresholds(model: nn.Module, tokenizer: Any, target: str, sparsity: float, options: Any) -> Thresholds:
    """Per-layer thresholds at `sparsity` (uniform or greedy per `options.allocation`), cached in the run folder."""
    from actsparse.speed.calibrate import calibrate, calibration_batches

    if not 0.0 <= float(sparsity) <= 1.0:
        raise ValueError(f"threshold's value is a target sparsity in [0, 1], got {sparsity}")
    sparsity = float(sparsity)
    run_dir = options.run_dir
    key = (model_id(model), target, options.allocation, sparsity, options.text_id())
    path = None if run_dir is None else cache_file(run_dir, "thresholds", *key)
    if path is not None and path.exists():
        return _parse(json.loads(path.read_text())["thresholds"])
    batches = list(calibration_batches(tokenizer, options.text(), options.calibration_tokens))
    if options.allocation == "greedy":
        from actsparse.methods.allocation import ErrorCurves, error_curves, greedy_thresholds

        curves_path = None if run_dir is None else cache_file(run_dir, "greedy-curves", *key[:2], key[4])
        if curves_path is not None and curves_path.exists():
            curves = ErrorCurves.from_dict(json.loads(curves_path.read_text()))
        else:
            curves = error_curves(model, batches, target)
            if curves_path is not None:
                _write(curves_path, curves.to_dict())
        thresholds = greedy_thresholds(curves, sparsity)
    else:
        thresholds = calibrate(model, batches, target, sparsity)
    if path is not None:
        record = {"target": target, "allocation": options.allocation, "sparsity": sparsity, "text": options.text_id()}
        _write(path, {**record, "thresholds": {str(k): v for k, v in sorted(thresholds.items())}})
    return thresholds


def _parse(data: dict) -> Thresholds:
    return {int(layer): {str(v): float(t) for v, t in taus.items()} for layer, taus in data.items()}
