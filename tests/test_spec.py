import json

import pytest

from actsparse import SparsitySpec


def test_valid_specs() -> None:
    spec = SparsitySpec("all_inputs", "top_p", 0.9)
    assert spec.vectors == ("input", "intermediate") and spec.value == 0.9
    assert SparsitySpec("gate", "top_k", "0.25").value == 0.25
    assert SparsitySpec("up", "max_p", 1).label == "up/max_p=1"


@pytest.mark.parametrize(
    ("target", "rule", "value", "message"),
    [
        ("hidden", "top_p", 0.5, "unknown target 'hidden'"),
        ("input", "top_q", 0.5, "unknown rule 'top_q'"),
        ("input", "top_p", 1.2, "must lie in"),
        ("input", "max_p", -0.1, "must lie in"),
        ("input", "top_k", float("nan"), "must lie in"),
        ("input", "top_p", "high", "needs a number"),
        ("input", "threshold", 0.5, "per-layer thresholds"),
        ("input", "threshold", {0: -1.0}, "finite and ≥ 0"),
    ],
)
def test_invalid_specs_raise_clear_errors(target: str, rule: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SparsitySpec(target, rule, value)


def test_threshold_from_mapping_and_file(tmp_path) -> None:
    spec = SparsitySpec("all_inputs", "threshold", {0: 0.1, "1": {"input": 0.2, "intermediate": 0.3}})
    assert spec.value_for(0, "intermediate") == 0.1
    assert spec.value_for(1, "input") == 0.2
    path = tmp_path / "taus.json"
    path.write_text(json.dumps({"target": "input", "thresholds": {"0": {"input": 0.5}}}))
    assert SparsitySpec("input", "threshold", str(path)).value_for(0, "input") == 0.5
    with pytest.raises(ValueError, match="calibrated for target 'input'"):
        SparsitySpec("intermediate", "threshold", path)
    with pytest.raises(ValueError, match="cannot read thresholds"):
        SparsitySpec("input", "threshold", tmp_path / "missing.json")
    with pytest.raises(ValueError, match="no calibrated threshold for layer 3"):
        spec.value_for(3, "input")


def test_one_definition_of_the_paper_grid_and_of_the_target_check(tmp_path) -> None:
    from actsparse.cli import main
    from actsparse.sparsity import spec
    from actsparse.speed import calibrate
    from actsparse.study import search, sweep

    assert sweep.PAPER_VALUES is search.PAPER_GRID and len(search.PAPER_GRID) == 26
    with pytest.raises(ValueError) as expected:
        spec.check_target("hidden")
    for check in (lambda: SparsitySpec("hidden", "top_p", 0.5), lambda: calibrate.calibrate(None, [], "hidden", 0.5)):
        with pytest.raises(ValueError) as got:
            check()
        assert str(got.value) == str(expected.value)
    assert main(["calibrate", "--target", "hidden", "--sparsity", "0.5", "--out", str(tmp_path / "t.json")]) == 2
