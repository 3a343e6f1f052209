"""Draining the trash: deleting ended leases' trees in a worker process, one at a time.

The trash is on disk (``<pool>/.trash``), so the queue is too: a daemon killed
mid-deletion finds the half-deleted tree there on start and finishes it. Failures
are retried with exponential backoff and reported as ``reclaim_failed`` events; they
never stop the queue. Bytes reclaimed are what deletion freed, counted as it goes (a
stat per file, and a usage scan of what is handed to rm): a lease's last measured
usage misses whatever was written since, all of it for a lease shorter than a scan
period. That usage is still the estimate of what is pending, which eviction counts on.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from scratchd.leases import Lease
from scratchd.mounts import Mount, read_mounts
from scratchd.offload import DELETER_NICENESS, disk_worker, stop_task
from scratchd.pool_dirs import TRASH_DIR
from scratchd.reclaim.deleter import DeleteResult, delete_tree

log = logging.getLogger("scratchd.reclaim")

RETRY_BASE_SECONDS = 1.0
RETRY_MAX_SECONDS = 300.0
BATCH = 256
# A trip to the worker wakes three threads and a process. Under churn (a trip ended
# less than this long ago), trees arriving within this long of the first go with it:
# a release's path is gone when it answers (the rename into the trash), so this only
# delays freeing the space, by a blink. A lone tree goes at once.
GATHER_SECONDS = 0.01


@dataclass(slots=True)
class TrashItem:
    path: str
    pool: str
    lease_id: str | None
    tenant: str | None
    estimated_bytes: int
    attempts: int = 0


class Trash:
    def __init__(self, report_failure: Callable[[TrashItem, DeleteResult | BaseException], None]) -> None:
        self._report_failure = report_failure
        self._queue: deque[TrashItem] = deque()
        self._wakeup = asyncio.Event()
        self._executor = disk_worker(DELETER_NICENESS, _delete_all)
        self._task: asyncio.Task[None] | None = None
        self.pending_bytes_by_pool: Counter[str] = Counter()  # what eviction counts as being freed
        self.reclaimed_total = 0
        self.reclaimed_bytes_total = 0
        self.failed_by_pool: Counter[str] = Counter()  # failed deletions, each retry counted
        self._busy: list[TrashItem] = []

    @property
    def pending(self) -> int:
        return len(self._queue) + len(self._busy)

    @property
    def pending_bytes(self) -> int:
        return sum(self.pending_bytes_by_pool.values())

    def add(self, item: TrashItem) -> None:
        self._queue.append(item)
        self.pending_bytes_by_pool[item.pool] += item.estimated_bytes
        self._wakeup.set()

    def removed(self, lease: Lease) -> None:
        """Count a lease whose directory was empty and removed without coming here (its bytes: none to speak of)."""
        self.reclaimed_total += 1

    def resume(self, pool_name: str, pool_path: str) -> int:
        """Queue whatever a previous run left in the pool's trash; returns how many."""
        trash = os.path.join(pool_path, TRASH_DIR)
        try:
            names = os.listdir(trash)
        except OSError:
            return 0
        for name in names:
            self.add(TrashItem(os.path.join(trash, name), pool_name, None, None, 0))
        return len(names)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._drain(), name="scratchd-trash")

    async def stop(self) -> None:
        """Stop after the current tree; what is left stays in the trash for the next start."""
        await stop_task(self._task)
        # A tree being deleted is left to the worker, which dies with the daemon;
        # the next start resumes it from the trash.
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        last_trip = float("-inf")  # when the last trip to the worker ended
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if len(self._queue) < BATCH and loop.time() - last_trip < GATHER_SECONDS:
                await asyncio.sleep(GATHER_SECONDS)
            # Everything queued goes in one round trip: under churn the trash fills with
            # small trees, and a trip to the worker costs more than deleting one of them.
            batch = self._busy = [self._queue.popleft() for _ in range(min(len(self._queue), BATCH))]
            try:
                results: list[DeleteResult | BaseException] = await loop.run_in_executor(
                    self._executor, _delete_all, [item.path for item in batch]
                )
            except asyncio.CancelledError:
                self._queue.extendleft(reversed(batch))
                self._busy = []
                raise
            except BrokenProcessPool as exc:  # the worker died (killed, out of memory): a new one
                self._executor = disk_worker(DELETER_NICENESS, _delete_all)
                results = [exc] * len(batch)
            self._busy = []
            last_trip = loop.time()
            for item, result in zip(batch, results, strict=True):
                self._settle(item, result)

    def _settle(self, item: TrashItem, result: DeleteResult | BaseException) -> None:
        self.pending_bytes_by_pool[item.pool] -= item.estimated_bytes
        if self.pending_bytes_by_pool[item.pool] <= 0:
            del self.pending_bytes_by_pool[item.pool]
        if isinstance(result, DeleteResult):
            self.reclaimed_bytes_total += result.bytes  # freed, even by an attempt that left something
            if result.complete:
                self.reclaimed_total += 1
                return
        self.failed_by_pool[item.pool] += 1
        self._report_failure(item, result)
        if isinstance(result, DeleteResult) and result.left_mounts and not result.errors:
            return  # a mount we may not detach stays where it is; retrying cannot change that
        item.attempts += 1
        delay = min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2 ** (item.attempts - 1))
        log.warning(
            "reclaim failed, retrying",
            extra={"path": item.path, "attempts": item.attempts, "retry_in": delay},
        )
        asyncio.get_running_loop().call_later(delay, self.add, item)


def _delete_all(paths: list[str]) -> list[DeleteResult | BaseException]:
    """Runs in the worker: each tree in turn; one failing tree does not stop the rest."""
    try:
        mounts: list[Mount] | None = read_mounts()  # once for the batch
    except (OSError, ValueError):
        mounts = None  # each tree tries again, and reports why it cannot
    results: list[DeleteResult | BaseException] = []
    for path in paths:
        try:
            results.append(delete_tree(path, mounts=mounts))
        except Exception as exc:
            results.append(exc)
    return results
