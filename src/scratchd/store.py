"""Durable state in one SQLite database (WAL): lease records, kept caches, the event log, orphan sightings.

Every lease change is written together with its event in one transaction, so the
event log and the records can never disagree after a crash. Either setting of
``synchronous`` survives the daemon being killed at any point (a commit is in the
kernel before ``commit()`` returns). What a power loss takes:

* ``NORMAL`` (the default): the WAL is fsynced only at checkpoints, which
  ``_Checkpointer`` runs within ``CHECKPOINT_EVERY_SECONDS`` (30 ms) of a commit (and
  the writer once per few MiB of WAL, so that the WAL starts over), so the commits of
  about the last 30 ms, plus a checkpoint's own fsyncs, may be rolled back, newest
  first; the database stays consistent.
  On the next start a lost create's directory is an orphan (reclaimed after
  ``gc.orphan_grace``); a lost release leaves an active record whose directory is in
  the trash (ended as ``directory_removed``), or, if the rename was undone too, a
  lease that is simply still active; a lost renew leaves the previous expiry.
* ``FULL``: the WAL is fsynced on every commit, so every answered change's record
  survives.

Neither fsyncs the pool directories: a mkdir or rename of the last seconds may be
undone too, independently, which ends the same two ways (an orphan, or a record
without its directory) -- never an active lease whose directory is deleted.

``bench/durability.py`` measures what each costs per lease cycle.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
import typing
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from enum import Enum
from operator import attrgetter
from pathlib import Path
from typing import Any, Generic, TypeVar

from scratchd.caches import Cache
from scratchd.leases import Lease
from scratchd.schema import fields_of, marks

log = logging.getLogger("scratchd.store")

SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    id TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    pool TEXT NOT NULL,
    tenant TEXT NOT NULL,
    uid INTEGER NOT NULL,
    gid INTEGER NOT NULL,
    state TEXT NOT NULL,
    end_reason TEXT,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    ended_at REAL,
    ttl_seconds INTEGER NOT NULL,
    idle_timeout_seconds INTEGER,
    pid INTEGER,
    pid_start_time INTEGER,
    max_bytes INTEGER,
    expected_bytes INTEGER,
    evictable INTEGER NOT NULL,
    labels TEXT NOT NULL,
    same_filesystem INTEGER,
    mount_point TEXT,
    last_activity_at REAL,
    usage_bytes INTEGER NOT NULL DEFAULT 0,
    usage_files INTEGER NOT NULL DEFAULT 0,
    usage_measured_at REAL
);
CREATE INDEX IF NOT EXISTS leases_state ON leases (state, ended_at);
CREATE TABLE IF NOT EXISTS events (
    -- Not AUTOINCREMENT (a second table written on every insert): prune() always keeps
    -- the newest event, so max(seq) + 1 never hands out a number twice.
    seq INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    lease_id TEXT,
    pool TEXT,
    tenant TEXT,
    reason TEXT,
    details TEXT
);
CREATE INDEX IF NOT EXISTS events_at ON events (at);
CREATE TABLE IF NOT EXISTS orphans (
    pool TEXT NOT NULL,
    name TEXT NOT NULL,
    first_seen REAL NOT NULL,
    PRIMARY KEY (pool, name)
);
"""

