"""`sweep --until-ci`: documents added in seeded batches until the interval is tight, kill-safe."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest
from tiny import tiny_lm, tiny_sweep_config, tiny_task

from actsparse import cli
from actsparse.study import adaptive
from actsparse.study.adaptive import document_batches, merge_sparsity
from actsparse.study.store import RunStore
from actsparse.study.sweep import run_sweep


def _config(out: Path, target: float):
    tasks = [tiny_task("mc", 40), tiny_task("lam", 28, kind="lambada", seed=1)]
    return tiny_sweep_config(out, tasks=tasks, limit=6, until_ci=target, values=[0.9, 0.5, 0.05], resamples=100)


def _contents(out: Path) -> dict:
    with RunStore.open(out, create=False) as store:
        return {key: [(d.doc_id, d.score, d.metrics) for d in store.get(key).docs] for key in store.keys()}  # noqa: SIM118


def _history(out: Path) -> list[dict]:
    with RunStore.open(out, create=False) as store:
        return store.get_meta("until_ci")["history"]


def test_document_batches_are_seeded_disjoint_and_cover_the_rest():
    batches = document_batches(30, [1, 5, 7], 4, seed=3)
    assert batches == document_batches(30, [1, 5, 7], 4, seed=3)
    flat = [d for b in batches for d in b]
    assert sorted(flat) == sorted(set(range(30)) - {1, 5, 7}) and len(flat) == len(set(flat))
    assert [len(b) for b in batches] == [4] * 6 + [3]


def test_merge_sparsity_weights_by_entries_seen():
    a = {"all": {"sparsity": 0.2, "per_layer": {"0": 0.1}}, "vectors": ["input"]}
    b = {"all": {"sparsity": 0.5, "per_layer": {"0": 0.4}}, "vectors": ["input"]}
    merged = merge_sparsity(a, 1.0, b, 2.0)
    assert merged["all"]["sparsity"] == pytest.approx(0.4) and merged["all"]["per_layer"]["0"] == pytest.approx(0.3)
    assert merged["vectors"] == ["input"]


@pytest.fixture(scope="module")
def exhausted(tmp_path_factory) -> tuple[Path, list[dict]]:
    """A run whose target is never reached: every document of the smaller task is used."""
    out = tmp_path_factory.mktemp("until") / "all"
    model, tokenizer = tiny_lm()
    run_sweep(_config(out, 1e-9), model, tokenizer, show_progress=False)
    return out, _history(out)


def _target(history: list[dict]) -> tuple[float, int]:
    """A target first reached at some batch j ≥ 2 before the documents run out, and that j."""
    widths = [h["half_width"] for h in history]
    for j in range(2, len(widths) - 1):
        if widths[j] < min(widths[:j]):
            return (widths[j] + min(widths[:j])) / 2, j
    pytest.fail(f"no batch narrows the interval: {widths}")


def test_until_ci_stops_when_the_target_width_is_reached(exhausted, tmp_path):
    out_all, history = exhausted
    assert len(history) > 2 and history[-1]["documents"] == 40  # every document of the larger task used
    target, j = _target(history)
    model, tokenizer = tiny_lm()
    run_sweep(_config(tmp_path / "run", target), model, tokenizer, show_progress=False)
    mine = _history(tmp_path / "run")
    assert [h["batch"] for h in mine] == list(range(j + 1))
    assert mine[-1]["half_width"] <= target < min(h["half_width"] for h in mine[:-1])
    assert mine == history[: j + 1]  # the same batches, the same documents, as the exhausted run
    full, part = _contents(out_all), _contents(tmp_path / "run")
    assert full.keys() == part.keys()
    for key, docs in part.items():
        assert len(docs) == min(6 * (j + 1), 40 if key.task == "mc" else 28)
        assert {d[0] for d in docs} <= {d[0] for d in full[key]}


def test_until_ci_survives_a_kill_between_batches(exhausted, tmp_path, monkeypatch):
    _, history = exhausted
    target, _ = _target(history)
    model, tokenizer = tiny_lm()
    out = tmp_path / "killed"
    calls = []
    real = adaptive._run_batch

    def killed(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # batch 0 is stored; killed before batch 1 runs
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(adaptive, "_run_batch", killed)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(_config(out, target), model, tokenizer, show_progress=False)
    held = _contents(out)
    assert all(len(docs) == 12 for docs in held.values())  # the first 6 and batch 0: nothing lost
    monkeypatch.setattr(adaptive, "_run_batch", real)
    run_sweep(_config(out, target), model, tokenizer, show_progress=False)
    reference = tmp_path / "straight"
    run_sweep(_config(reference, target), model, tokenizer, show_progress=False)
    assert _contents(out) == _contents(reference)  # nothing lost, nothing duplicated
    assert _history(out) == _history(reference)
    db = sqlite3.connect(out / "results.sqlite")
    assert db.execute("SELECT COUNT(*) FROM docs").fetchone()[0] == sum(len(d) for d in _contents(out).values())


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--until-ci", "0.02", "--limit", "all"], "give a --limit"), (["--until-ci", "1.5"], "in \\(0, 1\\)")],
)
def test_bad_until_ci_is_refused_before_any_model_work(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert cli.main(["sweep", "--model", "org/no-such-model", "--out", str(out), "--no-progress", *args]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (out / "results.sqlite").exists()
