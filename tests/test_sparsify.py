"""sparsify() on tiny random models of every supported family."""

from __future__ import annotations

import pytest
import torch
from tiny import FAMILIES, MOE_FAMILIES, tiny_model

import actsparse
import actsparse.sparsity.instrument
from actsparse import TARGETS, SparsitySpec, sparsify
from actsparse.sparsity import rules
from actsparse.sparsity.instrument import count_entries

FAMILY_NAMES = list(FAMILIES)


@pytest.fixture(scope="module")
def models() -> dict:
    return {family: tiny_model(family) for family in FAMILY_NAMES}


def ids(batch: int = 2, length: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def forward(model, x: torch.Tensor):
    """The model on a batch of unpadded sequences, saying so (a mask of ones): `sparsify` needs to know."""
    return model(x, attention_mask=torch.ones_like(x))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_target_p1_is_bit_identical_and_p05_is_sparse(models: dict, family: str) -> None:
    model = models[family]
    x = ids()
    with torch.no_grad():
        dense = forward(model, x).logits
        for target in TARGETS:
            with sparsify(model, SparsitySpec(target, "top_p", 1.0)):
                assert torch.equal(forward(model, x).logits, dense), target
            with sparsify(model, SparsitySpec(target, "top_p", 0.5)) as stats:
                half = forward(model, x).logits
            per_layer = stats.per_layer()
            assert sorted(per_layer) == [0, 1]
            assert all(0.0 < s < 1.0 for s in per_layer.values()), (target, per_layer)
            assert not torch.equal(half, dense)


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("rule", ["top_p", "top_k", "max_p"])
def test_reported_sparsity_is_the_fraction_the_masks_zeroed(models: dict, family: str, rule: str, monkeypatch) -> None:
    masks: list[torch.Tensor] = []

    def recording_masked(v: torch.Tensor, rule: str, value: float) -> tuple[torch.Tensor, torch.Tensor]:
        sparse, keep = rules.masked(v, rule, value)
        assert torch.equal(keep, rules.reference_mask(v, rule, value))
        assert torch.equal(sparse, rules.apply_mask(v, keep))
        masks.append(keep)
        return sparse, keep

    monkeypatch.setattr(actsparse.sparsity.instrument, "masked", recording_masked)
    with torch.no_grad(), sparsify(models[family], SparsitySpec("all_inputs", rule, 0.6)) as stats:
        forward(models[family], ids())
    zeroed = sum(int((~m).sum()) for m in masks)
    seen = sum(m.numel() for m in masks)
    assert stats.overall() == pytest.approx(zeroed / seen, abs=1e-12)
    assert stats.tokens_seen() == seen


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "phi3"])
def test_intermediate_equals_down_proj_of_masked_product_by_hand(models: dict, family: str) -> None:
    model = models[family]
    ffn = actsparse.find_ffns(model)[1]
    w = ffn.adapter.gated_weights(ffn.module)
    x = torch.randn(3, 5, model.config.hidden_size)
    with torch.no_grad():
        product = w.act(x @ w.gate.T) * (x @ w.up.T)
        by_hand = rules.top_p(product, 0.7) @ w.down.T
        with sparsify(model, SparsitySpec("intermediate", "top_p", 0.7)):
            ours = ffn.module(x)
    torch.testing.assert_close(ours, by_hand, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "qwen2_moe", "gemma2", "phi3"])
def test_padded_batch_matches_sequences_run_alone(models: dict, family: str) -> None:
    model = models[family]
    spec = SparsitySpec("all_inputs", "top_p", 0.7)
    seqs = [ids(1, 9, seed=1)[0], ids(1, 5, seed=2)[0]]
    alone_logits, alone_counts = [], []
    with torch.no_grad():
        for seq in seqs:
            with sparsify(model, spec) as stats:
                alone_logits.append(model(seq[None]).logits[0])
            alone_counts.append(stats.counts())
        batch = torch.zeros(2, 9, dtype=torch.long)
        mask = torch.zeros(2, 9, dtype=torch.long)
        for row, seq in enumerate(seqs):  # left padding
            batch[row, -len(seq) :] = seq
            mask[row, -len(seq) :] = 1
        with sparsify(model, spec) as stats:
            logits = model(batch, attention_mask=mask).logits
    for row, seq in enumerate(seqs):
        torch.testing.assert_close(logits[row, -len(seq) :], alone_logits[row], rtol=1e-4, atol=1e-5)
    pooled = {}
    for counts in alone_counts:
        for key, c in counts.items():
            pooled[key] = tuple(a + b for a, b in zip(pooled.get(key, (0, 0, 0)), c, strict=True))
    assert stats.counts() == pooled


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_model_restored_exactly_also_after_an_exception(models: dict, family: str) -> None:
    model = models[family]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    forwards = {name: dict(m.__dict__).get("forward") for name, m in model.named_modules()}
    hooks = len(model._forward_pre_hooks)
    x = ids()
    with torch.no_grad():
        dense = forward(model, x).logits
        with pytest.raises(RuntimeError, match="boom"), sparsify(model, SparsitySpec("input", "top_p", 0.3)):
            forward(model, x)
            raise RuntimeError("boom")
        assert torch.equal(forward(model, x).logits, dense)
    assert {name: dict(m.__dict__).get("forward") for name, m in model.named_modules()} == forwards
    assert len(model._forward_pre_hooks) == hooks
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_experts_are_counted_per_expert_and_layer(models: dict, family: str) -> None:
    with torch.no_grad(), sparsify(models[family], SparsitySpec("intermediate", "top_p", 0.5)) as stats:
        forward(models[family], ids(2, 12))
    experts = stats.per_expert(0)
    assert experts and all(0 < s < 1 for s in experts.values())
    assert set(experts) <= set(range(4))


