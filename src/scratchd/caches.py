"""Warm caches (docs/caches.md): kept directories, which one a new lease gets, which go and why.

Pure: no I/O, no clock. Callers pass ``now`` and the facts (pools' space, the caps),
and apply what comes back. A cache is ``free`` (kept, waiting for the next job of its
tenant) or ``in_use`` (it is an active lease's directory now).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from scratchd.schema import marks

CACHE_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+=/-]{0,127}")
MAX_FALLBACKS = 8


class CacheState(StrEnum):
    FREE = "free"
    IN_USE = "in_use"


class HitKind(StrEnum):
    EXACT = "exact"
    FALLBACK = "fallback"


class DropReason(StrEnum):
    MAX_AGE = "max_age"  # unused for caches.max_age
    POOL_CAP = "pool_cap"  # the pool's free caches above its cache_max
    TENANT_CAP = "tenant_cap"  # the tenant's free caches above its max_cache_bytes
    PRESSURE = "pressure"  # the pool below its reserve: before any lease is evicted
    REPLACED = "replaced"  # more than caches.keep_per_key of one tenant, key and pool
    REMOVED = "removed"  # DELETE /v1/caches/{id}


@dataclass(slots=True, kw_only=True)
class Cache:
    """A kept cache. Its fields are the record's one schema: the store's columns and the API's answer
    (in this order) derive from them (``schema``)."""

    id: str
    key: str
    tenant: str
    pool: str
    state: CacheState = CacheState.FREE
    lease_id: str | None = field(
        default=None, metadata=marks(description="The lease whose directory it is while in use.")
    )
    bytes: int = 0
    files: int = 0
    kept_at: float = field(metadata=marks(time=True))
    last_used_at: float = field(metadata=marks(time=True))
    hits: int = 0
    # Of its directory: how start-up finds it again after a crash mid hand-over.
    inode: int | None = field(default=None, metadata=marks(hidden=True))

    @property
    def free(self) -> bool:
        return self.state is CacheState.FREE


@dataclass(slots=True)
class CacheUse:
    """What a lease asked of the cache and got: the ``cache`` of a Lease."""

    key: str
    fallback: tuple[str, ...] = field(default=(), metadata=marks(hidden=True))
    hit: HitKind | None = field(
        default=None, metadata=marks(description="null: a miss, the lease started empty.")
    )
    matched_key: str | None = field(
        default=None, metadata=marks(description="The key of the cache handed over.")
    )
    # Kept again under this id on a keep; None on a miss.
    cache_id: str | None = field(default=None, metadata=marks(description="The cache handed over."))
    kept_at: float | None = field(
        default=None, metadata=marks(time=True, description="When the cache handed over was kept.")
    )
    kept_id: str | None = field(
        default=None, metadata=marks(description="Once released with keep: the kept cache's id.")
    )


@dataclass(frozen=True, slots=True)
class Hit:
    cache: Cache
    kind: HitKind


@dataclass(frozen=True, slots=True)
class Drop:
    cache_id: str
    reason: DropReason
    details: dict[str, Any] = field(default_factory=dict)


def _lru(cache: Cache) -> tuple[float, float, str]:
    return (cache.last_used_at, cache.kept_at, cache.id)


def _newest(cache: Cache) -> tuple[float, str]:
    return (cache.kept_at, cache.id)


def find_hit(
    caches: Iterable[Cache], *, tenant: str, key: str, fallback: Sequence[str], pools: Iterable[str]
) -> Hit | None:
    """The cache a new lease of ``tenant`` gets, among ``pools``: the newest free one of its key,
    else the newest free one whose key starts with the first prefix of ``fallback`` that any
    matches. Only the tenant's own: a cache never reaches another tenant."""
    allowed = set(pools)
    mine = [c for c in caches if c.free and c.tenant == tenant and c.pool in allowed]
    exact = [c for c in mine if c.key == key]
    if exact:
        return Hit(max(exact, key=_newest), HitKind.EXACT)
    for prefix in fallback:
        matched = [c for c in mine if c.key.startswith(prefix)]
        if matched:
            return Hit(max(matched, key=_newest), HitKind.FALLBACK)
    return None


def replaced(caches: Iterable[Cache], kept: Cache, keep_per_key: int) -> list[Drop]:
    """The free caches to drop now that ``kept`` is kept: its tenant, key and pool hold at most
    ``keep_per_key``, least recently used dropped first; ``kept`` itself and caches in use stay."""
    same = [
        c
        for c in caches
        if (c.tenant, c.key, c.pool) == (kept.tenant, kept.key, kept.pool) and c.id != kept.id
    ]
    excess = len(same) + 1 - keep_per_key
    candidates = sorted((c for c in same if c.free), key=_lru)
    return [
        Drop(c.id, DropReason.REPLACED, {"key": c.key, "keep_per_key": keep_per_key})
        for c in candidates[: max(excess, 0)]
    ]


@dataclass(frozen=True, slots=True)
class Rules:
    """The limits drops are decided by: ``caches.max_age``, each pool's ``cache_max`` in bytes, and
    each tenant's ``max_cache_bytes`` (a tenant without one has no cap)."""

    max_age: float
    pool_caps: Mapping[str, int]
    tenant_caps: Mapping[str, int]


def drops(caches: Iterable[Cache], rules: Rules, now: float) -> list[Drop]:
    """Every free cache that must go now, with one reason each: ``max_age``, then ``tenant_cap``,
    then ``pool_cap`` (least recently used first, only as many as it takes). ``pressure`` is
    decided with the evictions it comes before (``pressure_drops``)."""
    free = [c for c in caches if c.free]
    chosen: list[Drop] = [
        Drop(c.id, DropReason.MAX_AGE, {"unused_seconds": int(now - c.last_used_at)})
        for c in free
        if now - c.last_used_at >= rules.max_age
    ]
    gone = {d.cache_id for d in chosen}
    for attribute, caps, reason in (
        ("tenant", rules.tenant_caps, DropReason.TENANT_CAP),
        ("pool", rules.pool_caps, DropReason.POOL_CAP),
    ):
        for name, cap in caps.items():
            group = [c for c in free if c.id not in gone and getattr(c, attribute) == name]
            for cache in _least_recent(group, sum(c.bytes for c in group) - cap):
                chosen.append(Drop(cache.id, reason, {"cap_bytes": cap}))
                gone.add(cache.id)
    return chosen


def pressure_drops(caches: Iterable[Cache], pool: str, shortfall: int) -> list[Drop]:
    """Free caches of ``pool`` to drop, least recently used first, until ``shortfall`` bytes are freed."""
    mine = [c for c in caches if c.free and c.pool == pool]
    return [
        Drop(c.id, DropReason.PRESSURE, {"shortfall_bytes": shortfall})
        for c in _least_recent(mine, shortfall)
    ]


def _least_recent(caches: Iterable[Cache], over: int) -> Iterator[Cache]:
    """Least recently used first, until their bytes make up ``over``."""
    for cache in sorted(caches, key=_lru):
        if over <= 0:
            return
        yield cache
        over -= cache.bytes
