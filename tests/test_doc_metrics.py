"""Per-document metrics the scorer stores: the gold probability, bits per byte and each document's sparsity counts."""

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