def test_generation_splits_prefill_and_decode(models: dict) -> None:
    model = models["llama"]
    x = ids(2, 6)
    mask = torch.ones_like(x)
    mask[1, :2] = 0
    with torch.no_grad(), sparsify(model, SparsitySpec("intermediate", "top_p", 0.5)) as stats:
        model.generate(x, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    h = model.config.intermediate_size
    layers = model.config.num_hidden_layers
    assert stats.tokens_seen("prefill") == (6 + 4) * h * layers  # padding never counts
    assert stats.tokens_seen("decode") == 2 * 2 * h * layers  # 2 new tokens run through the model per sequence
    assert 0 < stats.overall("decode") < 1 and 0 < stats.overall("prefill") < 1


def test_threshold_rule_uses_per_layer_values(models: dict) -> None:
    model = models["llama"]
    spec = SparsitySpec("input", "threshold", {0: 0.0, 1: 1e9})
    with torch.no_grad(), sparsify(model, spec) as stats:
        forward(model, ids())
    assert stats.per_layer() == {0: pytest.approx(0.0, abs=0.01), 1: 1.0}
    with pytest.raises(ValueError, match=r"no calibrated threshold for layers \[1\]"):
        with sparsify(model, SparsitySpec("input", "threshold", {0: 0.1})):
            pass


def test_layers_subset_and_unknown_layers(models: dict) -> None:
    model = models["qwen3"]
    with torch.no_grad(), sparsify(model, SparsitySpec("gate", "top_p", 0.5), layers=[1]) as stats:
        forward(model, ids())
    assert list(stats.per_layer()) == [1]
    with pytest.raises(ValueError, match=r"layers \[7\] not in the model"):
        with sparsify(model, SparsitySpec("gate", "top_p", 0.5), layers=[7]):
            pass


def test_non_finite_activation_names_layer_and_target(models: dict) -> None:
    model = models["llama"]
    handle = model.model.layers[1].post_attention_layernorm.register_forward_hook(lambda m, a, out: out * float("nan"))
    try:
        with pytest.raises(actsparse.NonFiniteActivationError, match="'input' activation of layer 1"):
            with torch.no_grad(), sparsify(model, SparsitySpec("input", "top_p", 0.5)):
                forward(model, ids())
    finally:
        handle.remove()


def test_unknown_model_type_names_supported_ones() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(actsparse.UnsupportedModelError, match="model_type 'gpt2'.*supported: .*llama"):
        with sparsify(model, SparsitySpec("input", "top_p", 0.5)):
            pass


def test_batch_one_generation_without_mask_counts_decode(models: dict) -> None:
    model = models["llama"]
    with torch.no_grad(), sparsify(model, SparsitySpec("input", "top_p", 0.5)) as stats:
        model.generate(ids(1, 5), max_new_tokens=4, do_sample=False, pad_token_id=0)
    h, layers = model.config.hidden_size, model.config.num_hidden_layers
    assert stats.tokens_seen("prefill") == 5 * h * layers
    assert stats.tokens_seen("decode") == 3 * h * layers


def test_counting_over_real_tokens_needs_no_host_sync():
    """`count_entries` runs on meta tensors, so nothing in it waits for a value (a boolean index would)."""
    v = torch.empty(2, 3, 8, device="meta")
    keep = torch.empty(2, 3, 8, dtype=torch.bool, device="meta")
    real = torch.empty(2, 3, dtype=torch.bool, device="meta")
    assert count_entries(v, keep, real).shape == (3,)
    v, keep = torch.randn(2, 3, 8), torch.rand(2, 3, 8) > 0.5
    real = torch.tensor([[True, False, True], [False, True, True]])
    expected = [int((~keep[real]).sum()), int((v[real] == 0).sum()), int(real.sum()) * 8]
    assert count_entries(v, keep, real).tolist() == expected


def test_padding_that_cannot_be_known_is_refused_not_counted(models: dict) -> None:
    """Strict padding: without a usable mask only a single sequence is known to be all real."""
    from actsparse.sparsity.instrument import PaddingUnknownError, set_real_tokens

    model = models["llama"]
    spec = SparsitySpec("input", "top_p", 0.7)
    x = ids(2, 9)
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": torch.ones(2, 4, dtype=torch.long)}):  # no mask, or a wrong one
            with pytest.raises(PaddingUnknownError, match="real tokens"), sparsify(model, spec):
                model(x, **kwargs)
        with sparsify(model, spec) as alone:
            model(x[:1])  # one sequence: every token is real
        assert alone.tokens_seen("prefill") == 9 * 32 * 2  # tokens × h × layers
        with sparsify(model, spec) as stated:
            handle = model.register_forward_pre_hook(lambda *a: set_real_tokens(model, None))  # the caller says so
            try:
                model(x)
            finally:
                handle.remove()
        assert stated.tokens_seen("prefill") == 2 * 9 * 32 * 2
