"""Tenancy end to end: real Unix users on the real socket, real tokens over TCP, real permissions.

Each Unix user is a throwaway account (``useradd``), and every request "as" a user is
made by a child process running with that user's credentials, so the daemon's only
source of identity is the kernel's (SO_PEERCRED), exactly as in production.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import IS_ROOT, Daemon, wait_for
from users import (
    User,
    as_user,
    call,
    call_as,
    calls_as,
    free_port,
    raw_http,
    spawn_as,
    throwaway_group,
    throwaway_user,
    world_traversable_dir,
)

from scratchd.ratelimit import CREATE_BURST

pytestmark = pytest.mark.skipif(
    not IS_ROOT, reason="needs root: creates Unix users and drops to their credentials"
)

TOKENS = {name: f"{name}-{secrets.token_urlsafe(24)}" for name in ("ci", "other", "viewer", "admin")}
TOKEN_CONFIG = [
    {"name": "ci", "sha256": "", "role": "tenant", "tenant": "ci"},
    {"name": "other", "sha256": "", "role": "tenant", "tenant": "other"},
    {"name": "viewer", "sha256": "", "role": "viewer"},
    {"name": "admin", "sha256": "", "role": "admin"},
]
for _entry in TOKEN_CONFIG:
    _entry["sha256"] = hashlib.sha256(TOKENS[_entry["name"]].encode()).hexdigest()


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def admin_group() -> Iterator[str]:
    with throwaway_group() as group:
        yield group


@pytest.fixture(scope="module")
def alice() -> Iterator[User]:
    with throwaway_user() as user:
        yield user


@pytest.fixture(scope="module")
def bob() -> Iterator[User]:
    with throwaway_user() as user:
        yield user


@pytest.fixture(scope="module")
def carol(admin_group: str) -> Iterator[User]:
    """An admin by membership of a supplementary group."""
    with throwaway_user(groups=[admin_group]) as user:
        yield user


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    with world_traversable_dir() as path:
        yield path


@pytest.fixture
def start(shared_dir: Path, make_daemon: Callable[..., Daemon], admin_group: str) -> Callable[..., Daemon]:
    """A daemon whose socket and pool the throwaway users can reach, with TCP and tokens.

    Depends on ``shared_dir`` before ``make_daemon``, so the daemon stops before the directory goes.
    """
    counter = iter(range(100))

    def start_daemon(anonymous: str = "none", **config: Any) -> Daemon:
        root = shared_dir / f"d{next(counter)}"
        (root / "run").mkdir(parents=True)
        (root / "pool").mkdir()
        server: dict[str, Any] = {
            "socket": str(root / "run" / "scratchd.sock"),
            "listen": f"127.0.0.1:{free_port()}",
            "anonymous": anonymous,
            "admins": ["root", f"@{admin_group}"],
        }
        config.setdefault("pool", [{"name": "main", "path": str(root / "pool")}])
        daemon = make_daemon(start=False, server=server, token=TOKEN_CONFIG, **config)
        daemon.socket = server["socket"]  # the fixture's default socket path is under root's tmp_path
        return daemon.start()

    return start_daemon


def tcp(daemon: Daemon, token: str | None = None) -> httpx.Client:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(
        base_url=f"http://{daemon.config['server']['listen']}", headers=headers, timeout=10, verify=False
    )


def tcp_request(
    daemon: Daemon, token: str | None, method: str, path: str, body: Any = None
) -> httpx.Response:
    with tcp(daemon, token) as client:
        return client.request(method, path, json=body)


def code(body: Any) -> str | None:
    """The error code of an envelope, asserting the envelope's shape."""
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "details"}, body
    return body["error"]["code"]


def lease_as(user: User, daemon: Daemon, **body: Any) -> dict[str, Any]:
    status, answer = call_as(user, daemon.socket, "POST", "/v1/leases", body)
    assert status == 201, answer
    return answer


def tcp_lease(daemon: Daemon, token: str) -> dict[str, Any]:
    response = tcp_request(daemon, token, "POST", "/v1/leases", {})
    assert response.status_code == 201, response.text
    return response.json()


