"""The SQLite store on a real database file: records with their events, and group commit."""

import asyncio
import itertools
import linecache
import os
import sqlite3
import sys
from typing import Any

import pytest
from conftest import wait_for
from records import a_lease, every_field_cache, every_field_lease

from scratchd import store as store_module
from scratchd.leases import EndReason, Lease, LinkMode, end
from scratchd.store import NewEvent, Store, StoreError, lease_inserted, lease_updated


def lease(i: int) -> Lease:
    return a_lease(f"l{i}", created_at=1.0, expires_at=2.0, ttl_seconds=1, labels={"n": str(i)})


def test_a_record_and_its_event_survive_a_reopen(tmp_path):
    store = Store(str(tmp_path))
    store._write([lease_inserted(lease(1))], [NewEvent.for_lease("lease_created", lease(1))], 5.0)
    ended = end(lease(1), EndReason.EXPIRED, 6.0)
    store.save_lease(ended, NewEvent.for_lease("lease_ended", ended), 6.0)
    store.close()
    reopened = Store(str(tmp_path))
    assert reopened.get_lease("l1") == ended
    assert [(e.kind, e.reason) for e in reopened.events(0, 10)] == [
        ("lease_created", None),
        ("lease_ended", "expired"),
    ]


def test_writes_in_one_loop_turn_share_one_transaction(tmp_path):
    store = Store(str(tmp_path))
    transactions = []
    store._db.set_trace_callback(lambda sql: transactions.append(sql) if sql.startswith("BEGIN") else None)

    async def many() -> None:
        await asyncio.gather(
            *(
                store.write_grouped(
                    [lease_inserted(lease(i))], [NewEvent.for_lease("lease_created", lease(i))], 1.0
                )
                for i in range(20)
            )
        )

    asyncio.run(many())
    assert len(transactions) == 1
    assert len(store.active_leases()) == 20 and len(store.events(0, 100)) == 20


def test_a_failed_group_fails_every_waiter_and_commits_nothing(tmp_path):
    store = Store(str(tmp_path))
    store._write([lease_inserted(lease(1))], [], 1.0)

    async def clash() -> tuple[BaseException | None, ...]:
        return await asyncio.gather(
            store.write_grouped([lease_inserted(lease(2))], [], 1.0),
            store.write_grouped([lease_inserted(lease(1))], [], 1.0),  # the same id again
            return_exceptions=True,
        )

    results = asyncio.run(clash())
    assert all(isinstance(r, StoreError) for r in results)
    assert [lease.id for lease in store.active_leases()] == ["l1"]


def test_a_direct_write_commits_what_was_staged_first(tmp_path):
    store = Store(str(tmp_path))

    async def staged_then_direct() -> None:
        waiter = asyncio.ensure_future(store.write_grouped([lease_inserted(lease(1))], [], 1.0))
        await asyncio.sleep(0)  # staged, not yet committed
        ended = end(lease(1), EndReason.EXPIRED, 2.0)
        store.save_lease(ended, NewEvent.for_lease("lease_ended", ended), 2.0)  # must land after the insert
        await waiter

    asyncio.run(staged_then_direct())
    stored = store.get_lease("l1")
    assert stored is not None and stored.end_reason is EndReason.EXPIRED


def test_a_locked_database_is_a_store_error(tmp_path):
    store = Store(str(tmp_path))
    store._db.execute("PRAGMA busy_timeout=50")
    holder = sqlite3.connect(store.path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreError):
            store._write([lease_updated(lease(1))], [], 1.0)
    finally:
        holder.execute("ROLLBACK")


def test_synchronous_is_normal_by_default(tmp_path):
    assert Store(str(tmp_path))._db.execute("PRAGMA synchronous").fetchone() == (1,)


@pytest.mark.parametrize(("setting", "level"), [("NORMAL", 1), ("FULL", 2)])
def test_synchronous_is_set_as_asked(tmp_path, setting, level):
    store = Store(str(tmp_path), synchronous=setting)
    assert store._db.execute("PRAGMA synchronous").fetchone() == (level,)
    assert store._db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


@pytest.mark.parametrize("setting", ["normal", "OFF", "EXTRA", "FULL; DROP TABLE leases", ""])
def test_any_other_synchronous_is_refused(tmp_path, setting):
    with pytest.raises(ValueError, match="synchronous"):
        Store(str(tmp_path / "state"), synchronous=setting)
    assert not (tmp_path / "state").exists()  # refused before anything is created


