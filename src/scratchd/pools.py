"""Pool states and why a pool is not ``ok``: the words placement, reclaim and the API share.

No I/O: ``pool_dirs`` looks at the disk and answers in these types.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class PoolState(StrEnum):
    OK = "ok"
    FULL = "full"
    READ_ONLY = "read_only"
    UNAVAILABLE = "unavailable"


class PoolReason(StrEnum):
    """Why a pool is not ``ok``: a code for programs; ``PoolStatus.message`` says it for people."""

    MISSING = "missing"  # the path does not exist (its disk not mounted yet, a typo)
    NOT_ON_MOUNT_POINT = "not_on_mount_point"  # the path is on another mount than the configured mount_point
    UNMOUNTED = "unmounted"  # the mount the pool was first seen on went away or was covered
    LOCKED = "locked"  # another daemon serves it
    INACCESSIBLE = "inaccessible"  # not a directory, on no known mount, or stat/statvfs/lock failed
    READ_ONLY = "read_only"
    FULL = "full"


REASON_STATES = {
    PoolReason.MISSING: PoolState.UNAVAILABLE,
    PoolReason.NOT_ON_MOUNT_POINT: PoolState.UNAVAILABLE,
    PoolReason.UNMOUNTED: PoolState.UNAVAILABLE,
    PoolReason.LOCKED: PoolState.UNAVAILABLE,
    PoolReason.INACCESSIBLE: PoolState.UNAVAILABLE,
    PoolReason.READ_ONLY: PoolState.READ_ONLY,
    PoolReason.FULL: PoolState.FULL,
}


@dataclass(frozen=True, slots=True)
class PoolStatus:
    name: str
    path: str
    mount_point: str | None
    fstype: str | None
    device: str | None
    mount_id: int | None
    state: PoolState
    capacity_bytes: int
    free_bytes: int
    reserve_bytes: int
    labels: tuple[str, ...]
    reason: PoolReason | None  # None exactly when the state is ok
    message: str | None = None  # the reason as one sentence, for logs, events and people
    reflink: bool = False  # its filesystem clones files (FICLONE), as probed when the pool came up


def pool_state(reason: PoolReason | None) -> PoolState:
    return PoolState.OK if reason is None else REASON_STATES[reason]


def space_reason(*, read_only: bool, free_bytes: int, reserve_bytes: int) -> PoolReason | None:
    """The worst thing that is true of a mounted pool: read-only trumps full."""
    if read_only:
        return PoolReason.READ_ONLY
    if free_bytes == 0 or (reserve_bytes > 0 and free_bytes <= reserve_bytes):
        return PoolReason.FULL
    return None


def pool_json(
    pool: PoolStatus,
    *,
    reserved: int,
    leased: int,
    active: int,
    cache_entries: int,
    cache_bytes: int,
    cache_max: int,
    cache_hits: int,
    cache_misses: int,
) -> dict[str, Any]:
    """A pool as ``/v1/pools`` answers it and ``/metrics`` names its series, with its leases' and
    free kept caches' totals."""
    return {
        "name": pool.name,
        "path": pool.path,
        "mount_point": pool.mount_point,
        "fstype": pool.fstype,
        "device": pool.device,
        "state": pool.state.value,
        "reason": pool.reason.value if pool.reason else None,
        "message": pool.message,
        "capacity_bytes": pool.capacity_bytes,
        "free_bytes": pool.free_bytes,
        "reserve_bytes": pool.reserve_bytes,
        "reserved_bytes": reserved,
        "leased_bytes": leased,
        "active_leases": active,
        "labels": list(pool.labels),
        "reflink": pool.reflink,
        "cache_entries": cache_entries,
        "cache_bytes": cache_bytes,
        "cache_max_bytes": cache_max,
        "cache_hits_total": cache_hits,
        "cache_misses_total": cache_misses,
    }
