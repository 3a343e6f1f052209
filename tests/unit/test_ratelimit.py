"""The per-tenant token bucket: burst, refill, the wait it reports, bounded memory."""

from __future__ import annotations

import pytest
from fastapi import FastAPI

from scratchd.api.app import _create_rate
from scratchd.config import parse_config
from scratchd.ratelimit import CREATE_BURST, CREATE_RATE, RateLimiter
from scratchd.tenant import DEFAULT_MAX_LEASES_PER_TENANT


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_burst_then_refused_with_the_wait_until_the_next_token(clock):
    limiter = RateLimiter(burst=3, rate=2.0, clock=clock)
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a") == pytest.approx(0.5)
    clock.now += 0.25
    assert limiter.take("a") == pytest.approx(0.25)  # refusals spend nothing
    clock.now += 0.25
    assert limiter.take("a") == 0.0
    assert limiter.take("a") == pytest.approx(0.5)


def test_refill_is_capped_at_the_burst(clock):
    limiter = RateLimiter(burst=2, rate=10.0, clock=clock)
    limiter.take("a")
    clock.now += 3600
    assert [limiter.take("a") for _ in range(3)][-1] > 0


def test_sustained_rate(clock):
    limiter = RateLimiter(burst=5, rate=100.0, clock=clock)
    granted = 0
    for _ in range(10_000):  # 10 s of one request per millisecond
        clock.now += 0.001
        granted += limiter.take("a") == 0.0
    assert 1000 <= granted <= 1000 + 5


def test_keys_are_independent(clock):
    limiter = RateLimiter(burst=1, rate=1.0, clock=clock)
    assert limiter.take("a") == 0.0
    assert limiter.take("a") > 0
    assert limiter.take("b") == 0.0


def test_memory_holds_only_recently_seen_keys(clock):
    limiter = RateLimiter(burst=10, rate=10.0, clock=clock)  # refills in 1 s
    for i in range(1000):
        limiter.take(f"k{i}")
    assert len(limiter) == 1000
    clock.now += 0.5
    limiter.take("late")
    assert len(limiter) == 1001
    clock.now += 0.6  # the first thousand have refilled; "late" has not
    limiter.take("x")
    assert len(limiter) == 2
    for step in range(10_000):  # a steady trickle of new keys: memory stays at about rate x window
        clock.now += 0.01
        limiter.take(f"n{step}")
        assert len(limiter) <= 101


def test_a_forgotten_bucket_was_full(clock):
    limiter = RateLimiter(burst=2, rate=1.0, clock=clock)
    limiter.take("a")
    limiter.take("a")
    clock.now += 2.0
    limiter.take("b")  # forgets "a", which has refilled
    assert len(limiter) == 1
    assert [limiter.take("a") for _ in range(2)] == [0.0, 0.0]
    assert limiter.take("a") > 0


def test_a_clock_going_back_grants_nothing(clock):
    limiter = RateLimiter(burst=1, rate=1.0, clock=clock)
    limiter.take("a")
    clock.now -= 100
    assert limiter.take("a") > 0


@pytest.mark.parametrize("burst, rate", [(0, 1.0), (1, 0.0), (1, -1.0)])
def test_nonsense_limits_are_refused(burst, rate):
    with pytest.raises(ValueError):
        RateLimiter(burst, rate)


def test_a_tenant_may_claim_its_whole_default_allowance_at_once():
    assert CREATE_BURST >= DEFAULT_MAX_LEASES_PER_TENANT


def test_the_app_takes_the_configured_rate_and_a_reload_keeps_the_buckets_unless_it_changes():
    app = FastAPI()
    _create_rate(app, parse_config({}))
    first = app.state.create_rate
    assert (first.burst, first.rate) == (CREATE_BURST, CREATE_RATE)
    _create_rate(app, parse_config({}))
    assert app.state.create_rate is first  # a SIGHUP that leaves the rate alone grants no fresh burst
    _create_rate(app, parse_config({"limits": {"create_rate": 5}}))
    assert (app.state.create_rate.burst, app.state.create_rate.rate) == (CREATE_BURST, 5.0)
