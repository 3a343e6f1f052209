"""HTTP routes (docs/api.md). Thin: authorise, translate, call the manager, shape the answer."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, Query, Request
from fastapi.routing import APIRoute
from pydantic_core import to_json
from starlette.responses import Response

from scratchd.api import models
from scratchd.api.identity import PEER_KEY, Caller, Role, authenticate
from scratchd.caches import Cache
from scratchd.errors import Refused
from scratchd.leases import Lease, Totals
from scratchd.manager import CacheFilter, LeaseFilter, LeaseManager, LeaseSpec
from scratchd.placement import Placement
from scratchd.ratelimit import RateLimiter
from scratchd.reclaim.procs import pid_in_daemon_namespace
from scratchd.reclaim.trash import Trash
from scratchd.store import Store
from scratchd.tenant import Tenant

LARGEST_LEASES = 10  # in /v1/usage

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": models.ErrorBody, "description": text}
    for status, text in {
        400: "invalid_request (a body that cannot be parsed at all)",
        401: "unauthenticated",
        403: "forbidden",
        404: "lease_not_found / pool_not_found / cache_not_found / not_found",
        409: "lease_ended / no_pool_on_filesystem / cache_in_use",
        413: "request_too_large",
        422: "invalid_request",
        429: "quota_exceeded",
        503: "pool_unavailable",
        507: "insufficient_storage",
    }.items()
}
LEASE_ID = re.compile(r"^[a-z0-9-]{1,64}$")


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        keys = [key for key, _ in pairs]
        duplicate = next(key for key in keys if keys.count(key) > 1)
        raise json.JSONDecodeError(f"duplicate key {duplicate[:80]!r}", "", 0)
    return found


class _StrictJsonRequest(Request):
    """JSON bodies with a key twice are refused: which of the two counts is anybody's guess."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = json.loads(await self.body(), object_pairs_hook=unique_keys)
        return self._json


class _StrictJsonRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(_StrictJsonRequest(request.scope, request.receive))

        return strict


router = APIRouter(route_class=_StrictJsonRoute)


@dataclass(frozen=True, slots=True)
class Backend:
    """What the routes read and call, as ``app.state.backend``: the lease manager, the event
    log, the trash's counters, and whether the daemon is ready."""

    manager: LeaseManager
    events: Store
    trash: Trash
    ready: Callable[[], bool]


def _backend(request: Request) -> Backend:
    return request.app.state.backend


def _manager(request: Request) -> LeaseManager:
    return _backend(request).manager


async def reader(request: Request) -> Caller:
    """Any caller that may read: Unix peers, valid tokens, and anonymous viewers where allowed."""
    return authenticate(request, anonymous_ok=True)


async def writer(request: Request) -> Caller:
    """A caller that may change leases: tenants (their own) and admins."""
    caller = authenticate(request, anonymous_ok=False)
    if caller.role is Role.VIEWER:
        raise Refused(403, "forbidden", "A viewer may read but not change leases.")
    return caller


Reader = Annotated[Caller, Depends(reader)]
Writer = Annotated[Caller, Depends(writer)]


def _json(body: Any, status: int = 200) -> Response:
    return Response(to_json(body), status_code=status, media_type="application/json")


def _visible_lease(manager: LeaseManager, caller: Caller, lease_id: str) -> Lease:
    """The lease if this caller may see it; another tenant's lease is 404, so ids do not leak."""
    lease = manager.get(lease_id) if LEASE_ID.match(lease_id) else None
    if lease is None or not (caller.sees_all() or (caller.tenant and lease.tenant == caller.tenant.name)):
        raise Refused(404, "lease_not_found", f"No lease {lease_id[:80]!r}.", {"id": lease_id[:80]})
    return lease


# -- leases ---------------------------------------------------------------------------------


@router.post("/v1/leases", status_code=201, response_model=models.LeaseOut, responses=ERRORS, tags=["leases"])
async def create_lease(
    request: Request,
    caller: Writer,
    # None when no body is sent; not `| None`, which would let the schema accept a JSON null.
    body: Annotated[models.LeaseRequest, Body()] = None,  # type: ignore[assignment]
) -> Response:
    """Lease a new directory. Over the Unix socket it belongs to the caller's Unix user."""
    return _json(models.lease_json(await start_lease(request, caller, body or models.LeaseRequest())), 201)


