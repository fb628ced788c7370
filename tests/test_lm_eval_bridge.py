"""The lm-evaluation-harness bridge: offline suite tasks, per-document results, the `actsparse` model."""

from __future__ import annotations

import json

import pytest
from tiny import tiny_lm

from actsparse import SparsitySpec, sparsify
from actsparse.evaluate import evaluate_task
from actsparse.tasks import get_task

lm_eval = pytest.importorskip("lm_eval")

from actsparse.evaluate.lm_eval_bridge import (  # noqa: E402
    _register,
    evaluate_lm_eval,
    lm_eval_task_exists,
    real_lengths,
    task_manager,
)


def short_docs(name: str, n: int, limit: int = 110) -> list[int]:
    """Documents whose longest pair fits the tiny models' 128 positions under the char tokenizer."""
    task = get_task(name)
    ids = [d for d in range(len(task)) if max(len(c + x) for c, x in task.request(d).pairs()) < limit]
    return ids[:n]


def test_suite_tasks_are_known_offline():
    assert lm_eval_task_exists("arc_easy") and lm_eval_task_exists("lambada")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["arc_easy", "winogrande"])
def test_lm_eval_backend_gives_the_same_per_document_results(name):
    model, tokenizer = tiny_lm("llama")
    ids = short_docs(name, 4)
    theirs = evaluate_lm_eval(model, tokenizer, name, ids, batch_size=4)
    ours, _ = evaluate_task(model, tokenizer, name, ids)
    assert (theirs.task, theirs.split, theirs.metric) == (ours.task, ours.split, ours.metric)
    assert [d.doc_id for d in theirs.docs] == ids
    assert [d.metrics for d in theirs.docs] == [{k: d.metrics[k] for k in theirs.docs[0].metrics} for d in ours.docs]


@pytest.mark.slow
def test_registered_actsparse_model_sparsifies_and_reports(tmp_path):
    """`--model actsparse --model_args ...` as lm-eval's CLI builds it (the CLI itself: see main())."""
    model, tokenizer = tiny_lm("llama")
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    stats = tmp_path / "sparsity.json"
    _register()
    out = lm_eval.simple_evaluate(
        model="actsparse",
        model_args=f"pretrained={tmp_path / 'model'},target=input,rule=top_p,value=0.5,stats_path={stats}",
        tasks=["actsparse_arc_easy"],
        task_manager=task_manager("arc_easy"),
        samples={"actsparse_arc_easy": short_docs("arc_easy", 2)},
        device="cuda",  # the CLI's default: falls back to the CPU
    )
    written = json.loads(stats.read_text())
    model, tokenizer = tiny_lm("llama")  # the same model, scored one request at a time: no padding at all
    with sparsify(model, SparsitySpec("input", "top_p", 0.5)) as alone:
        evaluate_lm_eval(model, tokenizer, "arc_easy", short_docs("arc_easy", 2), batch_size=1)
    assert written == alone.to_dict()
    assert out["config"]["actsparse_sparsity"] == written
    assert "acc,none" in out["results"]["actsparse_arc_easy"]
    with pytest.raises(ValueError, match="rule"):
        lm_eval.simple_evaluate(
            model="actsparse",
            model_args="pretrained=x,target=input,rule=nope,value=0.5",
            tasks=["actsparse_arc_easy"],
            task_manager=task_manager("arc_easy"),
        )


def test_padding_of_lm_eval_batches_is_not_counted():
    """HFLM right-pads its batches and passes no mask: the bridge rebuilds it, so counts do not depend
    on the batch size (batch 1 has no padding at all)."""
    model, tokenizer = tiny_lm("llama")
    ids = short_docs("arc_easy", 3)
    counts = {}
    for batch_size in (1, 5):
        with sparsify(model, SparsitySpec("all_inputs", "top_p", 0.7)) as stats:
            evaluate_lm_eval(model, tokenizer, "arc_easy", ids, batch_size=batch_size)
        counts[batch_size] = stats.counts()
    assert counts[1] == counts[5]


def test_real_lengths_of_right_padded_rows():
    known = {(5, 6, 7), (5, 6), (8, 0), (8,)}
    assert real_lengths([[5, 6, 7, 0], [5, 6, 0, 0]], known) == [3, 2]
    with pytest.raises(ValueError, match="real tokens"):
        real_lengths([[8, 0, 0]], known)  # (8,) and (8, 0) both fit
    with pytest.raises(ValueError, match="real tokens"):
        real_lengths([[9, 0]], known)
