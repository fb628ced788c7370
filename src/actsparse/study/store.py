"""`RunStore`: a sweep's results in `RUN_DIR/results.sqlite` (points, per-document scores, sparsity).

Each point (dense baseline or (target, rule, value) on one task) is written in one transaction under
a unique key, so an interrupted sweep (Ctrl-C, kill -9) loses at most the point in flight and a rerun
never stores a point twice. A file that is not a results store is refused without being touched.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
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
    folder = run_dir
    if not create:
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            raise StoreError(f"run folder {run_dir} is not writable: {folder} is not a folder")
    try:
        if create:
            run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        raise StoreError(f"run folder {run_dir} is not writable: {err.strerror or err}") from None


class RunStore:
    """The results of one sweep folder; open with `RunStore.open(run_dir)` (creates it when new)."""

    FILENAME = "results.sqlite"

    def __init__(self, path: Path, connection: sqlite3.Connection):
        self.path = path
        self._db = connection

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
            db = sqlite3.connect(path, timeout=30, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
            if not _tables(db):
                with _transaction(db):
                    _create(db)
        except sqlite3.Error as err:
            raise StoreError(f"cannot use results file {path}: {err}") from None
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

    def set_meta(self, key: str, value: Any) -> None:
        with _transaction(self._db):
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def bind(self, key: str, value: Any) -> None:
        """Record a setting on first use; later runs in this folder must use the same value."""
        stored = self.get_meta(key)
        if stored is None:
            self.set_meta(key, value)
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
        with _transaction(self._db):
            if self._point_id(key) is not None:
                return False
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
            self._db.executemany(
                "INSERT INTO docs (point_id, doc_id, score, metrics, answer, kl, tokens) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        cur.lastrowid,
                        int(d.doc_id),
                        float(d.score),
                        json.dumps(d.metrics),
                        str(d.answer),
                        None if d.kl is None or not math.isfinite(d.kl) else float(d.kl),
                        int(d.tokens),
                    )
                    for d in result.docs
                ],
            )
        return True

    def add_docs(
        self, key: PointKey, docs: Sequence[DocResult], sparsity: dict[str, Any], seconds: float = 0.0
    ) -> bool:
        """Add documents to a stored point (`sweep --until-ci`) and replace its sparsity, atomically;
        False (nothing written) if any of them is stored already. KeyError if the point is not stored."""
        with _transaction(self._db):
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
                "INSERT INTO docs (point_id, doc_id, score, metrics, answer, kl, tokens) VALUES (?, ?, ?, ?, ?, ?, ?)",
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


def _doc_row(point_id: int, d: DocResult) -> tuple:
    kl = None if d.kl is None or not math.isfinite(d.kl) else float(d.kl)
    return (point_id, int(d.doc_id), float(d.score), json.dumps(d.metrics), str(d.answer), kl, int(d.tokens))


class _transaction:
    """BEGIN IMMEDIATE … COMMIT, rolled back on any exception (KeyboardInterrupt included)."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.db.execute("ROLLBACK" if exc_type is not None else "COMMIT")


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
        raise StoreError(f"{path} is corrupt or not an sqlite database ({err}); left untouched") from None


def atomic_path(path: Path) -> Path:
    """A temporary sibling of `path` to write to before `os.replace(tmp, path)`."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")
