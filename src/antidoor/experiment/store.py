"""The study's single record: a SQLite file (standard library, WAL mode) that several worker
processes write at once.

Tables
- ``runs``: one row per stage run, keyed by ``key`` (the hash of the canonical JSON of the config
  that produced it, upstream stages included): stage, config JSON, labels (dataset, model, attack,
  defense, seed), status (``running``/``done``/``failed``), error, attempts, start and end times,
  compute seconds, worker, library versions, git commit.
- ``metrics``: ``(run_id, stage, name, step, value)``. A scalar has ``step`` NULL; a curve is one
  row per step (an epoch, a round, a point ``t`` on a path). ``stage`` names the model the number
  belongs to (``attack``: the backdoored model; ``reference``: the clean model under the same
  trigger; ``purify``; ``stress``), so one run may record several.
- ``artifacts``: ``(run_id, name, path, bytes, sha256)``, paths relative to the study folder.
- ``meta``: the schema version and the study config last run.

A stage is recorded twice: ``start`` (status ``running``, in its own short transaction) and
``finish``/``fail`` (status, metrics and artifacts in one transaction, so a killed process leaves
either the whole record or the ``running`` row that ``--resume`` reruns). Writers take the lock
up front (``BEGIN IMMEDIATE``) and wait for it (``timeout``), so concurrent writers never lose a row.
This module imports neither torch nor the rest of antidoor (but its errors): workers and tools open it cheaply.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from antidoor.errors import AntidoorError  # pydantic only: the store stays cheap to import

SCHEMA_VERSION = 1
STATUSES = ("running", "done", "failed")
LABELS = ("dataset", "model", "attack", "defense", "seed")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    stage TEXT NOT NULL,
    config TEXT NOT NULL,
    dataset TEXT, model TEXT, attack TEXT, defense TEXT, seed INTEGER,
    status TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed')),
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    started REAL, finished REAL, seconds REAL,
    worker TEXT, versions TEXT, git_commit TEXT
);
CREATE TABLE IF NOT EXISTS metrics (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    stage TEXT NOT NULL,
    name TEXT NOT NULL,
    step REAL,
    value REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS metrics_unique ON metrics (run_id, stage, name, IFNULL(step, -1e300));
CREATE TABLE IF NOT EXISTS artifacts (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    path TEXT NOT NULL,
    bytes INTEGER,
    sha256 TEXT,
    PRIMARY KEY (run_id, name)
);
"""


class StoreError(AntidoorError):
    """A file that is not a usable study store (someone else's database, a corrupt file, another schema)."""


@dataclass(frozen=True)
class Metric:
    """One number: a scalar (``step`` None) or one point of a curve."""

    stage: str
    name: str
    value: float | None
    step: float | None = None


@dataclass(frozen=True)
class Artifact:
    name: str
    path: str  # relative to the study folder
    bytes: int | None = None
    sha256: str | None = None


