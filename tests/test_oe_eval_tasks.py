"""Tasks from oe-eval's files: bits per byte, gsm8k's answer extraction, code pass@1, and the sandbox."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from tiny import tiny_lm

from actsparse.evaluate import evaluate_task
from actsparse.evaluate.bpb import bits_per_byte, gold_metrics
from actsparse.tasks import EXTRA_TASK_NAMES, Generation, GoldLikelihood, get_task, task_from_requests
from actsparse.tasks.oe_eval import gsm8k_check, gsm8k_extract, humaneval_program, mbpp_program
from actsparse.tasks.sandbox import run_program


def test_bits_per_byte_by_hand():
    # 12 bits of NLL over "héllo" (6 UTF-8 bytes: é takes two) = 2 bits per byte
    assert bits_per_byte(-12 * math.log(2), "héllo") == pytest.approx(2.0)
    m = gold_metrics(-3 * math.log(2), "abc")
    assert m == pytest.approx({"bpb": 1.0, "inv_bpb": 1.0, "nll_bits": 3.0, "bytes": 3.0})
    with pytest.raises(ValueError, match="non-empty"):
        bits_per_byte(-1.0, "")


@pytest.mark.parametrize(
    "name, size, metric, kind",
    [
        ("gsm8k", 1319, "exact_match", "generate"),
        ("gsm8k_bpb", 1319, "inv_bpb", "bpb"),
        ("humaneval", 164, "pass@1", "generate"),
        ("humaneval_bpb", 164, "inv_bpb", "bpb"),
        ("mbpp", 500, "pass@1", "generate"),
        ("mbpp_bpb", 500, "inv_bpb", "bpb"),
        ("minerva_math_bpb", 500, "inv_bpb", "bpb"),
    ],
)
def test_oe_eval_tasks_load_offline(name, size, metric, kind):
    task = get_task(name)
    assert (len(task), task.metric, task.kind, task.split) == (size, metric, kind, "test")
    assert name in EXTRA_TASK_NAMES


def test_gsm8k_requests_follow_oe_eval():
    gen, gold = get_task("gsm8k").request(0), get_task("gsm8k_bpb").request(0)
    assert isinstance(gen, Generation) and isinstance(gold, GoldLikelihood)
    assert gen.prompt == gold.context and gen.prompt.endswith(
        "How much in dollars does she make every day at the farmers' market?\nAnswer:"
    )
    assert gen.prompt.count("Question:") == 9  # 8 shots and the question
    assert gen.until == ("Question:", "</s>", "<|im_end|>", "\n\n") and gen.max_tokens == 512
    assert gold.continuation.endswith("So the answer is 18.")
    assert gen.check(gold.continuation) == {"exact_match": 1.0}  # the gold CoT extracts to the gold answer


@pytest.mark.parametrize(
    "text, answer, expected",
    [
        (" She pays 1,234 dollars. So the answer is 1,234.", "1234", 1.0),
        (" 3 + 4 = 7. So the answer is 7.", "7", 1.0),
        (" 3 + 4 = 7. So the answer is 8.", "7", 0.0),  # the last number counts
        (" The answer is $18.", "18", 1.0),
        (" -5 degrees", "-5", 0.0),  # as oe-eval's regex: a sign only before a decimal point
        (" -2.5 degrees", "-2.5", 1.0),
        (" no number here", "3", 0.0),
    ],
)
def test_gsm8k_answer_extraction(text, answer, expected):
    assert gsm8k_check(text, answer) == {"exact_match": expected}


def test_gsm8k_extract_takes_the_last_number():
    assert gsm8k_extract("1 then 2.5 then 30") == "30"
    assert gsm8k_extract("nothing") == "nothing"


def test_canonical_solutions_pass_and_wrong_ones_fail():
    human = get_task("humaneval")
    for doc_id in (0, 1, 2):
        row = human.docs[doc_id]
        canonical = row["doc"]["canonical_solution"]
        assert human.request(doc_id).check(canonical) == {"pass@1": 1.0}
        assert human.request(doc_id).check("    return None\n") == {"pass@1": 0.0}
    # a completion that writes the whole function (after oe-eval's ```python prefix) redefines it
    row = human.docs[0]["doc"]
    whole = row["prompt"] + row["canonical_solution"]
    assert run_program(humaneval_program(row, whole)).passed
    mbpp = get_task("mbpp")
    for doc_id in (0, 1, 2):
        code = mbpp.docs[doc_id]["doc"]["code"]
        assert mbpp.request(doc_id).check(code) == {"pass@1": 1.0}
        assert not run_program(mbpp_program(mbpp.docs[doc_id]["doc"], "def nothing(): pass")).passed


def _nll(model, tokenizer, context: str, continuation: str) -> float:
    """Summed NLL (nats) of `continuation` after `context`, from one plain forward."""
    ctx = tokenizer.encode(context)
    whole = tokenizer.encode(context + continuation)
    with torch.no_grad():
        logp = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
    return -sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))


def test_bpb_task_scores_the_gold_continuation_by_hand():
    model, tok = tiny_lm("llama")
    pairs = [("Question: the cat?\nAnswer:", " the dog sat"), ("a b c", " big red sun."), ("x", " y")]
    task = task_from_requests("gold", [GoldLikelihood(c, t) for c, t in pairs])
    assert task.metric == "inv_bpb" and task.kind == "bpb"
    result, reference = evaluate_task(model, tok, task)
    for doc, (context, continuation) in zip(result.docs, pairs, strict=True):
        expected = _nll(model, tok, context, continuation) / math.log(2) / len(continuation.encode())
        assert doc.metrics["bpb"] == pytest.approx(expected, rel=1e-4)
        assert doc.score == pytest.approx(1 / expected, rel=1e-4)
    # sparse run against the dense reference: KL is there, and the same documents compare
    from actsparse.sparsity.instrument import sparsify
    from actsparse.sparsity.spec import SparsitySpec

    with sparsify(model, SparsitySpec("input", "top_p", 0.5)):
        sparse, _ = evaluate_task(model, tok, task, reference=reference)
    assert all(d.kl is not None and d.kl >= 0 for d in sparse.docs)
    assert any(s.metrics["bpb"] != d.metrics["bpb"] for s, d in zip(sparse.docs, result.docs, strict=True))


def test_generation_check_scores_the_cut_generation():
    model, tok = tiny_lm("llama")
    seen: list[str] = []

    def check(text: str) -> dict[str, float]:
        seen.append(text)
        return {"pass@1": float(text == seen[0])}

    task = task_from_requests("gen", [Generation("a b", (), ("\n",), 4, check=check)], metric="pass@1")
    result, _ = evaluate_task(model, tok, task)
    assert len(seen) == 1 and result.docs[0].metrics == {"pass@1": 1.0} and result.docs[0].answer == seen[0]


# --- the sandbox ------------------------------------------------------------------------------------


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") >= 0
    except FileNotFoundError:  # reaped between the two looks
        return True


def test_sandbox_runs_a_clean_program():
    out = run_program("print('hello')")
    assert out.passed and out.returncode == 0 and out.output == "hello\n"
    assert not run_program("raise SystemExit(3)").passed


def test_sandbox_kills_a_sleeper_and_its_child_and_removes_its_folder():
    program = (
        "import os, time\n"
        "child = os.fork()\n"
        "if child == 0:\n    time.sleep(60)\n"
        "print(os.getpid(), child, os.getcwd(), flush=True)\n"
        "time.sleep(60)\n"
    )
    out = run_program(program, timeout=1.0)
    assert not out.passed and out.timed_out and out.returncode is None and out.seconds < 10
    pid, child, folder = out.output.split()
    assert _gone(int(pid)) and _gone(int(child))
    assert not Path(folder).exists()


def test_sandbox_stops_unbounded_allocation():
    out = run_program("x = []\nwhile True:\n    x.append(bytearray(1 << 24))\n", memory=256 << 20)
    assert not out.passed and not out.timed_out and "MemoryError" in out.output


def test_sandbox_refuses_sockets():
    program = "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\ns.connect(('1.1.1.1', 80))\n"
    out = run_program(program)
    assert not out.passed and "network access is disabled" in out.output
    out = run_program("import _socket\n_socket.socket()\n")
    assert not out.passed and "network access is disabled" in out.output
