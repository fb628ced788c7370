"""Batching by a token budget, and out-of-memory simulated on CPU: the batch is halved and retried, so
every document is scored once, with the scores and the sparsity statistics of a run that never ran out."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny import tiny_lm, tiny_sweep_config, tiny_task

from actsparse import SparsitySpec, sparsify
from actsparse.evaluate import evaluate_task
from actsparse.evaluate.budget import Budget, OutOfMemory, auto_budget, bytes_per_token
from actsparse.study.store import RunStore
from actsparse.study.sweep import plan, run_sweep


class FakeOOM:
    """A pre-hook on one decoder layer that raises OutOfMemoryError when a forward holds more than
    `limit` tokens (padding included): mid-forward, after the layers before it have run and counted."""

    def __init__(self, model, limit: int, layer: int = 1):
        self.limit, self.raised, self.sizes = limit, 0, []
        self.handle = model.model.layers[layer].register_forward_pre_hook(self)

    def __call__(self, module, args) -> None:
        tokens = args[0].shape[0] * args[0].shape[1]
        self.sizes.append(tokens)
        if tokens > self.limit:
            self.raised += 1
            raise torch.OutOfMemoryError(f"simulated: {tokens} tokens > {self.limit}")

    def remove(self) -> None:
        self.handle.remove()


def _results(result):
    """Per document: what must be equal whatever the batching, and the gold probability apart: it is a softmax
    of log-likelihoods, whose float32 log-likelihoods round with the batch's shapes (~1e-6 in log space)."""
    rows = []
    for d in result.docs:
        exact = {k: v for k, v in d.metrics.items() if k != "p_gold"}
        rows.append((d.doc_id, d.score, exact, d.answer, d.kl, d.tokens, d.metrics.get("p_gold")))
    return rows


def _assert_same(got, expected):
    for a, b in zip(got, expected, strict=True):
        assert a[:4] == b[:4] and a[5] == b[5]
        assert a[4] == pytest.approx(b[4], abs=1e-6) if b[4] is not None else a[4] is None
        assert a[6] == pytest.approx(b[6], rel=1e-5, abs=1e-12) if b[6] is not None else a[6] is None


@pytest.mark.parametrize("kind", ["multiple_choice", "lambada", "generate"])
@pytest.mark.parametrize("packing", [True, False])
def test_simulated_out_of_memory_loses_no_document(kind: str, packing: bool) -> None:
    model, tokenizer = tiny_lm()
    task = tiny_task("t", 24, kind=kind, seed=2)
    spec = SparsitySpec("all_inputs", "top_p", 0.8)
    dense, reference = evaluate_task(model, tokenizer, task, packing=packing)
    with sparsify(model, spec) as stats:
        sparse, _ = evaluate_task(model, tokenizer, task, reference=reference, packing=packing)
    expected_stats = stats.to_dict()
    fake = FakeOOM(model, limit=200)
    try:
        seen: list[int] = []
        dense_oom, reference_oom = evaluate_task(model, tokenizer, task, packing=packing, progress=seen.append)
        with sparsify(model, spec) as stats:
            sparse_oom, _ = evaluate_task(model, tokenizer, task, reference=reference_oom, packing=packing)
    finally:
        fake.remove()
    assert fake.raised > 0, "the budget of 4096 tokens must overflow the fake device"
    assert max(s for s in fake.sizes if s <= 200) <= 200
    assert sum(seen) == len(task), "every document is reported once, after its batch succeeded"
    _assert_same(_results(dense_oom), _results(dense))
    _assert_same(_results(sparse_oom), _results(sparse))
    assert stats.to_dict() == expected_stats, "tokens of a failed forward are not counted twice"


def test_simulated_out_of_memory_loses_no_point_of_a_sweep(tmp_path: Path) -> None:
    model, tokenizer = tiny_lm()
    clean = run_sweep(tiny_sweep_config(tmp_path / "clean"), model, tokenizer, show_progress=False)
    fake = FakeOOM(model, limit=200)
    try:
        config = tiny_sweep_config(tmp_path / "oom", batch_size=None)
        oom = run_sweep(config, model, tokenizer, show_progress=False)
    finally:
        fake.remove()
    assert fake.raised > 0
    with RunStore.open(tmp_path / "oom") as store:
        assert store.keys() == set(plan(config))
        assert all(len(r.docs) == (10 if k.task == "mc" else 8) for k, r in store.items())
    assert oom["dense"] == clean["dense"]
    for a, b in zip(oom["points"], clean["points"], strict=True):
        assert a["scores"] == b["scores"] and a["sparsity"] == pytest.approx(b["sparsity"], abs=1e-12)


def test_out_of_memory_at_the_smallest_budget_is_an_error() -> None:
    model, tokenizer = tiny_lm()
    fake = FakeOOM(model, limit=0)
    try:
        with pytest.raises(ValueError, match="out of memory even with a budget of 16 tokens"):
            evaluate_task(model, tokenizer, tiny_task("t", 3), batch_tokens=64)
    finally:
        fake.remove()
    assert OutOfMemory is torch.OutOfMemoryError
    assert Budget(33, 10).halved() == Budget(16, 5)


def test_token_budget_sets_the_forwards_and_cpu_default() -> None:
    model, tokenizer = tiny_lm()
    assert auto_budget(model) == Budget()  # CPU: 4096 tokens
    assert bytes_per_token(model.to(torch.bfloat16)) * 2 == bytes_per_token(model.float())
    task = tiny_task("t", 30, seed=4)
    sizes: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, a, k: sizes.append(k["input_ids"].numel()), with_kwargs=True)
    try:
        small, _ = evaluate_task(model, tokenizer, task, batch_tokens=64)
        n_small = len(sizes)
        sizes.clear()
        large, _ = evaluate_task(model, tokenizer, task)
    finally:
        handle.remove()
    assert n_small > len(sizes) and _results(small) == _results(large)
