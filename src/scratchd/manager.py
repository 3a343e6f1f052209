"""The lease manager: every lease and kept-cache change goes through here, in a fixed order of effects.

Create: place -> mkdir -> commit record -> answer. A crash before the commit leaves
a directory without a record (an orphan, reclaimed after grace), never a record
without its directory.
End: rename into the trash (or rmdir, if empty) -> commit -> answer -> delete in the
background. The path is gone before anyone is told the lease ended; a crash between
rename and commit leaves an active record without a directory, which start-up ends
as ``directory_removed``.

Warm caches (docs/caches.md), in the same two shapes:

Hand-over (a create that hits): pick a free cache and mark it in use (on the loop, no
await between: two concurrent creates of one key never get the same cache) -> rename
``<pool>/.caches/<cache>`` to ``<pool>/<lease>``, chmod, chown -> commit the lease and
the cache in use together -> answer. A crash after the rename and before the commit
leaves a directory without a lease (an orphan, reclaimed after grace) and a free
cache record without a directory (dropped at start-up): never an active lease
without its directory, never a cache handed out twice.
Keep (a release with keep): rename ``<pool>/<lease>`` to ``<pool>/.caches/<cache>`` ->
commit the ended lease and the free cache together -> answer -> measure the cache off
the loop. A crash between rename and commit leaves an active record without its
directory (ended as ``directory_removed`` at start-up) and a directory in the cache
area: a kept cache if its record was in use by that lease (it is freed), else an
orphan of the cache area, reclaimed after grace.

``SCRATCHD_CRASH_AT`` names a point (``handover`` or ``keep``, right after the rename)
where the daemon kills itself with SIGKILL: how the tests crash it deterministically
in the middle of these two.

Runs on the event loop: each step here is a handful of metadata syscalls and one
SQLite commit. Tree deletion and usage scans happen elsewhere, off the loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from scratchd import leases as lease_sm
from scratchd.caches import (
    Cache,
    CacheState,
    CacheUse,
    Drop,
    DropReason,
    Hit,
    HitKind,
    Rules,
    find_hit,
    replaced,
)
from scratchd.config import Config
from scratchd.errors import Refused
from scratchd.leases import ActiveLeases, EndReason, Lease, LeaseCounts, Totals
from scratchd.mounts import MountTable, mount_of, resolve_near
from scratchd.placement import Near, Placement, PlacementError, place, placed_in
from scratchd.pool_dirs import (
    CACHE_DIR,
    PoolSet,
    cache_path,
    cache_to_lease,
    lease_to_cache,
    list_entries,
    make_lease_dir,
    move_to_trash,
    remove_if_empty,
)
from scratchd.pools import PoolReason, PoolStatus, pool_json
from scratchd.reclaim import procs
from scratchd.reclaim.trash import TrashItem
from scratchd.store import (
    NewEvent,
    Statement,
    Store,
    StoreError,
    cache_deleted,
    cache_saved,
    lease_inserted,
    lease_updated,
)
from scratchd.tenant import Tenant, check_bytes, check_lease_count, lease_ttl, tenant_charge

log = logging.getLogger("scratchd.lease")

_CRASH_AT = os.environ.get("SCRATCHD_CRASH_AT")
# A create's cache_key as scratchd_cache_requests_total counts it.
_RESULT: dict[HitKind | None, str] = {HitKind.EXACT: "hit", HitKind.FALLBACK: "fallback", None: "miss"}


def _crash_point(name: str) -> None:
    if name == _CRASH_AT:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True, slots=True)
class LeaseSpec:
    """A validated LeaseRequest (docs/api.md, "Requests"), in domain terms."""

    near: str | None = None
    pool: str | None = None
    placement: Placement = Placement.PREFER_SAME_FILESYSTEM
    ttl_seconds: int | None = None
    idle_timeout_seconds: int | None = None
    pid: int | None = None
    max_bytes: int | None = None
    expected_bytes: int | None = None
    evictable: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    cache_key: str | None = None
    cache_fallback: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CacheFilter:
    key: str | None = None
    tenant: str | None = None
    pool: str | None = None

    def matches(self, cache: Cache) -> bool:
        return (
            (self.key is None or cache.key == self.key)
            and (self.tenant is None or cache.tenant == self.tenant)
            and (self.pool is None or cache.pool == self.pool)
        )


@dataclass(frozen=True, slots=True)
class LeaseFilter:
    state: str = "active"  # active | ended | all
    pool: str | None = None
    tenant: str | None = None
    label: tuple[str, str] | None = None

    def matches(self, lease: Lease) -> bool:
        return (
            (self.pool is None or lease.pool == self.pool)
            and (self.tenant is None or lease.tenant == self.tenant)
            and (self.label is None or lease.labels.get(self.label[0]) == self.label[1])
        )


def _cache_use(spec: LeaseSpec, hit: Hit | None) -> CacheUse | None:
    if spec.cache_key is None:
        return None
    if hit is None:
        return CacheUse(spec.cache_key, spec.cache_fallback)
    cache = hit.cache
    return CacheUse(spec.cache_key, spec.cache_fallback, hit.kind, cache.key, cache.id, cache.kept_at)


def _unavailable(exc: StoreError) -> Refused:
    return Refused(
        503,
        "pool_unavailable",
        "The daemon cannot write its state database right now; nothing was changed.",
        {"reason": str(exc)},
    )


class LeaseManager:
    def __init__(
        self,
        config: Config,
        store: Store,
        pools: PoolSet,
        mounts: MountTable,
        on_trashed: Callable[[TrashItem], None],
        on_removed: Callable[[Lease], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store
        self.pools = pools
        self.mounts = mounts
        self._on_trashed = on_trashed  # a tree to delete in the background
        self._on_removed = on_removed  # an empty directory, removed on the spot
        self._clock = clock
        self.active = ActiveLeases(store.active_leases())
        self.counts = LeaseCounts(self.active)  # every start and end, by pool (and reason)
        self._ending: dict[str, Lease] = {}
        self._unrecorded: dict[str, tuple[Lease, NewEvent, list[Statement], list[NewEvent]]] = {}
        self.listeners: list[Callable[[Lease], None]] = []
        self.caches: dict[str, Cache] = {cache.id: cache for cache in store.caches()}
        self.cache_requests: Counter[tuple[str, str]] = Counter()  # (pool, hit | fallback | miss)
        self.cache_dropped: Counter[tuple[str, str]] = Counter()  # (pool, reason)
        self.cache_listeners: list[Callable[[Cache, str], None]] = []  # told of each cache kept, and where

    # -- queries --------------------------------------------------------------------------

    def get(self, lease_id: str) -> Lease | None:
        unrecorded = self._unrecorded.get(lease_id)
        return (
            self.active.get(lease_id)
            or self._ending.get(lease_id)
            or (unrecorded and unrecorded[0])
            or self.store.get_lease(lease_id)
        )

    def find(self, which: LeaseFilter) -> list[Lease]:
        leases: Iterable[Lease]
        if which.state == "active":
            leases = self.active.values()
        elif which.state == "ended":
            leases = self.store.ended_leases()
        else:
            leases = [*self.active.values(), *self.store.ended_leases()]
        found = [lease for lease in leases if which.matches(lease)]
        if which.state == "active":
            found.sort(key=lambda lease: lease.created_at)
        return found

    def reserved_by_pool(self) -> dict[str, int]:
        return {pool: totals.reserved_bytes for pool, totals in self.active.pool_totals.items()}

    def pool_rows(self) -> list[dict[str, Any]]:
        """Every pool with its active leases' and kept caches' totals, as ``/v1/pools`` and ``/metrics`` read them."""
        totals, empty = self.active.pool_totals, Totals()
        kept = self.kept_totals("pool")
        return [
            pool_json(
                pool,
                reserved=(t := totals.get(pool.name, empty)).reserved_bytes,
                leased=t.bytes,
                active=t.active_leases,
                cache_entries=kept.get(pool.name, (0, 0))[0],
                cache_bytes=kept.get(pool.name, (0, 0))[1],
                cache_max=self.cache_max_bytes(pool.name),
                cache_hits=self.cache_requests[pool.name, "hit"] + self.cache_requests[pool.name, "fallback"],
                cache_misses=self.cache_requests[pool.name, "miss"],
            )
            for pool in self.pools.statuses()
        ]

    def kept_totals(self, by: str) -> dict[str, tuple[int, int]]:
        """Free kept caches by ``pool`` or ``tenant``: (entries, bytes). In-use ones are leases."""
        totals: dict[str, tuple[int, int]] = {}
        for cache in self.caches.values():
            if cache.free:
                entries, size = totals.get(getattr(cache, by), (0, 0))
                totals[getattr(cache, by)] = (entries + 1, size + cache.bytes)
        return totals

    def find_caches(self, which: CacheFilter) -> list[Cache]:
        return sorted((c for c in self.caches.values() if which.matches(c)), key=lambda c: (c.kept_at, c.id))

    def cache_max_bytes(self, pool_name: str) -> int:
        """The pool's ``cache_max`` in bytes; 0 (keeping off) for a pool no longer configured."""
        cfg = next((p for p in self.config.pool if p.name == pool_name), None)
        status = self.pools.get(pool_name)
        if cfg is None or status is None:
            return 0
        return cfg.cache_max_bytes(status.capacity_bytes)

    def cache_rules(self) -> Rules:
        return Rules(
            max_age=self.config.caches.max_age,
            pool_caps={p.name: self.cache_max_bytes(p.name) for p in self.pools.statuses()},
            tenant_caps={
                t.name: t.max_cache_bytes for t in self.config.tenant if t.max_cache_bytes is not None
            },
        )

    # -- changes --------------------------------------------------------------------------

    async def create(self, tenant: Tenant, spec: LeaseSpec) -> Lease:
        now = self._clock()
        ttl = self._ttl(tenant, spec.ttl_seconds)
        self._check_quota(tenant, spec)
        pid_start = self._check_pid(tenant, spec.pid)
        near_mount = None
        if spec.near is not None:
            try:
                # Resolved with the tenant's permissions when the daemon has more than it.
                as_tenant = tenant.may_search if tenant.uid != os.geteuid() else None
                near_real = resolve_near(spec.near, as_tenant)
            except ValueError as exc:
                raise Refused(422, "invalid_request", f"near: {exc}", {"near": spec.near}) from None
            near_mount = mount_of(near_real, self.mounts.current())
        near = Near(near_mount.mount_id, near_mount.device) if near_mount else None
        try:
            placed = place(
                self.pools.statuses(),
                reserved=self.reserved_by_pool(),
                pool_name=spec.pool,
                near=near,
                placement=spec.placement,
                expected_bytes=spec.expected_bytes or 0,
            )
        except PlacementError as exc:
            if near_mount is not None:  # place() knows mount ids; people know mount points
                exc.details = {**(exc.details or {}), "near_mount_point": near_mount.mount_point}
            raise
        hit = None
        if spec.cache_key is not None:
            hit = find_hit(
                self.caches.values(),
                tenant=tenant.name,
                key=spec.cache_key,
                fallback=spec.cache_fallback,
                pools=[pool.name for pool in placed.candidates],
            )
            if hit is not None and hit.cache.pool != placed.pool.name:
                won = next(pool for pool in placed.candidates if pool.name == hit.cache.pool)
                placed = placed_in(won, near, placed.candidates)

        lease_id = lease_sm.new_lease_id()
        pool = placed.pool
        chown = os.geteuid() == 0
        uid, gid = (tenant.uid, tenant.gid) if chown else (None, None)
        statements: list[Statement] = []
        path = None
        if hit is not None:
            try:
                path = cache_to_lease(pool.path, hit.cache.id, lease_id, uid=uid, gid=gid)
            except FileNotFoundError:  # its directory went away: a miss, and the record goes too
                del self.caches[hit.cache.id]
                statements.append(cache_deleted(hit.cache.id))
                hit = None
            except OSError as exc:
                raise self._disk_refusal(pool.name, exc) from None
        if path is None:
            try:
                path = make_lease_dir(pool.path, lease_id, uid=uid, gid=gid)
            except OSError as exc:
                raise self._disk_refusal(pool.name, exc) from None
        if hit is not None:
            # In use from here on: a create that runs while this one's commit is in flight
            # cannot find it free.
            taken = dataclasses.replace(
                hit.cache,
                state=CacheState.IN_USE,
                lease_id=lease_id,
                hits=hit.cache.hits + 1,
                last_used_at=now,
            )
            self.caches[taken.id] = taken
            statements.append(cache_saved(taken))
            _crash_point("handover")
        lease = Lease(
            id=lease_id,
            path=path,
            pool=pool.name,
            tenant=tenant.name,
            uid=tenant.uid if chown else os.geteuid(),
            gid=tenant.gid if chown else os.getegid(),
            created_at=now,
            expires_at=now + ttl,
            ttl_seconds=ttl,
            mount_point=pool.mount_point,
            same_filesystem=placed.same_filesystem,
            link_mode=placed.link_mode,
            idle_timeout_seconds=spec.idle_timeout_seconds,
            pid=spec.pid,
            pid_start_time=pid_start,
            max_bytes=spec.max_bytes,
            expected_bytes=spec.expected_bytes,
            evictable=spec.evictable,
            labels=dict(spec.labels),
            last_activity_at=now,
            cache=_cache_use(spec, hit),
        )
        self.active.put(lease)  # holds its place in the tenant's quota while the commit is in flight
        details = (
            {}
            if lease.cache is None
            else {
                "cache_key": lease.cache.key,
                "cache_hit": lease.cache.hit.value if lease.cache.hit else None,
            }
        )
        try:
            await self.store.write_grouped(
                [lease_inserted(lease), *statements],
                [NewEvent.for_lease("lease_created", lease, **details)],
                now,
            )
        except StoreError as exc:
            # Undo the mkdir (or the hand-over) so a refused request changes nothing; if even
            # that fails the directory is an orphan and is reclaimed after grace.
            self.active.remove(lease.id)
            with contextlib.suppress(OSError):
                if hit is None:
                    os.rmdir(path)
                else:
                    lease_to_cache(pool.path, lease.id, hit.cache.id)
                    self.caches[hit.cache.id] = hit.cache
            raise _unavailable(exc) from None
        if lease.cache is not None:
            self.cache_requests[pool.name, _RESULT[lease.cache.hit]] += 1
        log.debug(
            "lease started",
            extra={
                "lease": lease.id,
                "pool": lease.pool,
                "tenant": lease.tenant,
                "path": lease.path,
                "ttl_seconds": ttl,
            },
        )
        self._notify(lease)
        return lease

    async def renew(self, lease: Lease, ttl_seconds: int | None, tenant: Tenant) -> Lease:
        if not lease.active:
            raise Refused(
                409,
                "lease_ended",
                f"Lease {lease.id} has already ended ({lease.end_reason}).",
                {"end_reason": lease.end_reason},
            )
        ttl = self._ttl(tenant, ttl_seconds if ttl_seconds is not None else lease.ttl_seconds)
        now = self._clock()
        renewed = lease_sm.renew(lease, ttl, now)
        try:
            await self.store.write_grouped(
                [lease_updated(renewed)], [NewEvent.for_lease("lease_renewed", renewed, ttl_seconds=ttl)], now
            )
        except StoreError as exc:
            raise _unavailable(exc) from None
        if renewed.id in self.active:  # not ended while the commit was in flight
            self.active.put(renewed)
            self._notify(renewed)
        return renewed

    def end(self, lease: Lease, reason: EndReason, **details: object) -> Lease:
        """End an active lease: its path is gone (or, for ``pool_lost``, left alone) before this returns.

        Only a release keeps a cache: a lease that ended any other way may hold a half-written one.
        """
        ended, event, also, events = self._begin_end(lease, reason, details, keep=False)
        try:
            self.store.save_lease(ended, event, ended.ended_at or self._clock(), also=also, events=events)
        except StoreError as exc:
            self._record_lost(ended, event, also, events, exc)
        return self._finish_end(ended)

    async def release(self, lease: Lease, keep: bool | None = None) -> Lease:
        """``end(lease, released)`` for a request: the same effects, its commit grouped with others.

        ``keep`` (default: whether the lease has a ``cache_key``) keeps its directory as a free
        cache, unless its pool's ``cache_max`` is 0.
        """
        keep = (lease.cache is not None) if keep is None else keep
        ended, event, also, events = self._begin_end(lease, EndReason.RELEASED, {}, keep=keep)
        try:
            await self.store.write_grouped(
                [lease_updated(ended), *also], [event, *events], ended.ended_at or self._clock()
            )
        except StoreError as exc:
            self._record_lost(ended, event, also, events, exc)
        return self._finish_end(ended)

    def _begin_end(
        self, lease: Lease, reason: EndReason, details: dict[str, object], *, keep: bool
    ) -> tuple[Lease, NewEvent, list[Statement], list[NewEvent]]:
        ended = lease_sm.end(lease, reason, self._clock())
        also: list[Statement] = []
        events: list[NewEvent] = []
        kept = None
        if reason is not EndReason.POOL_LOST:
            pool = self.pools.get(lease.pool)
            if pool is not None and pool.reason is PoolReason.LOCKED:
                # Another daemon serves the pool now: nothing in it is ours to move.
                raise Refused(
                    503,
                    "pool_unavailable",
                    f"Pool {lease.pool} is served by another scratchd.",
                    {"pool": lease.pool, "reason": pool.reason.value, "message": pool.message},
                )
            pool_path = self._pool_path(lease)
            if keep and lease.cache is not None and self.cache_max_bytes(lease.pool) > 0:
                kept = self._keep(lease, pool_path, ended.ended_at or self._clock())
            if kept is not None and lease.cache is not None:
                ended.cache = dataclasses.replace(lease.cache, kept_id=kept.id)
            elif remove_if_empty(pool_path, lease.id):
                self._on_removed(ended)
            else:
                try:
                    trashed = move_to_trash(pool_path, lease.id)
                except OSError as exc:
                    raise Refused(
                        503,
                        "pool_unavailable",
                        f"Cannot move lease {lease.id} out of its pool.",
                        {"reason": exc.strerror},
                    ) from None
                if trashed is not None:
                    self._on_trashed(
                        TrashItem(trashed, ended.pool, ended.id, ended.tenant, ended.usage.bytes)
                    )
        if kept is not None:
            also.append(cache_saved(kept))
            events.append(
                NewEvent(
                    "cache_kept",
                    lease.id,
                    lease.pool,
                    lease.tenant,
                    None,
                    {"cache_id": kept.id, "key": kept.key, "bytes": kept.bytes},
                )
            )
            for drop in replaced(self.caches.values(), kept, self.config.caches.keep_per_key):
                dropped = self._drop(self.caches[drop.cache_id], drop)
                if dropped is not None:
                    also.append(dropped[0])
                    events.append(dropped[1])
        else:
            held = self._held_cache(lease)
            if held is not None:  # handed over, and not kept: its content goes with the lease
                del self.caches[held.id]
                also.append(cache_deleted(held.id))
        self.active.remove(lease.id)
        self._ending[lease.id] = ended  # what get() answers until the record says so too
        return ended, NewEvent.for_lease("lease_ended", ended, **details), also, events

    def _held_cache(self, lease: Lease) -> Cache | None:
        cache_id = lease.cache.cache_id if lease.cache else None
        held = self.caches.get(cache_id) if cache_id else None
        return held if held is not None and held.lease_id == lease.id else None

    def _keep(self, lease: Lease, pool_path: str, now: float) -> Cache | None:
        """Rename the lease's directory into the cache area as a free cache; None if it cannot be
        (gone, or the rename refused): the lease then ends as any other, its content reclaimed."""
        held = self._held_cache(lease)
        cache_id = held.id if held is not None else lease_sm.new_lease_id()
        try:
            lease_to_cache(pool_path, lease.id, cache_id)
            inode = os.lstat(cache_path(pool_path, cache_id)).st_ino
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.warning("cannot keep cache", extra={"lease": lease.id, "error": exc.strerror})
            return None
        _crash_point("keep")
        kept = Cache(
            id=cache_id,
            key=lease.cache.key,  # type: ignore[union-attr]
            tenant=lease.tenant,
            pool=lease.pool,
            kept_at=now,
            last_used_at=now,
            bytes=lease.usage.bytes,
            files=lease.usage.files,
            hits=held.hits if held is not None else 0,
            inode=inode,
        )
        self.caches[kept.id] = kept
        for listener in self.cache_listeners:
            listener(kept, cache_path(pool_path, kept.id))
        return kept

    # -- kept caches ---------------------------------------------------------------------------

    def drop_cache(self, cache: Cache, drop: Drop) -> bool:
        """Drop a free cache for ``drop.reason``: renamed into the trash, then its record and event
        committed. False if it could not be moved (it stays, and the caller may try again)."""
        dropped = self._drop(cache, drop)
        if dropped is None:
            return False
        try:
            self.store.save_caches([dropped[0]], [dropped[1]], self._clock())
        except StoreError as exc:
            # The directory is in the trash; the record without it is dropped at the next start.
            log.error("cannot record cache drop", extra={"cache": cache.id, "error": str(exc)})
        return True

    def _drop(self, cache: Cache, drop: Drop) -> tuple[Statement, NewEvent] | None:
        try:
            trashed = move_to_trash(self._pool_dir(cache.pool), cache.id, area=CACHE_DIR)
        except (OSError, LookupError) as exc:
            log.warning("cannot drop cache yet", extra={"cache": cache.id, "error": str(exc)})
            return None
        if trashed is not None:
            self._on_trashed(TrashItem(trashed, cache.pool, None, cache.tenant, cache.bytes))
        del self.caches[cache.id]
        self.cache_dropped[cache.pool, drop.reason.value] += 1
        event = NewEvent(
            "cache_dropped",
            None,
            cache.pool,
            cache.tenant,
            drop.reason.value,
            {"cache_id": cache.id, "key": cache.key, "bytes": cache.bytes, **drop.details},
        )
        return cache_deleted(cache.id), event

    def remove_cache(self, cache: Cache) -> Cache:
        """``DELETE /v1/caches/{id}``: a free cache only; one in use is an active lease's directory."""
        if not cache.free:
            raise Refused(
                409,
                "cache_in_use",
                f"Cache {cache.id} is in use by lease {cache.lease_id}.",
                {"cache_id": cache.id, "lease_id": cache.lease_id},
            )
        if not self.drop_cache(cache, Drop(cache.id, DropReason.REMOVED)):
            raise Refused(
                503,
                "pool_unavailable",
                f"Cannot move cache {cache.id} out of its pool.",
                {"pool": cache.pool},
            )
        return cache

    def cache_measured(self, cache_id: str, size: int, files: int) -> None:
        """A kept cache's size, measured off the loop after it was kept."""
        cache = self.caches.get(cache_id)
        if cache is None or not cache.free:
            return
        cache.bytes, cache.files = size, files
        try:
            self.store.save_caches([cache_saved(cache)], [], self._clock())
        except StoreError as exc:
            log.warning("cannot save cache size", extra={"cache": cache_id, "error": str(exc)})

    def reconcile_caches(self, pools: Iterable[PoolStatus]) -> None:
        """At start-up, before the leases are: records and cache areas agree again after a crash.

        A free cache whose directory is gone was being handed over: found again by its inode
        among the pool's unrecorded entries, it is put back; else its record goes. A cache in
        use whose lease is not active, or whose directory is in the cache area (a keep whose
        commit was lost), is free again; one whose directory is nowhere goes.
        """
        statements: list[Statement] = []
        for pool in pools:
            for cache in [c for c in self.caches.values() if c.pool == pool.name]:
                lease = self.active.get(cache.lease_id or "") if not cache.free else None
                in_area = os.path.lexists(cache_path(pool.path, cache.id))
                if lease is not None and not in_area:
                    continue  # an active lease's directory, checked with the leases
                if not in_area and cache.free:
                    in_area = self._put_back(pool.path, cache)
                if in_area:
                    if not cache.free:
                        cache.state, cache.lease_id = CacheState.FREE, None
                        statements.append(cache_saved(cache))
                        log.info("cache kept after a restart", extra={"cache": cache.id, "pool": pool.name})
                else:
                    del self.caches[cache.id]
                    statements.append(cache_deleted(cache.id))
                    log.warning("kept cache gone from its pool", extra={"cache": cache.id, "pool": pool.name})
        if statements:
            try:
                self.store.save_caches(statements, [], self._clock())
            except StoreError as exc:
                log.warning("cannot record caches found at start", extra={"error": str(exc)})

    def _put_back(self, pool_path: str, cache: Cache) -> bool:
        """Find a cache's directory among the pool's entries that no lease holds (a hand-over
        cut short by a crash) and rename it back into the cache area."""
        if cache.inode is None:
            return False
        for name in list_entries(pool_path):
            if name in self.active:
                continue
            try:
                if os.lstat(os.path.join(pool_path, name)).st_ino == cache.inode:
                    lease_to_cache(pool_path, name, cache.id)
                    log.info("cache found again after a restart", extra={"cache": cache.id, "entry": name})
                    return True
            except (OSError, ValueError):
                continue
        return False

    def _pool_dir(self, pool_name: str) -> str:
        status = self.pools.get(pool_name)
        if status is None or not self.pools.holds(pool_name):
            raise LookupError(f"pool {pool_name} is not served here")
        return status.path

    def _record_lost(
        self, ended: Lease, event: NewEvent, also: list[Statement], events: list[NewEvent], exc: StoreError
    ) -> None:
        # The path is already gone: the end stands, in memory, and its record is written
        # by retry_unrecorded() once the store takes writes again (or, after a restart
        # first, the active record without a directory ends as directory_removed).
        log.error("cannot record end of lease", extra={"lease": ended.id, "error": str(exc)})
        self._unrecorded[ended.id] = (ended, event, also, events)

    def retry_unrecorded(self) -> None:
        """Write the ends the store refused earlier (full disk, locked database)."""
        for lease_id, (ended, event, also, events) in list(self._unrecorded.items()):
            try:
                self.store.save_lease(ended, event, ended.ended_at or self._clock(), also=also, events=events)
            except StoreError:
                return  # still refused: next cycle
            del self._unrecorded[lease_id]

    def _finish_end(self, ended: Lease) -> Lease:
        self._ending.pop(ended.id, None)
        # What clients ask for is in the events (and at debug, the log): a log line per
        # request would cost the lease cycle a tenth of its time. What the daemon ends on
        # its own is for operators to see.
        level = logging.DEBUG if ended.end_reason is EndReason.RELEASED else logging.INFO
        log.log(
            level,
            "lease ended",
            extra={
                "lease": ended.id,
                "pool": ended.pool,
                "tenant": ended.tenant,
                "reason": ended.end_reason.value if ended.end_reason else None,
            },
        )
        self._notify(ended)
        return ended

    # -- rules --------------------------------------------------------------------------

    def _ttl(self, tenant: Tenant, requested: int | None) -> int:
        limits = self.config.limits
        return lease_ttl(
            tenant.name,
            requested,
            default_ttl=limits.default_ttl,
            max_ttl=limits.max_ttl,
            own=self.config.tenant_limits(tenant.name),
        )

    def _check_quota(self, tenant: Tenant, spec: LeaseSpec) -> None:
        own = self.config.tenant_limits(tenant.name)
        check_lease_count(tenant.name, self.active.count_of_tenant(tenant.name), own)
        if own is not None and own.max_bytes is not None:
            held = sum(tenant_charge(lease) for lease in self.active.of_tenant(tenant.name))
            check_bytes(tenant.name, held, max(spec.max_bytes or 0, spec.expected_bytes or 0), own.max_bytes)

    def _check_pid(self, tenant: Tenant, pid: int | None) -> int | None:
        if pid is None:
            return None
        process = procs.identify(pid)
        if process is None:
            raise Refused(
                422,
                "invalid_request",
                f"pid {pid} is not a live process.",
                {"fields": {"pid": "not a live process"}},
            )
        if process.uid != tenant.uid and not tenant.may_bind_any_pid:
            raise Refused(403, "forbidden", f"pid {pid} belongs to another user.", {"pid": pid})
        return process.start_time

    def _pool_path(self, lease: Lease) -> str:
        return os.path.dirname(lease.path)

    def _disk_refusal(self, pool: str, exc: OSError) -> Refused:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return Refused(507, "insufficient_storage", f"Pool {pool} is full.", {"pool": pool})
        return Refused(
            503, "pool_unavailable", f"Pool {pool} cannot create a directory: {exc.strerror}.", {"pool": pool}
        )

    def _notify(self, lease: Lease) -> None:
        # Counted first: a listener may end the lease it is told about (a bound process
        # already gone), and the counts must see the start before that end.
        self.counts(lease)
        for listener in self.listeners:
            listener(lease)
