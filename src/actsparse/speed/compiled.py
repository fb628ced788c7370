"""`CompiledDecoder`: greedy decode whose whole step (dense, or sparse FFNs through `speed.ops`) compiles as one
graph: `torch.compile(fullgraph=True)`, a static KV cache, no graph break.

It is gpt-fast's recipe on a transformers model of Llama / Mistral / Qwen2 layout (`decoding.FAMILIES`): the
prompt runs through the model's own forward (sparsified as `accelerate` sparsifies a prefill), its cache is
copied into buffers of a fixed length, and each step is a pure function of (token, position) over those
buffers, so that its shapes never change: attention over the whole buffer with the unwritten positions masked
off, rotary tables indexed by the position tensor. The FFNs run the spec's rule (threshold, top_k or max_p
on `input`, `intermediate` or `all_inputs`) through the custom ops `actsparse::keep_mask` and
`actsparse::masked_rows_matmul`, which the compiler sees as single nodes. On CPU Inductor compiles the
step; on CUDA `mode="reduce-overhead"` captures it in a CUDA graph, the loop SPEC §8 asks dense and sparse
decode to be timed in. The step counts no sparsity (counting reads values back): `accelerate` measures it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from actsparse.sparsity.spec import SparsitySpec
from actsparse.speed import ops
from actsparse.speed.decoding import UnsupportedModelError, _check, _rms_norm, _rotate_half
from actsparse.speed.kernels.sparse_ffn import rows_of

__all__ = ["CompiledDecoder", "compile_mode"]

SPARSE_VECTORS = ("input", "intermediate")
"""The FFN vectors whose sparsity the compiled step skips weight rows for."""


def compile_mode(device: torch.device | str) -> str | None:
    """The `torch.compile` mode of a decode step on `device`: CUDA graphs on CUDA, Inductor's default elsewhere."""
    return "reduce-overhead" if torch.device(device).type == "cuda" else None


def _check_spec(spec: SparsitySpec | None) -> None:
    if spec is None:
        return
    if spec.rule not in ops.GRAPH_SAFE_RULES:
        raise UnsupportedModelError(f"the compiled step runs {', '.join(ops.GRAPH_SAFE_RULES)}, not {spec.rule}")
    if not set(spec.vectors) <= set(SPARSE_VECTORS):
        raise UnsupportedModelError(f"the compiled step sparsifies {' and '.join(SPARSE_VECTORS)} only")


class _FFN(nn.Module):
    """One gated FFN's decode: dense, or masked by the spec's rule with the products reading kept rows only."""

    def __init__(self, mlp: Any, values: dict[str, float], rule: str | None):
        super().__init__()
        projections: list[Any] = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if not all(isinstance(p, nn.Linear) and p.bias is None for p in projections):
            raise UnsupportedModelError("an FFN without bias-free gate_proj, up_proj and down_proj")
        self.mlp, self.act, self.rule, self.values = mlp, mlp.act_fn, rule, values
        gate, up, down = (p.weight for p in projections)
        sparse = "input" in values
        self.register_buffer("gate_t", rows_of(gate) if sparse else None, persistent=False)  # [h, d]: row per entry
        self.register_buffer("up_t", rows_of(up) if sparse else None, persistent=False)
        self.register_buffer("down_t", rows_of(down) if "intermediate" in values else None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, h]
        mlp = self.mlp
        if self.gate_t is not None and self.up_t is not None and self.rule is not None:
            keep = ops.keep_mask(x, self.rule, self.values["input"])
            gate = ops.masked_rows_matmul(x, keep, self.gate_t)
            up = ops.masked_rows_matmul(x, keep, self.up_t)
        else:
            gate, up = F.linear(x, mlp.gate_proj.weight), F.linear(x, mlp.up_proj.weight)
        i = self.act(gate) * up
        if self.down_t is None or self.rule is None:
            return F.linear(i, mlp.down_proj.weight)
        return ops.masked_rows_matmul(i, ops.keep_mask(i, self.rule, self.values["intermediate"]), self.down_t)


