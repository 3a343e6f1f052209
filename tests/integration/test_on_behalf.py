"""Leasing on behalf of a tenant (docs/api.md, "On behalf of a tenant"): admins only, and the
lease is the named tenant's in quotas, listings and isolation.

Unix-socket creates go through the hot path, TCP ones through the routes: both are driven.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from conftest import IS_ROOT, Daemon
from users import User, call_as, free_port, throwaway_user, world_traversable_dir

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="needs root: creates a Unix user and drops to it")

TOKENS = {name: secrets.token_urlsafe(24) for name in ("admin", "broker_tenant", "other")}
TOKEN_CONFIG = [
    {"name": "admin", "role": "admin"},
    {"name": "broker_tenant", "role": "tenant", "tenant": "k8s:ci"},
    {"name": "other", "role": "tenant", "tenant": "other"},
]


@pytest.fixture(scope="module")
def alice() -> Iterator[User]:
    with throwaway_user() as user:
        yield user


@pytest.fixture
def daemon(make_daemon: Callable[..., Daemon]) -> Iterator[Daemon]:
    """A daemon whose socket a throwaway user can reach, with TCP tokens and a one-lease tenant."""
    with world_traversable_dir() as shared:
        (shared / "run").mkdir()
        (shared / "pool").mkdir()
        socket_path = str(shared / "run" / "scratchd.sock")
        server = {
            "socket": socket_path,
            "listen": f"127.0.0.1:{free_port()}",
            "admins": ["root"],
        }
        tokens = [
            {**entry, "sha256": hashlib.sha256(TOKENS[entry["name"]].encode()).hexdigest()}
            for entry in TOKEN_CONFIG
        ]
        started = make_daemon(
            start=False,
            server=server,
            token=tokens,
            pool=[{"name": "main", "path": str(shared / "pool")}],
            tenant=[{"name": "k8s:ci", "max_leases": 1}],
        )
        started.socket = socket_path
        yield started.start()
        started.stop()


def tcp(daemon: Daemon, token: str, method: str, path: str, body: object = None) -> httpx.Response:
    headers = {"authorization": f"Bearer {TOKENS[token]}"}
    with httpx.Client(
        base_url=f"http://{daemon.config['server']['listen']}", headers=headers, verify=False
    ) as client:
        return client.request(method, path, json=body)


def test_an_admin_leases_for_a_tenant_whose_quota_and_listing_it_is(daemon: Daemon) -> None:
    lease = daemon.lease(tenant="k8s:ci")
    assert lease["tenant"] == "k8s:ci"
    assert (lease["uid"], Path(lease["path"]).stat().st_uid) == (0, 0)  # the broker's ids: it hands it on

    second = daemon.request("POST", "/v1/leases", json={"tenant": "k8s:ci"})
    assert second.status_code == 429, second.text
    assert second.json()["error"]["details"]["limit"] == "max_leases"
    assert daemon.lease()["tenant"] == "root"  # the admin's own quota is untouched

    listed = daemon.request("GET", "/v1/leases", params={"tenant": "k8s:ci"}).json()["leases"]
    assert [found["id"] for found in listed] == [lease["id"]]
    usage = {row["tenant"]: row for row in daemon.request("GET", "/v1/usage").json()["tenants"]}
    assert usage["k8s:ci"]["active_leases"] == 1

    mine = tcp(daemon, "broker_tenant", "GET", "/v1/leases").json()["leases"]
    assert [found["id"] for found in mine] == [lease["id"]]
    assert tcp(daemon, "other", "GET", f"/v1/leases/{lease['id']}").status_code == 404
    released = tcp(daemon, "broker_tenant", "DELETE", f"/v1/leases/{lease['id']}")
    assert released.json()["end_reason"] == "released"


def test_an_admin_token_leases_for_a_tenant(daemon: Daemon) -> None:
    response = tcp(daemon, "admin", "POST", "/v1/leases", {"tenant": "k8s:ci"})
    assert response.status_code == 201, response.text
    assert response.json()["tenant"] == "k8s:ci"


def test_nobody_else_may_name_a_tenant_not_even_itself(daemon: Daemon, alice: User) -> None:
    for tenant in ("k8s:ci", alice.name):
        status, body = call_as(alice, daemon.socket, "POST", "/v1/leases", {"tenant": tenant})
        assert (status, body["error"]["code"]) == (403, "forbidden"), body
    for tenant in ("k8s:ci", "broker_tenant"):
        response = tcp(daemon, "broker_tenant", "POST", "/v1/leases", {"tenant": tenant})
        assert (response.status_code, response.json()["error"]["code"]) == (403, "forbidden")
    assert daemon.request("GET", "/v1/leases", params={"state": "all"}).json()["leases"] == []


@pytest.mark.parametrize("tenant", ["", "-dash", "a b", "x" * 65, "ns/name"])
def test_a_bad_tenant_name_is_refused(daemon: Daemon, tenant: str) -> None:
    response = daemon.request("POST", "/v1/leases", json={"tenant": tenant})
    assert response.status_code == 422, response.text
    assert "tenant" in response.json()["error"]["details"]["fields"]
