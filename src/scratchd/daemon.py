"""The running daemon: its parts wired together, start-up reconciliation, and the GC loop.

Everything here runs on the event loop; the only blocking work it starts (tree
deletion, usage scans) goes to worker threads.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable

from scratchd.config import Config
from scratchd.lease import EndReason, Lease
from scratchd.manager import LeaseManager
from scratchd.mounts import MountTable
from scratchd.pools import PoolSet, PoolState, PoolStatus, prepare_pool_dir
from scratchd.reclaim import policy
from scratchd.reclaim.deleter import DeleteResult
from scratchd.reclaim.trash import Trash, TrashItem
from scratchd.store import NewEvent, Store, StoreError

log = logging.getLogger("scratchd")


class Daemon:
    def __init__(self, config: Config, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.store = Store(config.server.state_dir)
        self.mounts = MountTable()
        self.pools = PoolSet(config.pool)
        self.trash = Trash(self._reclaim_failed)
        self.manager = LeaseManager(config, self.store, self.pools, self.mounts, self._trashed, clock)
        self._gc_task: asyncio.Task[None] | None = None
        self.ready = False

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        self._refresh_pools()
        for status in self.pools.statuses():
            if status.state is not PoolState.UNAVAILABLE:
                prepare_pool_dir(status.path)
                self.trash.resume(status.name, status.path)
        self._reconcile()
        self.trash.start()
        self._gc_task = asyncio.get_running_loop().create_task(self._gc_loop(), name="scratchd-gc")
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        if self._gc_task is not None:
            self._gc_task.cancel()
            try:
                await self._gc_task
            except asyncio.CancelledError:
                pass
        await self.trash.stop()
        self.mounts.close()
        self.store.close()

    def _reconcile(self) -> None:
        """Records whose directory is gone end as ``directory_removed`` (SPEC §8)."""
        for lease in list(self.manager.active.values()):
            pool = self.pools.get(lease.pool)
            if pool is not None and pool.state is PoolState.UNAVAILABLE:
                continue  # cannot tell; the GC loop decides (pool_lost) once it looks
            if not os.path.lexists(lease.path):
                self.manager.end(lease, EndReason.DIRECTORY_REMOVED)

    # -- the GC loop ------------------------------------------------------------------------

    async def _gc_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.gc.interval)
            try:
                self.collect()
            except Exception:  # noqa: BLE001 - one bad cycle must not stop collection
                log.exception("gc cycle failed")

    def collect(self) -> None:
        """One GC cycle: look at the pools, end what is due, forget old history."""
        now = self.clock()
        self._refresh_pools()
        pools = {status.name: status for status in self.pools.statuses()}
        for ending in policy.decide(list(self.manager.active.values()), pools, now):
            lease = self.manager.active.get(ending.lease_id)
            if lease is not None:
                self.end_lease(lease, ending.reason, **ending.details)
        try:
            self.store.prune(now - self.config.gc.history_retention)
        except StoreError as exc:
            log.warning("cannot prune history", extra={"error": str(exc)})

    def end_lease(self, lease: Lease, reason: EndReason, **details: object) -> Lease:
        ended = self.manager.end(lease, reason, **details)
        self.trash.by_reason[reason.value] += 1
        return ended

    def _refresh_pools(self) -> None:
        changes = self.pools.refresh(self.mounts.current())
        events = [self._pool_event(old, new) for old, new in changes]
        if events:
            try:
                self.store.append_events(events, self.clock())
            except StoreError as exc:
                log.warning("cannot record pool state change", extra={"error": str(exc)})

    def _pool_event(self, old: PoolStatus | None, new: PoolStatus) -> NewEvent:
        log.info("pool state", extra={"pool": new.name, "state": new.state.value, "reason": new.reason})
        return NewEvent("pool_state_changed", pool=new.name, reason=new.state.value,
                        details={"from": old.state.value if old else None, "to": new.state.value,
                                 "why": new.reason})

    # -- reclaim callbacks ----------------------------------------------------------------------

    def _trashed(self, trash_path: str, lease: Lease) -> None:
        self.trash.add(TrashItem(trash_path, lease.pool, lease.id, lease.tenant, lease.usage.bytes))

    def _reclaim_failed(self, item: TrashItem, result: DeleteResult | BaseException) -> None:
        if isinstance(result, DeleteResult):
            details = {"path": item.path, "errors": result.errors[:20], "left_mounts": result.left_mounts}
        else:
            details = {"path": item.path, "errors": [repr(result)]}
        log.warning("reclaim failed", extra=details)
        try:
            self.store.append_events([NewEvent("reclaim_failed", item.lease_id, item.pool, item.tenant,
                                               None, details)], self.clock())
        except StoreError:
            pass
