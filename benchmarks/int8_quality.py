"""Quality of the int8 weight format: dense int8 against float32 on multiple-choice tasks, llama.cpp Q8_0 beside it.

    python benchmarks/int8_quality.py [--model smollm2-135m] [--tasks arc_easy,piqa] [--limit 200]
                                      [--llama Q8_0,F32] [--json PATH]

Every choice of every document (the same seeded documents as a sweep's `--limit`) is scored by the
log-likelihood of its continuation, tokenised as the scorer does (`evaluate.encode`), by three backends on
the same token ids: the float32 model; the model with every matrix the int8 decode reads replaced by its
int8 values (`kernels.int8`, dequantised: q, k, v, o and the LM head in [out, in] blocks, the FFN transposed,
as `StaticDecoder(weights="int8")` and `accelerate(weights="int8")` read them; the embedding stays float);
and llama.cpp's files of the same GGUF through llama-cpp-python's logits (skipped without it). Printed
per backend: acc and acc_norm, their paired difference to float32 with a 95 % paired-bootstrap interval
over documents, and the mean KL(float32 ‖ backend) over the scored positions (full vocabulary). llama.cpp
F32 against our float32 measures how far two float32 engines already differ (a floor for the KL).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from llamacpp_compare import LLAMA_FORMATS, llama_files, llamacpp
from torch import nn

LogProbs = Callable[[list[tuple[list[int], int]]], list[torch.Tensor]]
"""[(token ids, n)] → per sequence the next-token log-probs [n, vocab] (float64) of its n positions before the last."""


@contextmanager
def int8_values(model: Any) -> Iterator[None]:
    """The model computing with the int8 decode's weights: each matrix it quantizes replaced by its dequantised
    int8 values (the FFN's quantized transposed, blocks along its rows), restored bit for bit on exit."""
    from actsparse.models.adapters import find_ffns
    from actsparse.speed.kernels.int8 import quantize

    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    with torch.no_grad():
        for layer in model.model.layers:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                w = getattr(layer.self_attn, name).weight
                saved.append((w, w.detach().clone()))
                w.copy_(quantize(w).dequantize(w.dtype))
        for ffn in find_ffns(model):
            weights = ffn.adapter.gated_weights(ffn.module)
            assert weights is not None, "a gated FFN"
            for w in (weights.gate, weights.up, weights.down):
                saved.append((w, w.detach().clone()))
                w.copy_(quantize(w.t()).dequantize(w.dtype).t())
    head = model.lm_head.weight  # tied to the embedding in SmolLM2: a new parameter, the embedding stays float
    model.lm_head.weight = nn.Parameter(quantize(head).dequantize(head.dtype), requires_grad=False)
    try:
        yield
    finally:
        model.lm_head.weight = head
        with torch.no_grad():
            for w, original in saved:
                w.copy_(original)


def torch_logprobs(model: Any) -> LogProbs:
    def run(seqs: list[tuple[list[int], int]]) -> list[torch.Tensor]:
        width = max(len(ids) for ids, _ in seqs)  # padded on the right: a causal model's earlier positions ignore it
        batch = torch.tensor([ids + [ids[-1]] * (width - len(ids)) for ids, _ in seqs])
        with torch.no_grad():
            logits = model(batch).logits
        return [logits[i, len(ids) - n - 1 : len(ids) - 1].double().log_softmax(-1) for i, (ids, n) in enumerate(seqs)]

    return run


def llama_logprobs(path: Path, threads: int) -> LogProbs:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_threads=threads, n_ctx=2048, logits_all=True, verbose=False)

    def one(ids: list[int], n: int) -> torch.Tensor:
        llm.reset()
        llm.eval(ids)
        return torch.from_numpy(np.array(llm.scores[len(ids) - n - 1 : len(ids) - 1])).double().log_softmax(-1)

    def run(seqs: list[tuple[list[int], int]]) -> list[torch.Tensor]:
        return [one(ids, n) for ids, n in seqs]

    return run


