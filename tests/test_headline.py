"""The headline is the paper's critical sparsity, on each task's own metric; the proxies (KL, agreement)
keep their own names and compare curves at matched sparsity.

Acceptance of issue 22: the critical sparsity `actsparse sweep` prints equals the paper's quantity
recomputed here from the per-document scores in results.sqlite with plain loops (the task metric per
document, points ordered by achieved sparsity pooled over every task's documents, the first crossing
interpolated, '≥' for a curve that never crosses), on a tiny model and on the real SmolLM2.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pytest
from tiny import tiny_lm

from actsparse import cli
from actsparse.analysis import (
    Criterion,
    Curve,
    analyse_curve,
    critical_sparsity,
    draw_weights,
    matched_difference,
    predicted_documents,
    summarize,
    verdict,
)
from actsparse.evaluate.results import SPARSITY_SEEN, SPARSITY_ZEROED, DocResult, TaskResult
from actsparse.study.store import PointKey, RunStore

# --- the paper's quantity, recomputed from the store with plain loops --------------------------------


def recompute(run_dir: Path) -> dict[str, tuple[float, bool]]:
    """(target/rule) → (critical sparsity, lower bound), straight from results.sqlite."""
    with RunStore.open(run_dir, create=False) as store:
        tasks = store.get_meta("settings")["tasks"]
        results = {key: store.get(key) for key in store.keys()}  # noqa: SIM118
    dense = {k.task: r for k, r in results.items() if k.is_dense}
    curves: dict[str, list[tuple[float, float]]] = {}
    values = {(k.target, k.rule, k.value) for k in results if not k.is_dense}
    for target, rule, value in sorted(values):
        by_task = {t: results.get(PointKey(target, rule, value, t)) for t in tasks}
        if any(r is None for r in by_task.values()):
            continue
        ratios, zeroed, seen = [], 0.0, 0.0
        for t in tasks:
            d = {doc.doc_id: doc for doc in dense[t].docs}
            s = {doc.doc_id: doc for doc in by_task[t].docs}
            ids = sorted(set(d) & set(s))
            ratios.append(sum(s[i].score for i in ids) / sum(d[i].score for i in ids))
            zeroed += sum(s[i].metrics[SPARSITY_ZEROED] for i in ids)
            seen += sum(s[i].metrics[SPARSITY_SEEN] for i in ids)
        curves.setdefault(f"{target}/{rule}", []).append((zeroed / seen, sum(ratios) / len(ratios)))
    out = {}
    for label, points in curves.items():
        points = [(0.0, 1.0), *sorted(points)]
        for (x0, p0), (x1, p1) in itertools.pairwise(points):
            if p1 < 0.99:
                out[label] = (x0 + (p0 - 0.99) / (p0 - p1) * (x1 - x0), False)
                break
        else:
            out[label] = (points[-1][0], True)
    return out


def printed(err: str) -> dict[str, tuple[float, bool]]:
    """(target/rule) → (value, lower bound) from what `actsparse sweep` printed under its headline."""
    text = err.split("critical sparsity (the paper's", 1)[1]
    found = re.findall(r"^\s+(\w+/\w+): (≥ )?([\d.]+)% \(95% CI", text, flags=re.M)
    return {label: (float(value) / 100, bool(bound)) for label, bound, value in found}


def test_sweep_prints_the_papers_critical_sparsity_on_a_tiny_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("COLUMNS", "500")
    monkeypatch.setattr("actsparse.models.loading.load_model", lambda *a, **k: tiny_lm())
    out = tmp_path / "run"
    args = ["sweep", "--model", "test/tiny", "--out", str(out), "--tasks", "arc_easy,piqa", "--limit", "16"]
    args += ["--targets", "input,intermediate", "--values", "0.95,0.7,0.3", "--resamples", "50", "--no-progress"]
    assert cli.main(args) == 0
    shown = printed(capsys.readouterr().err)
    expected = recompute(out)
    assert set(shown) == set(expected) == {"input/top_p", "intermediate/top_p"}
    for label, (value, bound) in expected.items():
        assert shown[label][0] == pytest.approx(value, abs=5e-4), label  # printed to 0.1 %
        assert shown[label][1] == bound


@pytest.mark.slow
def test_sweep_prints_the_papers_critical_sparsity_on_smollm2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("COLUMNS", "500")
    out = tmp_path / "run"
    args = ["sweep", "--out", str(out), "--tasks", "arc_easy,piqa", "--limit", "16", "--targets", "input"]
    args += ["--values", "0.95,0.8", "--resamples", "50", "--no-progress"]
    assert cli.main(args) == 0
    shown, expected = printed(capsys.readouterr().err), recompute(out)
    assert set(shown) == set(expected) == {"input/top_p"}
    assert shown["input/top_p"][0] == pytest.approx(expected["input/top_p"][0], abs=5e-4)
    assert shown["input/top_p"][1] == expected["input/top_p"][1]


def test_a_bad_criterion_is_refused_before_any_model_work(
    tmp_path: Path, capsys: pytest.CaptureFixture, no_model: None
) -> None:
    assert cli.main(["sweep", "--out", str(tmp_path / "run"), "--criterion", "gold:0.9"]) == 2
    assert "unknown criterion 'gold:0.9'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# --- synthetic stores -------------------------------------------------------------------------------

SPARSITY = {0.9: 0.2, 0.7: 0.4, 0.5: 0.6}


def _store(tmp_path, docs_of, tasks=("a", "b"), targets=("input", "intermediate"), n=60):
    """A run store whose documents come from `docs_of(task, target, value, doc_id)` (dense: target None)."""
    store = RunStore.open(tmp_path / "run")
    store.set_meta("settings", {"tasks": list(tasks), "model": "synthetic", "limit": n, "seed": 0})
    for task in tasks:
        docs = [docs_of(task, None, None, i) for i in range(n)]
        store.put(PointKey.dense(task), TaskResult(task, "validation", "acc", docs))
        for target in targets:
            for value, s in SPARSITY.items():
                docs = [docs_of(task, target, value, i) for i in range(n)]
                for d in docs:
                    d.metrics |= {SPARSITY_ZEROED: s * 100, SPARSITY_SEEN: 100.0}
                sparsity = {"all": {"sparsity": s, "per_layer": {}}}
                store.put(PointKey(target, "top_p", value, task), TaskResult(task, "validation", "acc", docs, sparsity))
    return store


def _mc(task, target, value, i):
    """Accuracy that falls with sparsity (faster on input), a gold probability that hardly moves, KL that
    grows, and answers that flip where accuracy falls."""
    rng = np.random.default_rng([sum(map(ord, task)), i])
    correct = float(rng.random() < 0.7)
    kl, answer = None, str(int(correct))
    if value is not None:
        drop = {0.9: 0.02, 0.7: 0.1, 0.5: 0.3}[value] * (1.5 if target == "input" else 1.0)
        flipped = rng.random() < drop
        correct *= float(not flipped)
        answer = "x" if flipped else answer
        kl = {0.9: 0.01, 0.7: 0.05, 0.5: 0.2}[value] * (2.0 if target == "input" else 1.0)
    return DocResult(i, correct, {"acc": correct, "p_gold": 0.3 + 0.001 * correct}, answer, kl, 10)


def test_the_headline_is_the_task_metric_whatever_the_gold_probability_does(tmp_path):
    with _store(tmp_path, _mc) as store:
        summary = summarize(store, resamples=200)
    assert not any("low_noise" in key for key in summary)
    for label in ("input/top_p", "intermediate/top_p"):
        pts = [p for p in summary["points"] if f"{p['target']}/{p['rule']}" == label]
        perf = [p["normalized"] for p in pts]
        assert summary["critical_sparsity"][label]["value"] == pytest.approx(
            critical_sparsity([p["sparsity"] for p in pts], perf).value
        )
    assert summary["critical_sparsity"]["input/top_p"]["value"] < 0.4  # accuracy has fallen by then


def test_comparisons_read_the_proxies_at_matched_sparsity(tmp_path):
    with _store(tmp_path, _mc) as store:
        summary = summarize(store, resamples=200)
    (comparison,) = summary["comparisons"]
    assert (comparison["first"], comparison["second"]) == ("intermediate/top_p", "input/top_p")
    kl = {r["sparsity"]: r for r in comparison["damage"]["kl"]}
    # KL per point is 0.01/0.05/0.2 at 20/40/60 % on intermediate, twice that on input: at 25 % it is
    # interpolated between 20 and 40 % on both curves
    assert kl[0.25]["value"] == pytest.approx((0.01 + 0.25 * 0.04) - (0.02 + 0.25 * 0.08))
    assert kl[0.4]["ci_high"] < 0 and kl[0.4]["better"] == "intermediate/top_p"
    assert "intermediate/top_p is damaged less by mean KL" in comparison["verdict"]


def test_a_criterion_is_named_after_its_measure_and_crosses_where_it_should(tmp_path):
    with _store(tmp_path, _mc, targets=("intermediate",)) as store:
        summary = summarize(store, resamples=100, criterion=Criterion.parse("kl:0.03"))
    extra = summary["criterion"]
    assert extra["name"] == "sparsity at mean KL ≤ 0.03" and extra["text"] == "kl:0.03"
    # KL 0.01 at 20 %, 0.05 at 40 %: 0.03 is crossed half way
    assert extra["crossing"]["intermediate/top_p"]["value"] == pytest.approx(0.3)
    assert Criterion.parse("agreement").threshold == 0.99 and not Criterion.parse("kl").higher_is_better
    with pytest.raises(ValueError, match="unknown criterion"):
        Criterion.parse("p_gold:0.9")


def test_matched_difference_and_verdict_on_hand_made_curves():
    n = 50
    ones = np.ones(n)

    def curve(target, levels):
        scores = np.stack([np.full(n, v) for v in levels])
        return Curve(target, "top_p", [0.9, 0.5], np.array([0.2, 0.6]), {"a": np.array([0.2, 0.6])},
                     {"a": ones}, {"a": scores}, criterion=Criterion("agreement", 0.99))  # fmt: skip

    a, b = curve("intermediate", [0.98, 0.9]), curve("input", [0.9, 0.5])
    rows = matched_difference(a, b, draw_weights({"a": n}, 50, 0), at=(0.4, 0.7))
    assert [r["sparsity"] for r in rows] == [0.4]  # 70 % is beyond both curves: never extrapolated
    assert rows[0]["value"] == pytest.approx(0.94 - 0.7)
    assert rows[0]["better"] == "intermediate/top_p"
    line = verdict("intermediate/top_p", "input/top_p", None, {"agreement": rows})
    assert line == "intermediate/top_p vs input/top_p: intermediate/top_p is damaged less by agreement at 40 %"

    # two curves of one target and rule (two dtypes, runs or allocations) are told apart by their names
    low, high = curve("input", [0.98, 0.9]), curve("input", [0.9, 0.5])
    rows = matched_difference(high, low, draw_weights({"a": n}, 50, 0), at=(0.4,), names=("bfloat16", "float32"))
    assert rows[0]["better"] == "float32"
    line = verdict("bfloat16", "float32", None, {"agreement": rows})
    assert line == "bfloat16 vs float32: float32 is damaged less by agreement at 40 %"


def _bpb(task, target, value, i):
    """Bits per byte growing with sparsity (the contract of bits-per-byte tasks: metrics["bpb"])."""
    base = 1.0 + 0.01 * (i % 7)
    factor = 1.0 if value is None else {0.9: 1.005, 0.7: 1.02, 0.5: 1.1}[value]
    return DocResult(i, 1 / (base * factor), {"bpb": base * factor})


def test_bits_per_byte_tasks_are_normalised_as_dense_over_sparse(tmp_path):
    with _store(tmp_path, _bpb, tasks=("code",), targets=("input",), n=20) as store:
        summary = summarize(store, resamples=100)
    by_value = {p["value"]: p for p in summary["points"]}
    for value, factor in ((0.9, 1.005), (0.7, 1.02), (0.5, 1.1)):
        assert by_value[value]["normalized"] == pytest.approx(1 / factor)
    # 1/1.005 = 0.995 at 20 %, 1/1.02 = 0.9804 at 40 %: the crossing is interpolated between them
    expected = critical_sparsity([0.2, 0.4, 0.6], [1 / 1.005, 1 / 1.02, 1 / 1.1]).value
    crit = summary["critical_sparsity"]["input/top_p"]
    assert crit["value"] == pytest.approx(expected)
    assert crit["ci_low"] == pytest.approx(expected) and crit["ci_high"] == pytest.approx(expected)  # no noise


def _curve_with_counts(n: int, spread: float, seed: int = 0) -> Curve:
    rng = np.random.default_rng(seed)
    sparsity = np.array([0.2, 0.4, 0.6])
    dense = (rng.random(n) < 0.7).astype(float)
    scores = np.stack([dense * (rng.random(n) > d) for d in (0.0, 0.03, 0.2)])
    seen = rng.integers(50, 150, size=n).astype(float)
    per_doc = np.clip(sparsity[:, None] + spread * rng.standard_normal((3, n)), 0, 1)
    zeroed = per_doc * seen
    pooled = zeroed.sum(1) / seen.sum()
    curve = Curve("input", "top_p", [0.9, 0.7, 0.5], pooled, {"a": pooled}, {"a": dense}, {"a": scores})
    curve.doc_counts = {"a": (zeroed, np.broadcast_to(seen, zeroed.shape).copy())}
    return curve


def test_resampling_the_sparsity_axis_widens_the_interval_only_when_documents_differ():
    same = analyse_curve(_curve_with_counts(200, 0.0), resamples=300)
    assert same.ci == pytest.approx(same.ci_fixed_sparsity)  # every document at its point's sparsity
    varied = analyse_curve(_curve_with_counts(200, 0.15), resamples=300)
    assert varied.ci != pytest.approx(varied.ci_fixed_sparsity)
    assert varied.ci[0] <= varied.critical.value <= varied.ci[1]


def test_power_predicts_more_documents_for_a_tighter_interval():
    curve = _curve_with_counts(200, 0.0)
    analysis = analyse_curve(curve, resamples=300)
    assert analysis.half_width > 0.02
    needed = predicted_documents(curve, 0.02, resamples=300)
    assert needed is not None and needed > 200
    wider = predicted_documents(curve, 2 * analysis.half_width, resamples=300)
    assert wider == 200  # already there
    # the prediction is about the documents' distribution: four copies of them predict the same count
    copies = Curve(
        "input", "top_p", curve.params, curve.sparsity, curve.task_sparsity,
        {"a": np.tile(curve.dense["a"], 4)}, {"a": np.tile(curve.scores["a"], 4)},
    )  # fmt: skip
    assert predicted_documents(copies, 0.02, resamples=300) == pytest.approx(needed, rel=0.35)