def test_commits_only_append_to_the_wal_and_a_thread_checkpoints_them(tmp_path):
    store = Store(str(tmp_path))
    assert store._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0  # never inside a commit
    database = tmp_path / "scratchd.db"
    before = database.stat().st_size
    for i in range(300):  # some 100 pages: far below SQLite's own threshold of 1,000
        store._write([lease_inserted(lease(i))], [NewEvent.for_lease("lease_created", lease(i))], 1.0)
    wait_for(lambda: database.stat().st_size > before, what="a checkpoint into the database file")
    store.close()
    assert Store(str(tmp_path)).get_lease("l299") is not None


def test_checkpoint_passes_follow_commits_and_an_idle_store_makes_none(tmp_path, monkeypatch):
    store = Store(str(tmp_path))
    checkpointer = store._checkpointer
    passes: list[sqlite3.Connection] = []
    checkpoint = checkpointer.checkpoint

    def counted(db: sqlite3.Connection) -> None:
        passes.append(db)
        checkpoint(db)

    monkeypatch.setattr(checkpointer, "checkpoint", counted)

    def parked() -> bool:
        """The thread waits for the next commit (not for a clock): it cannot pass again without one."""
        assert checkpointer._thread.ident is not None  # started
        frame = sys._current_frames().get(checkpointer._thread.ident)
        while frame is not None and frame.f_code.co_name != "_run":
            frame = frame.f_back
        return frame is not None and "_committed.wait()" in linecache.getline(
            frame.f_code.co_filename, frame.f_lineno
        )

    wait_for(parked, what="the thread waiting for a first commit")
    assert passes == []
    store._write([lease_inserted(lease(1))], [NewEvent.for_lease("lease_created", lease(1))], 1.0)
    wait_for(lambda: passes, what="a pass after the commit")
    wait_for(lambda: parked() and not checkpointer._committed.is_set(), what="the thread idle again")
    assert len(passes) == 1
    store.close()


def test_the_wal_starts_over_though_a_commit_lands_in_every_checkpoint(tmp_path, monkeypatch):
    """Under steady commits one lands during each of the thread's checkpoints, so no write
    begins with the whole WAL copied and SQLite on its own never starts the WAL over: it
    grew for ever, on disk and in its shared-memory index, which the daemon maps (8 bytes
    a frame: the soak's RSS growth). Here the thread's pass runs inside every 20th commit."""
    monkeypatch.setattr(store_module, "CHECKPOINT_EVERY_SECONDS", 3600.0)  # the thread: only as called below
    monkeypatch.setattr(store_module, "WAL_REWIND_BYTES", 256 * 1024)
    store = Store(str(tmp_path))
    thread_side = sqlite3.connect(store.path, isolation_level=None, check_same_thread=False)
    commits = 0

    def during_commit(sql: str) -> None:
        nonlocal commits
        if sql == "COMMIT":
            commits += 1
            if commits % 20 == 0:
                store._checkpointer.checkpoint(thread_side)

    store._db.set_trace_callback(during_commit)
    wal_sizes = []
    for i in range(1500):  # tens of MB of WAL if it never started over: five pages a commit
        store._write([lease_inserted(lease(i))], [NewEvent.for_lease("lease_created", lease(i))], 1.0)
        wal_sizes.append(os.path.getsize(store.path + "-wal"))
    shm_bytes = os.path.getsize(store.path + "-shm")
    store._db.set_trace_callback(None)
    thread_side.close()
    store.close()
    # Past the limit the thread's next pass (within 20 commits) asks, and the writer's
    # next commits rewind: the WAL never holds much more than the limit.
    one_commit = max(after - before for before, after in itertools.pairwise(wal_sizes))
    assert max(wal_sizes) < 256 * 1024 + 22 * one_commit
    assert wal_sizes[-1] < max(wal_sizes)  # started over, more than once
    assert shm_bytes == 32 * 1024  # one region of the index: 4,000 frames, never more
    assert Store(str(tmp_path)).get_lease("l1499") is not None


