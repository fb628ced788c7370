"""`StaticDecoder`: greedy decode of a Llama-style model with a static KV cache and one kernel per attention block.

transformers' decode step at batch 1 is bound by what surrounds its kernels: on a 135M model about half
of a CPU decode step goes to ~30 small ops per layer, cache bookkeeping and module calls, which no FFN
sparsity can shrink. The decoder runs the same model (its own weights, embedding, rotary embedding,
FFN modules, final norm and LM head) with the prompt's cache copied into static buffers, and each decode
step's attention block in one fused C call (`kernels.attention_cpu`); the FFNs stay the model's modules,
so `sparsify` and `accelerate` apply to them unchanged and count decode tokens as they do under
`model.generate`. It is to CPU decode what a graph-captured static-cache loop is to GPU decode (gpt-fast):
the time measured is the kernels'. Without the C kernel (no compiler, float64, a GPU) each step runs the
same ops as transformers in PyTorch, with the same results bit for bit. With `weights="int8"` the attention
projections and the LM head read int8 copies of their weights (`kernels.int8`, quantized once, the model left
as it is); with `accelerate(..., weights="int8")` around the steps, the whole decode step reads int8 weights.

Llama, Mistral and Qwen2 (and models of their layout: SmolLM2, TinyLlama, ...) within full attention (no more
positions than a sliding window); a batch of up to 8 prompts of one length (no padding). Anything else raises
`UnsupportedModelError` before any work.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from actsparse.sparsity.instrument import announce_decode
from actsparse.speed.kernels import attention_cpu
from actsparse.speed.kernels.attention_cpu import AttentionStep
from actsparse.speed.kernels.int8 import Q8, quantize

__all__ = ["FAMILIES", "WEIGHTS", "StaticDecoder", "UnsupportedModelError"]

WEIGHTS = ("float", "int8")
"""Weights the decode kernels read: the model's own (float32 or bfloat16), or int8 copies (`kernels.int8`)."""

FAMILIES = ("llama", "mistral", "qwen2")
"""Model types whose decoder layers the static decoder runs."""


_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
"""The attention block's nn.Linear modules, in the order the kernel takes them."""


class UnsupportedModelError(ValueError):
    """The model's layout is not one the static decoder runs; the message says what differs."""


