"""The lease API's logic, in process: the clock is the test's, so time-driven ends take no time."""

from __future__ import annotations

import os
from typing import Any

import pytest

from inprocess.harness import InProcess

pytestmark = pytest.mark.anyio


async def create(scratchd: InProcess, **body: Any) -> dict[str, Any]:
    async with scratchd.client() as client:
        response = await client.post("/v1/leases", json=body)
    assert response.status_code == 201, response.text
    return response.json()


async def get(scratchd: InProcess, lease_id: str, user: str | None = None) -> tuple[int, dict[str, Any]]:
    async with scratchd.client(user) as client:
        response = await client.get(f"/v1/leases/{lease_id}")
    return response.status_code, response.json()


async def test_create_release_cycle(scratchd: InProcess) -> None:
    lease = await create(scratchd, ttl_seconds=60, labels={"job": "1"})
    assert os.path.isdir(lease["path"]) and lease["path"].endswith(lease["id"])
    assert os.stat(lease["path"]).st_mode & 0o777 == 0o700
    assert lease["expires_at"] == "2027-01-15T08:01:00.000Z"  # the injected clock's time + 60 s
    async with scratchd.client() as client:
        released = await client.delete(f"/v1/leases/{lease['id']}")
        again = await client.delete(f"/v1/leases/{lease['id']}")
    assert released.status_code == 200 and released.json()["end_reason"] == "released"
    assert again.status_code == 200 and again.json() == released.json()  # idempotent
    assert not os.path.exists(lease["path"])


async def test_ttl_expiry_on_the_clock(scratchd: InProcess) -> None:
    lease = await create(scratchd, ttl_seconds=30)
    scratchd.clock.advance(29)
    scratchd.collect()
    assert (await get(scratchd, lease["id"]))[1]["state"] == "active"
    scratchd.clock.advance(2)
    scratchd.collect()
    status, ended = await get(scratchd, lease["id"])
    assert (status, ended["state"], ended["end_reason"]) == (200, "ended", "expired")
    assert not os.path.exists(lease["path"])


async def test_renew_moves_the_expiry(scratchd: InProcess) -> None:
    lease = await create(scratchd, ttl_seconds=30)
    scratchd.clock.advance(20)
    async with scratchd.client() as client:
        renewed = await client.post(f"/v1/leases/{lease['id']}/renew", json={"ttl_seconds": 30})
    assert renewed.status_code == 200
    scratchd.clock.advance(20)  # 40 s after creation, 20 s after the renewal
    scratchd.collect()
    assert (await get(scratchd, lease["id"]))[1]["state"] == "active"


async def test_idle_timeout_counts_from_the_last_activity(scratchd: InProcess) -> None:
    lease = await create(scratchd, ttl_seconds=3600, idle_timeout_seconds=60)
    scratchd.clock.advance(61)
    scratchd.collect()
    _, ended = await get(scratchd, lease["id"])
    assert (ended["state"], ended["end_reason"]) == ("ended", "idle")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"ttl_seconds": 0}, "ttl_seconds"),
        ({"ttl_seconds": "60"}, "ttl_seconds"),
        ({"near": "relative/path"}, "near"),
        ({"labels": {"Bad Key": "x"}}, "labels"),
        ({"unknown": 1}, "unknown"),
        ({"max_bytes": 2**53}, "max_bytes"),
    ],
)
async def test_bad_input_is_refused_in_the_envelope_and_changes_nothing(
    scratchd: InProcess, body: dict[str, Any], field: str
) -> None:
    async with scratchd.client() as client:
        response = await client.post("/v1/leases", json=body)
        listed = await client.get("/v1/leases", params={"state": "all"})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and field in error["details"]["fields"]
    assert listed.json()["leases"] == []
    assert [e for e in os.listdir(scratchd.daemon.config.pool[0].path) if not e.startswith(".")] == []


@pytest.fixture
def settings(settings: dict[str, Any]) -> dict[str, Any]:
    settings["tenant"] = [{"name": "nobody", "max_leases": 1}]
    return settings


async def test_max_leases_is_per_tenant(scratchd: InProcess) -> None:
    async with scratchd.client("nobody") as nobody:
        first = await nobody.post("/v1/leases", json={})
        second = await nobody.post("/v1/leases", json={})
    assert first.status_code == 201
    assert second.status_code == 429 and second.json()["error"]["code"] == "quota_exceeded"
    await create(scratchd)  # another tenant is not held to nobody's limit


async def test_a_tenant_sees_only_its_own_leases(scratchd: InProcess) -> None:
    mine = await create(scratchd)
    status, body = await get(scratchd, mine["id"], user="nobody")
    assert status == 404 and body["error"]["code"] == "lease_not_found"
    async with scratchd.client("nobody") as nobody:
        assert (await nobody.get("/v1/leases")).json()["leases"] == []
        refused = await nobody.delete(f"/v1/leases/{mine['id']}")
    assert refused.status_code == 404
    assert (await get(scratchd, mine["id"]))[1]["state"] == "active"


async def test_usage_and_pools_count_active_leases(scratchd: InProcess) -> None:
    await create(scratchd, expected_bytes=4096)
    async with scratchd.client() as client:
        pools = (await client.get("/v1/pools")).json()["pools"]
        usage = (await client.get("/v1/usage")).json()
    (pool,) = pools
    assert pool["active_leases"] == 1 and pool["reserved_bytes"] >= 0
    assert sum(row["active_leases"] for row in usage["tenants"]) == 1


async def test_events_record_each_transition(scratchd: InProcess) -> None:
    lease = await create(scratchd, ttl_seconds=10)
    scratchd.clock.advance(11)
    scratchd.collect()
    async with scratchd.client() as client:
        events = (await client.get("/v1/events")).json()["events"]
    kinds = [(e["kind"], e["reason"]) for e in events if e.get("lease_id") == lease["id"]]
    assert kinds == [("lease_created", None), ("lease_ended", "expired")]
