"""The wire format (docs/api.md): request models that validate strictly, and the answers' JSON.

Answers are built as plain dicts by the ``*_json`` functions (cheap on the hot path);
the response models exist so ``/openapi.json`` documents them, and the schema tests
check the dicts against them. A record's answer and its model are both derived from the
record's dataclass (``schema``): its fields less the hidden ones, in its order, a time as
RFC 3339, an enum by value, a nested record nested.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable
from enum import Enum
from operator import attrgetter
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    create_model,
    field_validator,
)

from scratchd.caches import CACHE_KEY as _CACHE_KEY
from scratchd.caches import MAX_FALLBACKS, Cache
from scratchd.leases import Lease
from scratchd.schema import fields_of
from scratchd.store import Event

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

M = TypeVar("M", bound=BaseModel)


def _answer_model(record: type) -> Callable[[type[M]], type[M]]:
    """The decorated model with ``record``'s shown fields (``schema``): what ``/openapi.json``
    publishes of its answer. A nested record's model is ``<Record>Out``. A decorator on a
    declared class, not a bare ``create_model``, so the type checker sees a class it can
    use in annotations (``list[LeaseOut]``)."""

    def derive(model: type[M]) -> type[M]:
        return create_model(model.__name__, __base__=model, **_model_fields(record))

    return derive


@functools.cache
def _nested_model(record: type) -> type[BaseModel]:
    return create_model(f"{record.__name__}Out", **_model_fields(record))


def _model_fields(record: type) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for field in fields_of(record):
        if field.hidden:
            continue
        kind: Any = field.kind
        if field.time:
            kind = str
        elif field.nested:
            kind = _nested_model(kind)
        elif isinstance(kind, type) and issubclass(kind, Enum):
            kind = Literal[tuple(member.value for member in kind)]
        if field.optional:
            kind = kind | None
        found[field.name] = (kind, Field(description=field.description))
    return found


@_answer_model(Lease)
class LeaseOut(BaseModel):
    pass


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


@_answer_model(Cache)
class CacheOut(BaseModel):
    pass


class CacheList(BaseModel):
    caches: list[CacheOut]


@_answer_model(Event)
class EventOut(BaseModel):
    pass


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


def _answer(record: type) -> Callable[[Any], dict[str, Any]]:
    """A record's answer as a dict: its shown fields' values in one C call (``attrgetter``), then a
    Python step only for each field shown otherwise (a time, an enum, a nested record). A key set
    again keeps its place, so the answer's keys are in the record's order."""
    shown = [field for field in fields_of(record) if not field.hidden]
    names = tuple(field.name for field in shown)
    values = attrgetter(*names)
    converted: list[tuple[str, Callable[[Any], Any]]] = []
    for field in shown:
        if field.time:
            converted.append((field.name, timestamp))  # None stays None
        elif field.nested:
            nested = _answer(field.kind)
            converted.append((field.name, _or_none(nested) if field.optional else nested))
        elif isinstance(field.kind, type) and issubclass(field.kind, Enum):
            converted.append((field.name, _value_or_none if field.optional else _VALUE))

    def answer(item: Any) -> dict[str, Any]:
        built = dict(zip(names, values(item), strict=False))  # as many as names, by construction
        for name, convert in converted:
            built[name] = convert(built[name])
        return built

    return answer


_VALUE = attrgetter("value")


def _value_or_none(member: Enum | None) -> Any:
    return None if member is None else member.value


def _or_none(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def either(value: Any) -> Any:
        return None if value is None else convert(value)

    return either


lease_json = _answer(Lease)
cache_json = _answer(Cache)
event_json = _answer(Event)