def _rms_norm(x: torch.Tensor, norm: Any) -> torch.Tensor:
    """transformers' Llama RMSNorm, op for op (so that the results are the same bits)."""
    dtype = x.dtype
    x = x.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + norm.variance_epsilon)
    return norm.weight * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _check(model: Any) -> None:
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in FAMILIES:
        raise UnsupportedModelError(f"the static decoder runs {', '.join(FAMILIES)} models, not {kind!r}")
    base = getattr(model, "model", None)
    if base is None or not all(hasattr(base, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        raise UnsupportedModelError("the model has no decoder with embed_tokens, layers, norm and rotary_emb")
    if not isinstance(getattr(model, "lm_head", None), nn.Linear):
        raise UnsupportedModelError("the model has no lm_head")
    for layer in base.layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(isinstance(getattr(attn, n, None), nn.Linear) for n in _PROJECTIONS):
            raise UnsupportedModelError("a decoder layer without q_proj, k_proj, v_proj and o_proj")
        if hasattr(attn, "q_norm") or hasattr(layer, "pre_feedforward_layernorm"):
            raise UnsupportedModelError("query-key norms or sandwich norms are not supported")
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if not hasattr(norm, "variance_epsilon"):
                raise UnsupportedModelError(f"a {type(norm).__name__} is not a Llama RMSNorm")
    if getattr(model, "hf_device_map", None) and len(set(model.hf_device_map.values())) > 1:
        raise UnsupportedModelError("a model split over devices (device_map) is not supported")


class _Layer:
    """What one decoder layer's step needs, found once."""

    def __init__(self, layer: Any, attention: Callable[..., Any], use_kernel: bool, int8: bool = False):
        attn: Any = layer.self_attn
        self.layer: Any = layer
        self.attn, self.mlp, self.attention = attn, layer.mlp, attention
        self.heads = attn.config.num_attention_heads
        self.kv_heads = attn.config.num_key_value_heads
        self.head_dim = attn.head_dim
        self.kernel: AttentionStep | None = None
        if use_kernel:
            projections = [getattr(attn, n) for n in _PROJECTIONS]
            wq, wk, wv, wo = (quantize(m.weight) if int8 else m.weight.detach() for m in projections)
            biases = tuple(None if m.bias is None else m.bias.detach() for m in projections)
            n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
            norms = (n1.weight.detach(), n1.variance_epsilon, n2.weight.detach(), n2.variance_epsilon)
            try:
                self.kernel = AttentionStep(
                    (wq, wk, wv, wo),
                    biases,
                    norms,
                    self.heads,
                    self.kv_heads,
                    self.head_dim,
                    attn.scaling,
                )
            except ValueError:
                if int8:
                    raise
                self.kernel = None  # this layer's weights do not suit the kernel: PyTorch ops


class StaticDecoder:
    """Greedy decode of `model` (see the module docstring): `generate(input_ids, max_new_tokens)`, or
    `prefill(input_ids, max_new_tokens)` then `step(token)` per token. `kernel=False` runs PyTorch ops
    only; by default the fused C attention kernel runs where it can (CPU, float32 or bfloat16). `weights="int8"`
    runs it, and the LM head, on int8 copies of the weights (it needs the kernel)."""

    def __init__(self, model: Any, kernel: bool | None = None, weights: str = "float"):
        if weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, not {weights!r}")
        _check(model)
        self.model: Any = model
        self.base: Any = model.model
        weight = self.model.lm_head.weight
        self.dtype, self.device = weight.dtype, weight.device
        use_kernel = (
            kernel is not False
            and self.device.type == "cpu"
            and self.dtype in (torch.float32, torch.bfloat16)
            and attention_cpu.available()
        )
        if (kernel or weights == "int8") and not use_kernel:
            raise UnsupportedModelError(
                "the fused attention kernel runs float32 or bfloat16 CPU models with a C compiler"
            )
        layer0 = self.base.layers[0].self_attn
        module = sys.modules[type(layer0).__module__]
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        attention = ALL_ATTENTION_FUNCTIONS.get_interface(
            model.config._attn_implementation,
            module.eager_attention_forward,
        )
        try:
            self.layers = [_Layer(layer, attention, use_kernel, weights == "int8") for layer in self.base.layers]
            self.head_int8: Q8 | None = quantize(self.model.lm_head.weight) if weights == "int8" else None
        except ValueError as err:  # the int8 format's block size does not divide a weight's rows
            raise UnsupportedModelError(f"int8 weights: {err}") from None
        self.kernel = all(layer.kernel is not None for layer in self.layers)
        """Whether every layer's attention runs the fused C kernel."""
        self.cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.pos = 0
        self.logits: torch.Tensor | None = None
        """The logits [batch, vocab] of the last prefill or step."""

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Run the prompt through the model (its own forward) and keep its cache in static buffers with room
        for `max_new_tokens`; returns the first greedy token [batch, 1]."""
        if input_ids.dim() != 2 or not 1 <= input_ids.shape[0] <= attention_cpu.MAX_BATCH:
            raise ValueError(f"input_ids must be [batch, length] with 1 to {attention_cpu.MAX_BATCH} prompts")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        config = self.model.config
        window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        if window is not None and input_ids.shape[1] + max_new_tokens > window:
            raise UnsupportedModelError(
                f"{input_ids.shape[1] + max_new_tokens} positions exceed the sliding window of {window}: "
                "the static decoder runs full attention only"
            )
        ids = input_ids.to(self.device)  # every token real: the mask tells `sparsify` so for a batch
        out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        length = input_ids.shape[1]
        self.cache = []
        for layer, entry in zip(self.layers, cache.layers, strict=True):
            keys, values = entry.keys, entry.values
            shape = (keys.shape[0], layer.kv_heads, length + max_new_tokens, layer.head_dim)
            static = (keys.new_zeros(shape), values.new_zeros(shape))
            static[0][:, :, :length] = keys
            static[1][:, :, :length] = values
            self.cache.append(static)
        self.pos = length
        self.logits = out.logits[:, -1]
        return self.logits.argmax(-1, keepdim=True)

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """One decode step of tokens [batch, 1]; returns the next greedy tokens [batch, 1]."""
        if not self.cache or self.pos >= self.cache[0][0].shape[2]:
            raise RuntimeError("no room in the cache: call prefill with enough max_new_tokens")
        batch, pos = token.shape[0], self.pos
        announce_decode(self.model)
        h = self.base.embed_tokens(token.to(self.device))  # [batch, 1, hidden]
        positions = torch.full((batch, 1), pos, dtype=torch.long, device=self.device)
        cos, sin = self.base.rotary_emb(h, position_ids=positions)  # [batch, 1, head_dim]
        h = self._layers_fused(h, cos, sin, pos) if self.kernel else self._layers_torch(h, cos, sin, pos)
        h = self.base.norm(h)
        head = self.model.lm_head
        if self.head_int8 is not None:
            self.logits = attention_cpu.linear(h[:, -1], self.head_int8, head.bias)
        elif self.kernel and head.weight.is_contiguous():
            self.logits = attention_cpu.linear(h[:, -1], head.weight.detach(), head.bias)
        else:
            self.logits = head(h)[:, -1]
        self.pos += 1
        return self.logits.argmax(-1, keepdim=True)

    def _layers_fused(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: int) -> torch.Tensor:
        batch, hidden = h.shape[0], h.shape[-1]
        h = h.reshape(batch, hidden).contiguous()
        cos, sin = cos.reshape(batch, -1).contiguous(), sin.reshape(batch, -1).contiguous()
        add: torch.Tensor | None = None
        for layer, cache in zip(self.layers, self.cache, strict=True):
            h_out, normed = torch.empty_like(h), torch.empty_like(h)
            assert layer.kernel is not None
            layer.kernel(h, add, cos, sin, cache, pos, (h_out, normed))
            add = layer.mlp(normed.view(batch, 1, hidden)).reshape(batch, hidden).contiguous()
            h = h_out
        assert add is not None  # a model has layers
        return (h + add).view(batch, 1, hidden)

    def _layers_torch(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: int) -> torch.Tensor:
        """transformers' decoder layers, op for op, over the static cache."""
        batch = h.shape[0]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        for layer, (keys, values) in zip(self.layers, self.cache, strict=True):
            attn, d = layer.attn, layer.head_dim
            x = _rms_norm(h, layer.layer.input_layernorm)
            q = attn.q_proj(x).view(batch, 1, -1, d).transpose(1, 2)
            k = attn.k_proj(x).view(batch, 1, -1, d).transpose(1, 2)
            v = attn.v_proj(x).view(batch, 1, -1, d).transpose(1, 2)
            q = (q * cos) + (_rotate_half(q) * sin)
            k = (k * cos) + (_rotate_half(k) * sin)
            keys[:, :, pos : pos + 1] = k
            values[:, :, pos : pos + 1] = v
            o, _ = layer.attention(
                attn, q, keys[:, :, : pos + 1], values[:, :, : pos + 1], None, dropout=0.0, scaling=attn.scaling
            )
            h = h + attn.o_proj(o.reshape(batch, 1, -1).contiguous())
            h = h + layer.mlp(_rms_norm(h, layer.layer.post_attention_layernorm))
        return h

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None) -> torch.Tensor:
        """Greedy continuation [batch, ≤ max_new_tokens] of the prompts (stops early once every row has
        produced `eos_token_id`)."""
        token = self.prefill(input_ids, max_new_tokens)
        tokens = [token]
        done = token.squeeze(-1) == eos_token_id if eos_token_id is not None else None
        for _ in range(max_new_tokens - 1):
            if done is not None and bool(done.all()):
                break
            token = self.step(token)
            tokens.append(token)
            if done is not None:
                done |= token.squeeze(-1) == eos_token_id
        return torch.cat(tokens, dim=1)
