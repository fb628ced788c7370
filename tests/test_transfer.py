"""Transfer of operating points, retention with paired intervals, per-token sparsity, layer sensitivity."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from tiny import WORDS, tiny_lm, tiny_task

from actsparse.cli import main
from actsparse.evaluate import evaluate_task
from actsparse.evaluate.results import DocResult, TaskResult
from actsparse.sparsity.spec import SparsitySpec
from actsparse.study.structure import layer_sensitivity, record_tokens, retention
from actsparse.study.transfer import TransferConfig, operating_point, run_transfer
from actsparse.tasks import GoldLikelihood, task_from_requests


def _point(value, sparsity, normalized, target="input"):
    return {"target": target, "rule": "top_p", "value": value, "sparsity": sparsity, "normalized": normalized,
            "complete": True}  # fmt: skip


def test_operating_point_interpolates_p_at_the_crossing():
    summary = {"points": [_point(0.99, 0.2, 0.995), _point(0.95, 0.4, 0.98), _point(0.9, 0.6, 0.9)]}
    point = operating_point(summary, "input")
    # crossing a third of the way from (0.2, 0.995) to (0.4, 0.98)
    assert point.sparsity == pytest.approx(0.2 + 0.2 / 3)
    assert point.p == pytest.approx(round(0.99 - 0.04 / 3, 4))
    assert point.bracket == (0.99, 0.95) and not point.lower_bound
    # the first point already below: interpolate from the dense end (p = 1, sparsity 0)
    first = operating_point({"points": [_point(0.9, 0.5, 0.97)]}, "input")
    assert first.p == pytest.approx(1 - 0.1 / 3, abs=1e-4) and first.sparsity == pytest.approx(0.5 / 3)
    bound = operating_point({"points": [_point(0.99, 0.2, 0.999), _point(0.9, 0.5, 0.995)]}, "input")
    assert bound.lower_bound and bound.p == 0.9 and bound.sparsity == 0.5
    with pytest.raises(ValueError, match="no complete top_p point"):
        operating_point(summary, "gate")


def _result(task, scores, bpb=None):
    docs = [
        DocResult(i, s, {"bpb": b, "inv_bpb": 1 / b} if bpb else {"acc": s})
        for i, (s, b) in enumerate(zip(scores, bpb or scores, strict=True))
    ]
    return TaskResult(task, "test", "inv_bpb" if bpb else "acc", docs)


def test_retention_by_hand():
    r = retention(_result("t", [1, 0, 1, 1]), _result("t", [1, 0, 0, 1]), resamples=200)
    assert r.measure == "score" and r.value == pytest.approx(2 / 3) and r.ci_low <= r.value <= r.ci_high
    # bits per byte: the contract ratio dense_bpb / sparse_bpb of task means (not the mean of 1/bpb)
    dense = _result("b", [1.0, 0.5], bpb=[1.0, 2.0])
    sparse = _result("b", [0.5, 0.5], bpb=[2.0, 2.0])
    r = retention(dense, sparse, resamples=200)
    assert r.measure == "bpb" and r.value == pytest.approx(3 / 4) and (r.dense, r.sparse) == (1.5, 2.0)
    same = retention(dense, dense, resamples=50)
    assert same.value == same.ci_low == same.ci_high == 1.0
    with pytest.raises(ValueError, match="share no document"):
        retention(dense, TaskResult("b", "test", "inv_bpb", []))


def test_per_token_sparsity_pools_to_the_stats():
    model, tok = tiny_lm("llama")
    task = tiny_task("mc", 6)
    _, ref = evaluate_task(model, tok, task)
    with torch.no_grad(), record_tokens(model, SparsitySpec("all_inputs", "top_p", 0.7)) as (stats, sink):
        evaluate_task(model, tok, task, reference=ref)
    tokens, per_layer = sink.per_token(), sink.per_layer()
    pooled = stats.to_dict()["all"]
    assert tokens.ndim == 1 and len(tokens) > 10 and ((tokens >= 0) & (tokens <= 1)).all()
    # every token has the same entries, so the mean over tokens is the entry-pooled sparsity
    assert tokens.mean() == pytest.approx(pooled["sparsity"], abs=1e-6)
    for layer, values in per_layer.items():
        assert values.mean() == pytest.approx(pooled["per_layer"][str(layer)], abs=1e-6)


def test_layer_sensitivity_sparsifies_one_layer_at_a_time():
    model, tok = tiny_lm("llama")
    task = tiny_task("mc", 6)
    dense, ref = evaluate_task(model, tok, task)
    seen = []

    def evaluate():
        return {"mc": evaluate_task(model, tok, task, reference=ref)[0]}

    losses = layer_sensitivity(model, [0, 1], SparsitySpec("input", "top_p", 0.5), evaluate, {"mc": dense},
                               resamples=50, done=seen.append)  # fmt: skip
    assert [r.layer for r in losses] == [0, 1] == [r.layer for r in seen]
    assert all(r.kl["mc"] is not None and r.kl["mc"] > 0 and 0 < r.sparsity < 1 for r in losses)
    # one layer of two sparsified: about half the sparsity of both at the same p
    with torch.no_grad(), record_tokens(model, SparsitySpec("input", "top_p", 0.5)) as (stats, _):
        evaluate()
    both = stats.to_dict()["all"]["sparsity"]
    assert sum(r.sparsity for r in losses) / 2 == pytest.approx(both, rel=0.05)


def _gold_task(name, n, seed):
    rng = random.Random(seed)
    words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    return task_from_requests(name, [GoldLikelihood(words(4), " " + words(3)) for _ in range(n)])


def test_run_transfer_end_to_end_on_a_tiny_model(tmp_path):
    from actsparse.report.transfer import write_transfer_report

    model, tok = tiny_lm("llama")
    config = TransferConfig(
        model="tiny",
        sources=[tiny_task("mc", 10)],
        destinations=[_gold_task("gold", 6, 1), tiny_task("lam", 6, kind="lambada", seed=2)],
        targets=["input", "intermediate"],
        values=[0.9, 0.6, 0.3],
        limit=8,
        dest_limit=5,
        resamples=50,
        out=tmp_path,
        command="actsparse transfer (test)",
    )
    out = run_transfer(config, model, tok, show_progress=False)
    assert set(out["retention"]) == {"input", "intermediate"}
    for target, rows in out["retention"].items():
        assert set(rows) == {"mc", "gold", "lam"}
        assert rows["gold"]["measure"] == "bpb" and rows["mc"]["measure"] == "score"
        assert rows["mc"]["role"] == "source" and rows["gold"]["role"] == "destination"
        assert rows["gold"]["n"] == 5 and rows["mc"]["n"] == 8
        assert rows["gold"]["ci_low"] <= rows["gold"]["value"] <= rows["gold"]["ci_high"]
        assert out["specs"][target].startswith(f"{target}/top_p=")
        assert (tmp_path / "tokens" / f"{target}__gold.npy").exists()
    assert json.loads((tmp_path / "transfer.json").read_text())["destinations"] == ["gold", "lam"]
    paths = write_transfer_report(tmp_path)
    names = {p.name for p in paths}
    assert {"transfer.md", "retention.png", "heatmap_tasks_input.png", "density_input.png"} <= names
    md = (tmp_path / "transfer.md").read_text()
    assert "actsparse transfer (test)" in md and "| input | gold | destination | 5 | bpb" in md
    # a rerun resumes: every point is stored, the same numbers come back without evaluating again
    again = run_transfer(config, model, tok, show_progress=False)
    assert again["retention"] == out["retention"]
    # --report-only: no model, nothing evaluated, the stored points reported
    config.report_only = True
    assert run_transfer(config, None, None, show_progress=False)["retention"] == out["retention"]
    config.report_only = False
    # thresholds calibrated on the source prompts to the critical sparsity found there
    config.rule, config.out = "threshold", tmp_path / "thr"
    thr = run_transfer(config, model, tok, show_progress=False)
    assert thr["specs"]["input"] == "input/threshold=calibrated"
    source = thr["retention"]["input"]["mc"]["sparsity"]
    assert source == pytest.approx(thr["operating_points"]["input"]["sparsity"], abs=0.1)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["transfer", "--from", "arc_easy", "--to", "nope"], "unknown task 'nope'"),
        (["transfer", "--from", "arc_easy", "--to", "arc_easy"], "both a source and a destination"),
        (["transfer", "--targets", "bogus"], "unknown target"),
        (["transfer", "--values", "1.5"], "must lie in"),
        (["sensitivity", "--p", "2"], "must lie in"),
        (["sensitivity", "--every", "0"], "--every"),
        (["sensitivity", "--tasks", "nope"], "unknown task"),
    ],
)
def test_bad_input_is_refused_before_model_work(argv, message, tmp_path, capsys, monkeypatch):
    import actsparse.models.loading

    monkeypatch.setattr(actsparse.models.loading, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    assert main([*argv, "--out", str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err.replace("\n", " ")
    assert not (tmp_path / "x" / "points").exists()


def test_density_is_a_density():
    from actsparse.report.structure import densities

    fig = densities({"a": np.random.default_rng(0).uniform(0.2, 0.6, 500)}, "t")
    line = fig.axes[0].lines[0]
    x, y = line.get_data()
    assert np.trapezoid(y, x) == pytest.approx(1.0, abs=0.05)


def test_a_bpb_task_runs_in_a_normal_sweep(tmp_path):
    from tiny import tiny_sweep_config

    from actsparse.study.sweep import run_sweep

    model, tok = tiny_lm("llama")
    task = _gold_task("gold", 8, 3)
    summary = run_sweep(tiny_sweep_config(tmp_path, tasks=[task], values=[0.5]), model, tok, show_progress=False)
    from actsparse.study.store import PointKey, RunStore

    with RunStore.open(tmp_path, create=False) as store:
        dense, sparse = store.get(PointKey.dense("gold")), store.get(PointKey("input", "top_p", 0.5, "gold"))
    assert summary["metrics"]["gold"] == "inv_bpb"
    # the sweep's score is the mean of 1/bpb (bytes per bit); its normalised performance is the paper's
    # dense_bpb / sparse_bpb (SPEC §4b), the ratio of the task means of bpb
    inv = [1 / d.metrics["bpb"] for d in dense.docs]
    assert summary["dense"]["gold"] == pytest.approx(sum(inv) / len(inv))
    point = next(p for p in summary["points"] if p["target"] == "input")
    mean_bpb = [sum(d.metrics["bpb"] for d in r.docs) / len(r.docs) for r in (dense, sparse)]
    assert point["normalized"] == pytest.approx(mean_bpb[0] / mean_bpb[1])
    assert sparse.score != dense.score and all(d.kl is not None for d in sparse.docs)


def test_sensitivity_command_on_a_tiny_model(tmp_path, monkeypatch):
    import actsparse.models.loading
    import actsparse.tasks

    tasks = {"mc": tiny_task("mc", 6), "gold": _gold_task("gold", 5, 4)}
    monkeypatch.setattr(actsparse.models.loading, "load_model", lambda *a, **k: tiny_lm("llama"))
    monkeypatch.setattr(actsparse.tasks, "get_task", lambda name: tasks[name])
    argv = ["sensitivity", "--tasks", "mc,gold", "--p", "0.6", "--every", "1", "--resamples", "50"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "sensitivity.json").read_text())
    assert [r["layer"] for r in data["layers"]] == [0, 1]
    assert data["all_layers"]["gold"]["measure"] == "bpb" and data["all_layers"]["mc"]["measure"] == "score"
    assert set(data["sparsity_per_layer"]["mc"]) == {"0", "1"}
    for name in ("sensitivity.md", "sensitivity.png", "heatmap_tasks_input.png", "density_input.png"):
        assert (tmp_path / name).exists()
    assert np.load(tmp_path / "tokens_input__gold.npy").ndim == 1
