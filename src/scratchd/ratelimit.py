"""Rate limits: a token bucket per key, so one tenant's runaway loop cannot starve the others.

Pure: the clock is passed in and nothing else is touched. Memory stays bounded without
a sweeper: a bucket untouched for ``burst / rate`` seconds has refilled, and a full
bucket behaves exactly like no bucket, so it is forgotten. At most the keys seen in
the last ``burst / rate`` seconds are kept.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

# Lease creates per tenant (docs/security.md, "Limits against abuse", gives the measurements).
# The burst lets a tenant claim its whole default allowance of active leases at once;
# the sustained rate bounds the mkdir + commit + delete churn of a runaway loop.
CREATE_BURST = 1000
CREATE_RATE = 1000.0  # per second: the default of limits.create_rate, which the operator may change


class RateLimiter:
    """``burst`` takes at once per key, then ``rate`` per second."""

    def __init__(self, burst: int, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        if burst < 1 or rate <= 0:
            raise ValueError("a rate limit needs burst >= 1 and rate > 0")
        self.burst = burst
        self.rate = rate
        self._clock = clock
        self._refill_seconds = burst / rate
        # key -> (tokens left, when counted); least recently used first
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str) -> float:
        """Spend one token of ``key``'s bucket: 0.0 when granted, else the seconds until one is due."""
        now = self._clock()
        self._forget_full(now)
        tokens, counted = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - counted) * self.rate)
        if tokens >= 1:
            self._buckets[key] = (tokens - 1, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1 - tokens) / self.rate

    def __len__(self) -> int:
        """How many buckets are remembered (the memory bound)."""
        return len(self._buckets)

    def _forget_full(self, now: float) -> None:
        while self._buckets:
            key, (_, counted) = next(iter(self._buckets.items()))
            if now - counted < self._refill_seconds:
                return
            del self._buckets[key]
