"""`RunStore`: a sweep's results in `RUN_DIR/results.sqlite` (points, per-document scores, sparsity).

Each point (dense baseline or (target, rule, value) on one task) is written in one transaction under
a unique key, so an interrupted sweep (Ctrl-C, kill -9) loses at most the point in flight and a rerun
never stores a point twice. A file that is not a results store is refused without being touched. A full
disk or a writer that holds the store too long is a StoreError that says what to do; nothing stored is lost.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sqlite3
import struct
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actsparse.evaluate.results import DocResult, TaskResult

FORMAT = "actsparse-results"
VERSION = 1
DENSE = "dense"
"""Target and rule name under which the dense baseline of a task is stored."""

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE points (
    id INTEGER PRIMARY KEY,
    target TEXT NOT NULL,
    rule TEXT NOT NULL,
    value REAL NOT NULL,
    task TEXT NOT NULL,
    split TEXT NOT NULL,
    metric TEXT NOT NULL,
    sparsity TEXT NOT NULL,
    seconds REAL NOT NULL,
    created TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    UNIQUE (target, rule, value, task)
);
CREATE TABLE docs (
    point_id INTEGER NOT NULL REFERENCES points(id),
    doc_id INTEGER NOT NULL,
    score REAL NOT NULL,
    metrics TEXT NOT NULL,
    answer TEXT NOT NULL,
    kl REAL,
    tokens INTEGER NOT NULL,
    PRIMARY KEY (point_id, doc_id)
);
"""


LOCK_WAIT_S = 30.0
"""How long a write waits for another process that holds the store (a concurrent sweep's write takes
milliseconds) before it gives up with a StoreError that names that process."""


class StoreError(RuntimeError):
    """The run folder or its results file cannot be used (names the path and why)."""


@dataclass(frozen=True)
class PointKey:
    """What identifies a stored point: the dense baseline has target = rule = 'dense', value 0."""

    target: str
    rule: str
    value: float
    task: str

    @property
    def is_dense(self) -> bool:
        return self.rule == DENSE

    @classmethod
    def dense(cls, task: str) -> PointKey:
        return cls(DENSE, DENSE, 0.0, task)


def check_writable(run_dir: Path, create: bool = True) -> None:
    """Create `run_dir` if needed and prove a file can be written there; StoreError otherwise.

    With `create=False` nothing is made: the folder, or the nearest folder above it that exists, is tried.
    """
    blocker = file_in_the_way(run_dir)
    if blocker is not None:
        raise StoreError(f"cannot make run folder {run_dir}: {blocker} is a file, not a folder")
    folder = run_dir
    if not create:
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
    try:
        if create:
            run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        raise StoreError(f"run folder {run_dir} is not writable: {err.strerror or err}") from None


