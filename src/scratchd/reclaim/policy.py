"""Which active leases must end now, and why: pure decisions, no I/O, no clock.

Modelled on the kubelet eviction manager: signals (expiry, activity, usage, pool
state, pool free space) are gathered elsewhere; this module compares them with
thresholds and ranks eviction candidates. One lease gets at most one reason, taken in
the order of ``REASON_ORDER`` (the most definite first).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from scratchd.caches import Cache, Drop, Rules, drops, pressure_drops
from scratchd.leases import EndReason, Lease
from scratchd.pools import PoolReason, PoolState, PoolStatus


@dataclass(frozen=True, slots=True)
class Ending:
    lease_id: str
    reason: EndReason
    details: dict[str, Any] = field(default_factory=dict)


def lease_ending(lease: Lease, pool: PoolStatus | None, now: float) -> Ending | None:
    """The reason ``lease`` must end at ``now`` from its own signals, or None.

    ``pool`` is None for a pool dropped from the config: its leases live on (docs/configuration.md, "Reload").
    A pool another daemon serves (``locked``) is not ours to touch: its leases wait, as
    they are, until this daemon holds the pool again.
    """
    if pool is not None and pool.reason is PoolReason.LOCKED:
        return None
    if pool is not None and pool.state is PoolState.UNAVAILABLE:
        return Ending(
            lease.id, EndReason.POOL_LOST, {"pool_reason": pool.reason, "pool_message": pool.message}
        )
    if now >= lease.expires_at:
        return Ending(lease.id, EndReason.EXPIRED)
    if lease.max_bytes is not None and lease.usage.bytes > lease.max_bytes:
        return Ending(
            lease.id, EndReason.OVER_QUOTA, {"bytes": lease.usage.bytes, "max_bytes": lease.max_bytes}
        )
    if lease.idle_timeout_seconds is not None:
        last = lease.last_activity_at if lease.last_activity_at is not None else lease.created_at
        if now - last >= lease.idle_timeout_seconds:
            return Ending(lease.id, EndReason.IDLE, {"idle_seconds": int(now - last)})
    return None


def evictions(pool: PoolStatus, leases: Iterable[Lease], freed: int = 0) -> list[Ending]:
    """Evictable leases to reclaim so ``pool`` gets back above its reserve.

    Least recently active first; only as many as needed, counting each lease's
    measured bytes as freed (``freed``: bytes already being reclaimed for other reasons).
    Never a lease that is not ``evictable``.
    """
    shortfall = pool.reserve_bytes - pool.free_bytes - freed
    if pool.state is PoolState.UNAVAILABLE or shortfall <= 0:
        return []
    candidates = sorted(
        (lease for lease in leases if lease.evictable and lease.active and lease.pool == pool.name),
        key=lambda lease: (lease.last_activity_at or lease.created_at, lease.created_at, lease.id),
    )
    chosen: list[Ending] = []
    for lease in candidates:
        if shortfall <= 0:
            break
        chosen.append(
            Ending(
                lease.id,
                EndReason.EVICTED,
                {"pool_free_bytes": pool.free_bytes, "pool_reserve_bytes": pool.reserve_bytes},
            )
        )
        shortfall -= lease.usage.bytes
    return chosen


@dataclass(frozen=True, slots=True)
class Decision:
    endings: list[Ending]
    drops: list[Drop]


def decide(
    leases: Iterable[Lease],
    pools: Mapping[str, PoolStatus],
    now: float,
    reclaiming: Mapping[str, int] | None = None,
    caches: Iterable[Cache] = (),
    rules: Rules | None = None,
) -> Decision:
    """Every ending and cache drop due now: each lease's own signals and the caches' limits
    (``rules``) first, then, per pool below its reserve, free caches (``pressure``) before
    any eviction: a kept cache is a convenience, an evictable lease a running job.

    ``reclaiming``: bytes per pool still in its trash. They are free in a moment, so an
    eviction that already made up a shortfall is not followed by another while its
    tree is being deleted.
    """
    leases, caches = list(leases), list(caches)
    reclaiming = reclaiming or {}
    endings = [e for lease in leases if (e := lease_ending(lease, pools.get(lease.pool), now))]
    ending_ids = {e.lease_id for e in endings}
    remaining = [lease for lease in leases if lease.id not in ending_ids]
    served = {name for name, pool in pools.items() if pool.state is not PoolState.UNAVAILABLE}
    caches = [c for c in caches if c.pool in served]  # nothing in a pool we do not serve is ours to drop
    dropped = drops(caches, rules, now) if rules is not None else []
    for pool in pools.values():
        if pool.name not in served:
            continue
        gone = {d.cache_id for d in dropped}
        freed = (
            reclaiming.get(pool.name, 0)
            + sum(lease.usage.bytes for lease in leases if lease.id in ending_ids and lease.pool == pool.name)
            + sum(c.bytes for c in caches if c.id in gone and c.pool == pool.name)
        )
        shortfall = pool.reserve_bytes - pool.free_bytes - freed
        if shortfall > 0:
            pressed = pressure_drops([c for c in caches if c.id not in gone], pool.name, shortfall)
            dropped += pressed
            freed += sum(c.bytes for c in caches if c.id in {d.cache_id for d in pressed})
        endings.extend(evictions(pool, remaining, freed))
    return Decision(endings, dropped)


@dataclass(frozen=True, slots=True)
class OrphanReview:
    first_seen: dict[str, float]  # entries newly sighted now
    due: list[str]  # entries past grace: reclaim them
    cleared: list[str]  # sightings no longer orphans (a lease took the name, or it vanished)


def review_orphans(
    entries: Iterable[str], leased: set[str], sightings: Mapping[str, float], now: float, grace: float
) -> OrphanReview:
    """Entries of one pool without an active lease, judged against when each was first seen.

    Grace counts from the first sighting (kept across restarts), not from start-up, so
    a daemon restarting in a loop still reclaims; and not from the entry's mtime,
    which its creator controls.
    """
    entries = set(entries)
    orphans = entries - leased
    first_seen = {name: now for name in orphans if name not in sightings}
    due = sorted(name for name in orphans if name in sightings and now - sightings[name] >= grace)
    cleared = sorted(name for name in sightings if name not in orphans)
    return OrphanReview(first_seen, due, cleared)
