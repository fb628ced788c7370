"""Device and dtype (issue 12): bf16 and fp16 sweeps on tiny models of every family, the options bound to
the run folder (a mismatch exits 2 before model work), precision as a sweep axis with a paired
difference, float64 top-p sums under half-precision activations, provenance and plain progress lines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import FAMILIES, tiny_lm, tiny_sweep_config, tiny_task

from actsparse import cli
from actsparse.analysis import Curve
from actsparse.models import placement
from actsparse.sparsity.rules import reference_mask, top_p_mask
from actsparse.study.precision import paired_difference, run_dtypes_sweep
from actsparse.study.store import PointKey, RunStore
from actsparse.study.sweep import plan, run_sweep


def _err(capsys: pytest.CaptureFixture) -> str:
    return " ".join(capsys.readouterr().err.split())


def test_options_parse_and_resolve_on_this_machine() -> None:
    assert placement.parse_device(" CUDA:1 ") == "cuda:1" and placement.parse_dtype("torch.bfloat16") == "bfloat16"
    assert placement.parse_dtypes("float32, float16") == ("float32", "float16")
    for bad in ("gpu", "cuda:x", "mps:0"):
        with pytest.raises(ValueError, match="--device takes"):
            placement.parse_device(bad)
    with pytest.raises(ValueError, match="--dtype takes"):
        placement.parse_dtype("int8")
    with pytest.raises(ValueError, match="twice"):
        placement.parse_dtypes("float16,float16")
    with pytest.raises(ValueError, match="--dtypes takes"):
        placement.parse_dtypes("auto")
    assert placement.resolve_dtype("auto", "cuda:3") == "bfloat16"
    assert placement.resolve_dtype("auto", "cpu") == "float32"
    assert placement.resolve_dtype("auto", "cuda", checkpoint="float16") == "float16"  # HFLM's reading
    if not torch.cuda.is_available():
        assert placement.resolve("auto", "auto") == placement.Placement("cpu", "float32")
        with pytest.raises(ValueError, match="no CUDA device"):
            placement.resolve_device("cuda")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dtype", "bfloat16", "--dtypes", "float32,float16"], "give --dtype or --dtypes, not both"),
        (["--batch-tokens", "0"], "--batch-tokens must be at least 1"),
    ]
    + ([] if torch.cuda.is_available() else [(["--device", "cuda:0"], "no CUDA device is available")]),
)
def test_bad_device_or_dtype_is_refused_before_model_work(
    tmp_path: Path, capsys: pytest.CaptureFixture, no_model: None, args: list[str], message: str
) -> None:
    out = tmp_path / "run"
    assert cli.main(["sweep", "--out", str(out), "--tasks", "arc_easy", *args]) == 2
    assert message in _err(capsys)
    assert not (out / "results.sqlite").exists()


def test_unknown_dtype_is_an_argument_error(capsys: pytest.CaptureFixture, no_model: None) -> None:
    for command in ("sweep", "profile", "calibrate", "bench", "study"):
        assert cli.main([command, "--dtype", "int8"]) == 2  # argparse's usage error, as an exit code
        assert "--dtype takes auto" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("key", "stored", "args"), [("dtype", "float32", ["--dtype", "bfloat16"]), ("device", "cuda", ["--device", "cpu"])]
)
def test_another_dtype_or_device_in_a_folder_exits_2_and_keeps_its_points(
    tmp_path: Path, capsys: pytest.CaptureFixture, no_model: None, key: str, stored: str, args: list[str]
) -> None:
    from actsparse.evaluate.results import DocResult, TaskResult

    out = tmp_path / "run"
    with RunStore.open(out) as store:
        store.bind(key, stored)
        store.put(PointKey.dense("arc_easy"), TaskResult("arc_easy", "validation", "acc_norm", [DocResult(0, 1.0)]))
    before = (out / "results.sqlite").read_bytes()
    assert cli.main(["sweep", "--out", str(out), "--tasks", "arc_easy", "--limit", "5", *args]) == 2
    value = args[1]
    assert f"{key} = '{stored}', not '{value}'" in _err(capsys)
    with RunStore.open(out) as store:
        assert store.keys() == {PointKey.dense("arc_easy")}
    assert (out / "results.sqlite").read_bytes()[:100] == before[:100]


def test_a_folder_from_before_dtypes_were_bound_counts_as_float32(tmp_path: Path, no_model: None, capsys) -> None:
    from actsparse.evaluate.results import DocResult, TaskResult

    out = tmp_path / "old"
    with RunStore.open(out) as store:
        store.put(PointKey.dense("arc_easy"), TaskResult("arc_easy", "validation", "acc_norm", [DocResult(0, 1.0)]))
    assert cli.main(["sweep", "--out", str(out), "--tasks", "arc_easy", "--dtype", "float16"]) == 2
    assert "dtype = 'float32', not 'float16'" in _err(capsys)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_half_precision_sweeps_run_on_every_family(tmp_path: Path, family: str, dtype: str) -> None:
    model, tokenizer = tiny_lm(family)
    config = tiny_sweep_config(
        tmp_path / "run", targets=["intermediate"], values=[0.8], tasks=[tiny_task("mc", 6)], limit=None, dtype=dtype
    )
    summary = run_sweep(config, model, tokenizer, show_progress=False)
    assert model.dtype == torch.float32, "the caller's model is left as it was"
    (point,) = summary["points"]
    assert 0.05 < point["sparsity"] < 0.95 and point["kl"] is not None
    assert summary["settings"]["dtype"] == dtype and summary["settings"]["device"] == "cpu"
    assert summary["provenance"]["dtype"] == dtype
    with RunStore.open(tmp_path / "run") as store:
        assert store.get_meta("dtype") == dtype and len(store.keys()) == len(plan(config))


def _curve(dense: dict[str, np.ndarray], scores: dict[str, np.ndarray], sparsity: list[float]) -> Curve:
    x = np.array(sparsity)
    return Curve("input", "top_p", [0.9, 0.7, 0.5][: len(x)], x, dict.fromkeys(dense, x), dense, scores)


def test_paired_difference_uses_one_resample_for_both_dtypes() -> None:
    rng = np.random.default_rng(1)
    dense = {"t": rng.integers(0, 2, 300).astype(float)}
    scores = {"t": np.stack([np.where(rng.random(300) < p, dense["t"], 0.0) for p in (1.0, 0.97, 0.8)])}
    a = _curve(dense, scores, [0.2, 0.4, 0.6])
    same = paired_difference(a, a, resamples=200)
    assert same["value"] == 0 and same["ci_low"] == same["ci_high"] == 0, "paired: identical curves differ by 0"
    shifted = _curve(dense, scores, [0.3, 0.5, 0.7])  # the same damage 10 points of sparsity later
    d = paired_difference(a, shifted, resamples=200)
    assert d["value"] == pytest.approx(0.1) and d["ci_low"] == pytest.approx(0.1) and d["ci_high"] == pytest.approx(0.1)
    other = {"t": np.stack([np.where(rng.random(300) < p, dense["t"], 0.0) for p in (0.99, 0.9, 0.7)])}
    d = paired_difference(a, _curve(dense, other, [0.2, 0.4, 0.6]), resamples=200)
    assert d["ci_low"] <= d["value"] <= d["ci_high"] and d["ci_low"] < d["ci_high"]


def test_dtypes_give_one_curve_per_dtype_and_a_paired_difference(tmp_path: Path) -> None:
    from actsparse.report import write_report

    model, tokenizer = tiny_lm()
    out = tmp_path / "run"
    config = tiny_sweep_config(out, targets=["input"], values=[0.9, 0.6])
    summary = run_dtypes_sweep(config, ["float32", "bfloat16"], model, tokenizer, show_progress=False)
    assert summary["dtypes"] == ["float32", "bfloat16"] and summary["tasks"] == ["mc", "lam"]
    for dtype in ("float32", "bfloat16"):
        assert len(summary["points"][dtype]) == 2, "one curve (two points) per dtype"
        with RunStore.open(out / dtype) as store:
            assert store.get_meta("dtype") == dtype
            docs = {k.task: [d.doc_id for d in r.docs] for k, r in store.items() if k.is_dense}
        if dtype == "float32":
            first = docs
        assert docs == first, "every dtype scores the same documents"
    by_dtype = summary["critical_sparsity"]["input/top_p"]
    assert set(by_dtype) == {"float32", "bfloat16"}
    for c in by_dtype.values():
        assert c["ci_low"] <= c["value"] <= c["ci_high"]
    diff = summary["differences"]["input/top_p"]["bfloat16 - float32"]
    assert diff["value"] == pytest.approx(by_dtype["bfloat16"]["value"] - by_dtype["float32"]["value"], abs=1e-9)
    assert diff["ci_low"] <= diff["value"] <= diff["ci_high"]
    assert set(summary["dense_differences"]["mc"]) == {"bfloat16 - float32"}
    assert json.loads((out / "summary.json").read_text()) == summary
    paths = write_report(out, resamples=50)
    md = (out / "report.md").read_text()
    assert "float32" in md and "bfloat16" in md and "paired" in md.lower()
    assert (out / "report.html") in paths and (out / "bfloat16" / "report.md").exists()
    # a single-dtype sweep into the --dtypes folder is refused
    with pytest.raises(RuntimeError, match="--dtypes"):
        run_sweep(tiny_sweep_config(out), model, tokenizer, show_progress=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_top_p_sums_stay_float64_under_half_precision_activations(dtype: torch.dtype) -> None:
    # float16 sums of these would overflow (max 65504) and bfloat16 sums would round away the small entries
    v = torch.tensor([[40000.0, 30000.0, 20000.0, 8.0, 4.0, 2.0, 1.0, 0.5]], dtype=dtype)
    for p in (0.3, 0.5, 0.9, 0.9999, 0.99999):
        keep = top_p_mask(v, p)
        assert keep.tolist() == reference_mask(v, "top_p", p).tolist()
    assert top_p_mask(v, 0.5)[0].tolist() == [True, True, False, False, False, False, False, False]
    assert 4 <= int(top_p_mask(v, 0.99999).sum()) <= 7, "the small entries count: float64 sums"
    gen = torch.Generator().manual_seed(0)
    rows = (torch.randn(64, 333, generator=gen) * torch.rand(64, 1, generator=gen) * 50).to(dtype)
    for p in (0.5, 0.9, 0.99):
        assert torch.equal(top_p_mask(rows, p), reference_mask(rows, "top_p", p))


def test_plain_progress_lines_when_stdout_is_not_a_terminal(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model, tokenizer = tiny_lm()
    config = tiny_sweep_config(tmp_path / "run", targets=["input"], values=[0.7])
    run_sweep(config, model, tokenizer, show_progress=True)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("sweep ")]
    n = len(plan(config))
    assert len(lines) == n, "one line per finished point"
    assert lines[0].startswith(f"sweep 1/{n} dense mc: 10 docs in ") and "docs/s, ETA" in lines[0]
    assert lines[-1].startswith(f"sweep {n}/{n} input/top_p 0.7 lam: 8 docs") and lines[-1].endswith("ETA 0:00")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_sweep_of_smollm2_records_its_provenance(
    tmp_path: Path, capsys: pytest.CaptureFixture, dtype: str
) -> None:
    out = tmp_path / dtype
    args = ["sweep", "--out", str(out), "--targets", "intermediate", "--values", "0.9", "--tasks", "arc_easy"]
    args += ["--limit", "4", "--resamples", "20", "--device", "cpu", "--dtype", dtype]
    assert cli.main(args) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"sweep {dtype} ")]
    assert len(lines) == 2 and "docs/s" in lines[0]
    assert cli.main(["report", str(out), "--resamples", "20"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["dtype"] == dtype and summary["n_docs"] == {"arc_easy": 4}
    (point,) = summary["points"]
    assert 0.2 < point["sparsity"] < 0.9 and point["kl"] is not None
    prov = summary["provenance"]
    assert prov["dtype"] == dtype and prov["device"] == "cpu"
    assert prov["model"]["dequantised_from"]["file_type"] == "Q4_1"
    assert prov["versions"]["torch"] == torch.__version__ and prov["versions"]["transformers"]
    assert prov["reproduce"] == "actsparse " + " ".join(args)
    report = (out / "report.md").read_text()
    assert "## Provenance" in report and f"dtype: {dtype}" in report and "Q4_1" in report


def test_lm_eval_semantics_of_dtype_auto_is_the_checkpoints_own(tmp_path: Path) -> None:
    from tiny import tiny_model, tiny_tokenizer

    tiny_model("llama", dtype=torch.bfloat16).save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    own = placement.checkpoint_dtype(str(tmp_path / "m"))
    assert own == "bfloat16"
    assert placement.resolve_dtype("auto", "cpu", checkpoint=own) == "bfloat16"  # HFLM: the checkpoint's dtype
    assert placement.resolve_dtype("auto", "cpu") == "float32"  # our loader (SPEC §4b)
    assert placement.checkpoint_dtype("smollm2-135m") == "float32"  # a GGUF file is dequantised to float32