def test_pruning_keeps_ended_history_newer_than_the_cutoff_and_never_reuses_a_seq(tmp_path):
    store = Store(str(tmp_path))
    old, recent = end(lease(1), EndReason.RELEASED, 10.0), end(lease(2), EndReason.RELEASED, 30.0)
    for record, at in ((old, 10.0), (recent, 30.0)):
        store._write([lease_inserted(record)], [NewEvent.for_lease("lease_ended", record)], at)
    store.prune(before=20.0)
    assert store.get_lease("l1") is None and store.get_lease("l2") == recent
    assert [e.lease_id for e in store.events(0, 10)] == ["l2"]
    store.prune(before=40.0)  # everything is older: the newest event stays, to number the next one
    newest = store.events(0, 10)
    assert [e.lease_id for e in newest] == ["l2"]
    store.append_events([NewEvent("pool_state", pool="p")], 50.0)
    store.close()
    reopened = Store(str(tmp_path))
    assert [e.seq for e in reopened.events(0, 10)] == [newest[0].seq, newest[0].seq + 1]


# -- upgrades: a state directory of an earlier release, in place ------------------------------

STATE_V0 = os.path.join(os.path.dirname(__file__), os.pardir, "data", "state-v0.sql")


def state_of_the_first_release(state_dir) -> str:
    path = os.path.join(state_dir, "scratchd.db")
    with open(STATE_V0) as dump, sqlite3.connect(path) as db:
        db.executescript(dump.read())
    db.close()
    return path


def test_an_earlier_releases_state_upgrades_in_place_and_keeps_every_lease(tmp_path):
    path = state_of_the_first_release(tmp_path)
    store = Store(str(tmp_path))
    active = {lease.labels["job"]: lease for lease in store.active_leases()}
    assert {job: lease.link_mode for job, lease in active.items()} == {
        "1": LinkMode.HARDLINK,
        "2": LinkMode.COPY,
        "3": None,
    }  # what same_filesystem said
    assert [lease.same_filesystem for _, lease in sorted(active.items())] == [True, False, None]
    assert [lease.id for lease in store.ended_leases()] == ["00000000000004aaaaaaaaaaaaaaaaaaa"]
    assert [event.kind for event in store.events(0, 10)] == ["lease_created"] * 3
    store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (len(store_module.MIGRATIONS),)
    db.close()


def test_an_upgraded_state_opens_again_unchanged(tmp_path):
    state_of_the_first_release(tmp_path)
    Store(str(tmp_path)).close()
    store = Store(str(tmp_path))
    assert len(store.active_leases()) == 3


def test_a_new_state_is_at_the_latest_version(tmp_path):
    Store(str(tmp_path)).close()
    with sqlite3.connect(tmp_path / "scratchd.db") as db:
        assert db.execute("PRAGMA user_version").fetchone() == (len(store_module.MIGRATIONS),)
    db.close()


def test_a_failed_upgrade_leaves_the_earlier_version_whole(tmp_path, monkeypatch):
    path = state_of_the_first_release(tmp_path)
    monkeypatch.setattr(store_module, "MIGRATIONS", (*store_module.MIGRATIONS, "UPDATE nowhere SET x = 1;"))
    with pytest.raises(StoreError, match=f"version {len(store_module.MIGRATIONS)}"):
        Store(str(tmp_path))
    with sqlite3.connect(path) as db:  # the migrations before the failing one are committed, each whole
        assert db.execute("PRAGMA user_version").fetchone() == (len(store_module.MIGRATIONS) - 1,)
        assert db.execute("SELECT count(*) FROM leases WHERE state = 'active'").fetchone() == (3,)
    db.close()


def test_a_state_from_a_later_release_is_refused_untouched(tmp_path):
    path = state_of_the_first_release(tmp_path)
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {len(store_module.MIGRATIONS) + 1}")
    db.close()
    with pytest.raises(StoreError, match="later release"):
        Store(str(tmp_path))
    with sqlite3.connect(path) as db:
        assert "link_mode" not in {row[1] for row in db.execute("PRAGMA table_info(leases)")}
    db.close()


def state_of_the_link_mode_release(state_dir) -> str:
    """Version 1 (link modes, before warm caches), as that release left it: migrated from the first."""
    path = state_of_the_first_release(state_dir)
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(f"BEGIN; {store_module.MIGRATIONS[0]} PRAGMA user_version = 1; COMMIT;")
    db.close()
    return path


