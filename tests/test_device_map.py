"""sparsify() on models dispatched by accelerate (device_map, offload): same logits as undispatched."""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import cpu_offload, dispatch_model
from tiny import tiny_lm, tiny_model

from actsparse import SparsitySpec, sparsify
from actsparse.models.loading import load_model

SPEC = SparsitySpec("intermediate", "top_p", 0.7)


def ids() -> torch.Tensor:
    return torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(0))


def sparse_run(model: torch.nn.Module, spec: SparsitySpec = SPEC) -> tuple[torch.Tensor, dict]:
    with torch.no_grad(), sparsify(model, spec) as stats:
        x = ids()
        logits = model(x, attention_mask=torch.ones_like(x)).logits
    return logits, stats.per_layer()


@pytest.fixture(scope="module")
def reference() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, dict]:
    model = tiny_model("llama")
    with torch.no_grad():
        dense = model(ids()).logits
    logits, per_layer = sparse_run(model)
    return model, dense, logits, per_layer


def block_map(model: torch.nn.Module, mlp_device: str) -> dict[str, str]:
    """Every block on the CPU, the FFN of each layer as its own block on `mlp_device`."""
    layers = len(model.model.layers)
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    for i in range(layers):
        for part in ("self_attn", "input_layernorm", "post_attention_layernorm"):
            device_map[f"model.layers.{i}.{part}"] = "cpu"
        device_map[f"model.layers.{i}.mlp"] = mlp_device
    return device_map


def test_ffn_offloaded_to_disk_as_one_block_keeps_its_hook(reference, tmp_path) -> None:
    base, dense, expected, per_layer = reference
    model = copy.deepcopy(base)
    # the FFN is one offloaded block: its weights are on the meta device until the FFN's own hook loads them
    dispatch_model(model, block_map(model, "disk"), offload_dir=tmp_path, preload_module_classes=["LlamaMLP"])
    mlp = model.model.layers[1].mlp
    assert mlp.gate_proj.weight.device.type == "meta" and hasattr(mlp, "_hf_hook")
    hooked = mlp.forward
    logits, stats = sparse_run(model)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)
    assert stats == pytest.approx(per_layer)
    assert mlp.forward is hooked and "_old_forward" in vars(mlp)  # the hook is back as it was
    with torch.no_grad():
        torch.testing.assert_close(model(ids()).logits, dense, rtol=1e-5, atol=1e-6)


def test_blocks_with_forced_hooks_and_cpu_offload(reference) -> None:
    base, _, expected, per_layer = reference
    dispatched = dispatch_model(copy.deepcopy(base), block_map(base, "cpu"), force_hooks=True)
    assert hasattr(dispatched.model.layers[0].mlp, "_hf_hook")
    offloaded = cpu_offload(copy.deepcopy(base), execution_device=torch.device("cpu"))
    for model in (dispatched, offloaded):
        for spec in (SPEC, SparsitySpec("input", "max_p", 0.3)):
            logits, _ = sparse_run(model, spec)
            want = expected if spec is SPEC else sparse_run(base, spec)[0]
            torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-6)
        assert sparse_run(model)[1] == pytest.approx(per_layer)


def test_load_model_with_a_device_map(tmp_path) -> None:
    model, tokenizer = tiny_lm("llama")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, _ = load_model(str(tmp_path), device_map={"": "cpu"})
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids()).logits, model(ids()).logits)
    torch.testing.assert_close(sparse_run(loaded)[0], sparse_run(model)[0])
