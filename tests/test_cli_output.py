"""What the command line prints, and what it imports to print it: --help, `tasks`, `models` and every argument
error answer without torch or transformers (held by sys.modules, not by timing); a usage error is one line;
messages are not hard-wrapped outside a terminal; the bench table reads whole at 100 columns."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

import actsparse
from actsparse import cli
from actsparse.cli.bench import TABLE_COLUMNS, table

SOURCE = Path(actsparse.__file__).resolve().parents[1]
"""The actsparse under test, for the fresh interpreter (whatever the working folder)."""

HEAVY = ("torch", "transformers", "lm_eval", "ray", "triton", "scipy", "sklearn")
"""Packages whose import costs seconds: none of them may load before a command has checked its arguments."""

ANSWERED_AT_ONCE = [
    ["--help"],
    *([name, "--help"] for name in cli.COMMANDS),
    ["tasks"],
    ["models"],
    ["sweep", "--limit", "0"],
    ["sweep", "--limit", "ten"],
    ["sweep", "--resamples", "0"],
    ["sweep", "--dtype", "int8"],
    ["sweep", "--targets", "input,outputs"],
    ["sweep", "--rules", "top_q"],
    ["sweep", "--tasks", "nosuchtask"],
    ["sweep", "--values", "0.9,1.5"],
    ["sweep", "--model", "smollm3-135m"],
    ["profile", "--max-tokens", "0"],
    ["profile", "--value", "1.5"],
    ["profile", "--text-file", "missing.txt"],
    ["calibrate", "--sparsity", "1.5", "--out", "taus.json"],
    ["calibrate", "--sparsity", "0.5", "--out", "missing/taus.json"],
    ["sensitivity", "--target", "hidden"],
    ["sensitivity", "--tasks", "nosuchtask"],
    ["transfer", "--targets", "hidden"],
    ["study", "--targets", "hidden"],
    ["bench", "--ops", "nope"],
    ["bench", "--sparsities", "1.5"],
    ["report", "--resamples", "0"],
    ["sensitivity", "--every", "0"],
    ["nosuchcommand"],
]

PROBE = """
import json, sys
from actsparse.cli import main
heavy, argvs, loaded = json.loads(sys.argv[1]), json.loads(sys.argv[2]), {}
for argv in argvs:
    code = main(argv)
    loaded[" ".join(argv)] = [code, sorted(m for m in heavy if m in sys.modules)]
print(json.dumps(loaded))
"""


def test_help_listings_and_argument_errors_import_no_heavy_package(tmp_path) -> None:
    """One fresh interpreter runs every case in turn: a case that imports torch is named (those after it too)."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(HEAVY), json.dumps(ANSWERED_AT_ONCE)],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # `tasks` and `models` write nothing, and no run folder appears here
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(SOURCE), os.environ.get("PYTHONPATH", "")])},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.splitlines()[-1])
    first = next((f"{argv!r} imported {heavy}" for argv, (_, heavy) in loaded.items() if heavy), None)
    assert first is None, first
    codes = {argv: code for argv, (code, _) in loaded.items()}
    assert codes["tasks"] == codes["models"] == codes["--help"] == 0
    assert {argv: code for argv, code in codes.items() if "--help" not in argv and argv not in ("tasks", "models")} == {
        argv: 2 for argv in codes if "--help" not in argv and argv not in ("tasks", "models")
    }
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sweep", "--limit", "0"], "--limit 0 would score no document: give a positive number, or 'all'"),
        (["sweep", "--limit", "ten"], "--limit takes a number of documents or 'all', got 'ten'"),
        (["sweep", "--resamples", "0"], "--resamples must be at least 10, got 0"),
        (["sweep", "--dtype", "int8"], "--dtype takes auto, float32, bfloat16, float16, got 'int8'"),
        (["profile", "--max-tokens", "0"], "--max-tokens must be at least 1, got 0"),
        (["sensitivity", "--every", "0"], "--every must be at least 1, got 0"),
    ],
)
def test_a_range_error_is_one_line_without_the_usage_block(
    capsys: pytest.CaptureFixture, no_model: None, argv: list[str], message: str
) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"actsparse {argv[0]}: error: {message} (see actsparse {argv[0]} --help)\n"


def test_a_long_message_is_not_wrapped_outside_a_terminal(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, no_model: None
) -> None:
    monkeypatch.delenv("COLUMNS")  # the width a log gets: rich's default of 80
    deep = tmp_path / ("a-long-folder-name-" * 6)
    deep.mkdir()
    (deep / "file").write_text("x")
    assert cli.main(["sweep", "--out", str(deep / "file" / "run")]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and len(lines[0]) > 200 and lines[0].endswith("file is a file, not a folder")


def _record(op: str, shape: str, **extra) -> dict:
    return {
        "op": op,
        "shape": shape,
        "sparsity": 0.5,
        "measured_sparsity": 0.5012,
        "dense_us": 123456.7,
        "sparse_us": 98765.4,
        "speedup": 1.25,
        "ideal": 10.12,
        "kernel": "pytorch",
        "timing": "cpu-wall",
        "load": "3.91 4.05 4.20",
        **extra,
    }


def test_the_bench_table_reads_whole_at_100_columns() -> None:
    records = [
        _record("gemv", "28672x8192", limit_speedup=1.91, kernel="triton"),
        _record("ffn", "8192x28672", limit_speedup=9.1, kernel="fused-c"),
        _record(
            "decode",
            "smollm2-135m threshold (generate)",
            model="smollm2-135m",
            rule="threshold",
            decoder="generate",
            kernel="fused-c+attention-c",
        ),
    ]
    console = Console(width=100, record=True, file=io.StringIO())
    console.print(table(records, "decode speed on cpu (float32, 2 threads; load average 3.91 at the end)"))
    text = console.export_text()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 100, text
    assert " ".join(TABLE_COLUMNS) in " ".join(text.split())
    rows = [line.split() for line in text.splitlines()]
    decode = [
        "decode",
        "threshold",
        "0.50",
        "0.501",
        "123456.7",
        "98765.4",
        "1.25×",
        "-",
        "10.12×",
        "fused-c+attention-c",
    ]
    assert decode in rows
    assert "decode: smollm2-135m (generate loop)" in " ".join(text.split())
