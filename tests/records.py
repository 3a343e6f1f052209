"""Core records with every required field filled in, for the pure tests: each test names only
the fields it is about."""

from __future__ import annotations

from typing import Any

from scratchd.caches import Cache, CacheState, CacheUse, HitKind
from scratchd.leases import EndReason, Lease, LeaseState, LinkMode, Usage
from scratchd.pools import PoolState, PoolStatus


def a_lease(id: str = "l", pool: str = "p", **fields: Any) -> Lease:
    """An active lease in ``pool`` at ``/<pool>/<id>``, of tenant ``t`` (uid and gid 1), created at 0
    for 1000 s; ``fields`` override any of that."""
    defaults: dict[str, Any] = {
        "path": f"/{pool}/{id}",
        "tenant": "t",
        "uid": 1,
        "gid": 1,
        "created_at": 0.0,
        "expires_at": 1000.0,
        "ttl_seconds": 1000,
    }
    return Lease(id=id, pool=pool, **(defaults | fields))


def a_pool(name: str = "p", **fields: Any) -> PoolStatus:
    """An ``ok`` tmpfs pool at ``/<name>`` with 1000 of 10,000 bytes free and no reserve;
    ``fields`` override any of that."""
    defaults: dict[str, Any] = {
        "path": f"/{name}",
        "mount_point": "/",
        "fstype": "tmpfs",
        "device": "0:1",
        "mount_id": 1,
        "state": PoolState.OK,
        "capacity_bytes": 10_000,
        "free_bytes": 1000,
        "reserve_bytes": 0,
        "labels": (),
        "reason": None,
    }
    return PoolStatus(name=name, **(defaults | fields))


def every_field_lease() -> Lease:
    """A lease with every field set, none to its default: what a record's round trip (store, API) must keep."""
    return Lease(
        id="l1",
        path="/p/l1",
        pool="p",
        tenant="t",
        uid=1,
        gid=2,
        state=LeaseState.ENDED,
        end_reason=EndReason.RELEASED,
        created_at=1.5,
        expires_at=2.5,
        ended_at=3.5,
        ttl_seconds=1,
        idle_timeout_seconds=4,
        pid=5,
        pid_start_time=6,
        max_bytes=7,
        expected_bytes=8,
        evictable=True,
        labels={"a": "b", "c": "d"},
        same_filesystem=False,
        link_mode=LinkMode.CLONE,
        mount_point="/",
        last_activity_at=9.5,
        usage=Usage(bytes=10, files=11, measured_at=12.5),
        cache=CacheUse("k", ("k-", "x"), HitKind.FALLBACK, "k-1", "c1", 13.5, "c2"),
    )


def every_field_cache() -> Cache:
    """A kept cache with every field set, none to its default."""
    return Cache(
        id="c2",
        key="k",
        tenant="t",
        pool="p",
        state=CacheState.IN_USE,
        lease_id="l1",
        bytes=1,
        files=2,
        kept_at=3.5,
        last_used_at=4.5,
        hits=5,
        inode=6,
    )
