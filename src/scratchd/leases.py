"""A lease and its state machine: ``active`` -> ``ended`` with a reason, and nothing else.

Pure: no I/O, no clock. Callers pass ``now`` so every transition is testable.
"""

from __future__ import annotations

import dataclasses
import heapq
import secrets
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum

from scratchd.caches import CacheUse
from scratchd.schema import marks


class LeaseState(StrEnum):
    ACTIVE = "active"
    ENDED = "ended"


class EndReason(StrEnum):
    RELEASED = "released"
    EXPIRED = "expired"
    PROCESS_EXITED = "process_exited"
    IDLE = "idle"
    OVER_QUOTA = "over_quota"
    EVICTED = "evicted"
    DIRECTORY_REMOVED = "directory_removed"
    POOL_LOST = "pool_lost"


class LinkMode(StrEnum):
    """What a tool can do between the lease and ``near``: link, clone, or only copy out of its cache."""

    HARDLINK = "hardlink"  # the same mount
    CLONE = "clone"  # another mount of the same filesystem, which clones (Linux reflinks across its mounts)
    COPY = "copy"


class LeaseEnded(Exception):
    """A transition that needs an active lease was asked of an ended one."""

    def __init__(self, lease: Lease) -> None:
        super().__init__(f"lease {lease.id} already ended ({lease.end_reason})")
        self.lease = lease


def new_lease_id() -> str:
    """The creation time in µs (13 hex digits), then 80 random bits (20): ``[a-z0-9]`` only
    and unguessable (docs/security.md). In creation order, a group commit's new ids land on the
    last page of the records' primary-key index instead of one random page each."""
    return f"{time.time_ns() // 1000:013x}{secrets.token_hex(10)}"


@dataclass(slots=True)
class Usage:
    bytes: int = 0
    files: int = 0
    measured_at: float | None = field(default=None, metadata=marks(time=True))


@dataclass(slots=True, kw_only=True)
class Lease:
    """A lease. Its fields are the record's one schema: the store's columns and the API's answer
    (in this order) derive from them (``schema``)."""

    id: str
    path: str
    pool: str
    tenant: str
    uid: int
    gid: int = field(metadata=marks(hidden=True))
    state: LeaseState = LeaseState.ACTIVE
    end_reason: EndReason | None = None
    created_at: float = field(metadata=marks(time=True))
    expires_at: float = field(metadata=marks(time=True))
    ended_at: float | None = field(default=None, metadata=marks(time=True))
    ttl_seconds: int
    idle_timeout_seconds: int | None = None
    pid: int | None = None
    pid_start_time: int | None = field(default=None, metadata=marks(hidden=True))
    max_bytes: int | None = None
    expected_bytes: int | None = None
    evictable: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    same_filesystem: bool | None = None
    link_mode: LinkMode | None = None
    mount_point: str | None = None
    last_activity_at: float | None = field(default=None, metadata=marks(time=True))
    usage: Usage = field(default_factory=Usage)
    cache: CacheUse | None = field(default=None, metadata=marks(description="null without a cache_key."))

    @property
    def active(self) -> bool:
        return self.state is LeaseState.ACTIVE

    @property
    def reserved_bytes(self) -> int:
        """Space promised but not yet used: counts against the pool until written (docs/api.md, expected_bytes)."""
        if not self.active or not self.expected_bytes:
            return 0
        return max(0, self.expected_bytes - self.usage.bytes)


def renew(lease: Lease, ttl_seconds: int, now: float) -> Lease:
    if not lease.active:
        raise LeaseEnded(lease)
    return dataclasses.replace(lease, ttl_seconds=ttl_seconds, expires_at=now + ttl_seconds)


def end(lease: Lease, reason: EndReason, now: float) -> Lease:
    """The only way out of ``active``; ending twice is refused so a reason is never overwritten."""
    if not lease.active:
        raise LeaseEnded(lease)
    return dataclasses.replace(lease, state=LeaseState.ENDED, end_reason=reason, ended_at=now)


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


class LeaseCounts:
    """Leases started and ended per pool (ended also by reason), told by the manager of every create, renew and end:
    what ``/metrics`` counts and ``/v1/usage`` sums by reason.

    A lease is counted as started the first time it is seen active; the leases that were
    already active when the process started are known from the outset, so a renew after a
    restart is not mistaken for a start.
    """

    def __init__(self, active: Iterable[str]) -> None:
        self._live = set(active)
        self.created: Counter[str] = Counter()
        self.ended: Counter[tuple[str, str]] = Counter()

    def __call__(self, lease: Lease) -> None:
        if lease.active:
            if lease.id not in self._live:
                self._live.add(lease.id)
                self.created[lease.pool] += 1
        else:
            self._live.discard(lease.id)
            self.ended[lease.pool, str(lease.end_reason)] += 1
