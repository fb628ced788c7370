"""The results store: round trip, no duplicates, refusal of foreign or corrupt files (untouched)."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest

from actsparse.evaluate.results import DocResult, TaskResult
from actsparse.study.store import PointKey, RunStore, StoreError, check_settings, check_writable


def _result(task: str = "t", n: int = 3, score: float = 1.0) -> TaskResult:
    docs = [DocResult(i, score, {"acc": score}, str(i % 2), 0.5 if i else None, i) for i in range(n)]
    return TaskResult(task, "validation", "acc", docs, {"all": {"sparsity": 0.4, "per_layer": {"0": 0.4}}})


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_round_trip_and_unique_points(tmp_path: Path) -> None:
    key = PointKey("input", "top_p", 0.9, "t")
    with RunStore.open(tmp_path) as store:
        assert store.put(PointKey.dense("t"), _result())
        assert store.put(key, _result(score=0.0))
        assert not store.put(key, _result(score=1.0))  # already stored: nothing written
        assert store.keys() == {PointKey.dense("t"), key}
    with RunStore.open(tmp_path) as store:
        got = store.get(key)
        assert got is not None
        assert got.score == 0.0 and len(got.docs) == 3
        assert got.docs[1] == DocResult(1, 0.0, {"acc": 0.0}, "1", 0.5, 1)
        assert got.docs[0].kl is None
        assert got.sparsity["all"]["sparsity"] == 0.4
        assert [k for k, _ in store.items()] == [PointKey.dense("t"), key]
        assert store.get(PointKey("up", "top_p", 0.9, "t")) is None
    db = sqlite3.connect(tmp_path / "results.sqlite")
    assert db.execute("SELECT count(*) FROM docs").fetchone() == (6,)
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_a_failed_point_writes_nothing(tmp_path: Path) -> None:
    bad = _result()
    bad.docs.append(DocResult(0, 1.0))  # duplicate doc_id: the insert fails half-way
    with RunStore.open(tmp_path) as store:
        with pytest.raises(sqlite3.IntegrityError):
            store.put(PointKey.dense("t"), bad)
        assert store.keys() == set()
        assert store.put(PointKey.dense("t"), _result())  # the store is still usable


def test_bound_settings_must_match(tmp_path: Path) -> None:
    with RunStore.open(tmp_path) as store:
        store.bind("model", "a")
        store.bind("model", "a")
        with pytest.raises(StoreError, match="model = 'a'"):
            store.bind("model", "b")


def test_corrupt_file_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "results.sqlite"
    path.write_bytes(b"this is not sqlite at all" * 100)
    before = _digest(path)
    with pytest.raises(StoreError, match=r"results\.sqlite is corrupt or not an sqlite database"):
        RunStore.open(tmp_path)
    assert _digest(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.sqlite"]


def test_truncated_store_is_refused_and_left_untouched(tmp_path: Path) -> None:
    with RunStore.open(tmp_path) as store:
        store.put(PointKey.dense("t"), _result(n=200))
    path = tmp_path / "results.sqlite"
    path.write_bytes(path.read_bytes()[:1500])
    before = _digest(path)
    with pytest.raises(StoreError, match="corrupt"):
        RunStore.open(tmp_path)
    assert _digest(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.sqlite"], "no -wal or -shm appears beside it"
    with pytest.raises(StoreError, match="corrupt"):
        check_settings(tmp_path, {"model": "m"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.sqlite"]


def test_foreign_sqlite_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "results.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE customers (name TEXT)")
    db.execute("INSERT INTO customers VALUES ('ada')")
    db.commit()
    db.close()
    before = _digest(path)
    with pytest.raises(StoreError, match="not an actsparse results store.*customers"):
        RunStore.open(tmp_path)
    assert _digest(path) == before


def test_unwritable_folder_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match=r"/file is a file, not a folder"):
        check_writable(blocker / "run")
    with pytest.raises(StoreError, match=r"/file is a file, not a folder"):
        RunStore.open(blocker / "run")
    with pytest.raises(StoreError, match=r"/file is a file, not a folder"):
        check_writable(blocker / "run", create=False)


def test_opening_a_missing_store_without_create(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        RunStore.open(tmp_path / "nowhere", create=False)
    assert not (tmp_path / "nowhere").exists()


def test_check_settings_reads_only(tmp_path: Path) -> None:
    check_settings(tmp_path / "new", {"model": "a"})  # no folder yet: nothing to compare, nothing made
    assert not (tmp_path / "new").exists()
    with RunStore.open(tmp_path) as store:
        store.bind("model", "a")
    path = tmp_path / "results.sqlite"
    before = _digest(path)
    check_settings(tmp_path, {"model": "a", "limit": 5})  # limit not bound yet: accepted
    with pytest.raises(StoreError, match="model = 'a', not 'b'"):
        check_settings(tmp_path, {"model": "b"})
    assert _digest(path) == before
    with RunStore.open(tmp_path) as store:
        assert store.get_meta("limit") is None
