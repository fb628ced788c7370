"""LLaDA (masked-diffusion LLM): a faithful, minimal model definition without remote code and its denoiser
(how the diffusion scorer runs it, looked up by `actsparse.diffusion` by `model_type`). Its FFN adapter (how
`sparsify` reaches the four vectors) is `actsparse.models.adapters.llada`, with the other families'.

Parameter names and config keys are those of the GSAI-ML LLaDA checkpoints (`modeling_llada.py`,
`block_type: llama`): `model.transformer.{wte, blocks.N.{attn_norm, q_proj, k_proj, v_proj, attn_out,
ff_norm, ff_proj, up_proj, ff_out}, ln_f, ff_out}`, so their safetensors load as they are. The blocks
are LLaMA blocks with bidirectional attention; the FFN is `ff_out(act(ff_proj(x)) * up_proj(x))`
(ff_proj is the gate). Differences from the remote code: padding keys are masked when an attention
mask has zeros (the remote code ignores the mask; equal without padding), and there is no KV cache.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutput

MASK_TOKEN_ID = 126336
"""`<|mdm_mask|>` of the LLaDA tokenizer."""


class LLaDAConfig(PretrainedConfig):
    """The config.json of a LLaDA checkpoint (OLMo-style field names)."""

    model_type = "llada"

    def __init__(
        self,
        d_model: int = 4096,
        n_heads: int = 32,
        n_kv_heads: int | None = None,
        n_layers: int = 32,
        mlp_hidden_size: int | None = 12288,
        mlp_ratio: int = 4,
        max_sequence_length: int = 4096,
        vocab_size: int = 126464,
        embedding_size: int | None = 126464,
        rope: bool = True,
        rope_theta: float = 500000.0,
        rope_full_precision: bool = True,
        rms_norm_eps: float = 1e-5,
        layer_norm_type: str = "rms",
        layer_norm_with_affine: bool = True,
        bias_for_layer_norm: bool | None = False,
        attention_layer_norm: bool = False,
        activation_type: str = "silu",
        block_type: str = "llama",
        block_group_size: int = 1,
        include_bias: bool = False,
        include_qkv_bias: bool = False,
        multi_query_attention: bool | None = None,
        input_emb_norm: bool = False,
        scale_logits: bool = False,
        weight_tying: bool = False,
        alibi: bool = False,
        mask_token_id: int = MASK_TOKEN_ID,
        pad_token_id: int | None = 126081,
        eos_token_id: int | None = 126081,
        **kwargs: Any,
    ):
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.n_layers = n_layers
        self.mlp_hidden_size = mlp_hidden_size
        self.mlp_ratio = mlp_ratio
        self.max_sequence_length = max_sequence_length
        self.vocab_size = vocab_size
        self.embedding_size = embedding_size
        self.rope = rope
        self.rope_theta = rope_theta
        self.rope_full_precision = rope_full_precision
        self.rms_norm_eps = rms_norm_eps
        self.layer_norm_type = layer_norm_type
        self.layer_norm_with_affine = layer_norm_with_affine
        self.bias_for_layer_norm = bias_for_layer_norm
        self.attention_layer_norm = attention_layer_norm
        self.activation_type = activation_type
        self.block_type = block_type
        self.block_group_size = block_group_size
        self.include_bias = include_bias
        self.include_qkv_bias = include_qkv_bias
        self.multi_query_attention = multi_query_attention
        self.input_emb_norm = input_emb_norm
        self.scale_logits = scale_logits
        self.weight_tying = weight_tying
        self.alibi = alibi
        self.mask_token_id = mask_token_id
        kwargs.setdefault("tie_word_embeddings", False)  # LLaDA ties by `weight_tying` in its own forward
        kwargs.update(pad_token_id=pad_token_id, eos_token_id=eos_token_id)
        super().__init__(**kwargs)

    @property
    def effective_n_kv_heads(self) -> int:
        if self.multi_query_attention:
            return 1
        return self.n_kv_heads or self.n_heads

    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layers

    def check_supported(self) -> None:
        """The options of this definition (those of the released LLaDA checkpoints); others raise."""
        unsupported = {
            "block_type": (self.block_type, "llama"),
            "layer_norm_type": (self.layer_norm_type, "rms"),
            "block_group_size": (self.block_group_size, 1),
            "rope": (self.rope, True),
            "alibi": (self.alibi, False),
            "attention_layer_norm": (self.attention_layer_norm, False),
        }
        bad = {k: v for k, (v, want) in unsupported.items() if v != want}
        if self.activation_type not in ACT2FN:
            bad["activation_type"] = self.activation_type
        if bad:
            raise ValueError(f"LLaDA options not supported by actsparse's definition: {bad}")


class RMSLayerNorm(nn.Module):
    """LLaDA's RMS norm: normalise in float32, cast back, then scale (and shift)."""

    def __init__(self, size: int, eps: float, affine: bool, bias: bool):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size)) if affine else None
        self.bias = nn.Parameter(torch.zeros(size)) if affine and bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        if self.weight is not None:
            y = self.weight * y
        return y + self.bias if self.bias is not None else y


def rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE on [B, H, T, hs] at integer `positions` [B, T] (halves rotated, float32)."""
    hs = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, hs, 2, device=x.device, dtype=torch.float) / hs))
    freqs = positions.float()[..., None] * inv_freq
    angles = torch.cat([freqs, freqs], dim=-1)[:, None]
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * angles.cos() + rotated * angles.sin()).to(x.dtype)


class LLaDAFeedForward(nn.Module):
    """A parameter-free view of a block's SwiGLU FFN, so that adapters and hooks see one FFN module.

    The linears stay registered on the block (checkpoint names); this module only calls them.
    """

    def __init__(self, block: LLaDALlamaBlock):
        super().__init__()
        object.__setattr__(self, "_block", block)  # not a child: no parameters, no cycle

    def __getattr__(self, name: str) -> Any:
        if name in ("ff_proj", "up_proj", "ff_out", "act"):
            return getattr(self.__dict__["_block"], name)
        return super().__getattr__(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff_out(self.act(self.ff_proj(x)) * self.up_proj(x))


class LLaDALlamaBlock(nn.Module):
    """Pre-norm block: bidirectional GQA attention with RoPE, then the SwiGLU FFN."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        d, hidden = config.d_model, config.mlp_hidden_size or config.mlp_ratio * config.d_model
        head_dim = d // config.n_heads
        kv = config.effective_n_kv_heads * head_dim
        qkv_bias = config.include_bias or config.include_qkv_bias
        norm_bias = config.include_bias if config.bias_for_layer_norm is None else config.bias_for_layer_norm
        self.config = config
        self.attn_norm = RMSLayerNorm(d, config.rms_norm_eps, config.layer_norm_with_affine, norm_bias)
        self.ff_norm = RMSLayerNorm(d, config.rms_norm_eps, config.layer_norm_with_affine, norm_bias)
        self.q_proj = nn.Linear(d, d, bias=qkv_bias)
        self.k_proj = nn.Linear(d, kv, bias=qkv_bias)
        self.v_proj = nn.Linear(d, kv, bias=qkv_bias)
        self.attn_out = nn.Linear(d, d, bias=config.include_bias)
        self.ff_proj = nn.Linear(d, hidden, bias=config.include_bias)
        self.up_proj = nn.Linear(d, hidden, bias=config.include_bias)
        self.ff_out = nn.Linear(hidden, d, bias=config.include_bias)
        self.act = ACT2FN[config.activation_type]
        self.mlp = LLaDAFeedForward(self)

    def attention(self, x: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        c = self.config
        b, t, d = x.shape
        hs = d // c.n_heads
        q = self.q_proj(x).view(b, t, c.n_heads, hs).transpose(1, 2)
        k = self.k_proj(x).view(b, t, c.effective_n_kv_heads, hs).transpose(1, 2)
        v = self.v_proj(x).view(b, t, c.effective_n_kv_heads, hs).transpose(1, 2)
        q, k = rotary(q, positions, c.rope_theta), rotary(k, positions, c.rope_theta)
        if c.n_heads != c.effective_n_kv_heads:
            k = k.repeat_interleave(c.n_heads // c.effective_n_kv_heads, dim=1)
            v = v.repeat_interleave(c.n_heads // c.effective_n_kv_heads, dim=1)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)
        return self.attn_out(out.transpose(1, 2).reshape(b, t, d))

    def forward(self, x: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attention(self.attn_norm(x), positions, key_mask)
        return x + self.mlp(self.ff_norm(x))


class LLaDAModel(nn.Module):
    """The `model` of a LLaDA checkpoint: `transformer.{wte, blocks, ln_f, ff_out}`."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.config = config
        vocab = config.embedding_size or config.vocab_size
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(vocab, config.d_model),
                "blocks": nn.ModuleList(LLaDALlamaBlock(config) for _ in range(config.n_layers)),
                "ln_f": RMSLayerNorm(
                    config.d_model, config.rms_norm_eps, config.layer_norm_with_affine, bool(config.bias_for_layer_norm)
                ),
            }
        )
        if not config.weight_tying:
            self.transformer["ff_out"] = nn.Linear(config.d_model, vocab, bias=config.include_bias)


class LLaDAModelLM(PreTrainedModel):
    """LLaDA as a Hugging Face model: `forward(input_ids, attention_mask) -> logits` at every position."""

    config_class = LLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDALlamaBlock"]  # noqa: RUF012 (a transformers class attribute)

    def __init__(self, config: LLaDAConfig):
        config.check_supported()
        super().__init__(config)
        self.model = LLaDAModel(config)
        self.post_init()

    def _init_weights(self, module: Any) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            bias = getattr(module, "bias", None)
            if bias is not None:
                nn.init.zeros_(bias)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.transformer["wte"]

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutput:
        """Logits [B, T, V] of every position; `position_ids` default to 0..T-1 as in the remote code."""
        if kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None:
            raise ValueError("LLaDA is a masked-diffusion model: it has no KV cache")
        t = self.model.transformer
        x = t["wte"](input_ids) if inputs_embeds is None else inputs_embeds
        if self.config.input_emb_norm:
            x = x * self.config.d_model**0.5
        b, n = x.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(n, device=x.device).expand(b, n)
        key_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            key_mask = attention_mask.bool()
        for block in t["blocks"]:
            x = block(x, position_ids, key_mask)
        x = t["ln_f"](x)
        logits = F.linear(x, t["wte"].weight) if self.config.weight_tying else t["ff_out"](x)
        if self.config.scale_logits:
            logits = logits / self.config.d_model**0.5
        return CausalLMOutput(logits=logits)


def is_llada_config(config: dict[str, Any]) -> bool:
    """Whether a config.json describes a LLaDA checkpoint (by model_type or its remote-code auto_map)."""
    auto_map = config.get("auto_map") or {}
    return config.get("model_type") == "llada" or any("llada" in str(v).lower() for v in auto_map.values())


AutoConfig.register("llada", LLaDAConfig, exist_ok=True)  # so config.json reads offline, without remote code


class MaskDenoiser:
    """LLaDA for the diffusion scorer (an `actsparse.diffusion.Denoiser`): noised tokens become the mask
    token; prompt and canvas run together, bidirectionally."""

    noise_token: int | None

    def __init__(self, model: nn.Module, mask_token_id: int):
        self.model: Any = model
        self.mask_token_id = self.noise_token = mask_token_id

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def noise_tokens(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.full((n,), self.mask_token_id, dtype=torch.long)

    def encode(self, prompts: torch.Tensor, prompt_mask: torch.Tensor) -> Any:
        return prompts, prompt_mask

    def predict(
        self, state: Any, canvas: torch.Tensor, canvas_mask: torch.Tensor, previous: torch.Tensor | None = None
    ) -> torch.Tensor:
        prompts, prompt_mask = state
        mask = torch.cat([prompt_mask, canvas_mask], dim=1)
        ids = torch.cat([prompts, canvas], dim=1)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # the prompts are left-padded
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        return logits[:, prompts.shape[1] :].float()
