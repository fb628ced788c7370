"""The sweep on a tiny model: resume after kill -9 and Ctrl-C, same documents everywhere, summary keys,
and bad input refused before any model work with nothing stored lost."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from tiny import tiny_lm, tiny_sweep_config, tiny_task

from actsparse import cli
from actsparse.study.store import PointKey, RunStore
from actsparse.study.sweep import PAPER_VALUES, SweepConfig, parse_values, plan, run_sweep

TESTS = Path(__file__).parent


_config = tiny_sweep_config


SCRIPT = """
import signal, sqlite3, sys, time
from tiny import tiny_lm, tiny_task
from actsparse.study.sweep import SweepConfig, run_sweep

signal.signal(signal.SIGINT, signal.default_int_handler)  # a parent (pytest-xdist) may have it ignored


def stored() -> int:
    try:
        db = sqlite3.connect(f"file:{sys.argv[1]}/results.sqlite?mode=ro", uri=True)
        try:
            return db.execute("SELECT count(*) FROM points").fetchone()[0]
        finally:
            db.close()
    except sqlite3.OperationalError:
        return 0


def hold(*args):  # once 4 points are stored, wait to be interrupted (however slow the machine)
    if stored() >= 4:
        time.sleep(600)


model, tokenizer = tiny_lm()
model.register_forward_pre_hook(hold)
config = SweepConfig(
    model="tiny", targets=["input", "intermediate"], rules=["top_p"], values=[0.9, 0.6],
    tasks=[tiny_task("mc", 12), tiny_task("lam", 8, kind="lambada", seed=1)], limit=10,
    out=sys.argv[1], resamples=50, batch_size=4,
)
run_sweep(config, model, tokenizer, show_progress=False)
"""


def _rows(out: Path) -> list[tuple]:
    path = out / "results.sqlite"
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute("SELECT id, target, rule, value, task, created FROM points ORDER BY id").fetchall()
    except sqlite3.OperationalError:  # schema not created yet
        return []
    finally:
        db.close()


def _interrupt(tmp_path: Path, out: Path, sig: int, after_points: int) -> list[tuple]:
    script = tmp_path / "sweep_script.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(script), str(out)], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while len(_rows(out)) < after_points:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "sweep ended early"
            assert time.monotonic() < deadline, "sweep too slow"
            time.sleep(0.05)
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, "the sweep finished before it was interrupted"
    return _rows(out)


def _check_complete(out: Path, config: SweepConfig) -> None:
    expected = plan(config)
    rows = _rows(out)
    assert len(rows) == len(expected) == len(set(expected))
    with RunStore.open(out) as store:
        assert store.keys() == set(expected)
        ids = {t.name: None for t in config.resolved_tasks}
        for key, result in store.items():
            docs = [d.doc_id for d in result.docs]
            assert len(docs) == len(set(docs)) == 10 if key.task == "mc" else 8
            if ids[key.task] is None:
                ids[key.task] = docs
            assert docs == ids[key.task], "every point runs the same documents"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_sweep_resumes_with_exactly_the_expected_points(tmp_path: Path, sig: int) -> None:
    out = tmp_path / "run"
    before = _interrupt(tmp_path, out, sig, after_points=4)
    config = _config(out)
    assert 4 <= len(before) < len(plan(config))
    model, tokenizer = tiny_lm()
    run_sweep(config, model, tokenizer, show_progress=False)
    _check_complete(out, config)
    assert _rows(out)[: len(before)] == before, "points stored before the interruption are kept, not redone"
    assert (out / "summary.json").exists()


def test_sweep_summary_and_extension(tmp_path: Path) -> None:
    out = tmp_path / "run"
    model, tokenizer = tiny_lm()
    config = _config(out)
    summary = run_sweep(config, model, tokenizer, show_progress=False)
    _check_complete(out, config)
    assert {"model", "tasks", "dense", "points", "critical_sparsity"} <= set(summary)
    assert summary["tasks"] == ["mc", "lam"] and summary["model"] == "tiny"
    assert set(summary["dense"]) == {"mc", "lam"}
    assert len(summary["points"]) == 4
    for point in summary["points"]:
        assert {"target", "rule", "value", "sparsity", "sparsity_per_layer", "scores", "normalized", "kl"} <= set(point)
        assert "agreement" in point and 0 <= point["agreement"] <= 1
        assert 0 < point["sparsity"] < 1 and set(point["sparsity_per_layer"]) == {"0", "1"}
        assert point["kl"] is not None and point["kl"] >= 0
    for label in ("input/top_p", "intermediate/top_p"):
        c = summary["critical_sparsity"][label]
        assert {"value", "grid_value", "ci_low", "ci_high", "lower_bound"} <= set(c)
        assert c["ci_low"] <= c["value"] <= c["ci_high"]
        assert set(summary["critical_sparsity_per_task"][label]) == {"mc", "lam"}
    assert summary["splits"] == {"mc": "custom", "lam": "custom"}
    assert json.loads((out / "summary.json").read_text()) == summary

    # a rerun with one more value computes only the new points and keeps the old ones
    rows = _rows(out)
    (out / "dense" / "lam.ref").unlink()  # a lost reference is rebuilt, its dense point not stored twice
    bigger = _config(out, values=[0.9, 0.6, 0.3])
    run_sweep(bigger, model, tokenizer, show_progress=False)
    _check_complete(out, bigger)
    assert _rows(out)[: len(rows)] == rows
    assert (out / "dense" / "lam.ref").exists()


def _err(capsys: pytest.CaptureFixture) -> str:
    return " ".join(capsys.readouterr().err.split())


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_unwritable_run_dir_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture, no_model: None) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli.main(["sweep", "--out", str(blocker / "run")]) == 2
    assert f"{blocker} is a file, not a folder" in _err(capsys)


def test_corrupt_or_mismatched_store_is_refused_and_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture, no_model: None
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.sqlite").write_bytes(b"\x00garbage" * 500)
    before = _digest(out / "results.sqlite")
    assert cli.main(["sweep", "--out", str(out)]) == 2
    err = _err(capsys)
    assert "results.sqlite is corrupt" in err and str(out) in err
    assert _digest(out / "results.sqlite") == before

    good = tmp_path / "good"
    with RunStore.open(good) as store:
        store.bind("model", "smollm2-135m")
        store.bind("limit", 50)
        store.put(PointKey.dense("arc_easy"), _dense_result())
    before = _digest(good / "results.sqlite")
    assert cli.main(["sweep", "--out", str(good), "--limit", "20", "--tasks", "arc_easy"]) == 2
    assert "limit = 50, not 20" in _err(capsys)
    with RunStore.open(good) as store:
        assert store.keys() == {PointKey.dense("arc_easy")}


def _dense_result():
    from actsparse.evaluate.results import DocResult, TaskResult

    return TaskResult("arc_easy", "validation", "acc_norm", [DocResult(0, 1.0)])


def test_values_parsing() -> None:
    assert parse_values("paper") == PAPER_VALUES and len(PAPER_VALUES) == 26
    assert parse_values("1, 0.9,0.7") == (1.0, 0.9, 0.7)
    with pytest.raises(ValueError, match="twice"):
        parse_values("0.9,0.9")


@pytest.mark.slow
def test_cli_sweep_and_report_on_the_embedded_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    args = ["--targets", "intermediate", "--values", "0.9", "--tasks", "arc_easy", "--limit", "6", "--no-progress"]
    assert cli.main(["sweep", "--out", str(out), "--resamples", "50", *args]) == 0
    assert "intermediate/top_p" in capsys.readouterr().err
    assert cli.main(["report", str(out), "--resamples", "50"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "smollm2-135m" and summary["splits"] == {"arc_easy": "validation"}
    assert summary["n_docs"] == {"arc_easy": 6}
    (point,) = summary["points"]
    assert len(point["sparsity_per_layer"]) == 30 and 0.2 < point["sparsity"] < 0.9
    assert (out / "report.html").exists() and (out / "heatmap_intermediate.png").exists()
    assert cli.main(["sweep", "--out", str(out), "--resamples", "50", *args]) == 0  # nothing left: no model load


def test_accelerate_gives_the_same_points_as_the_simulation(tmp_path: Path) -> None:
    model, tokenizer = tiny_lm()
    summaries = []
    for accelerate in (False, True):
        config = _config(tmp_path / str(accelerate), targets=["input"], values=[0.7], accelerate=accelerate)
        config.tasks = [tiny_task("gen", 6, kind="generate", seed=3)]
        summaries.append(run_sweep(config, model, tokenizer, show_progress=False))
    simulated, accelerated = (s["points"][0] for s in summaries)
    assert accelerated["scores"] == simulated["scores"]
    assert accelerated["sparsity"] == pytest.approx(simulated["sparsity"])
    with RunStore.open(tmp_path / "True") as store:
        assert store.get_meta("accelerate") is True


def test_a_non_finite_dense_baseline_is_refused_and_not_stored(tmp_path: Path) -> None:
    """A poisoned model (NaN in one weight) gives no dense baseline, as no sparse point either."""
    import torch

    from actsparse import NonFiniteActivationError

    out = tmp_path / "run"
    model, tokenizer = tiny_lm()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3] = float("nan")
    with pytest.raises(NonFiniteActivationError, match=r"dense baseline of 'mc'.*layer 1"):
        run_sweep(_config(out, tasks=[tiny_task("mc", 12)]), model, tokenizer, show_progress=False)
    with RunStore.open(out) as store:
        assert store.keys() == set()
    assert not (out / "dense" / "mc.ref").exists()
