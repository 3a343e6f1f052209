"""Keeping leases' usage fresh; the totals by pool and by tenant are ``manager.ActiveLeases``'.

The measuring itself is :func:`scratchd.scan.scan_tree`, run in a niced worker process.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
import os
import time
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool

from scratchd.caches import Cache
from scratchd.leases import Lease, Usage
from scratchd.manager import LeaseManager
from scratchd.offload import SCANNER_NICENESS, disk_worker, stop_task
from scratchd.scan import UsageSample, scan_tree
from scratchd.store import Store, StoreError
from scratchd.walk import TreeChanged

log = logging.getLogger("scratchd.usage")


# -- keeping usage fresh ------------------------------------------------------------------

# Scans may use at most this share of one CPU (the rest the worker idles), so a host full
# of huge leases costs a bounded slice of one core, even where a big scan takes two.
SCAN_DUTY_CYCLE = 0.5
# Leases whose figures drive a decision (idle timeout, byte limit, reservation) are
# rescanned every gc.interval; the rest at most this often.
BACKGROUND_PERIOD_SECONDS = 60.0
# A lease is measured again once writes under it have stopped this long: longer than the
# activity watch's debounce, so the scan starts after the last write it was told of.
SETTLE_SECONDS = 1.0
FLUSH_SECONDS = 1.0


class UsageMonitor:
    """Scans active leases one at a time in a worker process, most overdue first.

    Each lease is due at the earlier of two times: its periodic scan, and SETTLE_SECONDS
    after the last write the activity watch reported (which moves on while writes go on).
    Results go to the in-memory leases at once (the GC loop decides on them) and to
    the store in batches: a lost batch costs one rescan, not correctness.

    ``directory_gone`` is told of a lease whose directory a scan did not find;
    ``interval`` reads ``gc.interval`` (a reload may change it).
    """

    def __init__(
        self,
        manager: LeaseManager,
        store: Store,
        *,
        directory_gone: Callable[[Lease], None],
        interval: Callable[[], float],
        clock: Callable[[], float],
    ) -> None:
        self._manager = manager
        self._store = store
        self._directory_gone = directory_gone
        self._interval = interval
        self._clock = clock
        self._due: list[tuple[float, str]] = []  # entries whose time is no longer _when's are skipped
        self._when: dict[str, float] = {}
        self._periodic: dict[str, float] = {}
        self._settle: dict[str, float] = {}
        self._dirty: dict[str, Lease] = {}
        self._wakeup = asyncio.Event()
        self._executor = disk_worker(SCANNER_NICENESS, scan_tree)
        self._task: asyncio.Task[None] | None = None
        self._cache_scans: set[asyncio.Task[None]] = set()
        manager.listeners.append(self._lease_changed)
        manager.cache_listeners.append(self._cache_kept)

    def start(self) -> None:
        now = self._clock()
        for lease in self._manager.active.values():
            self._schedule(lease.id, now)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="scratchd-usage")

    async def stop(self) -> None:
        for scan in list(self._cache_scans):
            await stop_task(scan)
        await stop_task(self._task)
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._flush()

    def _period(self, lease: Lease) -> float:
        interval = self._interval()
        if lease.idle_timeout_seconds or lease.max_bytes or lease.expected_bytes or lease.evictable:
            return interval
        return max(interval, BACKGROUND_PERIOD_SECONDS)

    def written(self, lease_id: str, at: float) -> None:
        """Writes under a lease were seen at ``at``: measure it once they have stopped."""
        if lease_id in self._manager.active:
            self._settle[lease_id] = at + SETTLE_SECONDS
            self._push(lease_id)

    def _schedule(self, lease_id: str, when: float) -> None:
        """The next periodic scan: at ``when``, unless one is due sooner."""
        if when < self._periodic.get(lease_id, math.inf):
            self._periodic[lease_id] = when
            self._push(lease_id)

    def _push(self, lease_id: str) -> None:
        when = min(self._periodic.get(lease_id, math.inf), self._settle.get(lease_id, math.inf))
        if self._when.get(lease_id) != when:
            self._when[lease_id] = when
            heapq.heappush(self._due, (when, lease_id))
            if self._due[0] == (when, lease_id):  # due before all the rest: the loop must look again
                self._wakeup.set()

    def _forget(self, lease_id: str) -> None:
        self._when.pop(lease_id, None)
        self._periodic.pop(lease_id, None)
        self._settle.pop(lease_id, None)

    def _lease_changed(self, lease: Lease) -> None:
        if lease.active:  # a new lease is empty: its first scan can wait a period
            self._schedule(lease.id, self._clock() + self._period(lease))
        else:
            self._forget(lease.id)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last_flush = time.monotonic()
        while True:
            if time.monotonic() - last_flush >= FLUSH_SECONDS:
                self._flush()
                last_flush = time.monotonic()
            if not self._due:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            when, lease_id = self._due[0]
            if self._when.get(lease_id) != when:
                heapq.heappop(self._due)
                continue
            wait = when - self._clock()
            if wait > 0:
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), timeout=min(wait, FLUSH_SECONDS))
                continue
            heapq.heappop(self._due)
            self._forget(lease_id)
            lease = self._manager.active.get(lease_id)
            if lease is None:
                continue
            started = time.monotonic()
            try:
                sample = await loop.run_in_executor(self._executor, scan_tree, lease.path)
            except FileNotFoundError:
                sample = None
            except BrokenProcessPool:
                self._executor = disk_worker(SCANNER_NICENESS, scan_tree)
                self._schedule(lease_id, self._clock())
                continue
            except (OSError, TreeChanged) as exc:
                log.warning("usage scan failed; will retry", extra={"lease": lease_id, "error": str(exc)})
                self._schedule(lease_id, self._clock() + self._period(lease))
                continue
            elapsed = time.monotonic() - started
            self._apply(lease_id, sample)
            busy = max(elapsed, sample.cpu_seconds if sample else 0.0)
            await asyncio.sleep(busy / SCAN_DUTY_CYCLE - elapsed)

    def _apply(self, lease_id: str, sample: UsageSample | None) -> None:
        lease = self._manager.active.get(lease_id)
        if lease is None:
            return
        if sample is None or not os.path.lexists(lease.path):
            self._directory_gone(lease)
            return
        self._manager.active.set_usage(
            lease, Usage(bytes=sample.bytes, files=sample.files, measured_at=sample.measured_at)
        )
        newest = min(sample.newest_mtime, sample.measured_at)
        if lease.last_activity_at is None or newest > lease.last_activity_at:
            lease.last_activity_at = newest
        self._dirty[lease.id] = lease
        self._schedule(lease.id, sample.measured_at + self._period(lease))

    def _cache_kept(self, cache: Cache, path: str) -> None:
        """A kept cache's size was its lease's last measurement: measure the directory itself, soon."""
        scan = asyncio.get_running_loop().create_task(self._measure_cache(cache.id, path))
        self._cache_scans.add(scan)
        scan.add_done_callback(self._cache_scans.discard)

    async def _measure_cache(self, cache_id: str, path: str) -> None:
        try:
            sample = await asyncio.get_running_loop().run_in_executor(self._executor, scan_tree, path)
        except (OSError, TreeChanged, BrokenProcessPool) as exc:  # dropped meanwhile, or the worker died
            log.debug("cache not measured", extra={"cache": cache_id, "error": str(exc)})
            return
        self._manager.cache_measured(cache_id, sample.bytes, sample.files)

    def _flush(self) -> None:
        if not self._dirty:
            return
        leases, self._dirty = list(self._dirty.values()), {}
        try:
            self._store.save_usage(leases)
        except StoreError as exc:
            log.warning("cannot save usage", extra={"error": str(exc)})
