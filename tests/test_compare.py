"""`actsparse report --compare`: several runs on one plot, critical sparsity side by side, paired differences."""

from __future__ import annotations

import pytest
from tiny import tiny_lm, tiny_sweep_config

from actsparse.cli import main
from actsparse.report.compare import critical_difference, load_run, write_compare
from actsparse.sweep import run_sweep


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    runs = []
    for seed in (0, 1):
        out = tmp_path_factory.mktemp(f"run{seed}")
        model, tok = tiny_lm("llama", seed=seed)
        run_sweep(tiny_sweep_config(out, values=[0.95, 0.8, 0.5]), model, tok, show_progress=False)
        runs.append(out)
    return runs


def test_a_run_against_itself_differs_by_nothing(two_runs):
    a = load_run(two_runs[0], resamples=50)
    d = critical_difference(a, a, ("input", "top_p"), resamples=50)
    assert d is not None and d["difference"] == d["ci_low"] == d["ci_high"] == 0.0
    assert d["tasks"] == ["lam", "mc"] and d["n_docs"] == {"lam": 8, "mc": 10}


def test_two_runs_compare_on_shared_documents(two_runs, tmp_path):
    a, b = (load_run(r, resamples=100) for r in two_runs)
    d = critical_difference(a, b, ("intermediate", "top_p"), resamples=100)
    assert d is not None and d["ci_low"] <= d["difference"] <= d["ci_high"]
    # on every shared document the difference is that of the runs' own critical sparsities
    own = (
        b.summary["critical_sparsity"]["intermediate/top_p"]["value"]
        - a.summary["critical_sparsity"]["intermediate/top_p"]["value"]
    )
    assert d["difference"] == pytest.approx(own)
    paths = write_compare(two_runs, tmp_path / "cmp", resamples=100)
    assert [p.name for p in paths] == ["compare.md", "compare.png"]
    md = paths[0].read_text()
    assert "| input/top_p |" in md and "pts" in md and "actsparse report --compare" in md


def test_compare_cli_refuses_bad_input(two_runs, tmp_path, capsys):
    assert main(["report", "--compare", str(two_runs[0]), "--out", str(tmp_path / "c")]) == 2
    assert "at least two" in capsys.readouterr().err.replace("\n", " ")
    assert main(["report", "--compare", str(two_runs[0]), str(tmp_path), "--out", str(tmp_path / "c")]) == 2
    assert "has no results.sqlite" in capsys.readouterr().err.replace("\n", " ")
    assert main(["report", "--compare", str(two_runs[0]), str(two_runs[1]), "--out", str(tmp_path / "c")]) == 0
    assert (tmp_path / "c" / "compare.md").exists()
