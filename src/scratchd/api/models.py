"""The wire format (docs/api.md): request models that validate strictly, and the answers' JSON.

Answers are built as plain dicts by the ``*_json`` functions (cheap on the hot path);
the response models exist so ``/openapi.json`` documents them, and the schema tests
check the dicts against them.
"""

from __future__ import annotations

import functools
import re
import time
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)

from scratchd.caches import CACHE_KEY as _CACHE_KEY
from scratchd.caches import MAX_FALLBACKS, Cache
from scratchd.leases import Lease

MAX_LABELS = 32
CACHE_KEY = f"^{_CACHE_KEY.pattern}$"
LABEL_KEY = re.compile(r"[a-z0-9][a-z0-9_./-]{0,62}")
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
MAX_PATH = 4096
TENANT_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}$"
# The largest integer a request carries (8 PiB as bytes): the largest a double holds exactly.
# JSON's numbers are doubles to many parsers and to JSON Schema tools: above this, values past
# the maximum compare equal to it, and a client could not tell its limit from the schema.
MAX_INTEGER = 2**53 - 1


def _absolute_path(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL bytes")
    if not value.startswith("/"):
        raise ValueError("must be an absolute path")
    return value


def _labels(value: dict[str, str]) -> dict[str, str]:
    if len(value) > MAX_LABELS:
        raise ValueError(f"at most {MAX_LABELS} labels")
    for key, text in value.items():
        if not LABEL_KEY.fullmatch(key):
            raise ValueError(f"label key {key[:80]!r} must match {LABEL_KEY.pattern}")
        if len(text) > 256:
            raise ValueError(f"label {key!r}: value longer than 256 characters")
        if _UNPRINTABLE.search(text):
            # They would reach admins' terminals through `scratchd ls` and the logs.
            raise ValueError(f"label {key!r}: value holds control characters or lone surrogates")
    return value


def _integral(value: object) -> object:
    """``88.0`` is an integer by JSON Schema, which the published schema speaks; ``88.5`` and ``"88"`` are not."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# Strict, as every request type is, but by JSON's numbers rather than Python's types. After
# the field's own constraints in ``Annotated``, or they drop out of the JSON Schema.
INTEGRAL = BeforeValidator(_integral)


# What the validators above check, published in the JSON Schema too, so that a request
# the schema allows is never refused for its form (the validators word the refusals).
_ABSOLUTE_PATH: dict[str, Any] = {"pattern": "^/[^\\x00]*$"}
_LABELS: dict[str, Any] = {
    "maxProperties": MAX_LABELS,
    "propertyNames": {"pattern": f"^{LABEL_KEY.pattern}$"},
    "additionalProperties": {"type": "string", "maxLength": 256, "pattern": "^[^\\x00-\\x1f\\x7f-\\x9f]*$"},
}


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class LeaseRequest(_Request):
    # Published, so that a request the schema allows is never refused for its form.
    model_config = ConfigDict(
        json_schema_extra={
            "dependentSchemas": {
                "cache_fallback": {"required": ["cache_key"], "properties": {"cache_key": {"type": "string"}}}
            }
        }
    )

    near: (
        Annotated[
            str,
            Field(min_length=1, max_length=MAX_PATH, json_schema_extra=_ABSOLUTE_PATH),
            AfterValidator(_absolute_path),
        ]
        | None
    ) = None
    pool: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    placement: Literal["prefer-same-filesystem", "same-filesystem", "any"] = "prefer-same-filesystem"
    ttl_seconds: Annotated[int, Field(ge=1), INTEGRAL] | None = None
    idle_timeout_seconds: Annotated[int, Field(ge=1, le=10 * 365 * 86400), INTEGRAL] | None = None
    pid: Annotated[int, Field(ge=1, le=2**22), INTEGRAL] | None = None
    max_bytes: Annotated[int, Field(ge=1, le=MAX_INTEGER), INTEGRAL] | None = None
    expected_bytes: Annotated[int, Field(ge=0, le=MAX_INTEGER), INTEGRAL] | None = None
    evictable: bool = False
    labels: Annotated[dict[str, str], AfterValidator(_labels)] = Field(
        default_factory=dict, json_schema_extra=_LABELS
    )
    tenant: Annotated[str, Field(pattern=TENANT_NAME)] | None = Field(
        default=None,
        description="Lease on behalf of this tenant (admins only: a broker such as the CSI plugin).",
    )
    cache_key: Annotated[str, Field(pattern=CACHE_KEY)] | None = Field(
        default=None,
        description="Start from this tenant's kept cache of this key, if any, and keep the directory "
        "under it when the lease is released (docs/caches.md).",
    )
    cache_fallback: Annotated[
        list[Annotated[str, Field(pattern=CACHE_KEY)]], Field(max_length=MAX_FALLBACKS)
    ] = Field(
        default_factory=list,
        description="On a miss of cache_key: the newest kept cache whose key starts with the first of "
        "these prefixes that any matches. Needs cache_key.",
    )

    @field_validator("cache_fallback")
    @classmethod
    def _fallback_needs_key(cls, value: list[str], info: ValidationInfo) -> list[str]:
        if value and info.data.get("cache_key") is None:
            raise ValueError("needs a cache_key to fall back from")
        return value


class RenewRequest(_Request):
    ttl_seconds: Annotated[int, Field(ge=1), INTEGRAL] | None = None


# -- answers -----------------------------------------------------------------------------


class UsageOut(BaseModel):
    bytes: int
    files: int
    measured_at: str | None


class CacheUseOut(BaseModel):
    key: str
    hit: Literal["exact", "fallback"] | None = Field(description="null: a miss, the lease started empty.")
    matched_key: str | None = Field(description="The key of the cache handed over.")
    cache_id: str | None = Field(description="The cache handed over.")
    kept_at: str | None = Field(description="When the cache handed over was kept.")
    kept_id: str | None = Field(description="Once released with keep: the kept cache's id.")


class LeaseOut(BaseModel):
    id: str
    path: str
    pool: str
    tenant: str
    uid: int
    state: Literal["active", "ended"]
    end_reason: str | None
    created_at: str
    expires_at: str
    ended_at: str | None
    ttl_seconds: int
    idle_timeout_seconds: int | None
    pid: int | None
    max_bytes: int | None
    expected_bytes: int | None
    evictable: bool
    labels: dict[str, str]
    same_filesystem: bool | None
    link_mode: Literal["hardlink", "clone", "copy"] | None
    mount_point: str | None
    last_activity_at: str | None
    usage: UsageOut
    cache: CacheUseOut | None = Field(description="null without a cache_key.")


class LeaseList(BaseModel):
    leases: list[LeaseOut]


class PoolOut(BaseModel):
    name: str
    path: str
    mount_point: str | None
    fstype: str | None
    device: str | None
    state: Literal["ok", "full", "read_only", "unavailable"]
    reason: (
        Literal["missing", "not_on_mount_point", "unmounted", "locked", "inaccessible", "read_only", "full"]
        | None
    ) = Field(description="Why the pool is not ok: a code; null when ok.")
    message: str | None = Field(description="The reason in one sentence for a person; null when ok.")
    capacity_bytes: int
    free_bytes: int
    reserve_bytes: int
    reserved_bytes: int
    leased_bytes: int
    active_leases: int
    labels: list[str]
    reflink: bool
    cache_entries: int = Field(description="Free kept caches in the pool.")
    cache_bytes: int = Field(description="Bytes of the free kept caches in the pool.")
    cache_max_bytes: int = Field(description="The pool's cache_max; 0: releases keep nothing here.")
    cache_hits_total: int = Field(
        description="Creates here that started warm (exact or fallback) since start."
    )
    cache_misses_total: int = Field(
        description="Creates here with a cache_key that started empty since start."
    )


class PoolList(BaseModel):
    pools: list[PoolOut]


class TenantUsage(BaseModel):
    tenant: str
    active_leases: int
    bytes: int
    reserved_bytes: int
    cache_bytes: int = Field(description="Bytes of the tenant's free kept caches.")


class CacheTotals(BaseModel):
    entries: int
    bytes: int
    hits_total: int = Field(description="Creates that got a kept cache (exact or fallback), since start.")
    misses_total: int
    dropped_total: int
    by_reason: dict[str, int] = Field(description="Caches dropped since start, by reason.")


class ReclaimStatus(BaseModel):
    pending: int
    pending_bytes: int
    reclaimed_total: int
    reclaimed_bytes_total: int
    by_reason: dict[str, int]


class UsageReport(BaseModel):
    generated_at: str
    pools: list[PoolOut]
    tenants: list[TenantUsage]
    largest_leases: list[LeaseOut]
    reclaim: ReclaimStatus
    caches: CacheTotals


class CacheOut(BaseModel):
    id: str
    key: str
    tenant: str
    pool: str
    state: Literal["free", "in_use"]
    lease_id: str | None = Field(description="The lease whose directory it is while in use.")
    bytes: int
    files: int
    kept_at: str
    last_used_at: str
    hits: int


class CacheList(BaseModel):
    caches: list[CacheOut]


class EventOut(BaseModel):
    seq: int
    at: str
    kind: str
    lease_id: str | None
    pool: str | None
    tenant: str | None
    reason: str | None
    details: dict[str, Any] | None


class EventList(BaseModel):
    events: list[EventOut]


class Status(BaseModel):
    status: str


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: dict[str, Any] | None


class ErrorBody(BaseModel):
    error: ErrorDetail


# -- building the answers ------------------------------------------------------------------


def timestamp(seconds: float | None) -> str | None:
    """RFC 3339, UTC, milliseconds, with ``Z`` (docs/api.md, "Answers"). Five of these are in every lease
    answer, mostly within the same second: the formatted second is cached."""
    if seconds is None:
        return None
    whole, millis = divmod(int(seconds * 1000), 1000)
    return _second(whole) + f".{millis:03d}Z"


@functools.lru_cache(maxsize=64)
def _second(whole: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))


def lease_json(lease: Lease) -> dict[str, Any]:
    return {
        "id": lease.id,
        "path": lease.path,
        "pool": lease.pool,
        "tenant": lease.tenant,
        "uid": lease.uid,
        "state": lease.state.value,
        "end_reason": lease.end_reason.value if lease.end_reason else None,
        "created_at": timestamp(lease.created_at),
        "expires_at": timestamp(lease.expires_at),
        "ended_at": timestamp(lease.ended_at),
        "ttl_seconds": lease.ttl_seconds,
        "idle_timeout_seconds": lease.idle_timeout_seconds,
        "pid": lease.pid,
        "max_bytes": lease.max_bytes,
        "expected_bytes": lease.expected_bytes,
        "evictable": lease.evictable,
        "labels": lease.labels,
        "same_filesystem": lease.same_filesystem,
        "link_mode": lease.link_mode.value if lease.link_mode else None,
        "mount_point": lease.mount_point,
        "last_activity_at": timestamp(lease.last_activity_at),
        "usage": {
            "bytes": lease.usage.bytes,
            "files": lease.usage.files,
            "measured_at": timestamp(lease.usage.measured_at),
        },
        "cache": None
        if lease.cache is None
        else {
            "key": lease.cache.key,
            "hit": lease.cache.hit.value if lease.cache.hit else None,
            "matched_key": lease.cache.matched_key,
            "cache_id": lease.cache.cache_id,
            "kept_at": timestamp(lease.cache.kept_at),
            "kept_id": lease.cache.kept_id,
        },
    }


def cache_json(cache: Cache) -> dict[str, Any]:
    return {
        "id": cache.id,
        "key": cache.key,
        "tenant": cache.tenant,
        "pool": cache.pool,
        "state": cache.state.value,
        "lease_id": cache.lease_id,
        "bytes": cache.bytes,
        "files": cache.files,
        "kept_at": timestamp(cache.kept_at),
        "last_used_at": timestamp(cache.last_used_at),
        "hits": cache.hits,
    }