def file_in_the_way(folder: Path) -> Path | None:
    """The existing path that is not a folder where `folder` or one above it should be; None if there is none."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    return None if existing is None or existing.is_dir() else existing


class RunStore:
    """The results of one sweep folder; open with `RunStore.open(run_dir)` (creates it when new)."""

    FILENAME = "results.sqlite"

    def __init__(self, path: Path, connection: sqlite3.Connection):
        self.path = path
        self._db = connection
        self._with_first_point: dict[str, tuple[Any, bool]] = {}  # key → (value, bound), written by `put`

    @classmethod
    def open(cls, run_dir: str | Path, create: bool = True) -> RunStore:
        """Open (or create) `run_dir/results.sqlite`; a foreign or corrupt file raises StoreError untouched."""
        run_dir = Path(run_dir)
        path = run_dir / cls.FILENAME
        if path.exists():
            _check_ours(path)
        elif not create:
            raise StoreError(f"no results in {run_dir}: {path} does not exist")
        else:
            check_writable(run_dir)
        try:
            db = sqlite3.connect(path, timeout=LOCK_WAIT_S, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
            if not _tables(db):
                with _transaction(db, path):
                    _create(db)
        except sqlite3.Error as err:
            raise _store_error(path, err) from None
        return cls(path, db)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- run-level settings -------------------------------------------------------------------------
    def get_meta(self, key: str) -> Any:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def set_meta(self, key: str, value: Any, with_first_point: bool = False) -> None:
        """Record `value` under `key`; `with_first_point`: in a store without points, in the transaction of
        the first point `put` stores instead (so that a run that stores nothing leaves nothing behind)."""
        if with_first_point and not self.keys():
            self._with_first_point[key] = (value, False)
            return
        with _transaction(self._db, self.path):
            self._set_meta(key, value)

    def bind(self, key: str, value: Any, with_first_point: bool = False) -> None:
        """Record a setting on first use; later runs in this folder must use the same value.

        `with_first_point`: in a store without points, the setting is checked now and written with the first
        point `put` stores, so that a run that fails before it (a broken model) leaves the folder unbound."""
        stored = self.get_meta(key)
        if stored is not None:
            _check_bound(self.path, key, stored, value)
        elif key in self._with_first_point:
            _check_bound(self.path, key, self._with_first_point[key][0], value)
        elif with_first_point and not self.keys():
            self._with_first_point[key] = (value, True)
        else:
            self.set_meta(key, value)

    def _set_meta(self, key: str, value: Any) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def _write_first_point_meta(self) -> None:
        """Inside `put`'s transaction: write what waited for the first point, checking the settings against
        those another process may have bound meanwhile (StoreError: the point is not stored)."""
        for key, (value, bound) in self._with_first_point.items():
            stored = self.get_meta(key) if bound else None
            if stored is None:
                self._set_meta(key, value)
            else:
                _check_bound(self.path, key, stored, value)

    # --- points ------------------------------------------------------------------------------------
    def keys(self) -> set[PointKey]:
        """Every stored point."""
        rows = self._db.execute("SELECT target, rule, value, task FROM points").fetchall()
        return {PointKey(t, r, float(v), k) for t, r, v, k in rows}

    def __contains__(self, key: PointKey) -> bool:
        return self._point_id(key) is not None

    def put(self, key: PointKey, result: TaskResult, seconds: float = 0.0) -> bool:
        """Store one point and its documents atomically; False (nothing written) if it is already there."""
        with _transaction(self._db, self.path):
            self._write_first_point_meta()
            new = self._point_id(key) is None
            if new:
                cur = self._db.execute(
                    "INSERT INTO points (target, rule, value, task, split, metric, sparsity, seconds)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        key.target,
                        key.rule,
                        float(key.value),
                        key.task,
                        result.split,
                        result.metric,
                        json.dumps(result.sparsity),
                        seconds,
                    ),
                )
                point_id = cur.lastrowid
                assert point_id is not None  # the rowid of the row just inserted
                self._db.executemany(_INSERT_DOC, [_doc_row(point_id, d) for d in result.docs])
        self._with_first_point.clear()  # written: the folder is bound
        return new

    def add_docs(
        self, key: PointKey, docs: Sequence[DocResult], sparsity: dict[str, Any], seconds: float = 0.0
    ) -> bool:
        """Add documents to a stored point (`sweep --until-ci`) and replace its sparsity, atomically;
        False (nothing written) if any of them is stored already. KeyError if the point is not stored."""
        with _transaction(self._db, self.path):
            point_id = self._point_id(key)
            if point_id is None:
                raise KeyError(f"no stored point {key}")
            ids = [int(d.doc_id) for d in docs]
            marks = ",".join("?" * len(ids))
            held = self._db.execute(
                f"SELECT COUNT(*) FROM docs WHERE point_id = ? AND doc_id IN ({marks})", (point_id, *ids)
            ).fetchone()[0]
            if held:
                return False
            self._db.executemany(
                _INSERT_DOC,
                [_doc_row(point_id, d) for d in docs],
            )
            self._db.execute(
                "UPDATE points SET sparsity = ?, seconds = seconds + ? WHERE id = ?",
                (json.dumps(sparsity), seconds, point_id),
            )
        return True

    def get(self, key: PointKey) -> TaskResult | None:
        """The stored result of a point, documents in doc_id order, or None."""
        row = self._db.execute(
            "SELECT id, split, metric, sparsity FROM points WHERE target = ? AND rule = ? AND value = ? AND task = ?",
            (key.target, key.rule, float(key.value), key.task),
        ).fetchone()
        if row is None:
            return None
        point_id, split, metric, sparsity = row
        docs = [
            DocResult(doc_id, score, json.loads(metrics), answer, kl, tokens)
            for doc_id, score, metrics, answer, kl, tokens in self._db.execute(
                "SELECT doc_id, score, metrics, answer, kl, tokens FROM docs WHERE point_id = ? ORDER BY doc_id",
                (point_id,),
            )
        ]
        return TaskResult(key.task, split, metric, docs, json.loads(sparsity))

    def items(self) -> Iterator[tuple[PointKey, TaskResult]]:
        """Every stored point with its result, in the order they were stored."""
        rows = self._db.execute("SELECT target, rule, value, task FROM points ORDER BY id").fetchall()
        for t, r, v, k in rows:
            key = PointKey(t, r, float(v), k)
            result = self.get(key)
            if result is not None:
                yield key, result

    def _point_id(self, key: PointKey) -> int | None:
        row = self._db.execute(
            "SELECT id FROM points WHERE target = ? AND rule = ? AND value = ? AND task = ?",
            (key.target, key.rule, float(key.value), key.task),
        ).fetchone()
        return None if row is None else int(row[0])


_INSERT_DOC = "INSERT INTO docs (point_id, doc_id, score, metrics, answer, kl, tokens) VALUES (?, ?, ?, ?, ?, ?, ?)"


def _doc_row(point_id: int, d: DocResult) -> tuple:
    kl = None if d.kl is None or not math.isfinite(d.kl) else float(d.kl)
    return (point_id, int(d.doc_id), float(d.score), json.dumps(d.metrics), str(d.answer), kl, int(d.tokens))


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection, path: Path) -> Iterator[None]:
    """BEGIN IMMEDIATE … COMMIT, rolled back on any exception (KeyboardInterrupt included); a full disk or
    a store held by another writer past LOCK_WAIT_S is a StoreError that says so."""
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # sqlite has already rolled back after some errors (a full disk)
                db.execute("ROLLBACK")
            raise
    except sqlite3.OperationalError as err:
        raise _store_error(path, err) from None


def _store_error(path: Path, err: sqlite3.Error) -> StoreError:
    """What a failed use of the store at `path` means, and what to do."""
    code = getattr(err, "sqlite_errorcode", None)
    if code == sqlite3.SQLITE_FULL or "disk is full" in str(err):
        return StoreError(
            f"the disk holding {path} is full: the point being stored was not written, every point stored "
            "before is intact; free space, then rerun the same command to resume"
        )
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) or "database is locked" in str(err):
        holder = lock_holder(path)
        return StoreError(
            f"{path} is held by another writer ({holder or 'another process'}) for over {LOCK_WAIT_S:g} s: "
            "wait until it ends (or stop it), then rerun; nothing was written"
        )
    return StoreError(f"cannot use results file {path}: {err}")


_WAL_WRITE_LOCK = 120
"""Offset in the -shm file of the lock a WAL database's writer holds (sqlite's os_unix.c: 120 + index 0)."""


def lock_holder(path: Path) -> str | None:
    """'pid N (its command line)' of the process holding the write lock of the store at `path`; None when
    none does, or it cannot be told (not Linux; sqlite's locks are POSIX record locks, which F_GETLK names)."""
    shm = path.with_name(path.name + "-shm")
    if sys.platform != "linux" or not shm.exists():
        return None
    import fcntl

    query = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, _WAL_WRITE_LOCK, 1, 0)  # struct flock
    try:
        fd = os.open(shm, os.O_RDWR)
    except OSError:
        return None
    try:
        kind, _, _, _, pid = struct.unpack("hhqqi4x", fcntl.fcntl(fd, fcntl.F_GETLK, query))
    except OSError:
        return None
    finally:
        os.close(fd)
    if kind == fcntl.F_UNLCK:
        return None
    try:
        command = " ".join(
            Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").replace("\0", " ").split()
        )
    except OSError:
        command = ""
    return f"pid {pid}: {command[:100]}" if command else f"pid {pid}"


