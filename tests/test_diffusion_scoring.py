"""Diffusion scoring: online step statistics equal offline ones, the Monte-Carlo estimator and the
unmasking loop on denoisers with known answers, paired KL, and a sweep + report on a tiny LLaDA."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import tiny_lm, tiny_sweep_config, tiny_task, tiny_tokenizer
from tiny_diffusion import MASK_ID, tiny_llada

from actsparse import SparsitySpec, sparsify
from actsparse.diffusion import Denoiser, DiffusionOptions, evaluate_diffusion_task, generate, mc_loglikelihood
from actsparse.evaluate import DenseReference, evaluate_task
from actsparse.sparsity.stats import StepStats
from actsparse.tasks import task_from_requests


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 2**12 - 1), min_size=2, max_size=6), st.booleans())
def test_online_jaccard_equals_offline(masks: list[int], expert: bool) -> None:
    keeps = [torch.tensor([(m >> i) & 1 for i in range(12)], dtype=torch.bool).view(3, 4) for m in masks]
    stats = StepStats()
    for step, keep in enumerate(keeps):
        stats.record(step, 0, "input", keep, 1 if expert else None)
    sparsity = stats.sparsity()
    for step, keep in enumerate(keeps):
        assert sparsity[step] == pytest.approx(float((~keep).float().mean()))
    if expert:  # routed experts: sparsity only
        assert stats.jaccard() == {}
        return

    def jaccard(a: torch.Tensor, b: torch.Tensor) -> float | None:
        union = int((a | b).sum())
        return int((a & b).sum()) / union if union else None

    for against, other in (("previous", lambda s: keeps[s - 1]), ("first", lambda s: keeps[0])):
        online = stats.jaccard(against)
        for step in range(1, len(keeps)):
            expected = jaccard(keeps[step], other(step))
            assert online.get(step) == (pytest.approx(expected) if expected is not None else None)
    stats.new_trajectory()
    stats.record(9, 0, "input", keeps[0], None)  # a new trajectory: no comparison for its first step
    assert 9 not in stats.jaccard()


class _Fixed(Denoiser):
    """A denoiser whose logits do not depend on its input: `table` [L, V] for every row."""

    def __init__(self, table: torch.Tensor):
        super().__init__(torch.nn.Linear(1, 1))
        self.table, self.calls = table, []

    def noise_tokens(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.full((n,), 99, dtype=torch.long)

    def encode(self, prompts, prompt_mask):
        return None

    def predict(self, state, canvas, canvas_mask, previous=None):
        self.calls.append(canvas.clone())
        return self.table[: canvas.shape[1]].expand(canvas.shape[0], -1, -1).clone()


def test_monte_carlo_estimate_is_exact_when_every_token_has_the_same_log_prob() -> None:
    denoiser = _Fixed(torch.zeros(4, 8))  # uniform over 8 tokens: each noised token contributes -log 8
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    lls, scored = mc_loglikelihood(denoiser, [[1], [1, 2]], [[3, 4, 5], [6]], gens, samples=5, pad=0)
    assert lls == pytest.approx([-3 * math.log(8), -math.log(8)])
    assert sum(s.shape[0] for s in scored) == sum(int((c == 99).sum()) for c in denoiser.calls)
    assert all(((c == 99).sum(-1) >= 1).all() for c in denoiser.calls)  # every sample noises ≥ 1 token


def test_monte_carlo_estimate_is_seeded_and_unbiased() -> None:
    table = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    answer = [2, 5, 7]
    exact = float(table.log_softmax(-1)[torch.arange(3), torch.tensor(answer)].sum())

    def estimate(seed: int, samples: int) -> float:
        lls, _ = mc_loglikelihood(_Fixed(table), [[1]], [answer], [torch.Generator().manual_seed(seed)], samples, 0)
        return lls[0]

    assert estimate(3, 4) == estimate(3, 4)
    assert estimate(3, 4) != estimate(4, 4)
    assert estimate(0, 4000) == pytest.approx(exact, rel=0.03)


def test_unmasking_commits_the_most_confident_tokens_block_by_block() -> None:
    target = torch.tensor([3, 1, 4, 1, 5, 2])
    confidence = torch.tensor([1.0, 5.0, 2.0, 9.0, 3.0, 4.0])
    table = torch.zeros(6, 8)  # confidence (softmax max) grows with the target logit
    table[torch.arange(6), target] = confidence
    denoiser = _Fixed(table)
    tokens, first = generate(denoiser, [[1]], [torch.Generator()], length=6, steps=6, block_length=3, pad=0)
    assert tokens[0] == target.tolist()
    assert len(denoiser.calls) == 6 and first.shape == (1, 6, 8)
    committed = [(c[0] != 99).nonzero().flatten().tolist() for c in denoiser.calls[1:]]
    assert committed[:3] == [[1], [1, 2], [0, 1, 2]]  # first block, most confident first; then the second
    assert committed[3] == [0, 1, 2, 3]


def test_evaluate_task_dispatches_and_kl_is_paired() -> None:
    model, tokenizer = tiny_llada(), tiny_tokenizer()
    options = DiffusionOptions(mc_samples=3, gen_length=4, steps=4, block_length=4)
    for kind in ("multiple_choice", "lambada", "generate"):
        task = tiny_task("t", 3, kind=kind)
        dense, reference = evaluate_task(model, tokenizer, task, batch_size=2)
        direct, _ = evaluate_diffusion_task(model, tokenizer, task, batch_size=2)
        assert [d.score for d in dense.docs] == [d.score for d in direct.docs]
        again, _ = evaluate_diffusion_task(model, tokenizer, task, reference=reference, batch_size=3)
        assert all(d.kl == pytest.approx(0.0, abs=1e-6) for d in again.docs), kind  # batching changes nothing
        reference_o = evaluate_diffusion_task(model, tokenizer, task, options=options)[1]
        with sparsify(model, SparsitySpec("intermediate", "top_p", 0.5)) as stats:
            sparse, _ = evaluate_diffusion_task(model, tokenizer, task, reference=reference_o, options=options)
        assert all(d.kl is not None and d.kl > 0 for d in sparse.docs), kind
        assert stats.to_dict()["steps"]["sparsity"]


def test_both_scorers_check_documents_and_the_reference_alike() -> None:
    """One check of the document ids and of the dense reference, whichever scorer `evaluate_task` picks."""
    task = tiny_task("t", 3)
    for model, tokenizer in (tiny_lm(), (tiny_llada(), tiny_tokenizer())):
        with pytest.raises(ValueError, match=r"document ids must lie in \[0, 3\) for task 't'"):
            evaluate_task(model, tokenizer, task, [0, 3])
        with pytest.raises(ValueError, match="the dense reference is for task 'other', not 't'"):
            evaluate_task(model, tokenizer, task, reference=DenseReference("other", 32))
        empty = DenseReference("t", 32, topk={d: (torch.zeros(0, 32), torch.zeros(0, 32)) for d in range(3)})
        with pytest.raises(ValueError, match=r"document 0: \d+ scored positions, the reference has 0 \(another"):
            evaluate_task(model, tokenizer, task, reference=empty)
        with pytest.raises(ValueError, match=r"the dense reference lacks documents \[0, 1, 2\]$"):
            evaluate_task(model, tokenizer, task, reference=DenseReference("t", 32))
    many = task_from_requests("m", [task.request(0)] * 7)
    with pytest.raises(ValueError, match=r"lacks documents \[0, 1, 2, 3, 4\]…"):
        evaluate_task(tiny_llada(), tiny_tokenizer(), many, reference=DenseReference("m", 32))


def test_sweep_and_report_draw_the_step_figures(tmp_path: Path) -> None:
    from actsparse.report import write_report
    from actsparse.study.sweep import run_sweep

    model, tokenizer = tiny_llada(), tiny_tokenizer()
    tasks = [tiny_task("mc", 6), tiny_task("lam", 4, kind="lambada", seed=1)]
    config = tiny_sweep_config(tmp_path, model="tiny-llada", values=[0.9, 0.5], tasks=tasks, limit=None, resamples=20)
    summary = run_sweep(config, model, tokenizer, show_progress=False)
    assert {(p["target"], p["value"]) for p in summary["points"]} == {
        (t, v) for t in ("input", "intermediate") for v in (0.9, 0.5)
    }
    paths = {p.name for p in write_report(tmp_path, resamples=20)}
    assert {"performance.png", "step_sparsity.png", "step_stability.png", "report.html"} <= paths
    assert "(step_stability.png)" in (tmp_path / "report.md").read_text()
    stored = summary["points"][0]
    assert stored["sparsity"] > 0
    assert model.config.mask_token_id == MASK_ID


def test_sweep_passes_diffusion_options_and_binds_them_to_the_run(tmp_path: Path, monkeypatch) -> None:
    import actsparse.diffusion.scoring as scoring
    from actsparse.cli import main
    from actsparse.study.store import StoreError
    from actsparse.study.sweep import SweepConfig, run_sweep

    seen: list[int] = []
    original = scoring.mc_loglikelihood

    def spy(denoiser, prompts, answers, generators, samples, *rest):
        seen.append(samples)
        return original(denoiser, prompts, answers, generators, samples, *rest)

    monkeypatch.setattr(scoring, "mc_loglikelihood", spy)
    model, tokenizer = tiny_llada(), tiny_tokenizer()
    options = DiffusionOptions(mc_samples=3, steps=4, gen_length=4, block_length=2)
    common = dict(model="tiny-llada", targets=["input"], values=[0.9], tasks=[tiny_task("mc", 3)], limit=None)
    config = SweepConfig(out=tmp_path, resamples=10, diffusion=options, **common)
    summary = run_sweep(config, model, tokenizer, show_progress=False)
    assert summary["points"] and seen and set(seen) == {3}  # every likelihood took the sweep's sample count
    other = SweepConfig(out=tmp_path, resamples=10, diffusion=DiffusionOptions(mc_samples=5), **common)
    with pytest.raises(StoreError, match="diffusion"):  # a folder keeps one setting, so its points compare
        run_sweep(other, model, tokenizer, show_progress=False)
    assert main(["sweep", "--out", str(tmp_path / "bad"), "--mc-samples", "0"]) == 2  # before any model work
