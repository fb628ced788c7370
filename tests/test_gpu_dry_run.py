"""Every GPU path on the CPU: the steps of `benchmarks/gpu_check.sh` at tiny shapes (its `--dry-run`), and the
failures a review found on those paths (issue 25), each with the code path it broke on."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from tiny import tiny_lm, tiny_task

from actsparse.cli import main

ROOT = Path(__file__).parent.parent
has = importlib.util.find_spec


def script(name: str):
    """A script of benchmarks/ as a module (they are not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the failures of issue 25 -------------------------------------------------------------------


def test_bench_decode_of_a_random_model_calibrates(tmp_path):
    """`bench --ops decode` on a random model (the CUDA default) builds batches `calibrate` can count."""
    out = tmp_path / "decode.json"
    argv = ["bench", "--device", "cpu", "--ops", "decode", "--model", "tiny-llama-shaped", "--layers", "2"]
    argv += ["--sparsities", "0.5", "--repeats", "1", "--decode-tokens", "2", "--rules", "threshold,top_k"]
    assert main([*argv, "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert [r["shape"].split()[-2] for r in records] == ["threshold", "top_k"]
    assert all(0.3 < r["measured_sparsity"] < 0.7 for r in records)


def test_eval_throughput_builds_its_random_model():
    """The random model of eval_throughput.py comes from where it lives now (it imported a name bench no
    longer has); the 8B shape stays a GPU benchmark."""
    eval_throughput = script("eval_throughput")
    where = type("Where", (), {"device": "cpu", "dtype": "float32", "torch_dtype": torch.float32})()
    model, tokenizer = eval_throughput._model("tiny-llama-shaped", where)
    assert model.config.hidden_size == 64 and tokenizer.pad_token is not None
    with pytest.raises(SystemExit, match="GPU benchmark"):
        eval_throughput._model("llama3-8b-shaped", where)


@pytest.mark.skipif(not has("lm_eval"), reason="lm-eval is not installed")
def test_lm_eval_backend_never_asks_for_batch_size_auto(monkeypatch):
    """On CUDA the executor asked lm-eval for batch_size='auto', which the bridge's HFLM refuses."""
    from actsparse.evaluate import lm_eval_bridge
    from actsparse.study import executors

    model, tokenizer = tiny_lm()
    seen = []

    def evaluate(model_, tokenizer_, task, doc_ids, *, batch_size):
        lm_eval_bridge._masked_hflm()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device="cpu")
        seen.append(batch_size)
        return "result"

    monkeypatch.setattr(lm_eval_bridge, "evaluate_lm_eval", evaluate)
    on_cuda = type("OnCuda", (), {"device": torch.device("cuda")})()  # only the device of a CUDA model
    for batch_size in (None, 4):
        context = executors.PointContext(model="m", tasks={"t": "t"}, doc_ids={"t": [0]}, backend="lm-eval")
        context.batch_size = batch_size
        assert executors._evaluate(on_cuda, tokenizer, "t", context, None, None) == ("result", None)
    assert seen == [executors.LM_EVAL_BATCH, 4]


def test_cached_path_scores_without_boolean_logits_to_keep(monkeypatch):
    """A transformers whose `logits_to_keep` takes no [B, T] mask: the cached path projects every position and
    selects, as the packed path does, with the same scores."""
    from actsparse.evaluate import packed
    from actsparse.evaluate.encode import Encoder
    from actsparse.evaluate.scorer import score_groups

    model, tokenizer = tiny_lm("llama")
    encoder = Encoder(tokenizer)
    groups = [g for d in range(4) for g in encoder.groups(tiny_task(n_docs=4, seed=3).request(d).pairs())]
    want = score_groups(model, groups, encoder.pad, packing=False)
    forward = model.forward

    def int_only(*args, logits_to_keep=0, **kwargs):
        if isinstance(logits_to_keep, torch.Tensor):
            raise TypeError("logits_to_keep takes an int in this transformers")
        return forward(*args, logits_to_keep=logits_to_keep, **kwargs)

    monkeypatch.setattr(model, "forward", int_only)
    monkeypatch.setattr(packed, "_masked_logits_to_keep", lambda: False)
    got = score_groups(model, groups, encoder.pad, packing=False)
    for a, b in zip(got, want, strict=True):
        assert a.lls == pytest.approx(b.lls, abs=1e-5) and a.greedy == b.greedy


def test_transfer_measures_in_the_precision_of_its_source_sweep(tmp_path, monkeypatch):
    """Every evaluation of a transfer, source sweep and transfer points alike, runs in the dtype the source sweep
    runs in (a float32 model given, bfloat16 asked for: as `--dtype auto` resolves on CUDA)."""
    import actsparse.evaluate
    from actsparse.study.transfer import TransferConfig, run_transfer

    evaluate, dtypes = actsparse.evaluate.evaluate_task, set()

    def recording(model, *args, **kwargs):
        dtypes.add(next(model.parameters()).dtype)
        return evaluate(model, *args, **kwargs)

    monkeypatch.setattr(actsparse.evaluate, "evaluate_task", recording)
    model, tok = tiny_lm("llama")
    config = TransferConfig(
        model="tiny",
        sources=[tiny_task("mc", 6)],
        destinations=[tiny_task("lam", 4, kind="lambada", seed=2)],
        targets=["input"],
        values=[0.9, 0.5],
        limit=6,
        dest_limit=4,
        resamples=20,
        out=tmp_path,
        device="cpu",
        dtype="bfloat16",
    )
    run_transfer(config, model, tok, show_progress=False)
    assert dtypes == {torch.bfloat16} and model.dtype == torch.float32  # the caller's model is left as it was


@pytest.mark.parametrize("command", ["outliers", "sensitivity", "transfer"])
def test_device_and_dtype_options(command, tmp_path, monkeypatch, capsys):
    """outliers, sensitivity and transfer take --device and --dtype, load the model there, and refuse a bad one
    (exit 2, one line) before any model work."""
    import actsparse.models.loading
    import actsparse.tasks

    loads = []

    def load(name, dtype=torch.float32, device="cpu", **kwargs):
        loads.append((str(dtype).removeprefix("torch."), str(device)))
        model, tok = tiny_lm("llama")
        return model.to(getattr(torch, str(dtype).removeprefix("torch."))), tok

    monkeypatch.setattr(actsparse.models.loading, "load_model", load)
    assert main([command, "--device", "tpu", "--out", str(tmp_path / "bad")]) == 2
    assert "--device takes" in capsys.readouterr().err
    assert not loads
    tasks = {"mc": tiny_task("mc", 6), "mc2": tiny_task("mc2", 6, seed=5)}
    monkeypatch.setattr(actsparse.tasks, "get_task", lambda name: tasks[name])
    argv = {
        "outliers": ["--tokens", "64"],
        "sensitivity": ["--tasks", "mc", "--p", "0.6", "--resamples", "20"],
        "transfer": ["--from", "mc", "--to", "mc2", "--values", "0.9", "--targets", "input", "--resamples", "20"],
    }[command]
    if command == "transfer":
        from actsparse.study import sweep, transfer

        monkeypatch.setattr(sweep.SweepConfig, "_resolve", lambda self, task: tasks.get(task, task))
        monkeypatch.setattr(transfer, "_name", lambda task: getattr(task, "name", task))
    code = main([command, *argv, "--device", "cpu", "--dtype", "bfloat16", "--out", str(tmp_path / "run")])
    assert code == 0 and loads == [("bfloat16", "cpu")]