def _create(db: sqlite3.Connection) -> None:
    for statement in SCHEMA.split(";"):
        if statement.strip():
            db.execute(statement)
    db.execute("INSERT INTO meta (key, value) VALUES ('format', ?)", (json.dumps(FORMAT),))
    db.execute("INSERT INTO meta (key, value) VALUES ('version', ?)", (json.dumps(VERSION),))


def _check_bound(path: Path, key: str, stored: Any, value: Any) -> None:
    if stored != json.loads(json.dumps(value)):
        raise StoreError(
            f"{path} holds a run with {key} = {stored!r}, not {value!r}: "
            "use another --out folder (or the same settings) so stored results stay comparable"
        )


def reference_path(run_dir: Path, task: str) -> Path:
    """Where a run folder keeps the dense reference (top-k next-token distributions) of a task."""
    return Path(run_dir) / "dense" / f"{task}.ref"


def check_settings(
    run_dir: str | Path, settings: dict[str, Any], unbound_with_points: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Refuse `settings` that differ from those bound in `run_dir` (StoreError); reads only, writes nothing.

    Lets a command refuse a folder before it loads a model, and bind the folder only after the load.
    `unbound_with_points` gives the value a setting has in a folder that stores points but never bound it
    (one made before the setting existed). Returns what the folder has bound (empty when there is no store yet).
    """
    path = Path(run_dir) / RunStore.FILENAME
    if not path.exists():
        return {}
    _check_ours(path)
    if path.stat().st_size == 0:
        return {}
    db = sqlite3.connect(_read_only_uri(path), uri=True)
    try:
        if "meta" not in _tables(db):
            return {}
        stored = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
        if unbound_with_points and "points" in _tables(db) and db.execute("SELECT 1 FROM points LIMIT 1").fetchone():
            stored = {**unbound_with_points, **stored}
    except sqlite3.Error as err:
        raise StoreError(f"cannot read results file {path}: {err}") from None
    finally:
        db.close()
    for key, value in settings.items():
        if stored.get(key) is not None:
            _check_bound(path, key, stored[key], value)
    return stored


def _read_only_uri(path: Path) -> str:
    """A URI that reads `path` without writing anything beside it.

    Without its -wal and -shm files, a read-only open would create them beside a file that may not be
    ours: read it as immutable then; with them, read it normally so that the WAL's content is seen too.
    """
    sidecars = any(path.with_name(path.name + suffix).exists() for suffix in ("-wal", "-shm"))
    return f"{path.resolve().as_uri()}?mode=ro{'' if sidecars else '&immutable=1'}"


def _tables(db: sqlite3.Connection) -> set[str]:
    return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _check_ours(path: Path) -> None:
    """Read-only check that `path` is an actsparse results store (or an empty file sqlite can start)."""
    if path.stat().st_size == 0:
        return
    try:
        db = sqlite3.connect(_read_only_uri(path), uri=True)
        try:
            tables = _tables(db)
            fmt = None
            if "meta" in tables:
                row = db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
                fmt = None if row is None else json.loads(row[0])
            if not tables:
                return
            if fmt != FORMAT or not {"points", "docs"} <= tables:
                raise StoreError(
                    f"{path} is an sqlite database but not an actsparse results store (tables: "
                    f"{', '.join(sorted(tables))}); left untouched — choose another --out folder"
                )
            check = db.execute("PRAGMA quick_check").fetchone()
            if check is None or check[0] != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {check[0] if check else 'no answer'}")
            row = db.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
            if row is None or json.loads(row[0]) != VERSION:
                raise StoreError(f"{path} was written by another version of actsparse; left untouched")
        finally:
            db.close()
    except (sqlite3.DatabaseError, json.JSONDecodeError) as err:
        raise StoreError(
            f"{path} is corrupt or not an sqlite database ({err}); left untouched: move it (with any -wal and "
            "-shm files beside it) out of the folder to start the run afresh, or give another --out folder"
        ) from None


def atomic_path(path: Path) -> Path:
    """A temporary sibling of `path` to write to before `os.replace(tmp, path)`."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")
