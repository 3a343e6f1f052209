"""ActiveLeases keeps running totals by pool and tenant: they must always equal a recount."""

import heapq

from hypothesis import given, settings
from hypothesis import strategies as st
from records import a_lease

from scratchd.leases import ActiveLeases, EndReason, Lease, Totals, Usage, end, renew


def lease(i: int, pool: str, tenant: str, expected: int | None) -> Lease:
    return a_lease(
        f"l{i}", pool, tenant=tenant, created_at=1.0, expires_at=2.0, ttl_seconds=1, expected_bytes=expected
    )


def recount(leases: list[Lease], key: str) -> dict[str, Totals]:
    totals: dict[str, Totals] = {}
    for one in leases:
        total = totals.setdefault(getattr(one, key), Totals())
        total.active_leases += 1
        total.bytes += one.usage.bytes
        total.reserved_bytes += one.reserved_bytes
    return totals


operations = st.lists(
    st.tuples(
        st.sampled_from(["put", "remove", "measure", "renew", "measure_gone"]),
        st.integers(0, 7),  # which lease
        st.sampled_from(["a", "b"]),  # its pool
        st.sampled_from(["t1", "t2", "t3"]),  # its tenant
        st.one_of(st.none(), st.integers(1, 5000)),  # expected_bytes
        st.integers(0, 8000),  # a measured size
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(operations)
def test_totals_equal_a_recount_after_any_sequence_of_changes(steps):
    active = ActiveLeases([])
    for op, i, pool, tenant, expected, size in steps:
        current = active.get(f"l{i}")
        if op == "put" and current is None:
            active.put(lease(i, pool, tenant, expected))
        elif op == "remove":
            active.remove(f"l{i}")
        elif op == "measure" and current is not None:
            active.set_usage(current, Usage(bytes=size, files=1, measured_at=3.0))
        elif op == "renew" and current is not None:
            active.put(renew(current, 60, 3.0))  # a new object for the same id
        elif op == "measure_gone":  # a scan that lands after its lease ended counts nowhere
            gone = end(lease(i, pool, tenant, expected), EndReason.RELEASED, 3.0)
            active.set_usage(gone, Usage(bytes=size, files=1, measured_at=3.0))
        leases = list(active.values())
        assert active.pool_totals == recount(leases, "pool")
        assert active.tenant_totals == recount(leases, "tenant")


def test_largest_are_by_measured_bytes_and_may_be_one_tenants():
    active = ActiveLeases([lease(i, "a", f"t{i % 2}", None) for i in range(20)])
    for one in list(active.values()):
        active.set_usage(one, Usage(bytes=int(one.id[1:]) * 10, files=1, measured_at=1.0))
    assert [one.id for one in active.largest(3)] == ["l19", "l18", "l17"]
    assert [one.id for one in active.largest(2, "t0")] == ["l18", "l16"]
    everyone = heapq.nlargest(20, active.values(), key=lambda one: one.usage.bytes)
    assert active.largest(50) == everyone
