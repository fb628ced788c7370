"""The methods through the sweep, compare, outliers and report on a tiny model: calibrations cached in
the run folder (a resumed sweep does not recalibrate), predictor quality recorded, bad options exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import tiny_lm, tiny_model, tiny_sweep_config, tiny_task

from actsparse import cli
from actsparse.methods.predictor import fit_low_rank
from actsparse.study.sweep import run_sweep


def _config(out: Path, **overrides):
    return tiny_sweep_config(out, tasks=[tiny_task("mc", 12)], calibration_tokens=256, **overrides)


def test_threshold_sweep_calibrates_once_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tokenizer = tiny_lm()
    out = tmp_path / "run"
    summary = run_sweep(_config(out, rules=["threshold"], values=[0.3, 0.6]), model, tokenizer, show_progress=False)
    files = sorted(p.name for p in (out / "calibration").glob("thresholds-*.json"))
    assert len(files) == 4  # (input, intermediate) × (0.3, 0.6)
    sparsity = {(p["target"], p["value"]): p["sparsity"] for p in summary["points"]}
    assert sparsity[("input", 0.6)] > sparsity[("input", 0.3)] > 0.1

    import actsparse.speed.calibrate

    def refuse(*args, **kwargs):
        raise AssertionError("recalibrated")

    monkeypatch.setattr(actsparse.speed.calibrate, "calibrate", refuse)
    (out / "results.sqlite").unlink()  # the points are gone, the calibrations stay
    for extra in out.glob("results.sqlite-*"):
        extra.unlink()
    run_sweep(_config(out, rules=["threshold"], values=[0.3, 0.6]), model, tokenizer, show_progress=False)


def test_greedy_allocation_reaches_the_target_on_calibration_text(tmp_path: Path) -> None:
    model, tokenizer = tiny_lm()
    out = tmp_path / "run"
    config = _config(out, rules=["threshold"], values=[0.5], targets=["intermediate"], allocation="greedy")
    summary = run_sweep(config, model, tokenizer, show_progress=False)
    assert list((out / "calibration").glob("greedy-curves-*.json"))
    record = json.loads(next((out / "calibration").glob("thresholds-*greedy*.json")).read_text())
    taus = [t["intermediate"] for t in record["thresholds"].values()]
    assert len(set(taus)) == len(taus)  # one τ per layer, from that layer's own sparsity
    point = summary["points"][0]
    assert 0.2 < point["sparsity"] < 0.8


def test_method_rules_and_predictor_in_a_sweep_then_compare(tmp_path: Path) -> None:
    model, tokenizer = tiny_lm()
    out = tmp_path / "run"
    config = _config(out, rules=["top_p", "wina_top_p", "top_p_outlier", "predictor"], targets=["intermediate"])
    summary = run_sweep(config, model, tokenizer, show_progress=False)
    assert {p["rule"] for p in summary["points"]} == {"top_p", "wina_top_p", "top_p_outlier", "predictor"}
    records = [json.loads(p.read_text()) for p in (out / "calibration").glob("predictor-*.json")]
    assert {r["p"] for r in records} == {0.9, 0.6}
    for r in records:
        assert 0 <= r["precision"] <= 1 and 0 < r["recall"] <= 1
        assert r["flops_per_token"]["predictor"] == 2 * 64 * (32 + 64)
    assert cli.main(["compare", str(out), "--out", str(tmp_path / "cmp"), "--resamples", "20"]) == 0
    md = (tmp_path / "cmp" / "compare.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and "method" not in line]
    assert len(rows) == 4
    assert "predictor (rank 64)" in md and "held-out recall" in md
    table = json.loads((tmp_path / "cmp" / "compare.json").read_text())["targets"]["intermediate"]
    assert table[0]["rule"] == "top_p" and "diff_to_top_p" not in table[0]
    for r in table[1:]:
        d = r["diff_to_top_p"]
        assert d["ci_low"] <= d["value"] + 1e-9 and r["critical_sparsity"]["value"] <= r["max_sparsity"]
        assert set(r["damage_vs_top_p"]) == {"kl", "agreement"} and r["verdict"].startswith(f"{r['method']} vs top_p")
    assert (tmp_path / "cmp" / "compare_intermediate.png").stat().st_size > 0


def test_predictor_fits_a_learnable_mask() -> None:
    torch.manual_seed(0)
    x = torch.randn(2000, 16)
    w = torch.randn(16, 40)
    keep = x @ w > 0.3  # a mask that a linear map predicts
    predictor = fit_low_rank(x[:1500], keep[:1500], rank=16)
    predicted = predictor.predict_mask(x[1500:])
    truth = keep[1500:]
    assert float((predicted == truth).float().mean()) > 0.9
    low = fit_low_rank(x[:1500], keep[:1500], rank=1)
    assert float((low.predict_mask(x[1500:]) == truth).float().mean()) < float((predicted == truth).float().mean())


def test_outliers_find_an_injected_massive_dimension(tmp_path: Path) -> None:
    from actsparse.study.outliers import find_outliers, massive_layers, save_outliers

    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[5] = 1e4
    batches = [{"input_ids": torch.randint(3, 97, (2, 24)), "attention_mask": torch.ones(2, 24, dtype=torch.long)}]
    records = find_outliers(model, batches, m=100.0)
    assert massive_layers(records, "input") == [1]
    layer1 = next(r for r in records if r.layer == 1 and r.vector == "input")
    assert layer1.dims[0][0] == 5 and layer1.token_fraction == 1.0 and layer1.max_ratio > 100
    path = save_outliers(tmp_path, records, "tiny", 100.0)
    assert json.loads(path.read_text())["massive_layers"]["input"] == [1]


def test_heatmaps_mark_massive_layers() -> None:
    from actsparse.report.plots import heatmap

    points = [
        {"target": "input", "rule": "top_p", "value": v, "sparsity": 0.3, "normalized": 1.0, "complete": True,
         "sparsity_per_layer": {"0": 0.2, "1": 0.4}}
        for v in (0.9, 0.8)
    ]  # fmt: skip
    summary = {"model": "tiny", "points": points, "outliers": {"massive_layers": {"input": [1]}}}
    fig = heatmap(summary, "input")
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]  # layers run across
    assert labels == ["0", "◆ 1"]
    plain = heatmap({**summary, "outliers": None}, "input")
    assert [t.get_text() for t in plain.axes[0].get_xticklabels()] == ["0", "1"]


@pytest.mark.parametrize(
    "argv",
    [
        ["sweep", "--rules", "top_p_outlier", "--outlier-m", "0.5"],
        ["sweep", "--rules", "wina_top_q"],
        ["sweep", "--rules", "threshold", "--values", "0.5,1.2"],
        ["sweep", "--rules", "threshold", "--allocation", "smart"],
        ["sweep", "--rules", "predictor", "--targets", "input"],
        ["sweep", "--rules", "predictor", "--targets", "intermediate", "--predictor-rank", "0"],
        ["sweep", "--rules", "wina_top_p", "--values", "1.5"],
        ["sweep", "--rules", "wina_top_k", "--accelerate"],
    ],
)
def test_bad_method_options_exit_2_before_model_work(argv: list[str], tmp_path: Path, monkeypatch) -> None:
    import actsparse.models.loading

    monkeypatch.setattr(actsparse.models.loading, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    out = tmp_path / "run"
    assert cli.main([*argv, "--out", str(out), "--no-progress"]) == 2
    assert not (out / "results.sqlite").exists()


def test_bad_outliers_and_compare_arguments_exit_2(tmp_path: Path) -> None:
    assert cli.main(["outliers", "--m", "0.5", "--out", str(tmp_path)]) == 2
    assert cli.main(["outliers", "--vectors", "residual", "--out", str(tmp_path)]) == 2
    assert cli.main(["compare", str(tmp_path / "missing")]) == 2
