"""transformers' diffusion_gemma: dense MLP and packed experts of encoder and decoder are adapted (the
vision tower is not), every target and rule runs, and per-step statistics come out of generation."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_diffusion import tiny_diffusion_gemma

from actsparse import SparsitySpec, find_ffns, sparsify
from actsparse.diffusion import BlockDiffusionDenoiser, denoiser_for, denoising_steps, generate, mc_loglikelihood
from actsparse.sparsity.spec import TARGETS


@pytest.fixture(scope="module")
def model():
    return tiny_diffusion_gemma()


def test_encoder_and_decoder_ffns_are_found_and_vision_is_not(model) -> None:
    ffns = find_ffns(model)
    names = [f.name for f in ffns]
    assert not any("vision" in n for n in names)
    for stack in ("model.encoder.language_model.layers", "model.decoder.layers"):
        for layer in (0, 1):
            assert f"{stack}.{layer}.mlp" in names and f"{stack}.{layer}.experts" in names
    assert {f.adapter.name for f in ffns} == {"llama", "moe_experts"}
    assert isinstance(denoiser_for(model), BlockDiffusionDenoiser)


def _predict(model, denoiser, canvas_mask=None):
    prompts = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    prompt_mask = (prompts != 0).long()
    canvas = torch.tensor([[20, 21, 22, 23, 0, 0], [24, 25, 26, 27, 28, 29]])
    mask = canvas_mask if canvas_mask is not None else (canvas != 0).long()
    with torch.no_grad():
        return denoiser.predict(denoiser.encode(prompts, prompt_mask), canvas, mask)


def test_p_one_changes_nothing_and_padding_is_not_counted(model) -> None:
    denoiser = BlockDiffusionDenoiser(model)
    dense = _predict(model, denoiser)
    with sparsify(model, SparsitySpec("all_inputs", "top_p", 1.0)) as stats:
        same = _predict(model, denoiser)
    torch.testing.assert_close(same, dense)
    # real tokens: encoder 3 + 5, decoder 4 + 6; the dense MLP sees each once per layer (2 layers)
    dense_mlp = sum(c[2] for k, c in stats.counts().items() if k[3] is None and k[1] == "input")
    assert dense_mlp == (8 + 10) * 2 * 32
    # the unpadded row alone gives the same logits as in the padded batch
    single = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        state = denoiser.encode(single, torch.ones_like(single))
        alone = denoiser.predict(state, torch.tensor([[20, 21, 22, 23]]), torch.ones(1, 4, dtype=torch.long))
    torch.testing.assert_close(alone[0], dense[0, :4], atol=1e-4, rtol=1e-4)


RULES = {"top_p": 0.6, "top_k": 0.4, "max_p": 0.3}


@pytest.mark.parametrize("target", TARGETS)
def test_every_target_and_rule_runs_and_reports_steps(model, target: str) -> None:
    denoiser = BlockDiffusionDenoiser(model)
    specs = [SparsitySpec(target, r, v) for r, v in RULES.items()]
    specs.append(SparsitySpec(target, "threshold", {0: 0.05, 1: 0.05}))
    for spec in specs:
        with sparsify(model, spec) as stats, denoising_steps(model) as set_step:
            gens = [torch.Generator().manual_seed(i) for i in range(2)]
            lls, _ = mc_loglikelihood(denoiser, [[5, 6], [7, 8, 9]], [[10, 11, 12], [13]], gens, 2, 0, set_step)
        assert all(math.isfinite(x) for x in lls)
        assert 0 < stats.overall() < 1, spec
        assert sorted(stats.steps.sparsity()) == [0, 1]
        assert stats.per_expert(0), spec  # the packed experts are sparsified too
    with sparsify(model, SparsitySpec(target, "top_p", 0.5)) as stats, denoising_steps(model) as set_step:
        gens = [torch.Generator().manual_seed(0)]
        tokens, first = generate(
            denoiser, [[5, 6, 7]], gens, length=4, steps=4, block_length=2, pad=0, set_step=set_step
        )
    assert len(tokens[0]) == 4 and first.shape[:2] == (1, 4)
    steps = stats.to_dict()["steps"]
    assert sorted(steps["sparsity"]) == ["0", "1", "2", "3"]
    assert sorted(steps["jaccard_prev"]) == ["1", "2", "3"]
    assert all(0 <= v <= 1 for v in steps["jaccard_first"].values())
    assert set(steps["jaccard_prev_per_layer"]["1"]) == {"0", "1"}


def test_a_saved_diffusion_gemma_folder_loads_through_load_model(model, tmp_path) -> None:
    from tiny import tiny_tokenizer

    from actsparse import load_model

    model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    loaded, _ = load_model(str(tmp_path))
    assert type(loaded).__name__ == "DiffusionGemmaForBlockDiffusion"
    loaded.config.get_text_config()._attn_implementation = "eager"
    torch.testing.assert_close(_predict(loaded, denoiser_for(loaded)), _predict(model, BlockDiffusionDenoiser(model)))
