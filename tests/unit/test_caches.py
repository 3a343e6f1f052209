"""Warm caches' decisions, pure: which cache a lease gets, and which kept caches go and why."""

from __future__ import annotations

import pytest
from records import a_lease, a_pool

from scratchd.caches import Cache, CacheState, DropReason, HitKind, Rules, drops, find_hit, replaced
from scratchd.leases import Lease, Usage
from scratchd.pools import PoolState, PoolStatus
from scratchd.reclaim.policy import decide

DAY = 86400.0


def cache(id: str, key: str = "k", tenant: str = "t", pool: str = "p", **kw: object) -> Cache:
    kw.setdefault("kept_at", 10.0)
    kw.setdefault("last_used_at", kw["kept_at"])
    return Cache(id=id, key=key, tenant=tenant, pool=pool, **kw)  # type: ignore[arg-type]


def pool(name: str = "p", free: int = 1000, reserve: int = 0, state: PoolState = PoolState.OK) -> PoolStatus:
    return a_pool(name, free_bytes=free, reserve_bytes=reserve, state=state)


def lease(id: str, used: int, active_at: float, evictable: bool = True) -> Lease:
    return a_lease(
        id,
        expires_at=1e9,
        ttl_seconds=10,
        evictable=evictable,
        last_activity_at=active_at,
        usage=Usage(bytes=used),
    )


KEPT = [
    cache("old", "main-a", kept_at=1.0),
    cache("new", "main-a", kept_at=2.0),
    cache("busy", "main-a", kept_at=3.0, state=CacheState.IN_USE, lease_id="l"),
    cache("branch", "main-b", kept_at=4.0),
    cache("feature", "feat-x", kept_at=5.0),
    cache("theirs", "main-a", tenant="other", kept_at=9.0),
    cache("elsewhere", "main-a", pool="q", kept_at=9.0),
]


@pytest.mark.parametrize(
    ("key", "fallback", "pools", "expected"),
    [
        ("main-a", [], ["p"], ("new", HitKind.EXACT)),  # the newest free one, never the one in use
        ("main-a", [], ["p", "q"], ("elsewhere", HitKind.EXACT)),  # among the pools placement left
        ("main-c", ["main-"], ["p"], ("branch", HitKind.FALLBACK)),  # newest whose key has the prefix
        (
            "main-c",
            ["nope", "feat-", "main-"],
            ["p"],
            ("feature", HitKind.FALLBACK),
        ),  # first prefix that matches
        ("main-c", [], ["p"], None),  # no fallback: a miss
        ("main-a", [], ["r"], None),  # not in a pool placement left
        ("other-key", ["other"], ["p"], None),  # prefixes match keys, not tenants
    ],
)
def test_find_hit(key, fallback, pools, expected):
    hit = find_hit(KEPT, tenant="t", key=key, fallback=fallback, pools=pools)
    assert (hit and (hit.cache.id, hit.kind)) == expected


def test_a_cache_never_reaches_another_tenant():
    assert find_hit(KEPT, tenant="nobody", key="main-a", fallback=["m", ""], pools=["p", "q"]) is None
    hit = find_hit(KEPT, tenant="other", key="main-a", fallback=[], pools=["p"])
    assert hit is not None and hit.cache.id == "theirs"


@pytest.mark.parametrize(
    ("others", "keep_per_key", "dropped"),
    [
        ([], 2, []),
        (["a"], 2, []),
        (["a", "b"], 2, ["a"]),  # the least recently used goes
        (["a", "b", "c"], 2, ["a", "b"]),
        (["a", "b"], 1, ["a", "b"]),
    ],
)
def test_replaced_keeps_keep_per_key_least_recently_used_first(others, keep_per_key, dropped):
    existing = [cache(name, last_used_at=float(i)) for i, name in enumerate(others)]
    kept = cache("kept", last_used_at=100.0)
    drops_ = replaced([*existing, kept], kept, keep_per_key)
    assert [d.cache_id for d in drops_] == dropped
    assert all(d.reason is DropReason.REPLACED for d in drops_)


def test_replaced_never_drops_a_cache_in_use_nor_another_key_tenant_or_pool():
    kept = cache("kept", last_used_at=100.0)
    existing = [
        cache("busy", state=CacheState.IN_USE, lease_id="l", last_used_at=0.0),
        cache("k2", key="k2", last_used_at=0.0),
        cache("t2", tenant="t2", last_used_at=0.0),
        cache("q", pool="q", last_used_at=0.0),
        cache("free", last_used_at=1.0),
    ]
    assert [d.cache_id for d in replaced([*existing, kept], kept, 1)] == ["free"]


