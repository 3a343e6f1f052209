"""A lease and its state machine: ``active`` -> ``ended`` with a reason, and nothing else.

Pure: no I/O, no clock. Callers pass ``now`` so every transition is testable.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from dataclasses import dataclass, field
from enum import StrEnum

from scratchd.caches import CacheUse


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
    measured_at: float | None = None


@dataclass(slots=True)
class Lease:
    id: str
    path: str
    pool: str
    tenant: str
    uid: int
    gid: int
    created_at: float
    expires_at: float
    ttl_seconds: int
    mount_point: str | None = None
    same_filesystem: bool | None = None
    link_mode: LinkMode | None = None
    idle_timeout_seconds: int | None = None
    pid: int | None = None
    pid_start_time: int | None = None
    max_bytes: int | None = None
    expected_bytes: int | None = None
    evictable: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    state: LeaseState = LeaseState.ACTIVE
    end_reason: EndReason | None = None
    ended_at: float | None = None
    last_activity_at: float | None = None
    usage: Usage = field(default_factory=Usage)
    cache: CacheUse | None = None  # None without a cache_key

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
