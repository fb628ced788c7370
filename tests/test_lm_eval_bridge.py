"""The lm-evaluation-harness bridge: offline suite tasks, per-document results, the `actsparse` model."""

from __future__ import annotations

import json

import pytest
from tiny import tiny_lm

from actsparse.evaluate import evaluate_task
from actsparse.tasks import get_task

lm_eval = pytest.importorskip("lm_eval")

from actsparse.evaluate.lm_eval_bridge import _register, evaluate_lm_eval, lm_eval_task_exists, task_manager  # noqa: E402


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
    assert 0.2 < written["all"]["sparsity"] < 0.9
    assert out["config"]["actsparse_sparsity"] == written
    assert "acc,none" in out["results"]["actsparse_arc_easy"]
    with pytest.raises(ValueError, match="rule"):
        lm_eval.simple_evaluate(
            model="actsparse",
            model_args="pretrained=x,target=input,rule=nope,value=0.5",
            tasks=["actsparse_arc_easy"],
            task_manager=task_manager("arc_easy"),
        )
