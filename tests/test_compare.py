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


SCORE = {None: 0.8, 0.9: 0.796, 0.7: 0.78, 0.5: 0.7}  # normalised: 0.995 at 20 %, 0.975 at 40 %, 0.875 at 60 %
KL = {0.9: 0.01, 0.7: 0.05, 0.5: 0.2}


def _exact(task, rule, value, i):
    """Every document scores SCORE (top_k one point sooner) with the same answer; KL grows, twice on top_k."""
    shifted = {None: None, 0.9: 0.7, 0.7: 0.5, 0.5: 0.5}[value] if rule == "top_k" else value
    kl = None if value is None else KL[value] * (2 if rule == "top_k" else 1)
    return DocResult(i, SCORE[shifted], {"acc": SCORE[shifted]}, answer="0", kl=kl, tokens=10)


def test_compare_headlines_the_papers_crossing_with_damage_at_matched_sparsity_beside_it(tmp_path):
    run = _methods_store(tmp_path / "run", _exact)
    paths = write_comparison([run], tmp_path / "cmp", resamples=50)
    rows = json.loads(paths[1].read_text())["targets"]["intermediate"]
    top_p, top_k = rows
    assert (top_p["method"], top_k["method"]) == ("top_p", "top_k")
    # top_p: 0.995 at 20 %, 0.975 at 40 %: 99 % is crossed a quarter of the way, at 25 %; no document
    # differs from another, so every resample gives 25 % (a zero-width interval), not censored
    c = top_p["critical_sparsity"]
    assert (c["value"], c["ci_low"], c["ci_high"]) == pytest.approx((0.25, 0.25, 0.25))
    assert c["censored"] == {"below": False, "above": False} and not c["lower_bound"]
    # top_k: 1 at 0 %, 0.975 at 20 %: crossed at 8 %, below the lowest sparsity reached: censored below
    k = top_k["critical_sparsity"]
    assert (k["value"], k["ci_low"], k["ci_high"]) == pytest.approx((0.08, 0.08, 0.08))
    assert k["censored"] == {"below": True, "above": False}
    diff = top_k["diff_to_top_p"]
    assert (diff["value"], diff["ci_low"], diff["ci_high"]) == pytest.approx((-0.17, -0.17, -0.17))
    # KL at 40 %: 0.05 on top_p, 0.10 on top_k; agreement is 1 on both: no ordering by it
    kl = {r["sparsity"]: r for r in top_k["damage_vs_top_p"]["kl"]}
    assert kl[0.4]["value"] == pytest.approx(0.05) and kl[0.4]["better"] == "top_p"
    assert all(r["better"] is None for r in top_k["damage_vs_top_p"]["agreement"])
    assert top_k["verdict"] == (
        "top_k vs top_p: top_p has the higher critical sparsity (-17.0 pts [-17.0, -17.0]); "
        "top_p is damaged less by mean KL at 25 %, 40 %, 50 %"
    )
    md = paths[0].read_text()
    assert "| target | method | critical sparsity [95 % CI] | Δ to top_p [95 % CI] | mean KL @25% |" in md
    assert "| intermediate | top_p | 25.0 % [25.0 %, 25.0 %] | – | 0.0200 |" in md
    assert "| intermediate | top_k | 8.0 % [8.0 %, 8.0 %] (censored below) | -17.0 pts [-17.0, -17.0] |" in md
    assert "gold" not in md and "low-noise" not in md
    assert (tmp_path / "cmp" / "compare_intermediate.png").stat().st_size > 0


def _noisy(task, rule, value, i):
    """0/1 answers that fall with sparsity (top_k a copy of top_p, wina_top_p its own); on `mc` the gold
    probability is the 0/1 score, `gen` (a generation task) has none."""
    rng = np.random.default_rng([len(task), i, 0 if rule == "wina_top_p" else 1])
    correct = float(rng.random() < 0.8)
    if value is not None:
        correct *= float(rng.random() > {0.9: 0.02, 0.7: 0.1, 0.5: 0.3}[value])
    return DocResult(i, correct, {"acc": correct, "p_gold": correct} if task == "mc" else {"exact_match": correct})


def test_one_resample_serves_every_method_and_every_measure(tmp_path):
    run = _methods_store(tmp_path / "run", _noisy, rules=("top_p", "top_k", "wina_top_p"), tasks=("mc", "gen"), n=40)
    methods, _ = load_methods(run)
    rows = {r["rule"]: r for r in compare(methods, resamples=200)["intermediate"]}
    # top_k is top_p on the same documents: in every resample the difference is exactly 0
    d = rows["top_k"]["diff_to_top_p"]
    assert d["value"] == d["ci_low"] == d["ci_high"] == 0.0
    for proxy in ("agreement",):
        assert all(r["value"] == r["ci_low"] == r["ci_high"] == 0.0 for r in rows["top_k"]["damage_vs_top_p"][proxy])
    wina = rows["wina_top_p"]["diff_to_top_p"]
    assert wina["ci_low"] < wina["ci_high"]  # a real interval, so the equality above says something
