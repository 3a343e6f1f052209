"""Core records with every required field filled in, for the pure tests: each test names only
the fields it is about."""

from __future__ import annotations

from typing import Any

from scratchd.leases import Lease
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