async def start_lease(request: Request, caller: Caller, body: models.LeaseRequest) -> Lease:
    """``POST /v1/leases`` once the caller and the body are known (shared with ``api.hotpath``)."""
    tenant = _lease_holder(caller, body.tenant)
    limiter: RateLimiter = request.app.state.create_rate  # replaced when a reload changes the rate
    if wait := limiter.take(tenant.name):
        raise Refused(
            429,
            "quota_exceeded",
            f"Tenant {tenant.name} creates leases too fast; retry shortly.",
            {
                "limit": "create_rate",
                "burst": limiter.burst,
                "per_second": limiter.rate,
                "retry_after_seconds": wait,
            },
            {"Retry-After": str(math.ceil(wait))},
        )
    spec = LeaseSpec(
        near=body.near,
        pool=body.pool,
        placement=Placement(body.placement),
        ttl_seconds=body.ttl_seconds,
        idle_timeout_seconds=body.idle_timeout_seconds,
        pid=_bound_pid(request, body.pid),
        max_bytes=body.max_bytes,
        expected_bytes=body.expected_bytes,
        evictable=body.evictable,
        labels=body.labels,
        cache_key=body.cache_key,
        cache_fallback=tuple(body.cache_fallback),
    )
    return await _manager(request).create(tenant, spec)


def _lease_holder(caller: Caller, named: str | None) -> Tenant:
    """Whom the lease is for: the caller, or the tenant an admin names (a broker such as the CSI plugin).

    A named tenant may have no Unix user: its directory is owned by the admin's Unix ids
    (the daemon's, for a token), and the broker hands it on (docs/api.md, "On behalf of a tenant").
    """
    if named is not None:
        if caller.role is not Role.ADMIN:
            raise Refused(
                403, "forbidden", "Only an admin may lease on behalf of a tenant.", {"tenant": named}
            )
        if caller.tenant is None:
            return Tenant(name=named, uid=os.geteuid(), gid=os.getegid())
        return dataclasses.replace(caller.tenant, name=named)
    if caller.tenant is None:
        raise Refused(403, "forbidden", "Only a tenant can hold leases; use a tenant's socket or token.")
    return caller.tenant


def _bound_pid(request: Request, pid: int | None) -> int | None:
    """A pid as the daemon numbers it: a caller in a container sends its own namespace's pid."""
    peer = request.scope.get(PEER_KEY)
    if pid is None or peer is None:
        return pid
    translated = pid_in_daemon_namespace(pid, peer[0])
    if translated is None:
        raise Refused(
            422,
            "invalid_request",
            f"pid {pid} is not a live process.",
            {"fields": {"pid": "not a live process"}},
        )
    return translated


@router.get("/v1/leases", response_model=models.LeaseList, responses=ERRORS, tags=["leases"])
async def list_leases(
    request: Request,
    caller: Reader,
    state: Literal["active", "ended", "all"] = "active",
    pool: Annotated[str | None, Query(max_length=64)] = None,
    tenant: Annotated[str | None, Query(max_length=256)] = None,
    label: Annotated[str | None, Query(max_length=400, pattern=r"^[^=]+=.*$", description="k=v")] = None,
) -> Response:
    if not caller.sees_all():
        tenant = caller.name if tenant in (None, caller.name) else "\x00nobody"
    key_value = tuple(label.split("=", 1)) if label else None
    which = LeaseFilter(state=state, pool=pool, tenant=tenant, label=key_value)  # type: ignore[arg-type]
    leases = _manager(request).find(which)
    return _json({"leases": [models.lease_json(lease) for lease in leases]})


@router.get("/v1/leases/{lease_id}", response_model=models.LeaseOut, responses=ERRORS, tags=["leases"])
async def get_lease(request: Request, lease_id: str, caller: Reader) -> Response:
    """One lease. An ended lease stays readable, as ``state: ended`` with its ``end_reason``, for
    ``gc.history_retention``: a release does not make its lease vanish from the API."""
    return _json(models.lease_json(_visible_lease(_manager(request), caller, lease_id)))


