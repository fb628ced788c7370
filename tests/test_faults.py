"""Faults injected into real commands on a tiny model: a full disk, a store held by another writer, a model
whose dense baseline is not finite, a mistyped alias, a file in the way, a corrupt store. Each ends with exit 2
and one line that says what happened and what to do, and loses nothing: the run folder holds the same bytes
before and after (or, where a point was being stored, the same points), and the rerun resumes."""

from __future__ import annotations

import errno
import hashlib
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import tiny_lm

from actsparse import cli
from actsparse.evaluate.reference import DenseReference
from actsparse.evaluate.results import DocResult, TaskResult
from actsparse.study import store as store_module
from actsparse.study.store import PointKey, RunStore, StoreError

SWEEP = ["--targets", "input", "--tasks", "arc_easy", "--limit", "2", "--resamples", "10", "--no-progress"]


@pytest.fixture
def tiny_models(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """`load_model` gives a tiny LM for any name (an Inf weight for names with 'inf'); returns the names loaded."""
    loads: list[str] = []

    def load(name, *args, **kwargs):
        loads.append(name)
        model, tokenizer = tiny_lm()
        if "inf" in name:
            with torch.no_grad():
                model.model.layers[0].mlp.up_proj.weight[0, 0] = float("inf")
        return model, tokenizer

    monkeypatch.setattr("actsparse.models.loading.load_model", load)
    return loads


def sweep(out: Path, values: str = "0.9", model: str = "org/tiny", limit: int = 2) -> int:
    return cli.main(["sweep", "--model", model, "--out", str(out), "--values", values, *SWEEP, "--limit", str(limit)])


def first_line(capsys: pytest.CaptureFixture) -> str:
    """The first line of what a command wrote to stderr; the test fails unless it wrote exactly one."""
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def folder_bytes(folder: Path) -> dict[str, str]:
    """Digest of every file under `folder`, but sqlite's -shm index (any reader rewrites it; it holds no data)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.endswith("-shm")
    }


def stored(folder: Path) -> dict[PointKey, list]:
    with RunStore.open(folder, create=False) as store:
        return {key: [(d.doc_id, d.score, d.kl) for d in result.docs] for key, result in store.items()}


def test_a_full_disk_while_a_point_is_stored_loses_nothing_and_the_rerun_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tiny_models: list[str]
) -> None:
    out = tmp_path / "run"
    assert sweep(out, limit=30) == 0  # 30 documents: a point needs pages of its own
    before, bytes_before = stored(out), folder_bytes(out)
    capsys.readouterr()
    real_put = RunStore.put

    def put_on_a_full_disk(self, *args, **kwargs):  # sqlite's own SQLITE_FULL: the file may not grow any more
        pages = self._db.execute("PRAGMA page_count").fetchone()[0]
        self._db.execute(f"PRAGMA max_page_count = {pages}")
        return real_put(self, *args, **kwargs)

    monkeypatch.setattr(RunStore, "put", put_on_a_full_disk)
    assert sweep(out, "0.9,0.5", limit=30) == 2
    line = first_line(capsys)
    assert line.startswith(f"error: the disk holding {out / 'results.sqlite'} is full: the point being stored")
    assert line.endswith("free space, then rerun the same command to resume")
    assert stored(out) == before
    assert {k: v for k, v in folder_bytes(out).items() if k != "results.sqlite"} == {
        k: v for k, v in bytes_before.items() if k != "results.sqlite"
    }, "no partial file beside the store"
    monkeypatch.setattr(RunStore, "put", real_put)  # space freed
    assert sweep(out, "0.9,0.5", limit=30) == 0
    after = stored(out)
    assert {k: after[k] for k in before} == before and PointKey("input", "top_p", 0.5, "arc_easy") in after


def test_a_full_disk_while_the_dense_reference_is_written_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tiny_models: list[str]
) -> None:
    def save(self, path):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(DenseReference, "save", save)
    out = tmp_path / "run"
    assert sweep(out) == 2
    assert first_line(capsys).startswith("error: no space left on the device to write ")
    assert list((out / "dense").iterdir()) == []
    with RunStore.open(out, create=False) as store:
        assert store.keys() == set() and store.get_meta("model") is None


def test_a_store_held_by_another_writer_is_named_after_a_bounded_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tiny_models: list[str]
) -> None:
    out = tmp_path / "run"
    assert sweep(out) == 0
    capsys.readouterr()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys; db = sqlite3.connect(sys.argv[1], isolation_level=None); "
            "db.execute('BEGIN IMMEDIATE'); print('held', flush=True); sys.stdin.read()",
            str(out / "results.sqlite"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        monkeypatch.setattr(store_module, "LOCK_WAIT_S", 0.5)
        before = folder_bytes(out)
        assert sweep(out, "0.9,0.5") == 2
        line = first_line(capsys)
        who = f"pid {holder.pid}: " if sys.platform == "linux" else "another process"  # F_GETLK names it on Linux
        assert line.startswith(f"error: {out / 'results.sqlite'} is held by another writer ({who}")
        assert line.endswith("for over 0.5 s: wait until it ends (or stop it), then rerun; nothing was written")
        assert folder_bytes(out) == before
    finally:
        holder.communicate("")
    assert sweep(out, "0.9,0.5") == 0  # the writer is gone: the same command goes on


def test_a_model_that_fails_before_its_first_point_leaves_the_folder_unbound(
    tmp_path: Path, capsys: pytest.CaptureFixture, tiny_models: list[str]
) -> None:
    out = tmp_path / "run"
    assert sweep(out, model="org/inf-model") == 2
    line = first_line(capsys)
    assert line.startswith("error: the dense baseline of 'arc_easy' is not finite (")
    assert line.endswith("the model itself is broken; nothing stored")
    with RunStore.open(out, create=False) as store:
        assert store.keys() == set()
        assert {
            k for k in ("model", "limit", "seed", "dtype", "docs/arc_easy") if store.get_meta(k) is not None
        } == set()
    assert sweep(out, model="org/good-model") == 0, capsys.readouterr().err  # another model may use the folder
    with RunStore.open(out, create=False) as store:
        assert store.get_meta("model") == "org/good-model" and len(store.keys()) == 2
        assert store.get_meta("provenance")["model"]["reference"] == "org/good-model"


def test_settings_that_wait_for_the_first_point_are_checked_against_a_concurrent_binding(tmp_path: Path) -> None:
    """Two sweeps that start at once on a fresh folder: the one whose first point comes second is refused, and
    stores nothing, when the first bound other settings."""
    result = TaskResult("t", "validation", "acc", [DocResult(0, 1.0)], {})
    with RunStore.open(tmp_path) as a, RunStore.open(tmp_path) as b:
        a.bind("model", "a", with_first_point=True)
        b.bind("model", "b", with_first_point=True)
        assert a.get_meta("model") is None, "not bound before a point is stored"
        with pytest.raises(StoreError, match="holds a run with model = 'a', not 'b'"):
            a.bind("model", "b")
        assert a.put(PointKey.dense("t"), result)
        with pytest.raises(StoreError, match="holds a run with model = 'a', not 'b'"):
            b.put(PointKey.dense("u"), result)
        assert b.keys() == {PointKey.dense("t")} and b.get_meta("model") == "a"


def test_a_mistyped_alias_is_refused_before_any_hub_call(
    tmp_path: Path, capsys: pytest.CaptureFixture, tiny_models: list[str]
) -> None:
    out = tmp_path / "run"
    assert sweep(out) == 0
    before = folder_bytes(out)
    capsys.readouterr()
    assert sweep(out, "0.9,0.5", model="smollm3-135m") == 2
    assert first_line(capsys) == (
        "actsparse sweep: error: argument --model: unknown model 'smollm3-135m': did you mean smollm2-135m? "
        "--model takes an alias (smollm2-135m, gemma3-270m), a folder, a .gguf file or a hub id owner/name "
        "(`actsparse models` lists those here) (see actsparse sweep --help)"
    )
    assert folder_bytes(out) == before
    assert tiny_models == ["org/tiny"], "nothing loaded for the typo"


def test_a_corrupt_store_is_kept_and_the_message_says_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture, tiny_models: list[str]
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.sqlite").write_bytes(b"not sqlite " * 300)
    before = folder_bytes(out)
    assert sweep(out) == 2
    line = first_line(capsys)
    assert "results.sqlite is corrupt or not an sqlite database" in line
    assert line.endswith("move it (with any -wal and -shm files beside it) out of the folder to start the run afresh, "
                         "or give another --out folder")  # fmt: skip
    assert folder_bytes(out) == before and tiny_models == []


@pytest.mark.parametrize(
    "argv",
    [
        ["sweep", "--out", "{file}/run"],
        ["calibrate", "--sparsity", "0.5", "--out", "{file}/x.json"],
        ["profile", "--json", "{file}/x.json"],
    ],
)
def test_a_file_in_the_way_of_a_folder_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture, no_model: None, argv: list[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli.main([a.format(file=blocker) for a in argv]) == 2
    assert f"{blocker} is a file, not a folder" in first_line(capsys)
    assert sorted(tmp_path.iterdir()) == [blocker] and blocker.read_text() == "x"


def test_sensitivity_refuses_an_every_that_leaves_one_layer(
    tmp_path: Path, capsys: pytest.CaptureFixture, tiny_models: list[str]
) -> None:
    out = tmp_path / "sens"
    argv = ["sensitivity", "--model", "org/tiny", "--tasks", "arc_easy", "--limit", "2", "--out", str(out)]
    assert cli.main([*argv, "--every", "2"]) == 2  # the tiny model has 2 layers
    assert first_line(capsys) == "error: --every 2 tests only layer 0 of this model's 2 layers: give --every 1 or less"
    assert list(out.iterdir()) == []


def test_a_sweep_without_out_uses_a_folder_of_its_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_models: list[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    for model in ("org/tiny-a", "org/tiny-b"):  # the second is not refused by the first one's folder
        assert cli.main(["sweep", "--model", model, "--values", "0.9", *SWEEP]) == 0
    for name in ("tiny-a", "tiny-b"):
        assert sqlite3.connect(tmp_path / "runs" / name / "results.sqlite").execute(
            "SELECT COUNT(*) FROM points"
        ).fetchone() == (2,)


def test_an_unreachable_hub_fails_at_once_without_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline without HF_HUB_OFFLINE, a hub id that is not cached here used to cost a minute of retries."""
    import socket

    import huggingface_hub

    from actsparse.models import loading
    from actsparse.models.loading import ModelNotAvailableError

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    probes: list[tuple] = []

    def unreachable(address, timeout=None):
        probes.append(address)
        raise OSError("Name or service not known")

    def no_hub_call(*args, **kwargs):
        raise AssertionError("the hub was called")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr("transformers.utils.cached_file", no_hub_call)
    with pytest.raises(ModelNotAvailableError, match="the hub could not be reached or has no such model"):
        loading.check_model("no-such-org/no-such-model")
    with pytest.raises(ModelNotAvailableError, match="the hub could not be reached or has no such model"):
        loading.load_model("no-such-org/no-such-model")
    assert probes == [("huggingface.co", 443)] * 2