# What takes a database from the version in its ``PRAGMA user_version`` (SCHEMA alone is
# version 0, the first release's) to the next, in order. Each one runs in a transaction
# with its version bump: a crash half-way leaves the previous version, whole, and an
# upgrade keeps every record.
MIGRATIONS: tuple[str, ...] = (
    # 1: a lease's link mode. Leases placed before it was known keep what same_filesystem said.
    "ALTER TABLE leases ADD COLUMN link_mode TEXT;"
    "UPDATE leases SET link_mode = CASE same_filesystem WHEN 1 THEN 'hardlink' WHEN 0 THEN 'copy' END;",
    # 2: warm caches. Kept caches have records of their own; a lease says what it asked and got.
    "CREATE TABLE caches ("
    " id TEXT PRIMARY KEY, key TEXT NOT NULL, tenant TEXT NOT NULL, pool TEXT NOT NULL, state TEXT NOT NULL,"
    " lease_id TEXT, bytes INTEGER NOT NULL DEFAULT 0, files INTEGER NOT NULL DEFAULT 0,"
    " kept_at REAL NOT NULL, last_used_at REAL NOT NULL, hits INTEGER NOT NULL DEFAULT 0, inode INTEGER);"
    "ALTER TABLE leases ADD COLUMN cache_key TEXT;"
    "ALTER TABLE leases ADD COLUMN cache_fallback TEXT;"
    "ALTER TABLE leases ADD COLUMN cache_hit TEXT;"
    "ALTER TABLE leases ADD COLUMN cache_matched_key TEXT;"
    "ALTER TABLE leases ADD COLUMN cache_id TEXT;"
    "ALTER TABLE leases ADD COLUMN cache_kept_at REAL;"
    "ALTER TABLE leases ADD COLUMN cache_kept_id TEXT;",
)

R = TypeVar("R")


class _Columns(Generic[R]):
    """A record's columns, derived once from its dataclass's fields (``schema``), and the record to and
    from a row of them.

    A nested record flattens into columns named ``<field>_<its field>`` (``usage_bytes``; a name that
    already starts so is not doubled: ``cache_id``), all NULL when it is None; an enum is kept by its
    value, a bool as 0/1, a dict, list or tuple as JSON text. The record's own fields come first, then
    each nested record's columns: SQL names every column, so the order is free, and this one lets a row
    be read and written with few Python steps per field (a lease's row is built on every create).
    """

    def __init__(self, record: type[R], prefix: str = "") -> None:
        self._record = record
        own: list[str] = []
        self._to_db: list[tuple[int, Callable[[Any], Any]]] = []
        self._from_db: list[tuple[str, Callable[[Any], Any]]] = []
        self._nested: list[tuple[str, _Columns[Any], bool]] = []
        for item in fields_of(record):
            if item.nested:
                self._nested.append((item.name, _Columns(item.kind, f"{prefix}{item.name}_"), item.optional))
                continue
            codec = _codec(item.kind)
            if codec is not None:
                to_db, from_db = codec
                if item.optional:
                    to_db, from_db = _or_none(to_db), _or_none(from_db)
                self._to_db.append((len(own), to_db))
                self._from_db.append((item.name, from_db))
            own.append(item.name)
        self._own = tuple(own)
        get = attrgetter(*own)
        self._get: Callable[[R], tuple[Any, ...]] = get if len(own) > 1 else lambda record: (get(record),)
        self.names: tuple[str, ...] = tuple(
            [name if name.startswith(prefix) else prefix + name for name in own]
            + [column for _, nested, _ in self._nested for column in nested.names]
        )
        self._nulls = (None,) * len(self.names)
        # Each column's value on its own, for an UPDATE of a few columns (a lease's end, its usage).
        self._column: dict[str, Callable[[R], Any]] = {}
        to_db_of = {own[index]: to_db for index, to_db in self._to_db}
        for name, column in zip(own, self.names, strict=False):
            self._column[column] = _own_value(name, to_db_of.get(name))
        for name, nested, _ in self._nested:
            for column, value in nested._column.items():
                self._column[column] = _nested_value(name, value)
        self.columns = ", ".join(self.names)
        self.placeholders = ", ".join("?" * len(self.names))

    def row(self, record: R) -> tuple[Any, ...]:
        values = list(self._get(record))
        for index, to_db in self._to_db:
            values[index] = to_db(values[index])
        for name, nested, _ in self._nested:
            part = getattr(record, name)
            values.extend(nested._nulls if part is None else nested.row(part))
        return tuple(values)

    def record(self, row: Sequence[Any]) -> R:
        start = len(self._own)
        fields = dict(zip(self._own, row[:start], strict=True))
        for name, from_db in self._from_db:
            fields[name] = from_db(fields[name])
        for name, nested, optional in self._nested:
            part, start = row[start : start + len(nested.names)], start + len(nested.names)
            fields[name] = None if optional and all(value is None for value in part) else nested.record(part)
        return self._record(**fields)

    def updated(self, table: str, *columns: str) -> tuple[str, Callable[[R], tuple[Any, ...]]]:
        """The UPDATE of only these columns of a record's row, found by its ``id``, and its parameters."""
        values = [self._column[name] for name in (*columns, "id")]
        sql = f"UPDATE {table} SET {', '.join(f'{name}=?' for name in columns)} WHERE id=?"

        def parameters(record: R) -> tuple[Any, ...]:
            return tuple(value(record) for value in values)

        return sql, parameters