class _Step(nn.Module):
    """The decode step as a module: the KV cache and rotary tables are its buffers (fixed addresses, as a
    CUDA graph needs), and `forward(token, pos)` is what `torch.compile` traces."""

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, model: Any, spec: SparsitySpec | None, length: int, batch: int):
        super().__init__()
        base = model.model
        self.model: Any = model
        self.base: Any = base
        weight = model.lm_head.weight
        positions = torch.arange(length, device=weight.device)[None]
        cos, sin = base.rotary_emb(weight.new_zeros(1), position_ids=positions)  # [1, length, head_dim]
        self.register_buffer("cos", cos[0], persistent=False)
        self.register_buffer("sin", sin[0], persistent=False)
        self.ffns = nn.ModuleList(
            _FFN(
                layer.mlp,
                {v: spec.value_for(i, v) for v in spec.vectors} if spec is not None else {},
                spec.rule if spec is not None else None,
            )
            for i, layer in enumerate(base.layers)
        )
        for i, layer in enumerate(base.layers):
            attn = layer.self_attn
            shape = (batch, attn.config.num_key_value_heads, length, attn.head_dim)
            self.register_buffer(f"keys{i}", weight.new_zeros(shape), persistent=False)
            self.register_buffer(f"values{i}", weight.new_zeros(shape), persistent=False)

    def caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(getattr(self, f"keys{i}"), getattr(self, f"values{i}")) for i in range(len(self.ffns))]

    def forward(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] of tokens [B, 1] at position `pos` (a 0-dim long tensor), the cache written there."""
        batch = token.shape[0]
        h = self.base.embed_tokens(token)  # [B, 1, hidden]
        where = pos.view(1)
        cos, sin = self.cos.index_select(0, where).view(1, 1, 1, -1), self.sin.index_select(0, where).view(1, 1, 1, -1)
        visible = (torch.arange(self.cos.shape[0], device=pos.device) <= pos).view(1, 1, 1, -1)  # positions written
        for layer, ffn, (keys, values) in zip(self.base.layers, self.ffns, self.caches(), strict=True):
            attn = layer.self_attn
            d = attn.head_dim
            x = _rms_norm(h, layer.input_layernorm)
            q = attn.q_proj(x).view(batch, 1, -1, d).transpose(1, 2)
            k = attn.k_proj(x).view(batch, 1, -1, d).transpose(1, 2)
            v = attn.v_proj(x).view(batch, 1, -1, d).transpose(1, 2)
            q = (q * cos) + (_rotate_half(q) * sin)
            k = (k * cos) + (_rotate_half(k) * sin)
            keys.index_copy_(2, where, k)
            values.index_copy_(2, where, v)
            o = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=visible, scale=attn.scaling, enable_gqa=keys.shape[1] != q.shape[1]
            )
            h = h + attn.o_proj(o.transpose(1, 2).reshape(batch, 1, -1))
            x = _rms_norm(h, layer.post_attention_layernorm)
            h = h + ffn(x.view(batch, -1)).view(batch, 1, -1)
        return self.model.lm_head(self.base.norm(h))[:, -1]


class CompiledDecoder:
    """Greedy decode of `model` (see the module docstring), dense or under `spec`: `prefill(input_ids,
    max_new_tokens)` then `step(token)` per token, or `generate`. `length` bounds prompt plus new tokens (the
    cache's fixed size); `compile=False` runs the same step eagerly; `mode` defaults to `compile_mode`."""

    def __init__(
        self,
        model: Any,
        spec: SparsitySpec | None = None,
        length: int = 256,
        batch: int = 1,
        compile: bool = True,
        mode: str | None = None,
    ):
        _check(model)
        _check_spec(spec)
        self.model, self.spec = model, spec
        self.device = model.lm_head.weight.device
        self.module = _Step(model, spec, length, batch)
        self.batch, self.length, self.pos = batch, length, 0
        mode = mode or compile_mode(self.device)
        self.fn = torch.compile(self.module, fullgraph=True, mode=mode) if compile else self.module

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """The prompt through the model's forward (sparsified by the spec, as `accelerate` runs a prefill), its
        cache copied into the static buffers; returns the first greedy token [batch, 1]."""
        from contextlib import nullcontext

        from actsparse.methods import sparsify

        batch, length = input_ids.shape
        if batch != self.batch or length + max_new_tokens > self.length:
            raise ValueError(
                f"the decoder holds {self.batch} prompts of up to {self.length} positions in all, "
                f"got {batch} × ({length} + {max_new_tokens})"
            )
        ids = input_ids.to(self.device)
        with nullcontext() if self.spec is None else sparsify(self.model, self.spec):
            out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
        for (keys, values), entry in zip(self.module.caches(), out.past_key_values.layers, strict=True):
            keys.zero_()
            values.zero_()
            keys[:, :, :length] = entry.keys
            values[:, :, :length] = entry.values
        self.pos = length
        return out.logits[:, -1].argmax(-1, keepdim=True)

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """One decode step of tokens [batch, 1]; returns the next greedy tokens [batch, 1]."""
        if self.pos >= self.length:
            raise RuntimeError("no room in the cache: prefill with fewer tokens or build a longer decoder")
        pos = torch.tensor(self.pos, device=self.device)
        logits = self.fn(token.to(self.device), pos)
        self.pos += 1
        return logits.argmax(-1, keepdim=True)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy continuation [batch, max_new_tokens] of the prompts."""
        tokens = [self.prefill(input_ids, max_new_tokens)]
        for _ in range(max_new_tokens - 1):
            tokens.append(self.step(tokens[-1]))
        return torch.cat(tokens, dim=1)
