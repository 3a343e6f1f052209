"""ActivityWatch on real directories and real inotify: immediate, and within its budget."""

import asyncio
import os
from pathlib import Path

from watchdog.observers.inotify_c import InotifyConstants, InotifyFD

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

    class Probe:
        """Another callback on the same watch: events reach it in the same order."""

        def __init__(self) -> None:
            self.names: list[bytes] = []

        def on_event(self, event) -> None:
            self.names.append(event.name)

        def on_watch_deleted(self, wd) -> None:
            pass

        def on_queue_overflow(self) -> None:
            pass

    async def scenario() -> None:
        watch = ActivityWatch(lambda lease_id, at: None)
        watch.bind("big", str(tmp_path))
        probe = Probe()
        inotify = InotifyFD.get_instance()
        wd = inotify.add_callback(os.fsencode(tmp_path), InotifyConstants.IN_CREATE, probe, "probe")
        try:
            for i in range(50):
                (tmp_path / f"d{i}").mkdir()
            (tmp_path / "sentinel").write_text("")
            # once the probe saw the sentinel, the lease's callback has seen every mkdir
            await _collect_until([], lambda: b"sentinel" in probe.names)
            assert watch.watches == 8
        finally:
            inotify.remove_callbacks([(wd, "probe")])
            watch.close()
        assert watch.watches == 0

    asyncio.run(scenario())


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
