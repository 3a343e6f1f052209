"""A record's answer and its published model both come from the record's fields (``schema``): a
field added to a record is in both, in the record's order, and a hidden one is in neither."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest
from records import every_field_cache, every_field_lease

from scratchd.api import models
from scratchd.caches import Cache, CacheUse
from scratchd.leases import Lease, Usage
from scratchd.store import Event

# What the API never shows: a decision per field, made here on purpose.
HIDDEN = {
    Lease: {"gid", "pid_start_time"},
    CacheUse: {"fallback"},
    Usage: set(),
    Cache: {"inode"},
    Event: set(),
}
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
EVENT = Event(7, 1.5, "lease_ended", "l1", "p", "t", "released", {"n": 1})


def shown(record: type) -> list[str]:
    return [field.name for field in dataclasses.fields(record) if field.name not in HIDDEN[record]]


def properties(model: type[Any], name: str) -> list[str]:
    schema = model.model_json_schema()
    found = schema if name == model.__name__ else schema["$defs"][name]
    return list(found["properties"])


@pytest.mark.parametrize(
    ("record", "answer", "model"),
    [
        (every_field_lease(), models.lease_json, models.LeaseOut),
        (every_field_cache(), models.cache_json, models.CacheOut),
        (EVENT, models.event_json, models.EventOut),
    ],
    ids=["lease", "cache", "event"],
)
def test_an_answer_and_its_model_are_the_records_shown_fields_in_order(record, answer, model):
    built = answer(record)
    assert list(built) == shown(type(record)) == properties(model, model.__name__)
    model.model_validate(built, strict=True)  # every type as published


def test_a_nested_record_answers_its_shown_fields_too():
    built = models.lease_json(every_field_lease())
    assert list(built["usage"]) == shown(Usage) == properties(models.LeaseOut, "UsageOut")
    assert list(built["cache"]) == shown(CacheUse) == properties(models.LeaseOut, "CacheUseOut")
    assert models.lease_json(dataclasses.replace(every_field_lease(), cache=None))["cache"] is None


def test_times_are_rfc_3339_and_enums_their_values():
    built = models.lease_json(every_field_lease())
    times = [built[n] for n in ("created_at", "expires_at", "ended_at", "last_activity_at")]
    times += [built["usage"]["measured_at"], built["cache"]["kept_at"]]
    assert all(TIME.fullmatch(value) for value in times), times
    assert (built["state"], built["end_reason"], built["link_mode"], built["cache"]["hit"]) == (
        "ended",
        "released",
        "clone",
        "fallback",
    )
    assert all(type(built[n]) is str for n in ("state", "end_reason", "link_mode"))
    assert models.event_json(EVENT)["at"] == "1970-01-01T00:00:01.500Z"
