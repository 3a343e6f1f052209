"""Prometheus metrics (docs/operations.md, "Metrics"): the daemon's state read at scrape time, and request timing.

Gauges are not updated as things change: a collector reads the daemon when Prometheus
asks, so a metric can never drift from what ``/v1/pools`` and ``/v1/usage`` answer.
Only lease starts and ends need memory (an ended lease leaves the active set), so they
are counted as they happen, by the manager (``leases.LeaseCounts``), from 0 in each process.
No label names a lease or a path a request chose: series stay bounded by the pools in
the config, by ``[metrics] tenants`` (the busiest tenants by active leases; the rest
are summed as ``tenant="other"``), by the reason codes and by the route templates.
"""

from __future__ import annotations

import platform
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from importlib import metadata
from typing import TypeVar

from prometheus_client import CollectorRegistry, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from scratchd.caches import DropReason
from scratchd.leases import EndReason
from scratchd.manager import LeaseManager
from scratchd.pools import REASON_STATES, PoolState
from scratchd.reclaim.trash import Trash

# Most answers take well under a millisecond; the top buckets catch a slow disk or SQLite.
REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER = "other"

# Pool JSON key (docs/api.md, "Answers") -> help; each becomes ``scratchd_pool_<key>{pool}``.
POOL_GAUGES = {
    "capacity_bytes": "Size of the filesystem the pool is on.",
    "free_bytes": "Free space on the pool's filesystem.",
    "reserve_bytes": "Free space the pool keeps back (config 'reserve'); below it, evictable leases go.",
    "reserved_bytes": "Space promised to active leases (expected_bytes) and not yet written.",
    "leased_bytes": "Allocated bytes measured in the pool's active leases.",
}

# Up is "this daemon serves the pool": a full or read-only pool is still mounted where it
# belongs and its leases still work, so it is up; the states say whether it takes new leases.
POOL_UP_HELP = (
    "1 when this daemon serves the pool (state ok, full or read_only); 0 when it is unavailable "
    "(its reason in scratchd_pool_state and /v1/pools)."
)
# Every (state, reason) a pool can be in: each pool has one series per pair, 1 for the
# one it is in, so a change is a value that moves, never a series that appears.
POOL_STATES = [
    (PoolState.OK.value, ""),
    *((state.value, reason.value) for reason, state in REASON_STATES.items()),
]
POOL_STATE_HELP = (
    '1 for the state and reason the pool is in, 0 for the others; reason is "" when the state is ok '
    "(missing, not_on_mount_point, unmounted, locked, inaccessible, read_only or full otherwise)."
)
POOL_INFO_HELP = (
    "The pool as configured and found: its path, mount, filesystem type and labels (comma-joined)."
)


def _version() -> str:
    try:
        return metadata.version("scratchd")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


BUILD = (_version(), platform.python_version())  # read once: a scrape does no disk work


def top_tenants(active: Mapping[tuple[str, str], int], keep: int) -> Counter[tuple[str, str]]:
    """``(pool, tenant) -> leases`` with only the ``keep`` tenants holding the most leases named.

    The others are summed per pool as ``other`` (ties go by name, so the same tenants
    keep their series from one scrape to the next).
    """
    totals: Counter[str] = Counter()
    for (_, tenant), count in active.items():
        totals[tenant] += count
    named = set(sorted(totals, key=lambda tenant: (-totals[tenant], tenant))[:keep])
    bounded: Counter[tuple[str, str]] = Counter()
    for (pool, tenant), count in active.items():
        bounded[pool, tenant if tenant in named else OTHER] += count
    return bounded