@router.post("/v1/leases/{lease_id}/renew", response_model=models.LeaseOut, responses=ERRORS, tags=["leases"])
async def renew_lease(
    request: Request,
    lease_id: str,
    caller: Writer,
    # None when no body is sent; not `| None`, which would let the schema accept a JSON null.
    body: Annotated[models.RenewRequest, Body()] = None,  # type: ignore[assignment]
) -> Response:
    """Push the expiry to now + ttl_seconds (default: the lease's own TTL)."""
    manager = _manager(request)
    lease = _visible_lease(manager, caller, lease_id)
    # An admin renewing someone's lease is held to that tenant's limits, not its own.
    tenant = caller.tenant if caller.tenant and caller.tenant.name == lease.tenant else _owner(lease)
    renewed = await manager.renew(lease, body.ttl_seconds if body else None, tenant)
    return _json(models.lease_json(renewed))


@router.delete("/v1/leases/{lease_id}", response_model=models.LeaseOut, responses=ERRORS, tags=["leases"])
async def release_lease(
    request: Request,
    lease_id: str,
    caller: Writer,
    keep: Annotated[
        Literal["true", "false"] | None,
        Query(
            description="Keep the directory as a warm cache under the lease's cache_key (default: true "
            "when it has one; true on a lease without one is 422)."
        ),
    ] = None,
) -> Response:
    """End the lease as ``released``; its path is gone when this answers. Idempotent: on a lease
    that already ended, 200 with the lease as it is. The record stays readable afterwards."""
    kept = None if keep is None else keep == "true"
    return _json(models.lease_json(await end_lease(request, caller, lease_id, kept)))


async def end_lease(request: Request, caller: Caller, lease_id: str, keep: bool | None = None) -> Lease:
    """``DELETE /v1/leases/{lease_id}`` once the caller is known (shared with ``api.hotpath``)."""
    manager = _manager(request)
    lease = _visible_lease(manager, caller, lease_id)
    if keep and lease.cache is None:
        raise Refused(
            422,
            "invalid_request",
            f"keep: lease {lease.id} has no cache_key, so there is nothing to keep it under.",
            {"fields": {"keep": "the lease has no cache_key"}},
        )
    if lease.active:
        lease = await manager.release(lease, keep)
    return lease


def _owner(lease: Lease) -> Tenant:
    return Tenant(name=lease.tenant, uid=lease.uid, gid=lease.gid)


# -- pools, usage, events -----------------------------------------------------------------------


@router.get("/v1/pools", response_model=models.PoolList, responses=ERRORS, tags=["pools"])
async def list_pools(request: Request, caller: Reader) -> Response:
    return _json({"pools": _manager(request).pool_rows()})


@router.get("/v1/usage", response_model=models.UsageReport, responses=ERRORS, tags=["usage"])
async def usage(request: Request, caller: Reader) -> Response:
    """What is used, by whom, where: answered from what was already measured, never by scanning."""
    backend = _backend(request)
    manager = backend.manager
    active = manager.active
    only = None if caller.sees_all() else caller.name
    kept = manager.kept_totals("tenant")
    names = sorted(
        (active.tenant_totals.keys() | kept.keys())
        if only is None
        else {only} & (active.tenant_totals.keys() | kept.keys())
    )
    empty = Totals()
    trash = backend.trash
    requests = manager.cache_requests
    dropped = manager.cache_dropped
    mine = kept.values() if only is None else [kept.get(only, (0, 0))]
    return _json(
        {
            "generated_at": models.timestamp(time.time()),
            "pools": manager.pool_rows(),
            "tenants": [
                {
                    "tenant": name,
                    "active_leases": (t := active.tenant_totals.get(name, empty)).active_leases,
                    "bytes": t.bytes,
                    "reserved_bytes": t.reserved_bytes,
                    "cache_bytes": kept.get(name, (0, 0))[1],
                }
                for name in names
            ],
            "largest_leases": [models.lease_json(lease) for lease in active.largest(LARGEST_LEASES, only)],
            "reclaim": {
                "pending": trash.pending,
                "pending_bytes": trash.pending_bytes,
                "reclaimed_total": trash.reclaimed_total,
                "reclaimed_bytes_total": trash.reclaimed_bytes_total,
                "by_reason": _by_reason(manager.counts.ended),
            },
            "caches": {
                "entries": sum(entries for entries, _ in mine),
                "bytes": sum(size for _, size in mine),
                "hits_total": sum(n for (_, result), n in requests.items() if result != "miss"),
                "misses_total": sum(n for (_, result), n in requests.items() if result == "miss"),
                "dropped_total": sum(dropped.values()),
                "by_reason": _by_reason(dropped),
            },
        }
    )