# -- the role matrix ---------------------------------------------------------------------------

CALLERS = (
    "unix_tenant",
    "unix_admin",
    "tcp_tenant",
    "tcp_viewer",
    "tcp_admin",
    "no_token",
    "anonymous_viewer",
)
OK = "2xx"
# route -> answer class per caller, in CALLERS' order. Lease and cache routes act on a lease or
# a kept cache of another tenant.
MATRIX: dict[tuple[str, str], tuple[Any, ...]] = {
    ("POST", "/v1/leases"): (OK, OK, OK, 403, 403, 401, 401),
    ("GET", "/v1/leases"): (OK, OK, OK, OK, OK, 401, OK),
    ("GET", "/v1/leases/{lease_id}"): (404, OK, 404, OK, OK, 401, OK),
    ("POST", "/v1/leases/{lease_id}/renew"): (404, OK, 404, 403, OK, 401, 401),
    ("DELETE", "/v1/leases/{lease_id}"): (404, OK, 404, 403, OK, 401, 401),
    ("GET", "/v1/pools"): (OK, OK, OK, OK, OK, 401, OK),
    ("GET", "/v1/usage"): (OK, OK, OK, OK, OK, 401, OK),
    ("GET", "/v1/events"): (OK, OK, OK, OK, OK, 401, OK),
    ("GET", "/v1/caches"): (OK, OK, OK, OK, OK, 401, OK),
    ("GET", "/v1/caches/{cache_id}"): (404, OK, 404, OK, OK, 401, OK),
    ("DELETE", "/v1/caches/{cache_id}"): (404, OK, 404, 403, OK, 401, 401),
    ("GET", "/healthz"): (OK, OK, OK, OK, OK, OK, OK),
    ("GET", "/readyz"): (OK, OK, OK, OK, OK, OK, OK),
    # Not in the OpenAPI document, but part of the API (docs/api.md). Metrics name every tenant: not for tenants.
    ("GET", "/metrics"): (403, OK, 403, OK, OK, 401, OK),
    # The dashboard's page holds no data: anyone may load it, and it asks for a token.
    ("GET", "/"): (OK, OK, OK, OK, OK, OK, OK),
}
CODES = {401: "unauthenticated", 403: "forbidden", 404: "lease_not_found"}
NOT_FOUND = {"/v1/caches/{cache_id}": "cache_not_found"}  # 404's code where it is not CODES'

BODIES = {"/v1/leases": {}, "/v1/leases/{lease_id}/renew": {"ttl_seconds": 60}}


def routes_of(daemon: Daemon) -> list[tuple[str, str]]:
    """Every route the OpenAPI document lists, plus the documented ones it leaves out; DELETE last."""
    spec = daemon.request("GET", "/openapi.json").json()
    listed = {(method.upper(), path) for path, item in spec["paths"].items() for method in item}
    unknown = listed - set(MATRIX)
    assert not unknown, f"routes without an entry in MATRIX (decide who may call them): {sorted(unknown)}"
    return sorted(MATRIX, key=lambda route: (route[0] == "DELETE", route))


def answer_class(path: str, status: int, body: Any) -> Any:
    """``2xx``, or the status when its envelope carries the expected code, else ``"<status> <code>"``."""
    if 200 <= status < 300:
        return OK
    expected = NOT_FOUND.get(path, CODES[404]) if status == 404 else CODES.get(status)
    return status if code(body) == expected else f"{status} {code(body)}"


