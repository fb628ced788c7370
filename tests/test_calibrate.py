"""Calibrated thresholds reach the requested sparsity, and the CLI round trip works."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import tiny_model

from actsparse import SparsitySpec, sparsify
from actsparse.cli import main
from actsparse.speed.calibrate import calibrate, calibration_text, quantile_threshold, save_thresholds


@settings(max_examples=50, deadline=None)
@given(
    values=st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=60),
    sparsity=st.floats(0, 1),
)
def test_quantile_threshold_is_the_smallest_reaching_the_sparsity(values, sparsity):
    v = torch.tensor(values, dtype=torch.float32)
    tau = quantile_threshold(v, sparsity)
    dropped = float((v <= tau).float().mean())
    assert dropped >= sparsity - 1e-6 or tau == 0.0
    below = v[v < tau]
    assert below.numel() / v.numel() < sparsity + 1e-6 or tau == 0.0  # no smaller candidate would do


def random_batches(seed: int, count: int = 3, batch: int = 2, length: int = 24):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(1, 97, (batch, length), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


@pytest.mark.parametrize("target", ["input", "intermediate", "all_inputs", "up"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.8])
def test_calibration_reaches_the_sparsity(target, sparsity, tmp_path):
    model = tiny_model("llama")
    batches = random_batches(0)
    thresholds = calibrate(model, batches, target, sparsity)
    assert set(thresholds) == {0, 1}
    path = tmp_path / "t.json"
    save_thresholds(path, thresholds, "tiny-llama", target, sparsity)
    spec = SparsitySpec(target, "threshold", str(path))
    with torch.no_grad(), sparsify(model, spec) as stats:
        for batch in batches:
            model(**batch)
    tolerance = 0.01 if target != "all_inputs" else 0.03  # later layers see earlier layers' sparsity
    for vector in spec.vectors:
        for layer, achieved in stats.per_layer(vector=vector).items():
            assert abs(achieved - sparsity) < tolerance, f"layer {layer}, {vector}: {achieved:.3f}"
    with torch.no_grad(), sparsify(model, spec) as held_out:  # other text: near, not exact
        for batch in random_batches(1):
            model(**batch)
    assert abs(held_out.overall() - sparsity) < 0.15


def test_padding_is_not_calibrated():
    model = tiny_model("llama")
    ids = torch.randint(1, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    ids[1, :6] = 0  # left padding with the pad token, which no real token uses
    batches = [{"input_ids": ids, "attention_mask": (ids != 0).long()}]
    before = calibrate(model, batches, "all_inputs", 0.5)
    with torch.no_grad():
        model.model.embed_tokens.weight[0] = 1e3  # only padded positions see this
    assert calibrate(model, batches, "all_inputs", 0.5) == before


def test_calibration_errors():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="target"):
        calibrate(model, random_batches(0), "nope", 0.5)
    with pytest.raises(ValueError, match="sparsity"):
        calibrate(model, random_batches(0), "input", 1.5)
    assert "Elliot" in calibration_text()


@pytest.mark.slow
def test_cli_calibrate_then_profile(tmp_path):
    thresholds = tmp_path / "smollm2.json"
    args = ["--target", "all_inputs", "--sparsity", "0.5", "--tokens", "256", "--seq-len", "128"]
    assert main(["calibrate", *args, "--out", str(thresholds)]) == 0
    record = json.loads(thresholds.read_text())
    assert record["target"] == "all_inputs" and record["sparsity"] == 0.5 and len(record["thresholds"]) == 30
    assert set(record["thresholds"]["0"]) == {"input", "intermediate"}
    text = tmp_path / "calib.txt"
    text.write_text(calibration_text()[:900])  # part of the calibration text: sparsity close to 50 %
    out = tmp_path / "profile.json"
    argv = ["profile", "--target", "all_inputs", "--rule", "threshold", "--value", str(thresholds)]
    assert main([*argv, "--text-file", str(text), "--generate", "2", "--json", str(out)]) == 0
    achieved = json.loads(out.read_text())["stats"]["prefill"]["sparsity"]
    assert 0.4 < achieved < 0.6
