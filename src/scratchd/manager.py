"""The lease manager: every lease change goes through here, in a fixed order of effects.

Create: place -> mkdir -> commit record -> answer. A crash before the commit leaves
a directory without a record (an orphan, reclaimed after grace), never a record
without its directory.
End: rename into the trash (or rmdir, if empty) -> commit -> answer -> delete in the
background. The path is gone before anyone is told the lease ended; a crash between
rename and commit leaves an active record without a directory, which start-up ends
as ``directory_removed``.

Runs on the event loop: each step here is a handful of metadata syscalls and one
SQLite commit. Tree deletion and usage scans happen elsewhere, off the loop.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from scratchd import leases as lease_sm
from scratchd.config import Config
from scratchd.errors import Refused
from scratchd.leases import EndReason, Lease, Usage
from scratchd.mounts import MountTable, mount_of, resolve_near
from scratchd.placement import Near, Placement, PlacementError, place
from scratchd.pool_dirs import PoolSet, make_lease_dir, move_to_trash, remove_if_empty
from scratchd.pools import PoolReason, pool_json
from scratchd.reclaim import procs
from scratchd.store import NewEvent, Store, StoreError, lease_inserted, lease_updated
from scratchd.tenant import Tenant, check_bytes, check_lease_count, lease_ttl, tenant_charge

log = logging.getLogger("scratchd.lease")


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


@dataclass(slots=True)
class Totals:
    """What the active leases of one pool or one tenant add up to."""

    active_leases: int = 0
    bytes: int = 0  # as last measured
    reserved_bytes: int = 0  # promised (expected_bytes) but not yet used


class ActiveLeases:
    """The active leases by id, indexed by tenant, with running totals by pool and by tenant.

    Quota and placement checks run on every create, ``/v1/usage`` and ``/metrics`` on
    every ask, all on the event loop: with 10,000 leases none of them may walk them
    all. The totals stay exact because every change to what they count goes through
    here: a lease's arrival, replacement (renew) and removal, and ``set_usage``.
    """

    def __init__(self, leases: Iterable[Lease]) -> None:
        self._by_id: dict[str, Lease] = {}
        self._by_tenant: dict[str, set[str]] = {}
        self.pool_totals: dict[str, Totals] = {}
        self.tenant_totals: dict[str, Totals] = {}
        for lease in leases:
            self.put(lease)

    def put(self, lease: Lease) -> None:
        replaced = self._by_id.get(lease.id)
        if replaced is not None:
            self._tally(replaced, -1)
        self._by_id[lease.id] = lease
        self._by_tenant.setdefault(lease.tenant, set()).add(lease.id)
        self._tally(lease, 1)

    def remove(self, lease_id: str) -> None:
        lease = self._by_id.pop(lease_id, None)
        if lease is not None:
            mine = self._by_tenant[lease.tenant]
            mine.discard(lease_id)
            if not mine:
                del self._by_tenant[lease.tenant]
            self._tally(lease, -1)

    def set_usage(self, lease: Lease, usage: Usage) -> None:
        """Record a measurement; the way to change the usage of a lease that may be in here."""
        counted = self._by_id.get(lease.id) is lease
        if counted:
            self._tally(lease, -1)
        lease.usage = usage
        if counted:
            self._tally(lease, 1)

    def get(self, lease_id: str) -> Lease | None:
        return self._by_id.get(lease_id)

    def values(self) -> Iterable[Lease]:
        return self._by_id.values()

    def __contains__(self, lease_id: object) -> bool:
        return lease_id in self._by_id

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_id)

    def __len__(self) -> int:
        return len(self._by_id)

    def of_tenant(self, tenant: str) -> list[Lease]:
        return [self._by_id[i] for i in self._by_tenant.get(tenant, ())]

    def count_of_tenant(self, tenant: str) -> int:
        return len(self._by_tenant.get(tenant, ()))

    def largest(self, count: int, tenant: str | None = None) -> list[Lease]:
        """The ``count`` leases using the most bytes (of ``tenant``, if given), largest first."""
        leases = self._by_id.values() if tenant is None else self.of_tenant(tenant)
        return heapq.nlargest(count, leases, key=_used_bytes)

    def _tally(self, lease: Lease, sign: int) -> None:
        used, reserved = sign * lease.usage.bytes, sign * lease.reserved_bytes
        for totals, name in ((self.pool_totals, lease.pool), (self.tenant_totals, lease.tenant)):
            total = totals.get(name)
            if total is None:
                total = totals[name] = Totals()
            total.active_leases += sign
            total.bytes += used
            total.reserved_bytes += reserved
            if not total.active_leases:
                del totals[name]


def _used_bytes(lease: Lease) -> int:
    return lease.usage.bytes


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
        on_trashed: Callable[[str, Lease], None],
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
        self._ending: dict[str, Lease] = {}
        self._unrecorded: dict[str, tuple[Lease, NewEvent]] = {}
        self.listeners: list[Callable[[Lease], None]] = []

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
        """Every pool with its active leases' totals, as ``/v1/pools`` and ``/metrics`` read them."""
        totals, empty = self.active.pool_totals, Totals()
        return [
            pool_json(
                pool,
                reserved=(t := totals.get(pool.name, empty)).reserved_bytes,
                leased=t.bytes,
                active=t.active_leases,
            )
            for pool in self.pools.statuses()
        ]

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
        try:
            placed = place(
                self.pools.statuses(),
                reserved=self.reserved_by_pool(),
                pool_name=spec.pool,
                near=Near(near_mount.mount_id, near_mount.device) if near_mount else None,
                placement=spec.placement,
                expected_bytes=spec.expected_bytes or 0,
            )
        except PlacementError as exc:
            if near_mount is not None:  # place() knows mount ids; people know mount points
                exc.details = {**(exc.details or {}), "near_mount_point": near_mount.mount_point}
            raise

        lease_id = lease_sm.new_lease_id()
        pool = placed.pool
        chown = os.geteuid() == 0
        try:
            path = make_lease_dir(
                pool.path, lease_id, uid=tenant.uid if chown else None, gid=tenant.gid if chown else None
            )
        except OSError as exc:
            raise self._disk_refusal(pool.name, exc) from None
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
        )
        self.active.put(lease)  # holds its place in the tenant's quota while the commit is in flight
        try:
            await self.store.write_grouped(
                [lease_inserted(lease)], [NewEvent.for_lease("lease_created", lease)], now
            )
        except StoreError as exc:
            # Undo the mkdir so a refused request changes nothing; if even that fails
            # the directory is an orphan and is reclaimed after grace.
            self.active.remove(lease.id)
            with contextlib.suppress(OSError):
                os.rmdir(path)
            raise _unavailable(exc) from None
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
        """End an active lease: its path is gone (or, for ``pool_lost``, left alone) before this returns."""
        ended, event = self._begin_end(lease, reason, details)
        try:
            self.store.save_lease(ended, event, ended.ended_at or self._clock())
        except StoreError as exc:
            self._record_lost(ended, event, exc)
        return self._finish_end(ended)

    async def release(self, lease: Lease) -> Lease:
        """``end(lease, released)`` for a request: the same effects, its commit grouped with others."""
        ended, event = self._begin_end(lease, EndReason.RELEASED, {})
        try:
            await self.store.write_grouped([lease_updated(ended)], [event], ended.ended_at or self._clock())
        except StoreError as exc:
            self._record_lost(ended, event, exc)
        return self._finish_end(ended)

    def _begin_end(
        self, lease: Lease, reason: EndReason, details: dict[str, object]
    ) -> tuple[Lease, NewEvent]:
        ended = lease_sm.end(lease, reason, self._clock())
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
            if remove_if_empty(pool_path, lease.id):
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
                    self._on_trashed(trashed, ended)
        self.active.remove(lease.id)
        self._ending[lease.id] = ended  # what get() answers until the record says so too
        return ended, NewEvent.for_lease("lease_ended", ended, **details)

    def _record_lost(self, ended: Lease, event: NewEvent, exc: StoreError) -> None:
        # The path is already gone: the end stands, in memory, and its record is written
        # by retry_unrecorded() once the store takes writes again (or, after a restart
        # first, the active record without a directory ends as directory_removed).
        log.error("cannot record end of lease", extra={"lease": ended.id, "error": str(exc)})
        self._unrecorded[ended.id] = (ended, event)

    def retry_unrecorded(self) -> None:
        """Write the ends the store refused earlier (full disk, locked database)."""
        for lease_id, (ended, event) in list(self._unrecorded.items()):
            try:
                self.store.save_lease(ended, event, ended.ended_at or self._clock())
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
        for listener in self.listeners:
            listener(lease)