def test_every_route_with_every_role(start, alice):
    strict = start(anonymous="none")
    relaxed = start(anonymous="viewer")
    routes = routes_of(strict)
    got: dict[tuple[str, str], list[Any]] = {route: [] for route in routes}

    def requests_for(daemon: Daemon) -> list[tuple[str, str, Any]]:
        # A fresh lease and a fresh kept cache of another tenant for each caller.
        target = tcp_lease(daemon, TOKENS["other"])["id"]
        kept = tcp_request(daemon, TOKENS["other"], "POST", "/v1/leases", {"cache_key": "k"}).json()["id"]
        cache = tcp_request(daemon, TOKENS["other"], "DELETE", f"/v1/leases/{kept}").json()["cache"][
            "kept_id"
        ]
        return [
            (method, path.replace("{lease_id}", target).replace("{cache_id}", cache), BODIES.get(path))
            for method, path in routes
        ]

    def over_tcp(daemon: Daemon, token: str | None) -> list[tuple[int, Any]]:
        with tcp(daemon, token) as client:
            answers = [client.request(m, p, json=b) for m, p, b in requests_for(daemon)]
        return [
            (a.status_code, a.json() if a.headers["content-type"].startswith("application/json") else None)
            for a in answers
        ]

    def over_socket(daemon: Daemon) -> list[tuple[int, Any]]:
        answers = []
        with daemon.client() as client:  # this test runs as root
            for method, path, body in requests_for(daemon):
                answer = client.request(method, path, json=body)
                is_json = answer.headers["content-type"].startswith("application/json")
                answers.append((answer.status_code, answer.json() if is_json else None))
        return answers

    runs = {
        "unix_tenant": lambda: calls_as(alice, strict.socket, requests_for(strict)),
        "unix_admin": lambda: over_socket(strict),
        "tcp_tenant": lambda: over_tcp(strict, TOKENS["ci"]),
        "tcp_viewer": lambda: over_tcp(strict, TOKENS["viewer"]),
        "tcp_admin": lambda: over_tcp(strict, TOKENS["admin"]),
        "no_token": lambda: over_tcp(strict, None),
        "anonymous_viewer": lambda: over_tcp(relaxed, None),
    }
    for caller in CALLERS:
        for route, (status, body) in zip(routes, runs[caller](), strict=True):
            got[route].append(answer_class(route[1], status, body))
    mismatches = {
        f"{m} {p}": {
            c: (want, have)
            for c, want, have in zip(CALLERS, MATRIX[m, p], got[m, p], strict=True)
            if want != have
        }
        for m, p in routes
        if tuple(got[m, p]) != MATRIX[m, p]
    }
    assert not mismatches, mismatches


# -- Unix tenants -------------------------------------------------------------------------------


def test_each_tenant_sees_only_its_own_leases(start, alice, bob):
    daemon = start()
    mine = lease_as(alice, daemon, labels={"who": "alice"})
    theirs = lease_as(bob, daemon)
    assert (mine["tenant"], mine["uid"]) == (alice.name, alice.uid)
    assert (theirs["tenant"], theirs["uid"]) == (bob.name, bob.uid)
    other = f"/v1/leases/{theirs['id']}"
    answers = calls_as(
        alice,
        daemon.socket,
        [
            ("GET", "/v1/leases", None),
            ("GET", f"/v1/leases?tenant={bob.name}", None),
            ("GET", "/v1/leases?state=all", None),
            ("GET", other, None),
            ("POST", f"{other}/renew", {"ttl_seconds": 60}),
            ("DELETE", other, None),
            ("GET", "/v1/usage", None),
            ("GET", "/v1/events", None),
        ],
    )
    (listed, filtered, everything, get, renew, release, usage, events) = answers
    assert [lease["id"] for lease in listed[1]["leases"]] == [mine["id"]]
    assert filtered[1]["leases"] == []
    assert [lease["id"] for lease in everything[1]["leases"]] == [mine["id"]]
    for status, body in (get, renew, release):
        assert status == 404 and code(body) == "lease_not_found"  # never 403: ids do not leak
    assert [t["tenant"] for t in usage[1]["tenants"]] == [alice.name]
    assert [lease["id"] for lease in usage[1]["largest_leases"]] == [mine["id"]]
    assert {e["tenant"] for e in events[1]["events"]} == {alice.name}
    # bob's lease is untouched
    assert daemon.request("GET", other).json()["state"] == "active"
    assert os.path.isdir(theirs["path"])


