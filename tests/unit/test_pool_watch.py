"""PoolWatcher on real directories and real inotify, read on the event loop."""

import asyncio
import os
from pathlib import Path

from conftest import QUEUED_EVENTS, needs_queue_sysctl, sysctl

from scratchd.reclaim.watcher import PoolWatcher


async def _until(condition, what: str, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def _lost(pools: set[str]) -> None:
    raise AssertionError(f"no event may be lost here: {pools}")


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_removed_and_renamed_entries_are_reported_hidden_ones_and_creations_are_not(tmp_path):
    pool, elsewhere = tmp_path / "pool", tmp_path / "elsewhere"
    pool.mkdir()
    elsewhere.mkdir()
    for name in ("gone", "moved", ".trash-item", "marker"):
        (pool / name).mkdir()

    async def scenario() -> list[tuple[str, str]]:
        gone: list[tuple[str, str]] = []
        watcher = PoolWatcher(lambda pool_name, name: gone.append((pool_name, name)), _lost)
        assert watcher.watch("p", str(pool))
        try:
            (pool / ".trash-item").rmdir()  # the daemon's own dot-entries: never a lease
            (pool / "new").mkdir()  # a creation is filtered by the kernel
            (pool / "gone").rmdir()
            (pool / "moved").rename(elsewhere / "moved")
            (pool / "marker").rmdir()  # events arrive in order: once this one is in, all are
            await _until(lambda: ("p", "marker") in gone, "the marker's removal")
        finally:
            watcher.stop()
        return gone

    assert asyncio.run(scenario()) == [("p", "gone"), ("p", "moved"), ("p", "marker")]


def test_unwatching_one_of_two_pools_on_a_directory_keeps_the_other(tmp_path):
    for name in ("first", "second"):
        (tmp_path / name).mkdir()

    async def scenario() -> list[tuple[str, str]]:
        gone: list[tuple[str, str]] = []
        watcher = PoolWatcher(lambda pool_name, name: gone.append((pool_name, name)), _lost)
        assert watcher.watch("a", str(tmp_path)) and watcher.watch("b", str(tmp_path))
        assert watcher.watch("a", str(tmp_path))  # again: a no-op
        try:
            (tmp_path / "first").rmdir()
            await _until(lambda: len(gone) == 2, "both pools' reports")
            watcher.unwatch("a")
            (tmp_path / "second").rmdir()
            await _until(lambda: ("b", "second") in gone, "pool b's report")
            watcher.unwatch("b")
            watcher.unwatch("b")  # again: a no-op
        finally:
            watcher.stop()
        return gone

    assert sorted(asyncio.run(scenario())) == [("a", "first"), ("b", "first"), ("b", "second")]


def test_a_pool_directory_that_goes_away_is_forgotten_and_stop_closes_the_fd(tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    before = _open_fds()

    async def scenario() -> None:
        watcher = PoolWatcher(lambda pool_name, name: None, _lost)
        assert not watcher.watch("missing", str(tmp_path / "missing"))
        assert watcher.watch("p", str(pool))
        pool.rmdir()
        await _until(lambda: not watcher._wd_of, "the watch to be dropped")  # IN_IGNORED arrived
        watcher.unwatch("p")  # the kernel dropped it already: nothing to undo, no error
        pool.mkdir()
        assert watcher.watch("p", str(pool))  # back: watched afresh
        watcher.stop()
        watcher.stop()

    asyncio.run(scenario())
    assert _open_fds() == before


def test_many_removals_queued_while_the_loop_was_busy_all_arrive(tmp_path):
    names = [f"lease-{i:04}" for i in range(3000)]  # more than one 64 KiB read of events
    for name in names:
        (tmp_path / name).mkdir()

    async def scenario() -> list[str]:
        gone: list[str] = []
        watcher = PoolWatcher(lambda pool_name, name: gone.append(name), _lost)
        assert watcher.watch("p", str(tmp_path))
        try:
            for name in names:  # no await: every event queues before the first read
                Path(tmp_path, name).rmdir()
            await _until(lambda: len(gone) == len(names), "every removal")
        finally:
            watcher.stop()
        return gone

    assert asyncio.run(scenario()) == names


@needs_queue_sysctl
def test_lost_removals_have_every_watched_pool_rechecked_and_later_ones_still_arrive(tmp_path, caplog):
    pool, other = tmp_path / "pool", tmp_path / "other"
    pool.mkdir()
    other.mkdir()
    names = [f"lease-{i:03}" for i in range(100)]
    for name in [*names, "after"]:
        (pool / name).mkdir()

    async def scenario() -> tuple[list[set[str]], list[str]]:
        lost: list[set[str]] = []
        gone: list[str] = []
        watcher = PoolWatcher(lambda pool_name, name: gone.append(name), lost.append)
        with sysctl(QUEUED_EVENTS, 16):
            assert watcher.watch("p", str(pool))
        assert watcher.watch("q", str(other))
        try:
            for name in names:  # no await: the queue overflows before the first read
                (pool / name).rmdir()
            await _until(lambda: lost, "the overflow")
            (pool / "after").rmdir()
            await _until(lambda: "after" in gone, "a removal after the overflow")
        finally:
            watcher.stop()
        return lost, gone

    lost, gone = asyncio.run(scenario())
    assert lost == [{"p", "q"}]
    assert len(gone) == 16 + 1  # what fit in the queue, then the one after
    assert sum("inotify queue overflowed" in r.getMessage() for r in caplog.records) == 1
