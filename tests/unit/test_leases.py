import re
import time
from typing import Any

import pytest
from records import a_lease

from scratchd.leases import EndReason, Lease, LeaseEnded, LeaseState, Usage, end, new_lease_id, renew


def make(**kw: Any) -> Lease:
    fields: dict[str, Any] = {"created_at": 100.0, "expires_at": 160.0, "ttl_seconds": 60} | kw
    return a_lease(fields.pop("id", "x"), **fields)


def test_ids_are_unguessable_and_well_formed():
    ids = {new_lease_id() for _ in range(2000)}
    assert len(ids) == 2000
    assert all(re.fullmatch(r"[0-9a-f]{33}", i) for i in ids)


def test_ids_sort_in_creation_order():
    """So that a group commit's new records share the primary-key index's last page."""
    created = [new_lease_id()[:13] for _ in range(1000)]  # the time part; the rest is random
    assert created == sorted(created)
    assert int(created[0], 16) <= time.time_ns() // 1000 < int(created[0], 16) + 60_000_000


def test_renew_moves_expiry_from_now():
    renewed = renew(make(), 300, now=150.0)
    assert renewed.expires_at == 450.0 and renewed.ttl_seconds == 300 and renewed.active


@pytest.mark.parametrize("reason", list(EndReason))
def test_end_is_final(reason):
    ended = end(make(), reason, now=120.0)
    assert ended.state is LeaseState.ENDED and ended.end_reason is reason and ended.ended_at == 120.0
    with pytest.raises(LeaseEnded):
        end(ended, EndReason.RELEASED, now=121.0)
    with pytest.raises(LeaseEnded):
        renew(ended, 60, now=121.0)


def test_reserved_bytes_shrink_as_usage_grows():
    lease = make(expected_bytes=1000)
    assert lease.reserved_bytes == 1000
    lease.usage = Usage(bytes=400, files=1, measured_at=1.0)
    assert lease.reserved_bytes == 600
    lease.usage = Usage(bytes=4000, files=1, measured_at=1.0)
    assert lease.reserved_bytes == 0
    assert end(make(expected_bytes=1000), EndReason.RELEASED, 1.0).reserved_bytes == 0