def test_lease_directories_are_the_tenants_and_private(start, alice, bob):
    daemon = start()
    mine = lease_as(alice, daemon)
    info = os.stat(mine["path"])
    assert (info.st_uid, info.st_gid) == (alice.uid, alice.gid)
    assert stat.S_IMODE(info.st_mode) == 0o700
    pool = os.stat(daemon.pool_path)
    assert (pool.st_uid, stat.S_IMODE(pool.st_mode)) == (0, 0o711)
    trash = os.stat(os.path.join(daemon.pool_path, ".trash"))
    assert (trash.st_uid, stat.S_IMODE(trash.st_mode)) == (0, 0o700)

    def write_own() -> list[str]:
        Path(mine["path"], "cache").write_text("x")
        return os.listdir(mine["path"])

    assert as_user(alice, write_own) == ["cache"]
    with pytest.raises(PermissionError):
        as_user(bob, lambda: os.listdir(mine["path"]))
    with pytest.raises(PermissionError):
        as_user(bob, lambda: Path(mine["path"], "cache").read_text())
    with pytest.raises(PermissionError):  # 0711: a tenant reaches its lease by path but cannot list the pool
        as_user(alice, lambda: os.listdir(daemon.pool_path))
    with pytest.raises(PermissionError):
        as_user(alice, lambda: os.listdir(os.path.join(daemon.pool_path, ".trash")))


def test_a_tcp_tenants_directory_belongs_to_the_daemons_user(start):
    daemon = start()
    lease = tcp_lease(daemon, TOKENS["ci"])
    assert (lease["tenant"], lease["uid"]) == ("ci", 0)
    info = os.stat(lease["path"])
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, 0, 0o700)


def test_an_admin_group_member_sees_and_ends_every_lease(start, alice, bob, carol):
    daemon = start()
    leases = [lease_as(alice, daemon), lease_as(bob, daemon), tcp_lease(daemon, TOKENS["ci"])]
    own = lease_as(carol, daemon)
    assert (own["tenant"], own["uid"]) == (carol.name, carol.uid)  # an admin is still a tenant of its own
    listed, released = calls_as(
        carol, daemon.socket, [("GET", "/v1/leases", None), ("DELETE", f"/v1/leases/{leases[0]['id']}", None)]
    )
    assert {lease["id"] for lease in listed[1]["leases"]} == {lease["id"] for lease in [*leases, own]}
    assert released[0] == 200 and released[1]["end_reason"] == "released"
    assert not os.path.lexists(leases[0]["path"])
    # and without the group, bob is no admin
    assert call_as(bob, daemon.socket, "DELETE", f"/v1/leases/{leases[2]['id']}")[0] == 404


# -- tokens -------------------------------------------------------------------------------------


def test_tokens_and_roles_over_tcp(start):
    daemon = start()
    for token in (None, "wrong", TOKENS["ci"] + "x", hashlib.sha256(TOKENS["ci"].encode()).hexdigest()):
        answer = tcp_request(daemon, token, "GET", "/v1/leases")
        assert answer.status_code == 401 and code(answer.json()) == "unauthenticated", token
    with tcp(daemon) as client:
        basic = client.get("/v1/leases", headers={"authorization": f"Basic {TOKENS['admin']}"})
        assert basic.status_code == 401
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200

    lease = tcp_lease(daemon, TOKENS["ci"])
    viewer = tcp_request(daemon, TOKENS["viewer"], "POST", "/v1/leases", {})
    assert viewer.status_code == 403 and code(viewer.json()) == "forbidden"
    viewer = tcp_request(daemon, TOKENS["viewer"], "DELETE", f"/v1/leases/{lease['id']}")
    assert viewer.status_code == 403 and code(viewer.json()) == "forbidden"
    assert (
        tcp_request(daemon, TOKENS["viewer"], "GET", f"/v1/leases/{lease['id']}").json()["state"] == "active"
    )
    assert tcp_request(daemon, TOKENS["other"], "GET", f"/v1/leases/{lease['id']}").status_code == 404
    assert (
        tcp_request(daemon, TOKENS["admin"], "POST", "/v1/leases", {}).status_code == 403
    )  # holds no leases
    released = tcp_request(daemon, TOKENS["admin"], "DELETE", f"/v1/leases/{lease['id']}")
    assert released.status_code == 200 and released.json()["end_reason"] == "released"


