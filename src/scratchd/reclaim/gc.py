"""The GC cycle: end the leases that are due, reclaim orphans, forget old history.

It runs on the event loop every ``gc.interval``. ``reclaim.policy`` decides; this
applies the decisions through the manager (ends) and the trash (orphans), and
records them in the store.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

from scratchd.config import GcConfig
from scratchd.errors import Refused
from scratchd.leases import EndReason, Lease
from scratchd.manager import LeaseManager
from scratchd.pool_dirs import CACHE_DIR, PoolSet, list_caches, list_entries, move_to_trash
from scratchd.pools import PoolState
from scratchd.reclaim import policy
from scratchd.reclaim.trash import Trash, TrashItem
from scratchd.store import NewEvent, Store, StoreError

log = logging.getLogger("scratchd")

# History is kept for days (gc.history_retention); looking for what to drop once a minute
# is plenty, and spares the database a write every gc.interval.
PRUNE_EVERY_SECONDS = 60.0


class Collector:
    """Ends what is due and reclaims what no lease holds, given the parts it touches and nothing more.

    ``refresh_pools`` is the daemon's (a pool coming up is watched and its trash resumed);
    ``watching(pool)`` says whether the pool's watch reports removed lease directories, so
    the cycle only checks the disk for the pools it does not.
    """

    def __init__(
        self,
        manager: LeaseManager,
        pools: PoolSet,
        trash: Trash,
        store: Store,
        *,
        gc: Callable[[], GcConfig],
        refresh_pools: Callable[[], None],
        watching: Callable[[str], bool],
        clock: Callable[[], float],
    ) -> None:
        self._manager = manager
        self._pools = pools
        self._trash = trash
        self._store = store
        self._gc = gc  # a getter: a reload replaces the config
        self._refresh_pools = refresh_pools
        self._watching = watching
        self._clock = clock
        self._pruned_at = 0.0

    async def run(self) -> None:
        """Collect every ``gc.interval`` until cancelled."""
        while True:
            await asyncio.sleep(self._gc().interval)
            try:
                self.collect()
            except Exception:
                log.exception("gc cycle failed")

    def collect(self) -> None:
        """One GC cycle: look at the pools, end what is due, review orphans, forget old history."""
        now = self._clock()
        self._refresh_pools()
        pools = {status.name: status for status in self._pools.statuses()}
        decision = policy.decide(
            list(self._manager.active.values()),
            pools,
            now,
            self._trash.pending_bytes_by_pool,
            caches=list(self._manager.caches.values()),
            rules=self._manager.cache_rules(),
        )
        for drop in decision.drops:  # first: under pressure, caches go before evictable leases
            cache = self._manager.caches.get(drop.cache_id)
            if cache is not None and cache.free:
                self._manager.drop_cache(cache, drop)
        for ending in decision.endings:
            lease = self._manager.active.get(ending.lease_id)
            if lease is not None:
                self._try_end(lease, ending.reason, **ending.details)
        for lease in list(self._manager.active.values()):
            if not self._watching(lease.pool) and self._pools.holds(lease.pool):
                self.directory_gone(lease)
        self._pools.unlock_dropped(keep={lease.pool for lease in self._manager.active.values()})
        self._review_orphans(now)
        self._manager.retry_unrecorded()
        if now - self._pruned_at >= PRUNE_EVERY_SECONDS:
            try:
                self._store.prune(now - self._gc().history_retention)
                self._pruned_at = now
            except StoreError as exc:
                log.warning("cannot prune history", extra={"error": str(exc)})

    def _try_end(self, lease: Lease, reason: EndReason, **details: object) -> None:
        """End a lease from a background decision; if its directory cannot be moved
        (a read-only pool), it stays active and the next cycle tries again."""
        try:
            self._manager.end(lease, reason, **details)
        except Refused as exc:
            log.warning(
                "cannot end lease yet",
                extra={"lease": lease.id, "reason": reason.value, "error": exc.message},
            )

    def _review_orphans(self, now: float) -> None:
        """Reclaim pool entries without an active lease, and entries of the cache area without a
        cache record, once ``gc.orphan_grace`` has passed.

        Nothing else deletes a name in a pool that no lease holds, and only after a grace
        that outlasts a create's mkdir-then-commit.
        """
        sightings = self._store.orphan_sightings()
        seen: list[tuple[str, str, float]] = []
        cleared: list[tuple[str, str]] = []
        events: list[NewEvent] = []
        leased = {lease.id for lease in self._manager.active.values()}
        leased |= {f"{CACHE_DIR}/{cache_id}" for cache_id in self._manager.caches}
        for pool in self._pools.statuses():
            if pool.state in (PoolState.UNAVAILABLE, PoolState.READ_ONLY):
                continue
            mine = {name: t for (p, name), t in sightings.items() if p == pool.name}
            try:
                entries = list_entries(pool.path) + [f"{CACHE_DIR}/{name}" for name in list_caches(pool.path)]
            except OSError:
                continue
            review = policy.review_orphans(entries, leased, mine, now, self._gc().orphan_grace)
            seen += [(pool.name, name, t) for name, t in review.first_seen.items()]
            cleared += [(pool.name, name) for name in review.cleared]
            for name in review.due:
                area, _, entry = name.rpartition("/")  # a kept cache without a record: .caches/<id>
                try:
                    trashed = move_to_trash(pool.path, entry, area=area or None)
                except OSError as exc:
                    log.warning(
                        "cannot reclaim orphan",
                        extra={"pool": pool.name, "entry": name, "error": exc.strerror},
                    )
                    continue
                cleared.append((pool.name, name))
                if trashed is None:
                    continue
                self._trash.add(TrashItem(trashed, pool.name, None, None, 0))
                log.info("orphan reclaimed", extra={"pool": pool.name, "entry": name})
                events.append(
                    NewEvent(
                        "orphan_reclaimed", pool=pool.name, details={"entry": name, "first_seen": mine[name]}
                    )
                )
        if seen or cleared or events:
            try:
                self._store.record_orphans(seen, cleared)
                self._store.append_events(events, now)
            except StoreError as exc:
                log.warning("cannot record orphans", extra={"error": str(exc)})

    def directory_gone(self, lease: Lease) -> None:
        """Someone reported the directory gone: believe the disk, not the report."""
        if lease.active and not os.path.lexists(lease.path):
            self._try_end(lease, EndReason.DIRECTORY_REMOVED)
