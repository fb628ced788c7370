"""LLaDA: a checkpoint in the real layout loads through `load_model` and matches a reference forward
written here from the remote code's semantics; every target and rule runs with per-step statistics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny import tiny_tokenizer
from tiny_diffusion import MASK_ID, VOCAB, tiny_llada
from torch.nn import functional as F

from actsparse import SparsitySpec, find_ffns, load_model, sparsify
from actsparse.diffusion import denoising_steps, generate, mc_loglikelihood
from actsparse.models.llada import LLaDAConfig, LLaDAModelLM, MaskDenoiser, is_llada_config
from actsparse.sparsity.spec import TARGETS

D, HEADS, KV_HEADS, LAYERS, HIDDEN, EMBED = 32, 4, 2, 2, 48, 128


def _real_config(weight_tying: bool) -> dict:
    """config.json as the LLaDA-8B checkpoints ship it (scaled down), remote-code fields included."""
    return {
        "activation_type": "silu",
        "alibi": False,
        "alibi_bias_max": 8.0,
        "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0,
        "attention_layer_norm": False,
        "attention_layer_norm_with_affine": True,
        "auto_map": {
            "AutoConfig": "configuration_llada.LLaDAConfig",
            "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
            "AutoModel": "modeling_llada.LLaDAModelLM",
        },
        "bias_for_layer_norm": False,
        "block_group_size": 1,
        "block_type": "llama",
        "d_model": D,
        "embedding_dropout": 0.0,
        "embedding_size": EMBED,
        "eos_token_id": 1,
        "flash_attention": False,
        "include_bias": False,
        "include_qkv_bias": False,
        "init_cutoff_factor": None,
        "init_device": "meta",
        "init_fn": "mitchell",
        "init_std": 0.02,
        "input_emb_norm": False,
        "layer_norm_type": "rms",
        "layer_norm_with_affine": True,
        "mask_token_id": MASK_ID,
        "max_sequence_length": 256,
        "mlp_hidden_size": HIDDEN,
        "mlp_ratio": 4,
        "model_type": "llada",
        "multi_query_attention": None,
        "n_heads": HEADS,
        "n_kv_heads": KV_HEADS,
        "n_layers": LAYERS,
        "pad_token_id": 0,
        "precision": "amp_bf16",
        "residual_dropout": 0.0,
        "rms_norm_eps": 1e-05,
        "rope": True,
        "rope_full_precision": True,
        "rope_theta": 500000.0,
        "scale_logits": False,
        "transformers_version": "4.46.3",
        "use_cache": False,
        "vocab_size": VOCAB,
        "weight_tying": weight_tying,
    }


def _real_weights(weight_tying: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    kv = KV_HEADS * (D // HEADS)
    shapes = {"model.transformer.wte.weight": (EMBED, D), "model.transformer.ln_f.weight": (D,)}
    if not weight_tying:
        shapes["model.transformer.ff_out.weight"] = (EMBED, D)
    for n in range(LAYERS):
        b = f"model.transformer.blocks.{n}."
        shapes |= {
            b + "attn_norm.weight": (D,),
            b + "q_proj.weight": (D, D),
            b + "k_proj.weight": (kv, D),
            b + "v_proj.weight": (kv, D),
            b + "attn_out.weight": (D, D),
            b + "ff_norm.weight": (D,),
            b + "ff_proj.weight": (HIDDEN, D),
            b + "up_proj.weight": (HIDDEN, D),
            b + "ff_out.weight": (D, HIDDEN),
        }
    out = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            out[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            out[name] = 0.3 * torch.randn(shape, generator=g)
    return out


def _reference_logits(w: dict[str, torch.Tensor], ids: torch.Tensor, weight_tying: bool) -> torch.Tensor:
    """The remote code's forward (LLaDALlamaBlock, no mask, positions 0..T-1), written out plainly."""

    def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))

    def rope(t: torch.Tensor) -> torch.Tensor:  # [B, H, T, hs], rotate_half on the two halves
        hs, n = t.shape[-1], t.shape[-2]
        inv = 1.0 / (500000.0 ** (torch.arange(0, hs, 2).float() / hs))
        freqs = torch.outer(torch.arange(n).float(), inv)
        pos = torch.cat([freqs, freqs], dim=-1)
        half = t.view(*t.shape[:-1], 2, hs // 2)
        rotated = torch.cat([-half[..., 1, :], half[..., 0, :]], dim=-1)
        return t * pos.cos() + rotated * pos.sin()

    b, n = ids.shape
    hs = D // HEADS
    x = w["model.transformer.wte.weight"][ids]
    for layer in range(LAYERS):
        p = f"model.transformer.blocks.{layer}."
        h = rms(x, w[p + "attn_norm.weight"])
        q = (h @ w[p + "q_proj.weight"].T).view(b, n, HEADS, hs).transpose(1, 2)
        k = (h @ w[p + "k_proj.weight"].T).view(b, n, KV_HEADS, hs).transpose(1, 2)
        v = (h @ w[p + "v_proj.weight"].T).view(b, n, KV_HEADS, hs).transpose(1, 2)
        q, k = rope(q), rope(k)
        k = k.repeat_interleave(HEADS // KV_HEADS, dim=1)
        v = v.repeat_interleave(HEADS // KV_HEADS, dim=1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hs), dim=-1) @ v  # bidirectional
        x = x + att.transpose(1, 2).reshape(b, n, D) @ w[p + "attn_out.weight"].T
        h = rms(x, w[p + "ff_norm.weight"])
        gate, up = h @ w[p + "ff_proj.weight"].T, h @ w[p + "up_proj.weight"].T
        x = x + (F.silu(gate) * up) @ w[p + "ff_out.weight"].T
    x = rms(x, w["model.transformer.ln_f.weight"])
    head = w["model.transformer.wte.weight"] if weight_tying else w["model.transformer.ff_out.weight"]
    return x @ head.T


@pytest.mark.parametrize("weight_tying", [False, True])
def test_real_layout_checkpoint_loads_and_matches_the_reference(tmp_path: Path, weight_tying: bool) -> None:
    weights = _real_weights(weight_tying)
    (tmp_path / "config.json").write_text(json.dumps(_real_config(weight_tying)))
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    tiny_tokenizer().save_pretrained(tmp_path)
    model, tokenizer = load_model(str(tmp_path))
    assert isinstance(model, LLaDAModelLM)
    loaded = {k: v for k, v in model.state_dict().items()}
    assert set(loaded) == set(weights)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    torch.testing.assert_close(ours, _reference_logits(weights, ids, weight_tying), atol=1e-4, rtol=1e-4)
    assert tokenizer.padding_side == "left"
    # left padding with its mask and positions changes nothing for the real tokens
    padded = torch.cat([torch.zeros(2, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(2, 3, dtype=torch.long), torch.ones_like(ids)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        again = model(input_ids=padded, attention_mask=mask, position_ids=positions).logits[:, 3:]
    torch.testing.assert_close(again, ours, atol=1e-5, rtol=1e-5)


def test_profile_cli_generates_with_a_diffusion_model(tmp_path: Path) -> None:
    from actsparse.cli import main

    (tmp_path / "config.json").write_text(json.dumps(_real_config(False)))
    save_file(_real_weights(False), tmp_path / "model.safetensors", metadata={"format": "pt"})
    tiny_tokenizer().save_pretrained(tmp_path)
    out = tmp_path / "profile.json"
    argv = ["profile", "--model", str(tmp_path), "--target", "intermediate", "--generate", "3", "--json", str(out)]
    assert main(argv) == 0
    record = json.loads(out.read_text())
    assert 0.0 < record["stats"]["prefill"]["sparsity"] < 1.0 and isinstance(record["continuation"], str)


def test_llada_is_recognised_and_unsupported_options_refused() -> None:
    assert is_llada_config({"model_type": "llada"})
    assert is_llada_config({"auto_map": {"AutoModel": "modeling_llada.LLaDAModelLM"}})
    assert not is_llada_config({"model_type": "llama"})
    with pytest.raises(ValueError, match="block_type"):
        LLaDAModelLM(LLaDAConfig(d_model=16, n_heads=2, n_layers=1, block_type="sequential"))


def test_adapter_finds_the_ffn_view_and_its_weights() -> None:
    model = tiny_llada()
    ffns = find_ffns(model)
    assert [(f.name, f.layer) for f in ffns] == [(f"model.transformer.blocks.{i}.mlp", i) for i in range(2)]
    block = model.model.transformer["blocks"][0]
    x = torch.randn(3, 32)
    w = ffns[0].adapter.gated_weights(ffns[0].module)
    expected = block.ff_out(F.silu(block.ff_proj(x)) * block.up_proj(x))
    torch.testing.assert_close(F.linear(w.act(F.linear(x, w.gate)) * F.linear(x, w.up), w.down), expected)
    assert sum(p.numel() for p in ffns[0].module.parameters()) == 0  # a view: no duplicated parameters


RULE_VALUES = {"top_p": 0.6, "top_k": 0.4, "max_p": 0.3}


@pytest.mark.parametrize("target", TARGETS)
def test_every_target_and_rule_reports_per_step_sparsity_and_stability(target: str) -> None:
    model = tiny_llada()
    denoiser = MaskDenoiser(model, MASK_ID)
    prompts, answers = [[5, 6, 7, 8], [9, 10]], [[11, 12, 13], [14, 15, 16, 17]]
    specs = [SparsitySpec(target, r, v) for r, v in RULE_VALUES.items()]
    specs.append(SparsitySpec(target, "threshold", {0: 0.05, 1: 0.05}))
    for spec in specs:
        with sparsify(model, spec) as stats, denoising_steps(model) as set_step:
            gens = [torch.Generator().manual_seed(i) for i in range(2)]
            lls, _ = mc_loglikelihood(denoiser, prompts, answers, gens, 3, 0, set_step)
        assert all(math.isfinite(x) for x in lls)
        per_step = stats.steps.sparsity()
        assert sorted(per_step) == [0, 1, 2], spec
        assert all(0 < s < 1 for s in per_step.values()), spec
        assert set(stats.steps.sparsity(per_layer=True)[0]) == {0, 1}
        for against in ("previous", "first"):
            jac = stats.steps.jaccard(against)
            assert sorted(jac) == [1, 2] and all(0 <= j <= 1 for j in jac.values()), (spec, against)
        # padding is never counted: 2 rows × (prompt + answer) real tokens × width, per sparsified vector
        width = {"input": 32, "intermediate": 64, "gate": 64, "up": 64}
        per_forward = sum(width[v] for v in spec.vectors) * sum(
            len(p) + len(a) for p, a in zip(prompts, answers, strict=True)
        )
        assert stats.tokens_seen() == 3 * 2 * per_forward  # 3 samples × 2 layers
    with sparsify(model, SparsitySpec(target, "top_p", 0.5)) as stats, denoising_steps(model) as set_step:
        gens = [torch.Generator().manual_seed(0)]
        tokens, _ = generate(denoiser, [[5, 6, 7]], gens, length=6, steps=6, block_length=3, pad=0, set_step=set_step)
    assert len(tokens[0]) == 6 and MASK_ID not in tokens[0]
    assert sorted(stats.steps.sparsity()) == list(range(6))
    assert sorted(stats.to_dict()["steps"]["jaccard_first"]) == [str(i) for i in range(1, 6)]
