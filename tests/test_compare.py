"""`actsparse report --compare` (several runs on one plot, critical sparsity side by side, paired
differences) and `actsparse compare` (methods by critical sparsity, low-noise and accuracy, Δ to top_p)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny import tiny_lm, tiny_sweep_config

from actsparse.analysis.comparison import compare, load_methods, write_comparison
from actsparse.cli import main
from actsparse.evaluate.results import DocResult, TaskResult
from actsparse.report.compare import critical_difference, load_run, write_compare
from actsparse.study.store import PointKey, RunStore
from actsparse.study.sweep import run_sweep


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


SPARSITY = {0.9: 0.2, 0.7: 0.4, 0.5: 0.6}  # rule value → achieved sparsity


def _methods_store(path, docs_of, rules=("top_p", "top_k"), tasks=("mc",), n=30):
    """A run folder of target `intermediate` whose documents are `docs_of(task, rule, value, doc_id)`
    (dense: rule and value None)."""
    with RunStore.open(path) as store:
        store.set_meta("settings", {"tasks": list(tasks), "model": "synthetic", "limit": n, "seed": 0})
        for task in tasks:
            metric = "acc" if task == "mc" else "exact_match"
            dense = [docs_of(task, None, None, i) for i in range(n)]
            store.put(PointKey.dense(task), TaskResult(task, "validation", metric, dense))
            for rule in rules:
                for value, s in SPARSITY.items():
                    docs = [docs_of(task, rule, value, i) for i in range(n)]
                    sparsity = {"all": {"sparsity": s, "per_layer": {}}}
                    store.put(
                        PointKey("intermediate", rule, value, task),
                        TaskResult(task, "validation", metric, docs, sparsity),
                    )
    return path


GOLD = {None: 0.8, 0.9: 0.796, 0.7: 0.78, 0.5: 0.7}  # normalised: 0.995 at 20 %, 0.975 at 40 %, 0.875 at 60 %


def _exact(task, rule, value, i):
    """Every answer right at every point; top_p's gold probability falls as GOLD, top_k's one point sooner."""
    gold = GOLD[{None: None, 0.9: 0.7, 0.7: 0.5, 0.5: 0.5}[value]] if rule == "top_k" else GOLD[value]
    return DocResult(i, 1.0, {"acc": 1.0, "p_gold": gold}, answer="0")


def test_compare_headlines_the_low_noise_crossing_with_accuracy_beside_it(tmp_path):
    run = _methods_store(tmp_path / "run", _exact)
    paths = write_comparison([run], tmp_path / "cmp", resamples=50)
    rows = json.loads(paths[1].read_text())["targets"]["intermediate"]
    top_p, top_k = rows
    assert (top_p["method"], top_k["method"]) == ("top_p", "top_k")
    assert top_p["low_noise_metrics"] == {"mc": "p_gold"}
    # top_p: 0.995 at 20 %, 0.975 at 40 %: 99 % is crossed a quarter of the way, at 25 %; no document
    # differs from another, so every resample gives 25 % (a zero-width interval), not censored
    low = top_p["critical_sparsity"]["low_noise"]
    assert (low["value"], low["ci_low"], low["ci_high"]) == pytest.approx((0.25, 0.25, 0.25))
    assert low["censored"] == {"below": False, "above": False} and not low["lower_bound"]
    # top_k: 1 at 0 %, 0.975 at 20 %: crossed at 8 %, below the lowest sparsity reached: censored below
    low_k = top_k["critical_sparsity"]["low_noise"]
    assert (low_k["value"], low_k["ci_low"], low_k["ci_high"]) == pytest.approx((0.08, 0.08, 0.08))
    assert low_k["censored"] == {"below": True, "above": False}
    diff = top_k["diff_to_top_p"]["low_noise"]
    assert (diff["value"], diff["ci_low"], diff["ci_high"]) == pytest.approx((-0.17, -0.17, -0.17))
    # accuracy never falls: a lower bound at the highest sparsity reached, censored above
    for r in rows:
        acc = r["critical_sparsity"]["accuracy"]
        assert acc["lower_bound"] and acc["value"] == acc["ci_high"] == pytest.approx(0.6)
        assert acc["censored"] == {"below": False, "above": True}
    md = paths[0].read_text()
    assert "| target | method | critical sparsity, low-noise [95 % CI] | Δ to top_p, low-noise [95 % CI] | " in md
    assert (
        "| intermediate | top_p | 25.0 % [25.0 %, 25.0 %] | – | ≥ 60.0 % [60.0 %, 60.0 %] (censored above) | – |" in md
    )
    assert "| top_k | 8.0 % [8.0 %, 8.0 %] (censored below) | -17.0 pts [-17.0, -17.0] | ≥ 60.0 %" in md
    assert "Low-noise measure on intermediate: mc: gold probability." in md
    assert (tmp_path / "cmp" / "compare_intermediate.png").stat().st_size > 0


def _noisy(task, rule, value, i):
    """0/1 answers that fall with sparsity (top_k a copy of top_p, wina_top_p its own); on `mc` the gold
    probability is the 0/1 score, `gen` (a generation task) has none."""
    rng = np.random.default_rng([len(task), i, 0 if rule == "wina_top_p" else 1])
    correct = float(rng.random() < 0.8)
    if value is not None:
        correct *= float(rng.random() > {0.9: 0.02, 0.7: 0.1, 0.5: 0.3}[value])
    return DocResult(i, correct, {"acc": correct, "p_gold": correct} if task == "mc" else {"exact_match": correct})


def test_one_resample_serves_both_measures_and_every_method(tmp_path):
    run = _methods_store(tmp_path / "run", _noisy, rules=("top_p", "top_k", "wina_top_p"), tasks=("mc", "gen"), n=40)
    methods, _ = load_methods(run)
    rows = {r["rule"]: r for r in compare(methods, resamples=200)["intermediate"]}
    assert rows["top_p"]["low_noise_metrics"] == {"mc": "p_gold", "gen": "exact_match"}  # gen: its score stands in
    # top_k is top_p on the same documents: in every resample the difference is exactly 0
    for measure in ("low_noise", "accuracy"):
        d = rows["top_k"]["diff_to_top_p"][measure]
        assert d["value"] == d["ci_low"] == d["ci_high"] == 0.0
    # the gold probability is the 0/1 score: one draw for both measures gives the same intervals
    for r in rows.values():
        assert r["critical_sparsity"]["low_noise"] == r["critical_sparsity"]["accuracy"]
        assert r.get("diff_to_top_p", {}).get("low_noise") == r.get("diff_to_top_p", {}).get("accuracy")
    wina = rows["wina_top_p"]["diff_to_top_p"]["low_noise"]
    assert wina["ci_low"] < wina["ci_high"]  # a real interval, so the equality above says something