@pytest.mark.parametrize("make_state", [state_of_the_first_release, state_of_the_link_mode_release])
def test_earlier_states_upgrade_to_warm_caches_keeping_every_lease(tmp_path, make_state):
    path = make_state(tmp_path)
    with sqlite3.connect(path) as db:
        before = db.execute("SELECT id, state FROM leases ORDER BY id").fetchall()
    db.close()
    store = Store(str(tmp_path))
    assert sorted((r.id, r.state.value) for r in [*store.active_leases(), *store.ended_leases()]) == before
    assert all(r.cache is None for r in store.active_leases())  # leased before caches: no cache_key
    assert store.caches() == []
    store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (len(store_module.MIGRATIONS),)
    db.close()


def test_a_lease_with_a_cache_and_its_kept_cache_survive_a_reopen(tmp_path):
    from scratchd.caches import Cache, CacheState, CacheUse, HitKind

    store = Store(str(tmp_path))
    leased = lease(1)
    leased.cache = CacheUse("main-a", ("main-",), HitKind.FALLBACK, "main-b", "c1", 3.0)
    handed = Cache(
        id="c1",
        key="main-b",
        tenant="t",
        pool="p",
        state=CacheState.IN_USE,
        lease_id="l1",
        bytes=10,
        files=2,
        kept_at=3.0,
        last_used_at=4.0,
        hits=1,
    )
    store._write([lease_inserted(leased), store_module.cache_saved(handed)], [], 4.0)
    ended = end(leased, EndReason.RELEASED, 5.0)
    ended.cache = CacheUse("main-a", ("main-",), HitKind.FALLBACK, "main-b", "c1", 3.0, kept_id="c1")
    kept = Cache(
        id="c1", key="main-a", tenant="t", pool="p", bytes=10, files=2, kept_at=5.0, last_used_at=5.0, hits=1
    )
    store.save_lease(
        ended,
        NewEvent.for_lease("lease_ended", ended),
        5.0,
        also=[store_module.cache_saved(kept)],
        events=[NewEvent("cache_kept", details={"cache_id": "c1"})],
    )
    store.close()
    reopened = Store(str(tmp_path))
    assert reopened.get_lease("l1") == ended
    assert reopened.caches() == [kept]
    assert [e.kind for e in reopened.events(0, 10)] == ["lease_ended", "cache_kept"]
    reopened.save_caches([store_module.cache_deleted("c1")], [], 6.0)
    assert reopened.caches() == []


def _table_columns(store: Store, table: str) -> set[str]:
    return {row[1] for row in store._db.execute(f"PRAGMA table_info({table})")}


def _leaf_fields(record: Any, prefix: str = "") -> set[str]:
    """A record's fields as columns: a nested record's by their prefixed names, not doubled (``cache_id``)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(record)
    found = set()
    for field in dataclasses.fields(record):
        kinds = [k for k in typing.get_args(hints[field.name]) or [hints[field.name]] if k is not type(None)]
        if dataclasses.is_dataclass(kinds[0]):
            found |= _leaf_fields(kinds[0], f"{prefix}{field.name}_")
        else:
            found.add(field.name if field.name.startswith(prefix) else prefix + field.name)
    return found


def test_every_field_of_a_record_is_a_column_of_its_table_and_every_column_a_field(tmp_path):
    """A field added to a record needs its column (a migration), and a column its field: the tables
    after every migration are the records' fields, and the columns the store reads and writes are too."""
    from scratchd.caches import Cache

    store = Store(str(tmp_path))
    tables: list[tuple[str, type, store_module._Columns[Any]]] = [
        ("leases", Lease, store_module._LEASES),
        ("caches", Cache, store_module._CACHES),
        ("events", store_module.Event, store_module._EVENTS),
    ]
    for table, record, columns in tables:
        assert _leaf_fields(record) == _table_columns(store, table), table
        assert set(columns.names) == _table_columns(store, table) and len(columns.names) == len(
            set(columns.names)
        )
    assert set(store_module._NEW_EVENTS.names) | {"seq", "at"} == _table_columns(store, "events")
    store.close()


def test_a_record_with_every_field_set_reads_back_equal(tmp_path):
    everything, cache = every_field_lease(), every_field_cache()
    store = Store(str(tmp_path))
    store._write([lease_inserted(everything), store_module.cache_saved(cache)], [], 1.0)
    assert store.get_lease("l1") == everything and store.caches() == [cache]
    store.close()