def score_docs(task_name: str, limit: int, tokenizer: Any, backends: dict[str, LogProbs]) -> dict[str, dict]:
    """Per backend: acc and acc_norm per document, and per document the mean KL(first backend ‖ it)."""
    from actsparse.evaluate.encode import Encoder
    from actsparse.evaluate.metrics import choice_metrics
    from actsparse.tasks import MultipleChoice, get_task, select_docs

    task = get_task(task_name)
    encoder = Encoder(tokenizer)
    out: dict[str, dict[str, list[float]]] = {name: {"acc": [], "acc_norm": [], "kl": []} for name in backends}
    base = next(iter(backends))
    for doc_id in select_docs(task, limit):
        request = task.request(doc_id)
        if not isinstance(request, MultipleChoice):
            raise ValueError(f"{task_name} is not a multiple-choice task")
        pairs = [encoder.pair(c, x) for c, x in request.pairs()]
        seqs = [(ctx + cont, len(cont)) for ctx, cont in pairs]
        reads = {name: logprobs(seqs) for name, logprobs in backends.items()}
        lls = {
            name: [
                float(logp[torch.arange(len(cont)), torch.tensor(cont)].sum())
                for logp, (_, cont) in zip(r, pairs, strict=True)
            ]
            for name, r in reads.items()
        }
        ref = torch.cat(reads[base])
        for name in backends:
            metrics, _, _ = choice_metrics(lls[name], request.choices, request.gold)
            out[name]["acc"].append(metrics["acc"])
            out[name]["acc_norm"].append(metrics["acc_norm"])
            logp = torch.cat(reads[name])
            out[name]["kl"].append(float((ref.exp() * (ref - logp)).sum(-1).mean()))
    return out


def paired_interval(diff: np.ndarray, resamples: int = 10000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of the mean of paired differences, resampling documents."""
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="an actsparse model alias or .gguf file")
    parser.add_argument("--tasks", default="arc_easy,piqa", help="comma list of multiple-choice tasks")
    parser.add_argument("--limit", type=int, default=200, help="documents per task (a seeded sample)")
    parser.add_argument("--llama", default="Q8_0,F32", help="comma list of llama.cpp formats ('' for none)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--int8", action=argparse.BooleanOptionalAction, default=True, help="score actsparse's int8 (--no-int8: skip)"
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    formats = [f for f in args.llama.split(",") if f]
    if unknown := set(formats) - set(LLAMA_FORMATS):
        parser.error(f"unknown llama.cpp formats {sorted(unknown)}; choose from {', '.join(LLAMA_FORMATS)}")
    if args.limit < 1:
        parser.error("--limit must be at least 1")

    from actsparse.models.loading import load_model, resolve
    from actsparse.speed.kernels.cbuild import cache_dir

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, dtype=torch.float32, device="cpu")
    llama: dict[str, LogProbs] = {}
    if formats and llamacpp() is None:
        print("llama-cpp-python is not installed: the llama.cpp rows are skipped", file=sys.stderr)
    elif formats:
        kind, source = resolve(args.model)
        if kind == "gguf" and source is not None:
            files = llama_files(source, cache_dir() / "llamacpp", formats, args.threads)
            llama = {f"llama.cpp {name}": llama_logprobs(path, args.threads) for name, path in files.items()}
    quantized = copy.deepcopy(model) if args.int8 else None
    backends: dict[str, LogProbs] = {"float32": torch_logprobs(model)}
    if quantized is not None:
        backends["int8 (actsparse)"] = torch_logprobs(quantized)
    backends.update(llama)
    with int8_values(quantized) if quantized is not None else contextlib.nullcontext():
        per_task = {task: score_docs(task, args.limit, tokenizer, backends) for task in args.tasks.split(",")}
    results: dict[str, Any] = {}
    print(f"{args.model}: {', '.join(args.tasks.split(','))}, {args.limit} documents each; paired against float32")
    ci = "[95% CI]"
    print(f"{'backend':18} {'task':9} {'acc':>6} {'Δacc ' + ci:>24} {'acc_norm':>8} {'Δacc_norm ' + ci:>24} {'KL':>9}")
    for name in backends:
        for task in [*per_task, "all"]:
            tasks = list(per_task) if task == "all" else [task]
            row: dict[str, Any] = {}
            for metric in ("acc", "acc_norm"):
                mine = np.concatenate([per_task[t][name][metric] for t in tasks])
                base = np.concatenate([per_task[t]["float32"][metric] for t in tasks])
                diff = mine - base
                row[metric] = float(mine.mean())
                row[f"{metric}_diff"] = float(diff.mean())
                row[f"{metric}_interval"] = paired_interval(diff)
            row["kl"] = float(np.mean(np.concatenate([per_task[t][name]["kl"] for t in tasks])))
            results.setdefault(name, {})[task] = row

            def cell(metric: str, row: dict[str, Any] = row) -> str:
                low, high = row[f"{metric}_interval"]
                return f"{row[f'{metric}_diff']:+.3f} [{low:+.3f}, {high:+.3f}]"

            print(
                f"{name:18} {task:9} {row['acc']:6.3f} {cell('acc'):>24} {row['acc_norm']:8.3f} "
                f"{cell('acc_norm'):>24} {row['kl']:9.2e}"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