def _own_value(name: str, to_db: Callable[[Any], Any] | None) -> Callable[[Any], Any]:
    get = attrgetter(name)
    return get if to_db is None else lambda record: to_db(get(record))


def _nested_value(name: str, value: Callable[[Any], Any]) -> Callable[[Any], Any]:
    get = attrgetter(name)

    def nested(record: Any) -> Any:
        part = get(record)
        return None if part is None else value(part)

    return nested


def _codec(kind: Any) -> tuple[Callable[[Any], Any], Callable[[Any], Any]] | None:
    """How a value of ``kind`` goes into its column and back, unless as it is."""
    if isinstance(kind, type) and issubclass(kind, Enum):
        return attrgetter("value"), kind
    if kind is bool:
        return int, bool
    origin = typing.get_origin(kind) or kind
    if origin is tuple:
        return json.dumps, _json_tuple
    if origin in (dict, list):
        return json.dumps, json.loads
    return None


def _json_tuple(text: str) -> tuple[Any, ...]:
    return tuple(json.loads(text))


def _or_none(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def either(value: Any) -> Any:
        return None if value is None else convert(value)

    return either


@dataclass(frozen=True, slots=True)
class Event:
    """An event of the log; its fields are the ``events`` table's columns and the API's answer (``schema``)."""

    seq: int
    at: float = field(metadata=marks(time=True))
    kind: str
    lease_id: str | None
    pool: str | None
    tenant: str | None
    reason: str | None
    details: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append; ``seq`` and ``at`` are assigned by the store."""

    kind: str
    lease_id: str | None = None
    pool: str | None = None
    tenant: str | None = None
    reason: str | None = None
    details: dict[str, Any] | None = None

    @classmethod
    def for_lease(cls, kind: str, lease: Lease, **details: Any) -> NewEvent:
        reason = lease.end_reason.value if lease.end_reason else None
        return cls(kind, lease.id, lease.pool, lease.tenant, reason, details or None)


Statement = tuple[str, tuple[Any, ...]]

_LEASES = _Columns(Lease)
_CACHES = _Columns(Cache)
_EVENTS = _Columns(Event)
_NEW_EVENTS = _Columns(NewEvent)
_RENEWED_OR_ENDED = _LEASES.updated(
    "leases",
    "state",
    "end_reason",
    "ended_at",
    "expires_at",
    "ttl_seconds",
    "usage_bytes",
    "usage_files",
    "usage_measured_at",
    "last_activity_at",
    "cache_kept_id",
)
_MEASURED = _LEASES.updated("leases", "usage_bytes", "usage_files", "usage_measured_at", "last_activity_at")


def lease_inserted(lease: Lease) -> Statement:
    return f"INSERT INTO leases ({_LEASES.columns}) VALUES ({_LEASES.placeholders})", _LEASES.row(lease)


def lease_updated(lease: Lease) -> Statement:
    """A renew or an end: only what those change (an UPDATE, not a row rewrite)."""
    sql, parameters = _RENEWED_OR_ENDED
    return sql, parameters(lease)


def cache_saved(cache: Cache) -> Statement:
    """A cache kept, handed over, measured or freed: its whole record."""
    sql = f"INSERT OR REPLACE INTO caches ({_CACHES.columns}) VALUES ({_CACHES.placeholders})"
    return sql, _CACHES.row(cache)


def cache_deleted(cache_id: str) -> Statement:
    return "DELETE FROM caches WHERE id = ?", (cache_id,)


class StoreError(Exception):
    """The state database cannot be written (full disk, locked, read-only)."""


SYNCHRONOUS = ("NORMAL", "FULL")
# A checkpoint pass follows a commit by at most this long. Under churn, short passes
# beat long ones: a pass's fsyncs hold up the writer's appends to the WAL meanwhile (the
# journal of ext4), for longer the more the pass has to flush. Once a second, 16
# clients' cycles on ext4 had p99 36-44 ms; every 30 ms, 19-25 ms, at a 10-25% higher
# rate (bench/lease_cycle.py, alternating runs). An idle daemon makes no passes.
CHECKPOINT_EVERY_SECONDS = 0.03
# Past this much WAL the writer's connection finishes a checkpoint itself so the WAL
# starts over (see _Checkpointer); also the size a longer WAL is cut back to then.
WAL_REWIND_BYTES = 4 * 1024 * 1024


class _Checkpointer:
    """Copies the WAL back into the database from a thread and a connection of its own.

    By default SQLite checkpoints inside whichever commit fills the WAL past 1,000
    pages: that commit writes and fsyncs megabytes, on the event loop, every few dozen
    lease cycles. Here commits only append to the WAL, and this thread checkpoints in
    PASSIVE mode (it never waits for, nor blocks, a writer) with the GIL released while
    SQLite works. Durability is SQLite's as before: what a checkpoint copies was
    committed to the WAL first.

    Copying is not rewinding, though. SQLite starts the WAL over from its beginning
    only when a write transaction begins with every frame already copied; under steady
    commits one always lands during the thread's checkpoint (its fsyncs), so the WAL
    never starts over: it grew by some 13 KB on disk per lease cycle, for ever, and its
    shared-memory index (8 bytes a frame, mapped into the daemon) by some 100 bytes of
    RSS. So once the WAL is past ``WAL_REWIND_BYTES`` the thread asks the writer's own
    connection to finish the job right after its next commit (:meth:`catch_up`): it
    copies only the few frames committed since the thread's pass (two small fsyncs on
    the event loop, once per ``WAL_REWIND_BYTES`` of writes), and the commit after
    that rewinds the WAL, which stays a few MiB.
    """

    def __init__(self, path: str, rewind_frames: int) -> None:
        self._path = path
        self._rewind_frames = rewind_frames
        self._rewind_due = False  # set by the thread, cleared by the writer (a bool: no lock needed)
        self._stopping = threading.Event()
        self._committed = threading.Event()
        self._failing = False
        self._thread = threading.Thread(target=self._run, name="scratchd-checkpoint", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._committed.set()
        self._thread.join()

    def committed(self) -> None:
        """Called by the writer after each commit: a pass is due (an idle daemon makes none)."""
        if not self._committed.is_set():
            self._committed.set()

    def _run(self) -> None:
        db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        try:
            while True:
                self._committed.wait()
                if self._stopping.is_set():
                    return
                self._committed.clear()
                self.checkpoint(db)
                if self._stopping.wait(CHECKPOINT_EVERY_SECONDS):
                    return
        finally:
            db.close()

    def checkpoint(self, db: sqlite3.Connection) -> None:
        """One pass of the thread: copy what the WAL holds; ask for a rewind once it is long."""
        try:
            _busy, frames, _copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:  # full disk, or an operator's lock: next time
            if not self._failing:
                log.warning("cannot checkpoint the state database", extra={"error": str(exc)})
            self._failing = True
        else:
            self._failing = False
            if frames >= self._rewind_frames:
                self._rewind_due = True

    def catch_up(self, db: sqlite3.Connection) -> None:
        """On the writer's connection, after a commit: when a rewind is due, copy the frames
        committed since the thread's pass, so that the next write transaction begins with
        all of the WAL copied and SQLite starts the WAL over."""
        if not self._rewind_due:
            return
        self._rewind_due = False
        # On an error the commit stands; the thread asks again after its next pass.
        with suppress(sqlite3.Error):
            db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


def migrate(db: sqlite3.Connection) -> None:
    """Bring a database of any earlier version up to this one's, in place."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > len(MIGRATIONS):
        raise StoreError(
            f"the state database is at version {version}, newer than this scratchd's "
            f"{len(MIGRATIONS)}: it was written by a later release; refusing to change it"
        )
    for number in range(version, len(MIGRATIONS)):
        try:
            db.executescript(
                f"BEGIN IMMEDIATE; {MIGRATIONS[number]} PRAGMA user_version = {number + 1}; COMMIT;"
            )
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise StoreError(f"cannot upgrade the state database to version {number + 1}: {exc}") from exc
        log.info("state database upgraded", extra={"version": number + 1})


