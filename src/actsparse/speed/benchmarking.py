"""The timing harness of the decode benchmarks (`actsparse bench`, `benchmarks/`), and their models.

`time_calls` times several variants of one op interleaved call by call (CPU) or as CUDA-graph replays
(CUDA), so that on a busy machine they share its load and their ratios hold; `load_average` is printed
beside every figure for that reason. `llama3_8b_shaped` is the random model of GPU end-to-end decode.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = [
    "byte_tokenizer",
    "decode_loop",
    "gemv_operands",
    "llama3_8b_shaped",
    "load_average",
    "lower_quartile",
    "parse_shape",
    "prefill",
    "random_batches",
    "random_llama",
    "sparse_input",
    "time_calls",
    "time_pair",
    "timed_step",
]


def load_average() -> str:
    """The machine's 1, 5 and 15 minute load averages (from /proc/loadavg; '?' where it has none)."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def lower_quartile(times: list[float]) -> float:
    """The lower quartile: robust to the preemptions of a shared machine, not to one lucky call."""
    ordered = sorted(times)
    return ordered[len(ordered) // 4]


def time_calls(
    fns: Mapping[str, Callable[[int], Any]], device: str, repeats: int, iters: int
) -> tuple[dict[str, float], str]:
    """µs per call of each fn(i) (i = call counter), timed interleaved, and how they were timed.

    On CPU each call is timed alone by the wall clock, the variants taking turns call by call, and each
    keeps the lower quartile of its `repeats`·`iters` times ('cpu-wall'). On CUDA, `iters` calls are
    captured in a CUDA graph and replays take turns, best replay kept ('cuda-graph': kernel time without
    Python's launch overhead, as a decode loop under CUDA graphs sees it); where capture fails, blocks of
    `iters` eager calls, best block ('cuda-eager').
    """
    names = list(fns)
    for fn in fns.values():  # warm up
        for i in range(min(iters, 3)):
            fn(i)
    if device == "cpu":
        times: dict[str, list[float]] = {name: [] for name in names}
        for i in range(repeats * iters):
            for name in names:
                start = time.perf_counter()
                fns[name](i)
                times[name].append((time.perf_counter() - start) * 1e6)
        return {name: lower_quartile(t) for name, t in times.items()}, "cpu-wall"
    try:
        graphs = {name: _cuda_graph(fns[name], iters) for name in names}
    except Exception:  # any capture failure: time eagerly instead
        graphs = None
    best = dict.fromkeys(names, math.inf)
    for _ in range(repeats):
        for name in names:
            if graphs is not None:
                best[name] = min(best[name], _replay_us(graphs[name]) / iters)
                continue
            sync(device)
            start = time.perf_counter()
            for i in range(iters):
                fns[name](i)
            sync(device)
            best[name] = min(best[name], (time.perf_counter() - start) / iters * 1e6)
    return best, "cuda-eager" if graphs is None else "cuda-graph"


def time_pair(
    dense: Callable[[int], Any], sparse: Callable[[int], Any], device: str, repeats: int, iters: int
) -> tuple[float, float, str]:
    """`time_calls` of two variants: (dense µs, sparse µs, timing)."""
    us, timing = time_calls({"dense": dense, "sparse": sparse}, device, repeats, iters)
    return us["dense"], us["sparse"], timing


def _cuda_graph(fn: Callable[[int], Any], iters: int) -> torch.cuda.CUDAGraph:
    """`iters` calls of fn captured in one CUDA graph (after a warm-up on a side stream)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(iters):  # every call once: lazy set-up (kernel builds, cached constants) stays out of the graph
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(iters):
            fn(i)
    return graph


def _replay_us(graph: torch.cuda.CUDAGraph) -> float:
    """µs of one replay of `graph`, by CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3


def parse_shape(text: str) -> tuple[int, int]:
    a, b = text.lower().replace("×", "x").split("x")
    return int(a), int(b)


def copies(nbytes: int, working_set_mb: float) -> int:
    """How many copies of `nbytes` of weights fill `working_set_mb` (1 to 64)."""
    return max(1, min(64, math.ceil(working_set_mb * 2**20 / nbytes)))


def sparse_input(x: torch.Tensor, s: float) -> torch.Tensor:
    """x with its smallest-|x| fraction `s` of entries (per row) set to zero."""
    drop = round(s * x.shape[-1])
    if drop == 0:
        return x
    idx = x.abs().topk(drop, dim=-1, largest=False).indices
    return x.scatter(-1, idx, torch.zeros_like(x))


def gemv_operands(shape: str, device: str, dtype: torch.dtype, working_set_mb: float, batch: int = 1):
    """Copies of a random out × in weight filling `working_set_mb` (so that they stream from memory), their
    transposes laid out for the sparse kernels, and an input x [batch, in]."""
    out_f, in_f = parse_shape(shape)
    n = copies(out_f * in_f * dtype.itemsize, working_set_mb)
    weights = [torch.randn(out_f, in_f, device=device, dtype=dtype) / math.sqrt(in_f) for _ in range(n)]
    weights_t = [w.t().contiguous() for w in weights]
    return weights, weights_t, torch.randn(batch, in_f, device=device, dtype=dtype)


def decode_loop(model: Any, prompt: torch.Tensor, tokens: int) -> list[float]:
    """µs of each greedy decode step after a prefill of `prompt` (the prefill is not timed)."""
    out = model(prompt, use_cache=True)
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(tokens):
        sync(prompt.device.type)
        start = time.perf_counter()
        out = model(token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        sync(prompt.device.type)
        times.append((time.perf_counter() - start) * 1e6)
    return times


def timed_step(model: Any, state: tuple[Any, torch.Tensor]) -> tuple[float, tuple[Any, torch.Tensor]]:
    """µs of one greedy decode step from `state` (cache, last token), and the next state."""
    cache, token = state
    sync(token.device.type)
    start = time.perf_counter()
    out = model(token, past_key_values=cache, use_cache=True)
    next_state = (out.past_key_values, out.logits[:, -1:].argmax(-1))
    sync(token.device.type)
    return (time.perf_counter() - start) * 1e6, next_state


def timed_decoder_step(decoder: Any, token: torch.Tensor) -> tuple[float, torch.Tensor]:
    """µs of one greedy step of a `StaticDecoder` from `token`, and the next token (`timed_step`'s twin)."""
    sync(token.device.type)
    start = time.perf_counter()
    next_token = decoder.step(token)
    sync(token.device.type)
    return (time.perf_counter() - start) * 1e6, next_token


def prefill(model: Any, prompt: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """The decode state (cache, first greedy token) after a prefill of `prompt`."""
    out = model(prompt, use_cache=True)
    return out.past_key_values, out.logits[:, -1:].argmax(-1)


RANDOM_SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b-shaped": dict(
        hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256
    ),
    "tiny-llama-shaped": dict(
        hidden_size=64, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, vocab_size=49152
    ),
}
"""Random Llama models of the GPU benchmarks by name: Llama-3-8B's shape, and a tiny one with the same
layout (SmolLM2's vocabulary) on which a CPU dry run takes the same code paths."""


def random_llama(name: str, device: str, dtype: torch.dtype, layers: int = 32) -> Any:
    """A Llama model of shape `name` (one of RANDOM_SHAPES) with random weights and `layers` layers, built
    directly on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if name not in RANDOM_SHAPES:
        raise ValueError(f"unknown random model {name!r}; choose from {', '.join(RANDOM_SHAPES)}")
    config = LlamaConfig(**RANDOM_SHAPES[name], num_hidden_layers=layers, max_position_embeddings=2048)
    with torch.device(device):
        model: Any = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def llama3_8b_shaped(device: str, dtype: torch.dtype, layers: int = 32) -> Any:
    """A Llama-3-8B-shaped model with random weights (h 4096, d 14336, `layers` layers)."""
    return random_llama("llama3-8b-shaped", device, dtype, layers)


def byte_tokenizer() -> Any:
    """A byte-level tokenizer built here (pad 0, eos 1, unk 2, then the 256 characters of code points < 256): for
    random models, whose vocabularies it fits, where no real tokenizer is at hand."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {chr(i): i + 3 for i in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Split("", "isolated"), decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", padding_side="left"
    )


def random_batches(vocab_size: int, rows: int = 2, length: int = 256, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """One calibration batch of random token ids, every token real: `calibrate` counts real tokens only, so the
    batch carries its attention mask (without one a batch of several rows cannot tell padding from text)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (rows, length), generator=generator)
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
