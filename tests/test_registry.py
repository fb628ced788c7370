"""The rule registry is the one list of rules: every rule it holds runs through `sparsify`, `profile` and a
one-point sweep on a tiny model, or is refused before any model work; bisection with each rule is
validated with the other arguments; instrumentation never leaks a patched forward; MoE experts follow
the model's own experts implementation, so p = 1 is the dense model bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import MOE_FAMILIES, tiny_lm, tiny_model, tiny_sweep_config, tiny_task

from actsparse import cli, find_ffns, sparsify
from actsparse.methods import point_spec
from actsparse.sparsity.instrument import replaced_forwards
from actsparse.sparsity.registry import METHOD_MASK, MODEL_DATA, RULES, get_rule, resolve
from actsparse.sparsity.spec import TARGETS, SparsitySpec
from actsparse.study.search import Bisection
from actsparse.study.sweep import SweepConfig, run_sweep

EXPERTS_IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")
"""transformers 5's experts implementations that run on a CPU (deepgemm and sonicmoe need CUDA)."""


def _target(rule: str) -> str:
    """A target the rule acts on (the predictor guesses d-dimensional masks only)."""
    return "intermediate" if get_rule(rule).targets else "input"


def _value(rule: str) -> float:
    """A value half-way along the rule's own sweep values: sparse, not everything zeroed."""
    values = get_rule(rule).sweep_values
    return values[len(values) // 2]


def test_the_registry_imports_no_torch() -> None:
    import actsparse.sparsity.registry as registry

    code = f"import runpy, sys; runpy.run_path({registry.__file__!r}); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


@pytest.mark.parametrize("name", list(RULES))
def test_each_rule_is_one_consistent_object(name: str) -> None:
    rule = RULES[name]
    assert rule.low <= min(rule.dense, rule.sparsest) and max(rule.dense, rule.sparsest) <= rule.high
    for values in (rule.sweep_values, rule.grid):
        assert [rule.check_value(v) for v in values] == rule.ordered(values), "densest first, in range"
    assert rule.grid[0] == rule.dense, "the grid starts at the dense end"
    assert callable(rule.mask_fn()) and (rule.reference is None or callable(rule.reference_fn()))
    assert set(rule.kernels) <= {"cpu_fused", "triton"} and rule.value and rule.describe()
    with pytest.raises(ValueError, match=rf"{name} value must lie in"):
        rule.check_value(rule.high + 1)


def test_the_kernels_the_registry_names_are_those_that_serve_the_rule() -> None:
    from actsparse.speed import accelerate
    from actsparse.speed.kernels.sparse_ffn_cpu import RULE_CODES

    assert set(RULE_CODES) == accelerate._FUSED_RULES
    assert [name for name, rule in RULES.items() if "triton" in rule.kernels] == ["top_p"]  # kernels.topp_triton
    assert callable(resolve(METHOD_MASK)) and callable(resolve(MODEL_DATA))  # the method rules' named entry points


@pytest.mark.parametrize("name", list(RULES))
def test_every_rule_runs_through_sparsify_on_a_tiny_model(name: str) -> None:
    model, tokenizer = tiny_lm()
    target, value = _target(name), _value(name)
    x = torch.randint(3, 90, (2, 12))
    if name == "threshold":  # SparsitySpec takes calibrated τ; the sweep's target sparsity is calibrated
        spec = point_spec(model, tokenizer, target, name, value, None)
    elif name == "predictor":  # fitted on calibration text: only point_spec can build it
        with pytest.raises(ValueError, match="predictor rule needs fitted predictors: build its spec with"):
            with sparsify(model, SparsitySpec(target, name, value)):
                raise AssertionError("ran without predictors")
        spec = point_spec(model, tokenizer, target, name, value, None)
    else:
        spec = SparsitySpec(target, name, value)  # the data WINA and top_p_outlier need comes from the model
    with torch.no_grad(), sparsify(model, spec) as stats:
        model(x, attention_mask=torch.ones_like(x))
    assert 0.0 < stats.overall("prefill") < 1.0, (name, stats.overall("prefill"))
    assert all("forward" not in vars(f.module) for f in find_ffns(model)), "restored"


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    """A tiny llama saved as a model folder, as `--model` takes it."""
    model, tokenizer = tiny_lm()
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", list(RULES))
def test_every_rule_runs_through_profile(name: str, tiny_folder: Path, tmp_path: Path) -> None:
    value = str(_value(name))
    if name == "threshold":  # profile takes the file `actsparse calibrate` writes
        value = str(tmp_path / "thresholds.json")
        Path(value).write_text(json.dumps({"target": "input", "thresholds": {"0": 0.2, "1": 0.2}}))
    out = tmp_path / "profile.json"
    argv = ["profile", "--model", str(tiny_folder), "--rule", name, "--target", _target(name), "--value", value]
    assert cli.main([*argv, "--generate", "2", "--max-tokens", "32", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["spec"]["rule"] == name and 0.0 < record["stats"]["prefill"]["sparsity"] < 1.0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rule", "predictor", "--target", "input"], "predictor acts on gate, up, intermediate only, not 'input'"),
        (["--rule", "max_p", "--value", "1.5"], "max_p value must lie in [0, 1], got 1.5"),
        (["--rule", "wina_top_k", "--value", "x"], "--value takes a number"),
    ],
)
def test_profile_refuses_a_rule_it_cannot_run_before_loading(
    argv: list[str], message: str, no_model: None, capsys: pytest.CaptureFixture
) -> None:
    assert cli.main(["profile", *argv]) == 2
    assert message in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("name", list(RULES))
def test_every_rule_runs_a_one_point_sweep(name: str, tmp_path: Path) -> None:
    model, tokenizer = tiny_lm()
    config = tiny_sweep_config(
        tmp_path / "run",
        rules=[name],
        targets=[_target(name)],
        values=[_value(name)],
        tasks=[tiny_task("mc", 6)],
        calibration_tokens=256,
    )
    summary = run_sweep(config, model, tokenizer, show_progress=False)
    (point,) = [p for p in summary["points"] if p["rule"] == name]
    assert point["value"] == _value(name) and 0.0 < point["sparsity"] < 1.0


def test_a_sweep_without_values_runs_each_rules_own() -> None:
    config = SweepConfig(rules=["top_p", "max_p"], tasks=["arc_easy"])
    assert config.values_for("max_p") == RULES["max_p"].sweep_values != config.values_for("top_p")
    assert SweepConfig(rules=["max_p"], search="bisect").values_for("max_p") == RULES["max_p"].grid


@pytest.mark.parametrize("name", list(RULES))
def test_bisection_with_each_rule_is_validated_before_any_model_work(
    name: str, tmp_path: Path, no_model: None, capsys: pytest.CaptureFixture
) -> None:
    rule = RULES[name]
    out = tmp_path / "run"
    base = ["sweep", "--out", str(out), "--rules", name, "--targets", _target(name), "--search", "bisect"]
    assert cli.main([*base, "--values", f"{rule.high + 1:g}"]) == 2
    assert f"{name} value must lie in [{rule.low:g}, {rule.high:g}]" in " ".join(capsys.readouterr().err.split())
    assert cli.main([*base, "--precision", "1.5"]) == 2
    assert "--precision is a fraction of sparsity" in capsys.readouterr().err
    assert not out.exists(), "nothing stored"
    config = tiny_sweep_config(out, rules=[name], targets=[_target(name)], values=None, search="bisect")
    config.validate()  # its own grid validates (and nothing loads)
    assert Bisection(name).ordered[-1] == rule.sparsest


def test_a_failing_make_forward_restores_every_layer_and_raises_the_original_error() -> None:
    model = tiny_model("llama")
    ffns = find_ffns(model)
    before = [f.module.forward for f in ffns]
    hooks = len(model._forward_pre_hooks)

    def make_forward(ffn, tokens):
        if ffn.layer == 1:
            raise MemoryError("out of memory re-laying out layer 1")
        return lambda *args: args[0]

    with pytest.raises(MemoryError, match="layer 1"):
        with replaced_forwards(model, ffns, make_forward):
            raise AssertionError("entered")
    assert all("forward" not in vars(f.module) for f in ffns), "no layer is left patched"
    assert [f.module.forward for f in ffns] == before and len(model._forward_pre_hooks) == hooks
    x = torch.randint(3, 90, (1, 6))
    with torch.no_grad(), sparsify(model, SparsitySpec("input", "top_p", 0.5)):
        model(x)  # the model still instruments and runs


@pytest.mark.parametrize("implementation", EXPERTS_IMPLEMENTATIONS)
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_p1_is_the_dense_model_bit_for_bit_under_each_experts_implementation(
    family: str, implementation: str
) -> None:
    model = tiny_model(family)
    model.set_experts_implementation(implementation)
    x = torch.randint(3, 90, (2, 10))
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    with torch.no_grad():
        dense = model(x, attention_mask=mask).logits
        for target in TARGETS:
            with sparsify(model, SparsitySpec(target, "top_p", 1.0)):
                assert torch.equal(model(x, attention_mask=mask).logits, dense), target
        with sparsify(model, SparsitySpec("intermediate", "top_p", 0.5)) as stats:
            model(x, attention_mask=mask)
    experts = stats.per_expert(0)
    assert experts and all(0 < s < 1 for s in experts.values()), "counted per expert"
