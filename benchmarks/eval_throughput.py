"""Dense scores and documents/second: actsparse's scorer against lm-evaluation-harness's HFLM.

Both score the same seeded documents with the same model object; lm-eval runs its own offline task
configs (its prompts, its metrics), so the accuracies check our prompts as well as our scorer. The
documents are scored in slices, ours and lm-eval's alternating, so that load from other processes
falls on both alike; lm-eval's time is that of its model calls (HFLM.loglikelihood), data loading
excluded on both sides.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/eval_throughput.py --limit 200 --json out.json
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
from actsparse.loading import load_model
from actsparse.tasks import get_task, select_docs


class LmEval:
    """lm-eval's HFLM on one offline task, timing only its log-likelihood calls."""

    def __init__(self, model, tokenizer, task: str, batch_size: int):
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
        if ids is not None:
            self.tokens += ids.numel()
            self.real += int(mask[:, -ids.shape[1] :].sum()) if mask is not None else ids.numel()

    def _count_rows(self, module, args) -> None:
        self.head_rows += args[0].shape[:-1].numel()

    def take(self) -> tuple[int, int, int, float]:
        """Tokens, real tokens, vocabulary rows and GFLOPs of the linear layers since the last call."""
        gflop = 2e-9 * (self.body_params * self.tokens + self.head_params * self.head_rows)
        out = self.tokens, self.real, self.head_rows, gflop
        self.tokens = self.real = self.head_rows = 0
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default="arc_easy,piqa,hellaswag")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slices", type=int, default=4, help="alternate ours and lm-eval over this many slices")
    parser.add_argument("--batch-size", type=int, default=16, help="documents per batch of our scorer")
    parser.add_argument("--hf-batch-size", type=int, default=16, help="requests per batch of lm-eval's HFLM")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    offline()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    model, tokenizer = load_model(args.model)
    print(
        f"{args.model}, torch threads {torch.get_num_threads()}, ours batch {args.batch_size} documents, "
        f"lm-eval HFLM batch {args.hf_batch_size} requests",
        flush=True,
    )
    work = Work(model)
    rows = []
    for name in args.tasks.split(","):
        task = get_task(name)
        ids = select_docs(task, args.limit, args.seed)
        theirs_fn = LmEval(model, tokenizer, name, args.hf_batch_size)
        evaluate_task(model, tokenizer, task, ids[:2])  # warm-up, both sides
        theirs_fn(ids[:2])
        theirs_fn.timer.seconds = 0.0
        ours: list[DocResult] = []
        theirs: list[DocResult] = []
        ours_s = 0.0
        ours_work, theirs_work = [0, 0, 0, 0.0], [0, 0, 0, 0.0]
        work.take()
        for k in range(args.slices):
            part = ids[k :: args.slices]
            start = time.perf_counter()
            ours += evaluate_task(model, tokenizer, task, part, batch_size=args.batch_size)[0].docs
            ours_s += time.perf_counter() - start
            ours_work = [a + b for a, b in zip(ours_work, work.take(), strict=True)]
            theirs += theirs_fn(part)
            theirs_work = [a + b for a, b in zip(theirs_work, work.take(), strict=True)]
        ours.sort(key=lambda d: d.doc_id)
        theirs.sort(key=lambda d: d.doc_id)
        theirs_s = theirs_fn.timer.seconds
        row = {"task": name, "split": task.split, "docs": len(ids), "ours_s": ours_s, "lm_eval_s": theirs_s}
        for metric in ("acc", "acc_norm"):
            a = sum(d.metrics[metric] for d in ours) / len(ours)
            b = sum(d.metrics[metric] for d in theirs) / len(theirs)
            row |= {f"ours_{metric}": a, f"lm_eval_{metric}": b, f"diff_{metric}_points": 100 * (a - b)}
        same = sum(x.metrics == y.metrics for x, y in zip(ours, theirs, strict=True))
        row["same_doc_metrics"] = same / len(ids)
        row["speedup"] = theirs_s / ours_s
        for side, (tokens, real, head_rows, gflop) in (("ours", ours_work), ("lm_eval", theirs_work)):
            row |= {f"{side}_tokens": tokens, f"{side}_real_tokens": real, f"{side}_head_rows": head_rows}
            row[f"{side}_gflop"] = gflop
            row[f"{side}_gflops"] = gflop / (ours_s if side == "ours" else theirs_s)
        row["work_ratio"] = theirs_work[3] / ours_work[3]
        # an exact scorer needs at least every real token once and the vocabulary at every scored position
        row["ours_floor_gflop"] = 2e-9 * (work.body_params * ours_work[1] + work.head_params * ours_work[2])
        rows.append(row)
        print(
            f"{name:10s} {len(ids)} docs | acc {row['ours_acc']:.4f} vs {row['lm_eval_acc']:.4f} "
            f"({row['diff_acc_points']:+.2f} pt) | acc_norm {row['ours_acc_norm']:.4f} vs "
            f"{row['lm_eval_acc_norm']:.4f} ({row['diff_acc_norm_points']:+.2f} pt) | per-doc metrics equal "
            f"{row['same_doc_metrics']:.3f} | {len(ids) / ours_s:.2f} vs {len(ids) / theirs_s:.2f} docs/s "
            f"({row['speedup']:.2f}x)",
            flush=True,
        )
        print(
            f"{'':10s} work: tokens {ours_work[0]} ({ours_work[1]} real) vs {theirs_work[0]} ({theirs_work[1]} real), "
            f"vocabulary rows {ours_work[2]} vs {theirs_work[2]}, {ours_work[3]:.0f} vs {theirs_work[3]:.0f} GFLOP "
            f"({row['work_ratio']:.2f}x less), {row['ours_gflops']:.0f} vs {row['lm_eval_gflops']:.0f} GFLOP/s",
            flush=True,
        )
    total = sum(r["lm_eval_s"] for r in rows) / sum(r["ours_s"] for r in rows)
    worst = max(max(abs(r["diff_acc_points"]), abs(r["diff_acc_norm_points"])) for r in rows)
    print(f"overall speed-up {total:.2f}x (total lm-eval time / total ours); largest accuracy gap {worst:.2f} points")
    less = sum(r["lm_eval_gflop"] for r in rows) / sum(r["ours_gflop"] for r in rows)
    floor = sum(r["lm_eval_gflop"] for r in rows) / sum(r["ours_floor_gflop"] for r in rows)
    print(f"overall work ratio {less:.2f}x (lm-eval GFLOP / ours): the speed-up at equal GFLOP/s")
    print(f"work ratio without our padding {floor:.2f}x: the most any exact scorer gets at lm-eval's GFLOP/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "model": args.model,
                    "tasks": rows,
                    "speedup": total,
                    "work_ratio": less,
                    "work_ratio_unpadded": floor,
                    "max_gap_points": worst,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
