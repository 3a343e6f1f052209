"""Reclaim decisions: signals -> thresholds -> ranking, all pure."""

import pytest
from records import a_lease, a_pool

from scratchd.leases import EndReason, Lease, Usage
from scratchd.pools import REASON_STATES, PoolReason, PoolState, PoolStatus
from scratchd.reclaim.policy import Ending, decide, evictions, lease_ending


def lease(id="l", pool="p", created=0.0, expires=1000.0, **kw) -> Lease:
    return a_lease(id, pool, created_at=created, expires_at=expires, **kw)


def pool(name="p", state=PoolState.OK, free=100, reserve=0, reason=None) -> PoolStatus:
    message = None if reason is None else f"{name} is {reason}"
    return a_pool(
        name,
        state=state,
        capacity_bytes=1000,
        free_bytes=free,
        reserve_bytes=reserve,
        reason=reason,
        message=message,
    )


def due(lease: Lease, pool: PoolStatus | None, now: float) -> Ending:
    """The ending due now, which the test expects there to be."""
    ending = lease_ending(lease, pool, now)
    assert ending is not None
    return ending


def test_nothing_due():
    assert lease_ending(lease(), pool(), now=10) is None


def test_expired_at_exactly_expiry():
    assert due(lease(expires=10), pool(), now=10).reason is EndReason.EXPIRED
    assert lease_ending(lease(expires=10), pool(), now=9.99) is None


def test_idle_counts_from_last_activity_or_creation():
    assert due(lease(idle_timeout_seconds=5), pool(), now=5).reason is EndReason.IDLE
    assert lease_ending(lease(idle_timeout_seconds=5, last_activity_at=3), pool(), now=7) is None
    assert due(lease(idle_timeout_seconds=5, last_activity_at=3), pool(), now=8).reason is EndReason.IDLE


def test_over_quota_only_above_the_limit():
    at_limit = lease(max_bytes=100, usage=Usage(bytes=100, files=1, measured_at=1))
    over = lease(max_bytes=100, usage=Usage(bytes=101, files=1, measured_at=1))
    assert lease_ending(at_limit, pool(), now=1) is None
    ending = due(over, pool(), now=1)
    assert ending.reason is EndReason.OVER_QUOTA and ending.details == {"bytes": 101, "max_bytes": 100}


@pytest.mark.parametrize(
    "reason",
    [
        r
        for r, state in REASON_STATES.items()
        if state is PoolState.UNAVAILABLE and r is not PoolReason.LOCKED
    ],
)
def test_pool_lost_wins(reason):
    ending = due(lease(expires=0), pool(state=PoolState.UNAVAILABLE, reason=reason), now=10)
    assert ending.reason is EndReason.POOL_LOST
    assert ending.details == {"pool_reason": reason, "pool_message": f"p is {reason}"}


def test_leases_of_a_pool_another_daemon_holds_wait_as_they_are():
    locked = pool(state=PoolState.UNAVAILABLE, reason=PoolReason.LOCKED)
    assert lease_ending(lease(expires=0), locked, now=10) is None  # not lost, and not ours to expire now
    assert lease_ending(lease(idle_timeout_seconds=1), locked, now=10) is None
    assert decide([lease(expires=0, evictable=True)], {"p": locked}, now=10).endings == []


def test_dropped_pool_lives_on():
    assert lease_ending(lease(), None, now=10) is None
    assert lease_ending(lease(), pool(state=PoolState.FULL), now=10) is None
    assert lease_ending(lease(), pool(state=PoolState.READ_ONLY), now=10) is None


def test_eviction_least_recently_active_first_and_only_as_many_as_needed():
    leases = [
        lease("old", evictable=True, last_activity_at=1, usage=Usage(30, 1, 1)),
        lease("mid", evictable=True, last_activity_at=2, usage=Usage(30, 1, 1)),
        lease("new", evictable=True, last_activity_at=3, usage=Usage(30, 1, 1)),
        lease("pinned", evictable=False, last_activity_at=0, usage=Usage(500, 1, 1)),
        lease("elsewhere", pool="q", evictable=True, last_activity_at=0, usage=Usage(500, 1, 1)),
    ]
    chosen = evictions(pool(free=50, reserve=100), leases)
    assert [e.lease_id for e in chosen] == ["old", "mid"]
    assert all(e.reason is EndReason.EVICTED for e in chosen)


def test_no_eviction_above_reserve_or_without_evictable_leases():
    assert evictions(pool(free=100, reserve=100), [lease(evictable=True)]) == []
    assert evictions(pool(free=0, reserve=100), [lease(evictable=False)]) == []
    assert evictions(pool(free=0, reserve=100, state=PoolState.UNAVAILABLE), [lease(evictable=True)]) == []


def test_eviction_takes_all_evictable_if_still_short():
    leases = [lease(f"l{i}", evictable=True, last_activity_at=i, usage=Usage(1, 1, 1)) for i in range(3)]
    assert len(evictions(pool(free=0, reserve=100), leases)) == 3


def test_bytes_still_in_the_trash_count_as_freed():
    leases = [lease(f"l{i}", evictable=True, last_activity_at=i, usage=Usage(60, 1, 1)) for i in range(3)]
    pools = {"p": pool(free=0, reserve=100)}
    assert [e.lease_id for e in decide(leases, pools, now=10).endings] == ["l0", "l1"]
    assert [e.lease_id for e in decide(leases, pools, now=10, reclaiming={"p": 60}).endings] == ["l0"]
    assert decide(leases, pools, now=10, reclaiming={"p": 100}).endings == []
    assert len(decide(leases, pools, now=10, reclaiming={"elsewhere": 100}).endings) == 2


def test_decide_gives_one_reason_per_lease_and_counts_freed_bytes():
    leases = [
        lease("expired", expires=5, evictable=True, usage=Usage(60, 1, 1)),
        lease("a", evictable=True, last_activity_at=1, usage=Usage(60, 1, 1)),
        lease("b", evictable=True, last_activity_at=2, usage=Usage(60, 1, 1)),
    ]
    endings = decide(leases, {"p": pool(free=0, reserve=100)}, now=10).endings
    assert [(e.lease_id, e.reason) for e in endings] == [
        ("expired", EndReason.EXPIRED),
        ("a", EndReason.EVICTED),
    ]


def test_orphans_are_due_only_after_grace_from_first_sighting():
    from scratchd.reclaim.policy import review_orphans

    first = review_orphans(["a", "leased", "b"], {"leased"}, {}, now=100, grace=60)
    assert first.first_seen == {"a": 100, "b": 100} and first.due == [] and first.cleared == []
    later = review_orphans(["a", "leased", "b"], {"leased"}, {"a": 100, "b": 130}, now=160, grace=60)
    assert later.first_seen == {} and later.due == ["a"]
    gone = review_orphans(["leased"], {"leased"}, {"a": 100, "leased": 50}, now=500, grace=60)
    assert gone.due == [] and gone.cleared == ["a", "leased"]