class StateCollector(Collector):
    """Reads pools, leases, caches and the trash at scrape time; runs on the event loop like the routes.

    ``tenants`` is ``[metrics] tenants`` as configured now (a reload changes it).
    """

    def __init__(self, manager: LeaseManager, trash: Trash, tenants: Callable[[], int]) -> None:
        self._manager = manager
        self._trash = trash
        self._tenants = tenants

    def collect(self) -> Iterator[Metric]:
        manager = self._manager
        counts = manager.counts
        pools = manager.pool_rows()
        names = sorted({p["name"] for p in pools} | set(counts.created) | {p for p, _ in counts.ended})
        for key, text in POOL_GAUGES.items():
            yield _family(
                GaugeMetricFamily(f"scratchd_pool_{key}", text, labels=["pool"]),
                {(p["name"],): p[key] for p in pools},
            )
        yield _family(
            GaugeMetricFamily("scratchd_pool_up", POOL_UP_HELP, labels=["pool"]),
            {(p["name"],): int(p["state"] != "unavailable") for p in pools},
        )
        yield _family(
            GaugeMetricFamily("scratchd_pool_state", POOL_STATE_HELP, labels=["pool", "state", "reason"]),
            {
                (p["name"], state, reason): int((p["state"], p["reason"] or "") == (state, reason))
                for p in pools
                for state, reason in POOL_STATES
            },
        )
        yield _family(
            GaugeMetricFamily(
                "scratchd_pool_info",
                POOL_INFO_HELP,
                labels=["pool", "path", "mount_point", "fstype", "labels"],
            ),
            {
                (p["name"], p["path"], p["mount_point"] or "", p["fstype"] or "", ",".join(p["labels"])): 1
                for p in pools
            },
        )

        active = Counter((lease.pool, lease.tenant) for lease in manager.active.values())
        yield _family(
            GaugeMetricFamily(
                "scratchd_leases_active",
                'Active leases; beyond the [metrics] tenants busiest, tenant="other".',
                labels=["pool", "tenant"],
            ),
            top_tenants(active, self._tenants()),
        )
        yield _family(
            CounterMetricFamily(
                "scratchd_leases_created", "Leases started since the daemon started.", labels=["pool"]
            ),
            {(pool,): counts.created[pool] for pool in names},
        )
        # Every (pool, reason) from 0, so rate() sees an end's first occurrence.
        ended = {
            (pool, reason.value): counts.ended[pool, reason.value] for pool in names for reason in EndReason
        }
        yield _family(
            CounterMetricFamily(
                "scratchd_leases_ended", "Leases ended since the daemon started.", labels=["pool", "reason"]
            ),
            ended,
        )

        yield _family(
            CounterMetricFamily(
                "scratchd_cache_requests",
                "Creates with a cache_key since the daemon started, by result: hit, fallback or miss.",
                labels=["pool", "result"],
            ),
            {
                (pool, result): manager.cache_requests[pool, result]
                for pool in names
                for result in ("hit", "fallback", "miss")
            },
        )
        kept = manager.kept_totals("pool")
        yield _family(
            GaugeMetricFamily("scratchd_cache_entries", "Free kept caches in the pool.", labels=["pool"]),
            {(pool,): kept.get(pool, (0, 0))[0] for pool in names},
        )
        yield _family(
            GaugeMetricFamily(
                "scratchd_cache_bytes", "Bytes of the free kept caches in the pool.", labels=["pool"]
            ),
            {(pool,): kept.get(pool, (0, 0))[1] for pool in names},
        )
        yield _family(
            CounterMetricFamily(
                "scratchd_cache_dropped",
                "Kept caches dropped since the daemon started, by reason.",
                labels=["pool", "reason"],
            ),
            {
                (pool, reason.value): manager.cache_dropped[pool, reason.value]
                for pool in names
                for reason in DropReason
            },
        )

        trash = self._trash
        yield GaugeMetricFamily(
            "scratchd_reclaim_pending", "Ended leases' trees waiting to be deleted.", value=trash.pending
        )
        yield GaugeMetricFamily(
            "scratchd_reclaim_pending_bytes",
            "Estimated bytes waiting to be deleted.",
            value=trash.pending_bytes,
        )
        yield CounterMetricFamily(
            "scratchd_reclaimed",
            "Trees deleted completely since the daemon started.",
            value=trash.reclaimed_total,
        )
        yield CounterMetricFamily(
            "scratchd_reclaimed_bytes",
            "Bytes freed by deletion since the daemon started.",
            value=trash.reclaimed_bytes_total,
        )
        failed = trash.failed_by_pool
        yield _family(
            CounterMetricFamily(
                "scratchd_reclaim_failed",
                "Deletions of a tree that failed (each retry counts) since the daemon started.",
                labels=["pool"],
            ),
            {(pool,): failed.get(pool, 0) for pool in sorted(set(names) | set(failed))},
        )
        yield _family(
            GaugeMetricFamily(
                "scratchd_build_info", "The running scratchd: always 1.", labels=["version", "python"]
            ),
            {BUILD: 1},
        )


_Labels = TypeVar("_Labels", bound=tuple[str, ...])  # one family's label values, in its labels' order


def _family(family: GaugeMetricFamily | CounterMetricFamily, samples: Mapping[_Labels, int]) -> Metric:
    for labels, value in samples.items():
        family.add_metric(list(labels), value)
    return family


class Metrics:
    """One app's metrics in a registry of its own, so two apps in one process never mix."""

    def __init__(self, manager: LeaseManager, trash: Trash, tenants: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(StateCollector(manager, trash, tenants))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.request_duration = Histogram(
            "scratchd_request_duration_seconds",
            "Time to answer an HTTP request, by route template.",
            ["route", "method", "status"],
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )


def attach(app: Starlette, manager: LeaseManager, trash: Trash, tenants: Callable[[], int]) -> Metrics:
    """Give ``app`` its metrics as ``app.state.metrics`` (read by ``/metrics``) and return them."""
    app.state.metrics = Metrics(manager, trash, tenants)
    return app.state.metrics


class RequestTimer:
    """Times every HTTP request into ``scratchd_request_duration_seconds``.

    Pure ASGI (not ``BaseHTTPMiddleware``, which adds a task and a stream per request):
    it is on every request's path. The route is the matched template (the router puts
    it in the scope), so ``/v1/leases/abc`` counts as ``/v1/leases/{lease_id}``; no
    match is ``other``. Histogram children are cached: ``labels()`` takes a lock.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self._histogram = metrics.request_duration
        self._children: dict[tuple[str, str, int], Histogram] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the server answers if the app raises before starting a response

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_with_status)
        finally:
            self.observe(scope, status, time.perf_counter() - start)

    def observe(self, scope: Scope, status: int, seconds: float) -> None:
        """Count one answered request: for layers in front of this one (``api.hotpath``)."""
        self._child(scope, status).observe(seconds)

    def _child(self, scope: Scope, status: int) -> Histogram:
        route = getattr(scope.get("route"), "path", OTHER)
        method = scope["method"] if scope["method"] in METHODS else OTHER
        key = (route, method, status)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._histogram.labels(route, method, str(status))
        return child