def _by_reason(counts: Mapping[tuple[str, str], int]) -> dict[str, int]:
    """Counts kept by (pool, reason), summed over the pools."""
    total: Counter[str] = Counter()
    for (_, reason), count in counts.items():
        total[reason] += count
    return dict(total)


# -- kept caches ----------------------------------------------------------------------------------


def _visible_cache(manager: LeaseManager, caller: Caller, cache_id: str) -> Cache:
    """The cache if this caller may see it; another tenant's cache is 404, as a lease is."""
    cache = manager.caches.get(cache_id) if LEASE_ID.match(cache_id) else None
    if cache is None or not (caller.sees_all() or cache.tenant == caller.name):
        raise Refused(404, "cache_not_found", f"No cache {cache_id[:80]!r}.", {"id": cache_id[:80]})
    return cache


@router.get("/v1/caches", response_model=models.CacheList, responses=ERRORS, tags=["caches"])
async def list_caches(
    request: Request,
    caller: Reader,
    key: Annotated[str | None, Query(max_length=128)] = None,
    tenant: Annotated[str | None, Query(max_length=256)] = None,
    pool: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:
    """Kept caches, oldest first: a tenant's own; viewers and admins see all."""
    if not caller.sees_all():
        tenant = caller.name if tenant in (None, caller.name) else "\x00nobody"
    found = _manager(request).find_caches(CacheFilter(key=key, tenant=tenant, pool=pool))
    return _json({"caches": [models.cache_json(cache) for cache in found]})


@router.get("/v1/caches/{cache_id}", response_model=models.CacheOut, responses=ERRORS, tags=["caches"])
async def get_cache(request: Request, cache_id: str, caller: Reader) -> Response:
    return _json(models.cache_json(_visible_cache(_manager(request), caller, cache_id)))


@router.delete("/v1/caches/{cache_id}", response_model=models.CacheOut, responses=ERRORS, tags=["caches"])
async def remove_cache(request: Request, cache_id: str, caller: Writer) -> Response:
    """Drop a free kept cache (reason ``removed``); one in use is 409 ``cache_in_use``."""
    manager = _manager(request)
    return _json(models.cache_json(manager.remove_cache(_visible_cache(manager, caller, cache_id))))


@router.get("/v1/events", response_model=models.EventList, responses=ERRORS, tags=["events"])
async def events(
    request: Request,
    caller: Reader,
    since: Annotated[int, Query(ge=0, le=models.MAX_INTEGER, description="exclusive: the last seq seen")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    order: Annotated[
        Literal["asc", "desc"], Query(description="desc: newest first, so with limit the last N")
    ] = "asc",
    before: Annotated[
        int | None,
        Query(ge=1, le=models.MAX_INTEGER, description="exclusive: with order=desc, the oldest seq seen"),
    ] = None,
) -> Response:
    """The event log after ``since``: a follower polls with the last seq it saw.

    A tenant's page holds ``limit`` of its own events, however many others' came between.
    """
    found = _backend(request).events.events(
        since,
        limit,
        before=before,
        newest_first=order == "desc",
        tenant=None if caller.sees_all() else caller.name,
    )
    return _json({"events": [models.event_json(event) for event in found]})


# -- health ---------------------------------------------------------------------------------------


@router.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request, caller: Reader) -> Response:
    """The schema of every route: a read like any other, so TCP needs a token (or anonymous viewing)."""
    return _json(request.app.openapi())


@router.get("/healthz", response_model=models.Status, tags=["health"])
async def healthz() -> Response:
    return _json({"status": "ok"})


@router.get(
    "/readyz", response_model=models.Status, responses={503: {"model": models.Status}}, tags=["health"]
)
async def readyz(request: Request) -> Response:
    """Ready = state store open and at least one pool ``ok``."""
    ok = _backend(request).ready()
    return _json({"status": "ready" if ok else "not_ready"}, 200 if ok else 503)