NO_CAPS = Rules(max_age=7 * DAY, pool_caps={}, tenant_caps={})


@pytest.mark.parametrize(
    ("caches", "rules", "now", "expected"),
    [
        ([cache("a", last_used_at=0.0)], NO_CAPS, 7 * DAY - 1, []),
        ([cache("a", last_used_at=0.0)], NO_CAPS, 7 * DAY, [("a", DropReason.MAX_AGE)]),
        (
            [cache("a", last_used_at=0.0, state=CacheState.IN_USE, lease_id="l")],
            NO_CAPS,
            30 * DAY,
            [],  # in use: an active lease, never dropped
        ),
        (
            [cache("a", bytes=60, last_used_at=2.0), cache("b", bytes=60, last_used_at=1.0)],
            Rules(7 * DAY, pool_caps={"p": 100}, tenant_caps={}),
            10.0,
            [("b", DropReason.POOL_CAP)],  # least recently used first, only as many as it takes
        ),
        (
            [cache("a", bytes=60, last_used_at=2.0), cache("b", bytes=60, last_used_at=1.0)],
            Rules(7 * DAY, pool_caps={"p": 0}, tenant_caps={}),
            10.0,
            [("b", DropReason.POOL_CAP), ("a", DropReason.POOL_CAP)],
        ),
        (
            [cache("a", bytes=60, tenant="u"), cache("b", bytes=60, tenant="t")],
            Rules(7 * DAY, pool_caps={}, tenant_caps={"t": 50}),
            10.0,
            [("b", DropReason.TENANT_CAP)],  # only the tenant over its cap
        ),
        (
            [cache("a", bytes=60, last_used_at=0.0), cache("b", bytes=60, last_used_at=5.0)],
            Rules(7 * DAY, pool_caps={"p": 100}, tenant_caps={}),
            7 * DAY,
            [("a", DropReason.MAX_AGE)],  # one reason each; what max_age dropped counts for the cap
        ),
        (
            [cache("a", bytes=60, last_used_at=1.0), cache("b", bytes=60, last_used_at=2.0)],
            Rules(7 * DAY, pool_caps={"p": 100}, tenant_caps={"t": 100}),
            10.0,
            [("a", DropReason.TENANT_CAP)],  # the tenant's cap first; then the pool is within its own
        ),
    ],
)
def test_drops(caches, rules, now, expected):
    assert [(d.cache_id, d.reason) for d in drops(caches, rules, now)] == expected


def test_pressure_drops_free_caches_before_any_eviction():
    caches = [cache("c1", bytes=30, last_used_at=2.0), cache("c2", bytes=30, last_used_at=1.0)]
    leases = [lease("l1", used=100, active_at=0.0)]
    # 50 bytes short: both caches (60 bytes) make it up, the lease stays.
    decision = decide(leases, {"p": pool(free=50, reserve=100)}, now=10.0, caches=caches)
    assert [(d.cache_id, d.reason) for d in decision.drops] == [
        ("c2", DropReason.PRESSURE),
        ("c1", DropReason.PRESSURE),
    ]
    assert decision.endings == []
    # 100 bytes short: the caches go first, and only then the lease.
    decision = decide(leases, {"p": pool(free=0, reserve=100)}, now=10.0, caches=caches)
    assert {d.cache_id for d in decision.drops} == {"c1", "c2"}
    assert [e.lease_id for e in decision.endings] == ["l1"]


def test_pressure_counts_what_other_drops_free_and_leaves_unserved_pools_alone():
    old = cache("old", bytes=80, last_used_at=0.0)
    fresh = cache("fresh", bytes=80, last_used_at=7 * DAY)
    decision = decide([], {"p": pool(free=50, reserve=100)}, now=7 * DAY, caches=[old, fresh], rules=NO_CAPS)
    assert [(d.cache_id, d.reason) for d in decision.drops] == [("old", DropReason.MAX_AGE)]
    gone = pool(state=PoolState.UNAVAILABLE, free=0, reserve=100)
    assert decide([], {"p": gone}, now=30 * DAY, caches=[old], rules=NO_CAPS).drops == []