class Store:
    """A study's SQLite file. Open one per process (``Store(path)``); it is cheap.

    ``readonly=True`` (``results``, ``report``) opens it with SQLite's read-only mode and never
    changes it: no tables created, no journal mode switched, nothing written beside it. A file that is
    no antidoor store (someone else's database, a corrupt file) is refused with one line, and left as it was.
    """

    def __init__(self, path: str | Path, timeout: float = 120.0, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        try:
            if readonly or (self.path.is_file() and self.path.stat().st_size > 0):
                self._check_is_store()  # before anything is written into someone else's file
            if readonly:
                self.conn = self._connect_readonly(timeout)
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so the write lock is taken before reading
            self.conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None, check_same_thread=False)
            self.conn.row_factory = sqlite3.Row
            self.conn.execute("PRAGMA foreign_keys = ON")
            if self.conn.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
                raise StoreError(f"could not switch {self.path} to WAL mode (is it on a network file system?)")
            self.conn.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: a committed stage survives a killed process
            self._create()
        except sqlite3.Error as e:
            raise StoreError(f"study store {str(self.path)!r} cannot be opened ({e})") from None

    def _connect_readonly(self, timeout: float) -> sqlite3.Connection:
        """A read-only connection that creates nothing beside the file.

        While a grid writes the store, its ``-wal`` file exists and SQLite's read-only mode reads a
        consistent snapshot through it. At rest there is no ``-wal``; read-only mode would then leave an
        empty ``-wal`` and a ``-shm`` behind (or fail in a folder we may not write), so the file is
        read as immutable: nobody is writing it.
        """
        uri = self.path.absolute().as_uri()
        writer = Path(f"{self.path}-wal").exists()
        mode = "mode=ro" if writer else "immutable=1"
        conn = sqlite3.connect(f"{uri}?{mode}", uri=True, timeout=timeout, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        return conn

    def _check_is_store(self) -> None:
        """Refuse a file that is not an antidoor study store, reading it read-only."""
        if not self.path.is_file():
            raise StoreError(f"no study store at {str(self.path)!r}")
        conn = None
        try:
            conn = self._connect_readonly(5.0)
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            missing = {"meta", "runs", "metrics", "artifacts"} - tables
            if missing:
                raise StoreError(f"{str(self.path)!r} is an SQLite database but not an antidoor study store "
                                 f"(no {', '.join(sorted(missing))} table); it was left unchanged")
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.Error as e:
            raise StoreError(f"{str(self.path)!r} is not a readable study store ({e})") from None
        finally:
            if conn is not None:
                conn.close()
        if row is None or row[0] != str(SCHEMA_VERSION):
            raise StoreError(f"{str(self.path)!r} has store schema {row[0] if row else None}; "
                             f"this antidoor reads schema {SCHEMA_VERSION}")

    def _create(self) -> None:
        with self.transaction() as c:
            for statement in SCHEMA.strip().split(";"):
                if statement.strip():
                    c.execute(statement)
            c.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        found = self.get_meta("schema_version")
        if found != str(SCHEMA_VERSION):
            raise StoreError(f"{self.path} has store schema {found}; this antidoor reads schema {SCHEMA_VERSION}")

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``: one writer at a time, the others wait up to ``timeout``."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # -- meta --------------------------------------------------------------------------------------------
    def set_meta(self, key: str, value: Any) -> None:
        with self.transaction() as c:
            c.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                      (key, json.dumps(value)))

    def get_meta(self, key: str) -> Any:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        if key == "schema_version":
            return row[0]
        try:
            return json.loads(row[0])
        except (ValueError, TypeError, RecursionError):
            raise StoreError(f"study store {str(self.path)!r}: its recorded {key!r} is not valid JSON") from None

    # -- writing runs ------------------------------------------------------------------------------------
    def start(self, key: str, stage: str, config: dict[str, Any], labels: dict[str, Any],
              versions: dict[str, str] | None = None, git_commit: str | None = None) -> int:
        """Mark a stage as running (a new row, or the same row again on a rerun); return its id."""
        now = time.time()
        lab = [labels.get(k) for k in LABELS]
        with self.transaction() as c:
            c.execute(
                "INSERT INTO runs (key, stage, config, dataset, model, attack, defense, seed, status, attempts, started, "
                "worker, versions, git_commit) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'running', 1, ?, ?, ?, ?) "
                "ON CONFLICT(key) DO UPDATE SET status = 'running', attempts = attempts + 1, started = excluded.started, "
                "finished = NULL, seconds = NULL, error = NULL, worker = excluded.worker, versions = excluded.versions, "
                "git_commit = excluded.git_commit",
                (key, stage, canonical_json(config), *lab, now, worker_name(), json.dumps(versions or {}), git_commit))
            return int(c.execute("SELECT id FROM runs WHERE key = ?", (key,)).fetchone()[0])

    def finish(self, run_id: int, metrics: Iterable[Metric], artifacts: Iterable[Artifact] = (),
               seconds: float | None = None) -> None:
        """Record a finished stage: its metrics and artifacts replace any earlier ones, all in one transaction."""
        with self.transaction() as c:
            c.execute("DELETE FROM metrics WHERE run_id = ?", (run_id,))
            c.execute("DELETE FROM artifacts WHERE run_id = ?", (run_id,))
            c.executemany("INSERT INTO metrics (run_id, stage, name, step, value) VALUES (?, ?, ?, ?, ?)",
                          [(run_id, m.stage, m.name, m.step, m.value) for m in metrics])
            c.executemany("INSERT INTO artifacts (run_id, name, path, bytes, sha256) VALUES (?, ?, ?, ?, ?)",
                          [(run_id, a.name, a.path, a.bytes, a.sha256) for a in artifacts])
            c.execute("UPDATE runs SET status = 'done', finished = ?, seconds = ?, error = NULL WHERE id = ?",
                      (time.time(), seconds, run_id))

    def fail(self, run_id: int, error: str, seconds: float | None = None) -> None:
        with self.transaction() as c:
            _mark_failed(c, run_id, error, seconds)

    def record_failure(self, key: str, stage: str, config: dict[str, Any], labels: dict[str, Any], error: str) -> None:
        """A stage that could not record its own end (its upstream failed, or its worker died): a failed row
        with the reason. ``attempts`` counts only real starts, which ``start`` already recorded: a stage that
        never ran keeps 0 (or its count from earlier runs), a lost worker's stage its one attempt."""
        with self.transaction() as c:
            c.execute("INSERT INTO runs (key, stage, config, dataset, model, attack, defense, seed, status, attempts) "
                      "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'failed', 0) ON CONFLICT(key) DO NOTHING",
                      (key, stage, canonical_json(config), *[labels.get(k) for k in LABELS]))
            _mark_failed(c, c.execute("SELECT id FROM runs WHERE key = ?", (key,)).fetchone()[0], error)

    def invalidate(self, keys: Iterable[str], reason: str) -> None:
        """Record stages as failed with ``reason``, their results removed, so no table shows them and every later
        run (``--resume``) that still plans them runs them again: finished stages whose upstream checkpoint changed,
        or stages a killed grid left 'running' under settings the study no longer has."""
        with self.transaction() as c:
            for key in keys:
                row = c.execute("SELECT id FROM runs WHERE key = ?", (key,)).fetchone()
                if row is not None:
                    _mark_failed(c, row[0], reason)

    # -- reading -----------------------------------------------------------------------------------------
    def runs(self, stage: str | None = None) -> list[dict[str, Any]]:
        q, args = "SELECT * FROM runs", ()
        if stage is not None:
            q, args = q + " WHERE stage = ?", (stage,)
        return [dict(r) for r in self.conn.execute(q + " ORDER BY id", args)]

    def status(self, keys: Iterable[str] | None = None) -> dict[str, str]:
        rows = self.conn.execute("SELECT key, status FROM runs").fetchall()
        wanted = None if keys is None else set(keys)
        return {r["key"]: r["status"] for r in rows if wanted is None or r["key"] in wanted}

    def metrics(self, run_id: int | None = None) -> list[dict[str, Any]]:
        if run_id is None:
            rows = self.conn.execute("SELECT * FROM metrics ORDER BY run_id, stage, name, step")
        else:
            rows = self.conn.execute("SELECT * FROM metrics WHERE run_id = ? ORDER BY stage, name, step", (run_id,))
        return [dict(r) for r in rows]

    def artifacts(self, run_id: int | None = None) -> list[dict[str, Any]]:
        if run_id is None:
            rows = self.conn.execute("SELECT * FROM artifacts ORDER BY run_id, name")
        else:
            rows = self.conn.execute("SELECT * FROM artifacts WHERE run_id = ? ORDER BY name", (run_id,))
        return [dict(r) for r in rows]


def _mark_failed(c: sqlite3.Connection, run_id: int, error: str, seconds: float | None = None) -> None:
    c.execute("DELETE FROM metrics WHERE run_id = ?", (run_id,))
    c.execute("DELETE FROM artifacts WHERE run_id = ?", (run_id,))
    c.execute("UPDATE runs SET status = 'failed', finished = ?, seconds = ?, error = ? WHERE id = ?",
              (time.time(), seconds, error, run_id))


def canonical_json(obj: Any) -> str:
    """The one JSON spelling of a config: sorted keys, no spaces, floats as Python writes them."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def config_key(config: dict[str, Any]) -> str:
    """A stage's key: the hash of its config's canonical JSON."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"