class Store:
    def __init__(self, state_dir: str, *, synchronous: str = "NORMAL") -> None:
        if synchronous not in SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {', '.join(SYNCHRONOUS)}, not {synchronous!r}")
        Path(state_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = str(Path(state_dir) / "scratchd.db")
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        # Only another process (an operator's sqlite3 shell) ever holds the lock, and every
        # wait happens on the event loop: refuse quickly (503) rather than stall the daemon.
        self._db.execute("PRAGMA busy_timeout=100")
        self._db.execute("PRAGMA wal_autocheckpoint=0")  # the _Checkpointer's job
        # A WAL that grew long while it could not start over (an operator's open read
        # transaction pins it) is cut back to this when it does, rather than kept on disk.
        self._db.execute(f"PRAGMA journal_size_limit={WAL_REWIND_BYTES}")
        self._db.executescript(SCHEMA)
        migrate(self._db)
        self._staged: list[tuple[list[Statement], list[NewEvent], float, asyncio.Future[None]]] = []
        page_size = self._db.execute("PRAGMA page_size").fetchone()[0]
        self._checkpointer = _Checkpointer(self.path, rewind_frames=max(1, WAL_REWIND_BYTES // page_size))

    def close(self) -> None:
        self._commit_staged()
        self._checkpointer.stop()
        self._db.close()  # the last connection out checkpoints what is left and removes the WAL

    # -- writes: each one transaction, lease change and its event together --------------

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        if self._staged:
            self._commit_staged()  # what is staged was asked for first: keep the order
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # a failed COMMIT (disk full) has rolled back already
                    self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from exc
        self._checkpointer.committed()
        self._checkpointer.catch_up(self._db)

    def _write(self, statements: Iterable[Statement], events: Iterable[NewEvent], now: float) -> None:
        with self._transaction() as db:
            for sql, params in statements:
                db.execute(sql, params)
            for event in events:
                self._insert_event(event, now)

    async def write_grouped(self, statements: list[Statement], events: list[NewEvent], now: float) -> None:
        """Durable when this returns, like ``_write``, but in one transaction with every other
        change asked for in the same turn of the event loop (group commit): under concurrent
        requests a commit's cost is shared instead of paid by each."""
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._staged.append((statements, events, now, waiter))
        if len(self._staged) == 1:
            loop.call_soon(self._commit_staged)
        await waiter

    def _commit_staged(self) -> None:
        staged, self._staged = self._staged, []
        if not staged:
            return
        try:
            with self._transaction() as db:
                for statements, events, now, _ in staged:
                    for sql, params in statements:
                        db.execute(sql, params)
                    for event in events:
                        self._insert_event(event, now)
        except StoreError as exc:
            outcome: StoreError | None = exc
        else:
            outcome = None
        for *_, waiter in staged:
            if waiter.done():
                continue  # its request was cancelled; the change is committed (or not) all the same
            if outcome is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(outcome)

    def _insert_event(self, event: NewEvent, now: float) -> int:
        cursor = self._db.execute(
            f"INSERT INTO events (at, {_NEW_EVENTS.columns}) VALUES (?, {_NEW_EVENTS.placeholders})",
            (now, *_NEW_EVENTS.row(event)),
        )
        return int(cursor.lastrowid or 0)

    def save_lease(
        self,
        lease: Lease,
        event: NewEvent,
        now: float,
        *,
        also: Iterable[Statement] = (),
        events: Iterable[NewEvent] = (),
    ) -> None:
        """A lease's renew or end with its event, and what changed with it (``also``: its cache)."""
        self._write([lease_updated(lease), *also], [event, *events], now)

    def save_caches(self, statements: Iterable[Statement], events: Iterable[NewEvent], now: float) -> None:
        """Caches dropped, measured or set right at start-up, with their events, in one transaction."""
        self._write(statements, events, now)

    def save_usage(self, leases: Iterable[Lease]) -> None:
        """Usage samples are soft state: batched, and losing the last batch costs one rescan."""
        sql, parameters = _MEASURED
        rows = [parameters(lease) for lease in leases]
        with self._transaction() as db:
            db.executemany(sql, rows)

    def append_events(self, events: Iterable[NewEvent], now: float) -> None:
        self._write([], events, now)

    def prune(self, before: float) -> None:
        """Drop ended records and events older than ``gc.history_retention``."""
        self._write(
            [
                ("DELETE FROM leases WHERE state = 'ended' AND ended_at < ?", (before,)),
                ("DELETE FROM events WHERE at < ? AND seq < (SELECT MAX(seq) FROM events)", (before,)),
            ],
            [],
            before,
        )

    # -- reads ----------------------------------------------------------------------------

    def active_leases(self) -> list[Lease]:
        rows = self._db.execute(f"SELECT {_LEASES.columns} FROM leases WHERE state = 'active'")
        return [_LEASES.record(r) for r in rows]

    def caches(self) -> list[Cache]:
        return [_CACHES.record(r) for r in self._db.execute(f"SELECT {_CACHES.columns} FROM caches")]

    def get_lease(self, lease_id: str) -> Lease | None:
        row = self._db.execute(f"SELECT {_LEASES.columns} FROM leases WHERE id = ?", (lease_id,)).fetchone()
        return _LEASES.record(row) if row else None

    def ended_leases(self) -> Iterator[Lease]:
        cursor = self._db.execute(
            f"SELECT {_LEASES.columns} FROM leases WHERE state = 'ended' ORDER BY ended_at DESC"
        )
        return (_LEASES.record(r) for r in cursor)

    def events(
        self,
        since: int,
        limit: int,
        *,
        before: int | None = None,
        tenant: str | None = None,
        newest_first: bool = False,
    ) -> list[Event]:
        """Up to ``limit`` events between ``since`` and ``before`` (both exclusive), only ``tenant``'s if given.

        Newest first, a client finds the last N without knowing where they start.
        """
        where = ["seq > ?"]
        params: list[int | str] = [since]
        if before is not None:
            where.append("seq < ?")
            params.append(before)
        if tenant is not None:
            where.append("tenant = ?")
            params.append(tenant)
        rows = self._db.execute(
            f"SELECT {_EVENTS.columns} FROM events"
            f" WHERE {' AND '.join(where)} ORDER BY seq {'DESC' if newest_first else 'ASC'} LIMIT ?",
            (*params, limit),
        )
        return [_EVENTS.record(r) for r in rows]

    # -- orphan sightings: grace counts from the first sighting, across restarts -----------

    def orphan_sightings(self) -> dict[tuple[str, str], float]:
        return {(p, n): t for p, n, t in self._db.execute("SELECT pool, name, first_seen FROM orphans")}

    def record_orphans(self, seen: Iterable[tuple[str, str, float]], gone: Iterable[tuple[str, str]]) -> None:
        with self._transaction() as db:
            db.executemany("INSERT OR IGNORE INTO orphans (pool, name, first_seen) VALUES (?, ?, ?)", seen)
            db.executemany("DELETE FROM orphans WHERE pool = ? AND name = ?", gone)
