"""Tiny random causal LMs of every supported family, built from configs (no downloads)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

COMMON = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48)

FAMILIES: dict[str, dict] = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": dict(head_dim=8),
    "gemma2": dict(head_dim=8),
    "gemma3_text": dict(head_dim=8, sliding_window=16),
    "phi3": {},
    "olmo2": {},
    "granite": {},
    "qwen2_moe": dict(MOE, shared_expert_intermediate_size=40),
    "qwen3_moe": dict(MOE, head_dim=8),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
}
MOE_FAMILIES = ("qwen2_moe", "qwen3_moe", "mixtral", "olmoe")


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A 2-layer random model of `family` in eval mode, with eager attention (MoE: transformers' default
    experts implementation, which the sparsified experts follow)."""
    config = AutoConfig.for_model(family, **COMMON, **FAMILIES[family])
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    widen(model)
    return model


def widen(model: torch.nn.Module) -> None:
    """Redraw every weight matrix at 0.2 scale: random init draws some at 0.02, which gives near-constant
    activations; widened, they vary."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)


CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,?!'\n:;-_\"()"


def tiny_tokenizer():
    """A character-level fast tokenizer built locally (pad 0, eos 1, unk 2); its vocab fits tiny models."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {c: i + 3 for i, c in enumerate(CHARS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", padding_side="left"
    )


def tiny_lm(family: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32):
    """(model, tokenizer): a tiny random model of `family` with the character tokenizer."""
    model = tiny_model(family, seed=seed, dtype=dtype)
    model.generation_config.eos_token_id = 1
    return model, tiny_tokenizer()


WORDS = ("the", "cat", "dog", "sat", "ran", "on", "a", "mat", "big", "red", "sun", "is", "hot", "sky")


def tiny_task(name: str = "tiny_mc", n_docs: int = 8, kind: str = "multiple_choice", seed: int = 0):
    """A `Task` over `n_docs` random in-memory documents of `kind` (multiple_choice, lambada, generate)."""
    import random

    from actsparse.tasks import Completion, Generation, MultipleChoice, task_from_requests

    rng = random.Random(seed)

    def words(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    requests: list = []
    for i in range(n_docs):
        context = f"Question: {words(rng.randint(2, 9))}?\nAnswer:"
        if kind == "multiple_choice":
            choices = tuple(words(rng.randint(1, 4)) for _ in range(rng.choice([2, 4])))
            requests.append(MultipleChoice((context,), tuple(" " + c for c in choices), i % len(choices), choices))
        elif kind == "lambada":
            requests.append(Completion(words(rng.randint(3, 10)), " " + rng.choice(WORDS)))
        else:
            requests.append(Generation(context, (rng.choice(WORDS),), max_tokens=6))
    return task_from_requests(name, requests)


def tiny_sweep_config(out, **overrides):
    """A small sweep of a tiny LM over two tiny tasks (multiple choice and lambada), for sweep tests."""
    from actsparse.study.sweep import SweepConfig

    settings = dict(
        model="tiny",
        targets=["input", "intermediate"],
        rules=["top_p"],
        values=[0.9, 0.6],
        tasks=[tiny_task("mc", 12), tiny_task("lam", 8, kind="lambada", seed=1)],
        limit=10,
        out=out,
        resamples=50,
        batch_size=4,
    )
    return SweepConfig(**(settings | overrides))