def test_the_schema_needs_a_token_too_and_no_page_loads_from_a_cdn(start):
    daemon = start()
    assert tcp_request(daemon, None, "GET", "/openapi.json").status_code == 401
    assert tcp_request(daemon, TOKENS["viewer"], "GET", "/openapi.json").json()["paths"]
    for path in ("/docs", "/redoc"):  # Swagger UI and ReDoc load their scripts from a CDN
        assert tcp_request(daemon, TOKENS["viewer"], "GET", path).status_code == 404, path


def test_a_token_dropped_from_the_config_stops_working_at_the_reload(start):
    daemon = start()
    assert tcp_request(daemon, TOKENS["ci"], "GET", "/v1/leases").status_code == 200
    daemon.config["token"] = [entry for entry in TOKEN_CONFIG if entry["name"] != "ci"]
    daemon.write_config()
    daemon.process.send_signal(signal.SIGHUP)
    wait_for(
        lambda: tcp_request(daemon, TOKENS["ci"], "GET", "/v1/leases").status_code == 401,
        what="the reload to revoke the token",
    )
    assert tcp_request(daemon, TOKENS["viewer"], "GET", "/v1/leases").status_code == 200


def test_anonymous_viewer_reads_but_a_wrong_token_is_still_refused(start):
    daemon = start(anonymous="viewer")
    assert tcp_request(daemon, None, "GET", "/v1/pools").status_code == 200
    assert tcp_request(daemon, "wrong", "GET", "/v1/pools").status_code == 401
    assert tcp_request(daemon, None, "POST", "/v1/leases", {}).status_code == 401


# -- pid binding ---------------------------------------------------------------------------------


def test_pid_binding_only_to_the_callers_own_processes(start, alice, bob):
    daemon = start()
    bobs = spawn_as(bob)
    try:
        status, body = call_as(alice, daemon.socket, "POST", "/v1/leases", {"pid": bobs.pid})
        assert status == 403 and code(body) == "forbidden"

        def bind_own() -> tuple[int, Any]:
            own = subprocess.Popen(["sleep", "60"])
            try:
                return call(daemon.socket, "POST", "/v1/leases", {"pid": own.pid})
            finally:
                own.kill()
                own.wait()

        status, body = as_user(alice, bind_own)
        assert status == 201 and body["pid"] and body["tenant"] == alice.name
        assert daemon.lease(pid=bobs.pid)["pid"] == bobs.pid  # root may bind any
    finally:
        bobs.kill()
        bobs.wait()
    status, body = call_as(alice, daemon.socket, "POST", "/v1/leases", {"pid": bobs.pid})
    assert status == 422 and code(body) == "invalid_request"  # no longer a live process


# -- quotas ---------------------------------------------------------------------------------------


