"""`actsparse study` (the paper's preset: estimate from a timed probe, recorded, then a resumable sweep),
`actsparse tasks` and `actsparse models`, and the provenance every run folder records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny import tiny_lm

from actsparse import cli
from actsparse.cli.study import expected_values, study_config
from actsparse.cli.tasks import KIND_ORDER
from actsparse.sparsity.registry import RULES
from actsparse.study.provenance import command_line, model_source
from actsparse.study.store import RunStore
from actsparse.study.sweep import PAPER_VALUES
from actsparse.tasks import EXTRA_TASK_NAMES, TASK_NAMES


def test_study_defaults_are_the_papers_study(tmp_path: Path) -> None:
    args = cli.build_parser().parse_args(["study", "--model", "org/m", "--out", str(tmp_path)])
    config = study_config(args)
    assert config.values_for("top_p") == PAPER_VALUES and len(PAPER_VALUES) == 26
    assert config.values_for("max_p") == RULES["max_p"].grid != PAPER_VALUES  # max_p on its own unit's grid
    assert list(config.targets) == ["input", "gate", "up", "intermediate"]
    assert list(config.rules) == ["top_p", "max_p"] and config.search == "bisect"
    assert len(config.tasks) == 10 and config.limit is None
    for rule in config.rules:
        typical, most = expected_values(config, rule)
        assert 2 <= typical <= most < len(config.values_for(rule))


def test_study_prints_and_records_its_estimate_then_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("COLUMNS", "500")
    loads: list[tuple] = []

    def tiny(name, dtype, device, **kwargs):
        loads.append((name, dtype, device))
        return tiny_lm()

    monkeypatch.setattr("actsparse.models.loading.load_model", tiny)
    out = tmp_path / "study"
    common = ["study", "--model", "org/tiny", "--out", str(out), "--tasks", "arc_easy,piqa", "--limit", "3"]
    assert cli.main([*common, "--probe-docs", "2", "--estimate-only"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "estimate:" in err and "from a probe of 2 documents per task" in err
    for rule in ("top_p", "max_p"):  # each rule's grid, in its own unit
        assert RULES[rule].describe() in err
    record = json.loads((out / "estimate.json").read_text())
    assert record["grids"] == {rule: list(RULES[rule].grid) for rule in ("top_p", "max_p")}
    assert set(record["probe"]) == {"arc_easy", "piqa"} and record["documents"] == {"arc_easy": 3, "piqa": 3}
    assert record["seconds"]["most"] >= record["seconds"]["typical"] > 0
    assert loads == [("org/tiny", "float32", "cpu")]
    with RunStore.open(out) as store:
        assert store.keys() == set(), "--estimate-only stores no point"
    args = [
        *common,
        "--targets",
        "input",
        "--rules",
        "top_p",
        "--resamples",
        "20",
        "--no-progress",
        "--probe-docs",
        "1",
    ]
    assert cli.main(args) == 0
    with RunStore.open(out) as store:
        first = store.keys()
        search = store.get_meta("search")
    assert search["method"] == "bisect" and len(first) > 2
    assert cli.main(args) == 0  # resumes: nothing left to do, nothing stored twice
    with RunStore.open(out) as store:
        assert store.keys() == first
        assert store.get_meta("provenance")["command"].startswith("actsparse study --model org/tiny")


def test_tasks_lists_the_offline_suite_with_counts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["tasks", "--json", str(tmp_path / "t.json")]) == 0
    listed = json.loads((tmp_path / "t.json").read_text())
    rows = {r["task"]: r for r in listed}
    assert set(rows) == set(TASK_NAMES + EXTRA_TASK_NAMES), "every task a command accepts"
    assert sum(r["suite"] for r in listed) == 10 and rows["arc_easy"]["documents"] == 570
    assert rows["piqa"]["documents"] == 1838 and rows["humaneval_bpb"]["documents"] == 164
    assert all(r["bytes"] > 0 for r in rows.values())
    kinds = [r["kind"] for r in listed]
    assert kinds == sorted(kinds, key=KIND_ORDER.index), "grouped by kind"
    out = capsys.readouterr().out
    assert "arc_easy" in out and "gsm8k_bpb" in out


def test_models_lists_the_aliases_with_files_and_quantisation(tmp_path: Path) -> None:
    assert cli.main(["models", "--json", str(tmp_path / "m.json")]) == 0
    rows = {r["model"]: r for r in json.loads((tmp_path / "m.json").read_text())}
    smol = rows["smollm2-135m"]
    assert smol["available"] and smol["file"].endswith(".gguf") and smol["quantisation"] == "Q4_1"


def test_provenance_names_the_gguf_quantisation_and_the_command() -> None:
    source = model_source("smollm2-135m")
    assert source["kind"] == "alias" and source["file"].endswith("Q4_1.gguf")
    assert source["dequantised_from"]["file_type"] == "Q4_1"
    line = command_line(["sweep", "--dtype", "auto", "--out", "a b"], "cpu", "float32")
    assert line["command"] == "actsparse sweep --dtype auto --out 'a b'"
    assert line["reproduce"] == "actsparse sweep --dtype float32 --out 'a b' --device cpu"
