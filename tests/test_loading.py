"""load_model on the embedded models, folders, GGUF files and hub ids, offline."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import actsparse
from actsparse.models.loading import ModelNotAvailableError, resolve


def test_hub_id_offline_gives_a_clear_error(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError, match="not a local folder or .gguf file"):
        actsparse.load_model("no-such-org/no-such-model")


def test_bad_paths_give_clear_errors(tmp_path) -> None:
    with pytest.raises(ModelNotAvailableError, match="GGUF file not found"):
        resolve(str(tmp_path / "model.gguf"))
    with pytest.raises(ModelNotAvailableError, match="has no config.json"):
        resolve(str(tmp_path))


def test_local_folder_round_trip(tmp_path) -> None:
    from tiny import tiny_model

    tiny_model("qwen3").save_pretrained(tmp_path / "m")
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(97)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), unk_token="t0")
    tok.save_pretrained(tmp_path / "m")
    model, tokenizer = actsparse.load_model(str(tmp_path / "m"), dtype="bfloat16")
    assert model.config.model_type == "qwen3" and tokenizer.padding_side == "left"
    assert model.dtype == torch.bfloat16 and not model.training
    assert tokenizer.pad_token is not None


@pytest.mark.slow
def test_smollm2_loads_offline_and_continues_greedily() -> None:
    model, tokenizer = actsparse.load_model("smollm2-135m")
    assert model.config.model_type == "llama" and len(actsparse.find_ffns(model)) == 30
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1] :])


@pytest.mark.slow
def test_profile_cli_prints_table_continuation_and_json(tmp_path) -> None:
    out = tmp_path / "profile.json"
    text = tmp_path / "text.txt"
    text.write_text("Sparse activations let an engine skip weights. " * 8)
    cmd = [sys.executable, "-m", "actsparse.cli", "profile", "--target", "intermediate", "--value", "0.9"]
    result = subprocess.run(
        [*cmd, "--text-file", str(text), "--json", str(out), "--generate", "4"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "120"},
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout and "layer" in result.stdout
    record = json.loads(out.read_text())
    per_layer = record["stats"]["prefill"]["per_layer"]
    assert len(per_layer) == 30 and all(0.2 < s < 0.9 for s in per_layer.values())
    assert "Paris" in record["continuation"]


def test_profile_cli_rejects_bad_values_before_loading() -> None:
    from actsparse.cli import main

    assert main(["profile", "--model", "/nonexistent/model.gguf", "--value", "1.5"]) == 2
    assert main(["profile", "--target", "hidden"]) == 2