def test_parallel_creates_never_exceed_max_leases(start, alice):
    daemon = start(tenant=[{"name": "root", "max_leases": 5}])
    barrier = threading.Barrier(32)
    answers: list[httpx.Response] = []

    def create() -> None:
        with daemon.client() as client:
            barrier.wait()
            answers.append(client.post("/v1/leases", json={}))

    threads = [threading.Thread(target=create) for _ in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(a.status_code for a in answers) == [201] * 5 + [429] * 27
    refused = [a.json()["error"] for a in answers if a.status_code == 429]
    assert all(e["code"] == "quota_exceeded" and e["details"]["limit"] == "max_leases" for e in refused)
    assert len(daemon.request("GET", "/v1/leases").json()["leases"]) == 5
    assert len(daemon.pool_entries()) == 5
    # one tenant's quota is not another's
    assert lease_as(alice, daemon)["tenant"] == alice.name


def test_an_admin_renewing_a_lease_is_held_to_its_owners_max_ttl(start, alice):
    daemon = start(tenant=[{"name": alice.name, "max_ttl": "10m"}])
    lease = lease_as(alice, daemon, ttl_seconds=60)
    renewed = daemon.request("POST", f"/v1/leases/{lease['id']}/renew", json={"ttl_seconds": 3600})
    assert renewed.status_code == 429 and renewed.json()["error"]["details"]["limit"] == "max_ttl"


CREATE = (
    b"POST /v1/leases HTTP/1.1\r\nhost: scratchd\r\ncontent-type: application/json\r\n"
    b"content-length: 2\r\n\r\n{}"
)
LOW_CREATE_RATE = 100.0  # limits.create_rate: a pipelined flood outruns it on any host, fast or slow
FLOOD = 2 * CREATE_BURST + 2000  # outruns LOW_CREATE_RATE unless the host answers under ~150 creates/s


def flood(daemon: Daemon, sent: int) -> tuple[list[tuple[int, dict[str, str], bytes]], list[str], float]:
    """``sent`` creates pipelined over 8 connections (the client is never the bottleneck):
    the answers, each one's ``details.limit``, and the seconds it took."""
    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        batches = pool.map(lambda n: raw_http(daemon.socket, CREATE * n, n), [sent // 8] * 8)
        answers = [answer for batch in batches for answer in batch]
    limits = [json.loads(body)["error"]["details"]["limit"] for _, _, body in answers]
    assert set(limits) <= {"max_leases", "create_rate"} and len(limits) == sent
    return answers, limits, time.monotonic() - started


def test_create_rate_limit_holds_back_one_tenant_only(start):
    """A flood of creates (refused by max_leases = 0 after the rate check, so cheap enough to
    outrun a low limits.create_rate) gets 429 create_rate with Retry-After; another tenant is
    served meanwhile."""
    daemon = start(tenant=[{"name": "root", "max_leases": 0}], limits={"create_rate": LOW_CREATE_RATE})
    answers, limits, elapsed = flood(daemon, FLOOD)
    allowed = CREATE_BURST + LOW_CREATE_RATE * elapsed
    assert limits.count("max_leases") <= allowed + 1
    if allowed * 1.1 > FLOOD:
        pytest.skip(f"this host sent only {FLOOD / elapsed:.0f} creates/s: too slow to outrun the limit")
    status, headers, body = next(
        a for a, limit in zip(answers, limits, strict=True) if limit == "create_rate"
    )
    assert status == 429 and code(json.loads(body)) == "quota_exceeded"
    details = json.loads(body)["error"]["details"]
    assert (details["burst"], details["per_second"]) == (CREATE_BURST, LOW_CREATE_RATE)  # the configured rate
    assert int(headers["retry-after"]) >= 1
    other = tcp_lease(daemon, TOKENS["ci"])
    time.sleep(int(headers["retry-after"]))
    refused = daemon.request("POST", "/v1/leases", json={})
    assert refused.json()["error"]["details"]["limit"] == "max_leases"  # past the rate check again
    assert daemon.pool_entries() == {other["id"]}


def test_a_reload_takes_the_new_create_rate(start):
    """From a rate no flood reaches to a low one on SIGHUP: the same tenant is then held back."""
    daemon = start(tenant=[{"name": "root", "max_leases": 0}], limits={"create_rate": 1_000_000.0})
    _, limits, _ = flood(daemon, 2 * CREATE_BURST)
    assert set(limits) == {"max_leases"}
    daemon.config["limits"] = {"create_rate": LOW_CREATE_RATE}
    daemon.write_config()
    daemon.process.send_signal(signal.SIGHUP)
    wait_for(
        lambda: any(
            e["kind"] == "config_reloaded"
            for e in daemon.request("GET", "/v1/events", params={"limit": 1000}).json()["events"]
        ),
        what="the reload",
    )
    answers, limits, elapsed = flood(daemon, FLOOD)
    assert limits.count("max_leases") <= CREATE_BURST + LOW_CREATE_RATE * elapsed + 1
    refused = [
        json.loads(body)["error"]["details"]
        for (_, _, body), limit in zip(answers, limits, strict=True)
        if limit == "create_rate"
    ]
    assert refused and {d["per_second"] for d in refused} == {LOW_CREATE_RATE}
