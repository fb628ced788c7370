"""The low-noise measures (gold probability, bits per byte) and per-document sparsity counts."""

from __future__ import annotations

import math

import pytest
from tiny import tiny_lm, tiny_task

from actsparse import sparsify
from actsparse.evaluate import evaluate_task
from actsparse.evaluate.metrics import bits_per_byte, choice_metrics, gold_probability
from actsparse.evaluate.results import SPARSITY_SEEN, SPARSITY_ZEROED
from actsparse.sparsity.spec import SparsitySpec


@pytest.mark.parametrize("normalized", [False, True])
@pytest.mark.parametrize("gold", [0, 1, 2])
def test_gold_probability_equals_accuracy_when_one_choice_has_all_the_mass(gold, normalized):
    choices = [" a", " bb", " ccc"]
    for winner in range(3):
        lls = [0.0 if i == winner else -math.inf for i in range(3)]
        metrics, _, _ = choice_metrics(lls, choices, gold)
        p = gold_probability(lls, choices, gold, normalized)
        assert p == metrics["acc_norm" if normalized else "acc"]


def test_gold_probability_is_a_softmax_with_acc_norm_length_normalisation():
    lls, choices = [-2.0, -3.0], [" ab", " abcdef"]  # per character: -2/3 and -3/7
    assert gold_probability(lls, choices, 0) == pytest.approx(math.exp(-2) / (math.exp(-2) + math.exp(-3)))
    a, b = math.exp(-2 / 3), math.exp(-3 / 7)
    assert gold_probability(lls, choices, 0, normalized=True) == pytest.approx(a / (a + b))
    assert gold_probability(lls, choices, 1, normalized=True) == pytest.approx(b / (a + b))


def test_bits_per_byte_on_hand_computed_values():
    assert bits_per_byte(math.log(2) * 12, "abcdef") == pytest.approx(2.0)  # 12 bits over 6 bytes
    assert bits_per_byte(math.log(2) * 3, "é") == pytest.approx(1.5)  # 2 UTF-8 bytes
    assert math.isnan(bits_per_byte(1.0, ""))


@pytest.mark.parametrize("kind", ["multiple_choice", "lambada"])
def test_documents_carry_the_gold_probability(kind):
    model, tokenizer = tiny_lm("llama")
    task = tiny_task(n_docs=6, kind=kind, seed=3)
    result, _ = evaluate_task(model, tokenizer, task, batch_size=4)
    for doc in result.docs:
        assert 0.0 < doc.metrics["p_gold"] <= 1.0
        assert SPARSITY_ZEROED not in doc.metrics  # dense: nothing counted


@pytest.mark.parametrize("family", ["llama", "qwen2_moe", "gemma3_text"])
@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("kind", ["multiple_choice", "lambada"])
def test_per_document_sparsity_counts_add_up_to_the_runs_counts(family, packing, kind):
    model, tokenizer = tiny_lm(family)
    task = tiny_task(n_docs=7, kind=kind, seed=4)
    _, reference = evaluate_task(model, tokenizer, task, batch_size=3, packing=packing)
    with sparsify(model, SparsitySpec("all_inputs", "top_p", 0.7)) as stats:
        result, _ = evaluate_task(model, tokenizer, task, reference=reference, batch_size=3, packing=packing)
    zeroed = sum(d.metrics[SPARSITY_ZEROED] for d in result.docs)
    seen = sum(d.metrics[SPARSITY_SEEN] for d in result.docs)
    assert seen == stats.tokens_seen()
    assert zeroed / seen == pytest.approx(stats.overall(), abs=1e-12)
    assert len({d.metrics[SPARSITY_SEEN] for d in result.docs}) > 1  # each document its own tokens


# --- analysis on synthetic stores --------------------------------------------------------------------

import numpy as np  # noqa: E402

from actsparse.analysis import (  # noqa: E402
    Curve,
    analyse_curve,
    critical_sparsity,
    predicted_documents,
    summarize,
)
from actsparse.evaluate.results import DocResult, TaskResult  # noqa: E402
from actsparse.study.store import PointKey, RunStore  # noqa: E402

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
                sparsity = {"all": {"sparsity": s, "per_layer": {}}}
                store.put(PointKey(target, "top_p", value, task), TaskResult(task, "validation", "acc", docs, sparsity))
    return store


def _mc(task, target, value, i):
    """Accuracy and gold probability that fall with sparsity; p_gold is 0/1 like the score."""
    rng = np.random.default_rng([hash(task) % 1000, i])
    correct = float(rng.random() < 0.7)
    if value is not None:
        drop = {0.9: 0.02, 0.7: 0.1, 0.5: 0.3}[value] * (1.5 if target == "input" else 1.0)
        correct *= float(rng.random() > drop)
    return DocResult(i, correct, {"acc": correct, "p_gold": correct})


def test_the_low_noise_measure_shares_the_accuracy_bootstrap(tmp_path):
    """p_gold equal to the 0/1 score: the same curve, so the same estimate and the same interval."""
    with _store(tmp_path, _mc) as store:
        summary = summarize(store, resamples=200)
    assert summary["low_noise_metrics"] == {"a": "p_gold", "b": "p_gold"}
    assert summary["critical_sparsity_low_noise"] == summary["critical_sparsity"]
    for p in summary["points"]:
        assert p["normalized_low_noise"] == pytest.approx(p["normalized"])
    diff = summary["paired_differences"]["intermediate − input (top_p)"]
    assert diff["low_noise"] == diff["accuracy"]
    acc = summary["critical_sparsity"]
    assert diff["accuracy"]["value"] == pytest.approx(acc["intermediate/top_p"]["value"] - acc["input/top_p"]["value"])
    assert diff["accuracy"]["ci_low"] <= diff["accuracy"]["value"] <= diff["accuracy"]["ci_high"]


def _bpb(task, target, value, i):
    """Bits per byte growing with sparsity (the contract of bits-per-byte tasks: metrics["bpb"])."""
    base = 1.0 + 0.01 * (i % 7)
    factor = 1.0 if value is None else {0.9: 1.005, 0.7: 1.02, 0.5: 1.1}[value]
    return DocResult(i, 0.0, {"bpb": base * factor})


def test_bits_per_byte_tasks_are_normalised_as_dense_over_sparse(tmp_path):
    with _store(tmp_path, _bpb, tasks=("code",), targets=("input",), n=20) as store:
        summary = summarize(store, resamples=100)
    assert summary["low_noise_metrics"] == {"code": "bpb"}
    by_value = {p["value"]: p for p in summary["points"]}
    for value, factor in ((0.9, 1.005), (0.7, 1.02), (0.5, 1.1)):
        assert by_value[value]["normalized_low_noise"] == pytest.approx(1 / factor)
    # 1/1.005 = 0.995 at 20 %, 1/1.02 = 0.9804 at 40 %: the crossing is interpolated between them
    expected = critical_sparsity([0.2, 0.4, 0.6], [1 / 1.005, 1 / 1.02, 1 / 1.1]).value
    crit = summary["critical_sparsity_low_noise"]["input/top_p"]
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
