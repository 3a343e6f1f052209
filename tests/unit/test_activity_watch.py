"""ActivityWatch on real directories and real inotify: immediate, and within its budget."""

import asyncio
import os
import time
from pathlib import Path

from conftest import QUEUED_EVENTS, needs_queue_sysctl, sysctl

from scratchd.reclaim import watcher
from scratchd.reclaim.watcher import ActivityWatch


async def _collect_until(reports: list, condition, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"no activity reported: {reports}"
        await asyncio.sleep(0.01)


def test_writes_deep_in_new_directories_are_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(watcher, "ACTIVITY_DEBOUNCE_SECONDS", 0.0)

    async def scenario() -> None:
        reports: list[tuple[str, float]] = []
        watch = ActivityWatch(lambda lease_id, at: reports.append((lease_id, at)))
        watch.bind("lease-1", str(tmp_path))
        try:
            deep = tmp_path / "a"
            deep.mkdir()
            await _collect_until(reports, lambda: reports)
            await _collect_until(reports, lambda: watch.watches == 2)  # the new directory is watched too
            before = len(reports)
            (deep / "file").write_text("x")
            await _collect_until(reports, lambda: len(reports) > before)
            assert all(lease_id == "lease-1" for lease_id, _ in reports)
        finally:
            watch.close()
        assert watch.watches == 0

    asyncio.run(scenario())


def test_a_lease_with_many_directories_stays_within_its_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(watcher, "WATCHES_PER_LEASE", 8)

    async def scenario() -> None:
        watch = ActivityWatch(lambda lease_id, at: None)
        watch.bind("big", str(tmp_path))
        try:
            for i in range(50):
                (tmp_path / f"d{i}").mkdir()
            watch._events._read()  # every mkdir's event is queued already: one read takes them all
            assert watch.watches == 8
        finally:
            watch.close()
        assert watch.watches == 0

    asyncio.run(scenario())


def test_past_the_total_budget_leases_are_bound_without_a_watch_and_logged_once(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(watcher, "WATCHES_TOTAL", 2)
    for name in "abcd":
        (tmp_path / name).mkdir()

    async def scenario() -> None:
        watch = ActivityWatch(lambda lease_id, at: None)
        try:
            for name in "abcd":
                watch.bind(name, str(tmp_path / name))
            assert watch.watches == 2 and all(name in watch for name in "abcd")
            watch.unbind("a")
            watch.unbind("c")  # had none: nothing to give back
            assert watch.watches == 1
        finally:
            watch.close()

    asyncio.run(scenario())
    assert sum("budget spent" in r.getMessage() for r in caplog.records) == 1


def test_a_deleted_subdirectory_gives_its_watch_back(tmp_path):
    async def scenario() -> None:
        watch = ActivityWatch(lambda lease_id, at: None)
        watch.bind("l", str(tmp_path))
        try:
            (tmp_path / "sub").mkdir()
            await _collect_until([], lambda: watch.watches == 2)
            (tmp_path / "sub").rmdir()
            await _collect_until([], lambda: watch.watches == 1)
        finally:
            watch.close()

    asyncio.run(scenario())


@needs_queue_sysctl
def test_after_an_overflow_every_watched_lease_counts_as_written_and_writes_are_still_seen(
    tmp_path, caplog, monkeypatch
):
    monkeypatch.setattr(watcher, "ACTIVITY_DEBOUNCE_SECONDS", 0.0)
    busy, quiet = tmp_path / "busy", tmp_path / "quiet"
    busy.mkdir()
    quiet.mkdir()

    async def scenario() -> list[tuple[str, float]]:
        reports: list[tuple[str, float]] = []
        watch = ActivityWatch(lambda lease_id, at: reports.append((lease_id, at)))
        with sysctl(QUEUED_EVENTS, 16):
            watch.bind("busy", str(busy))
        watch.bind("quiet", str(quiet))
        try:
            for i in range(1000):  # no await: the queue overflows before the first read
                (busy / f"f{i}").write_text("x")
            await _collect_until(reports, lambda: any(lease_id == "quiet" for lease_id, _ in reports))
            flooded = time.time()
            (busy / "after").write_text("x")
            await _collect_until(
                reports, lambda: any(at >= flooded for lease_id, at in reports if lease_id == "busy")
            )
        finally:
            watch.close()
        return reports

    reports = asyncio.run(scenario())
    assert {"busy", "quiet"} <= {lease_id for lease_id, _ in reports}
    assert sum("inotify queue overflowed" in r.getMessage() for r in caplog.records) == 1


def test_symlinked_directory_is_not_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    lease = tmp_path / "lease"
    lease.mkdir()

    async def scenario() -> None:
        reports: list = []
        watch = ActivityWatch(lambda lease_id, at: reports.append(at))
        (lease / "link").symlink_to(outside, target_is_directory=True)
        watch.bind("l", str(lease / "link"))
        try:
            assert watch.watches == 0  # IN_DONT_FOLLOW: the symlink itself is no directory
        finally:
            watch.close()

    asyncio.run(scenario())
    assert os.path.isdir(Path(outside))
