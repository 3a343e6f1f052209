"""The lease API end to end: a real daemon process, its real Unix socket, real directories."""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys

import pytest
from conftest import bind_mount, needs_root, tmpfs, wait_for

pytestmark = pytest.mark.shared_daemon

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


def assert_envelope(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    return body["error"]


def test_create_get_list_renew_release(daemon, tmp_path):
    lease = daemon.lease(ttl_seconds=120, labels={"job": "build-1"})
    assert lease["state"] == "active" and lease["end_reason"] is None
    assert re.fullmatch(r"[a-z0-9-]{16,}", lease["id"])
    assert lease["path"] == os.path.join(daemon.pool_path, lease["id"])
    assert lease["ttl_seconds"] == 120 and lease["labels"] == {"job": "build-1"}
    for key in ("created_at", "expires_at", "last_activity_at"):
        assert RFC3339.match(lease[key]), lease[key]

    info = os.stat(lease["path"])
    assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700
    assert os.listdir(lease["path"]) == []
    assert stat.S_IMODE(os.stat(daemon.pool_path).st_mode) == 0o711

    fetched = daemon.request("GET", f"/v1/leases/{lease['id']}").json()
    assert {**fetched, "usage": None} == {**lease, "usage": None}  # usage may be measured meanwhile
    listed = daemon.request("GET", "/v1/leases").json()["leases"]
    assert [entry["id"] for entry in listed] == [lease["id"]]
    assert daemon.request("GET", "/v1/leases", params={"label": "job=build-1"}).json()["leases"]
    assert not daemon.request("GET", "/v1/leases", params={"label": "job=other"}).json()["leases"]
    assert not daemon.request("GET", "/v1/leases", params={"pool": "elsewhere"}).json()["leases"]

    renewed = daemon.request("POST", f"/v1/leases/{lease['id']}/renew", json={"ttl_seconds": 600}).json()
    assert renewed["ttl_seconds"] == 600 and renewed["expires_at"] > lease["expires_at"]

    released = daemon.request("DELETE", f"/v1/leases/{lease['id']}")
    assert released.status_code == 200
    body = released.json()
    assert body["state"] == "ended" and body["end_reason"] == "released" and RFC3339.match(body["ended_at"])
    assert not os.path.lexists(lease["path"])  # gone before the answer (guarantee 3)

    again = daemon.request("DELETE", f"/v1/leases/{lease['id']}")
    assert again.status_code == 200 and again.json()["end_reason"] == "released"
    assert_envelope(daemon.request("POST", f"/v1/leases/{lease['id']}/renew", json={}), 409, "lease_ended")
    assert (
        daemon.request("GET", "/v1/leases", params={"state": "ended"}).json()["leases"][0]["id"]
        == lease["id"]
    )
    assert daemon.request("GET", "/v1/leases").json()["leases"] == []

    # the trash drains in the background
    trash = os.path.join(daemon.pool_path, ".trash")
    wait_for(lambda: os.listdir(trash) == [], what="trash drained")
    assert stat.S_IMODE(os.stat(trash).st_mode) == 0o700


def test_the_hot_path_answers_as_the_routes_do(daemon):
    """api.hotpath takes ``application/json`` creates on the Unix socket; FastAPI takes
    other JSON types: the two must answer alike, refusals included."""

    def create(content_type: str, body: bytes) -> tuple[int, dict]:
        response = daemon.request("POST", "/v1/leases", content=body, headers={"content-type": content_type})
        return response.status_code, response.json()

    body = b'{"ttl_seconds": 60, "labels": {"job": "x"}, "evictable": true}'
    (hot_status, hot), (route_status, routed) = (
        create("application/json", body),
        create("application/x+json", body),
    )
    assert hot_status == route_status == 201
    differ = {"id", "path", "created_at", "expires_at", "last_activity_at"}
    assert {k: v for k, v in hot.items() if k not in differ} == {
        k: v for k, v in routed.items() if k not in differ
    }
    for refused in (
        b'{"pool": "nowhere"}',
        b'{"ttl_seconds": 0}',
        b'{"ttl_seconds": 999999999}',
        b'{"x": 1}',
        b'{"pool": "a", "pool": "b"}',
        b"[]",
        b"{",
    ):
        assert create("application/json", refused) == create("application/x+json", refused), refused
    status, defaults = create("application/json", b"")
    assert status == 201
    active = {lease["id"] for lease in daemon.request("GET", "/v1/leases").json()["leases"]}
    assert active == {hot["id"], routed["id"], defaults["id"]}  # the refusals changed nothing

    released = daemon.request("DELETE", f"/v1/leases/{hot['id']}").json()
    assert released["state"] == "ended" and not os.path.exists(hot["path"])
    assert daemon.request("DELETE", f"/v1/leases/{hot['id']}").json() == released  # idempotent
    assert_envelope(daemon.request("DELETE", "/v1/leases/no-such-lease"), 404, "lease_not_found")


def test_events_record_the_lifecycle(daemon):
    start = daemon.newest_seq()
    lease = daemon.lease()
    daemon.request("POST", f"/v1/leases/{lease['id']}/renew", json={"ttl_seconds": 60})
    daemon.request("DELETE", f"/v1/leases/{lease['id']}")
    events = daemon.request("GET", "/v1/events", params={"since": start}).json()["events"]
    mine = [e for e in events if e["lease_id"] == lease["id"]]
    assert [e["kind"] for e in mine] == ["lease_created", "lease_renewed", "lease_ended"]
    assert mine[-1]["reason"] == "released"
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    after = daemon.request("GET", "/v1/events", params={"since": mine[0]["seq"]}).json()["events"]
    assert [e["seq"] for e in after] == [s for s in seqs if s > mine[0]["seq"]]


def test_ttl_expiry_ends_lease_within_gc_interval(daemon):
    lease = daemon.lease(ttl_seconds=1)
    ended = wait_for(
        lambda: (r := daemon.request("GET", f"/v1/leases/{lease['id']}").json())["state"] == "ended" and r,
        timeout=5,
        what="lease to expire",
    )
    assert ended["end_reason"] == "expired"
    assert not os.path.lexists(lease["path"])


def test_pools_usage_health(daemon):
    expected = 10 * 2**20
    daemon.lease(expected_bytes=expected)
    pools = daemon.request("GET", "/v1/pools").json()["pools"]
    assert len(pools) == 1
    pool = pools[0]
    assert pool["name"] == "main" and pool["state"] == "ok" and pool["active_leases"] == 1
    # Reserved: what is expected and not yet used. A usage scan may already have counted the
    # empty directory's own block, so allow for that, not for anything more.
    assert expected - 64 * 1024 <= pool["reserved_bytes"] <= expected
    assert pool["capacity_bytes"] > 0 and pool["mount_point"]
    usage = daemon.request("GET", "/v1/usage").json()
    assert usage["tenants"][0]["active_leases"] == 1
    assert set(usage["reclaim"]) == {
        "pending",
        "pending_bytes",
        "reclaimed_total",
        "reclaimed_bytes_total",
        "by_reason",
    }
    assert daemon.request("GET", "/healthz").json() == {"status": "ok"}
    assert daemon.request("GET", "/readyz").status_code == 200


def test_guarantee_1_durable_across_kill_9(make_daemon):
    daemon = make_daemon()
    lease = daemon.lease(ttl_seconds=3600)
    daemon.kill()
    daemon.start()
    after = daemon.request("GET", f"/v1/leases/{lease['id']}")
    assert after.status_code == 200 and after.json()["state"] == "active"
    assert os.path.isdir(lease["path"])


def test_record_without_directory_ends_directory_removed_on_start(make_daemon):
    daemon = make_daemon()
    lease = daemon.lease()
    daemon.stop()
    os.rmdir(lease["path"])
    daemon.start()
    assert daemon.request("GET", f"/v1/leases/{lease['id']}").json()["end_reason"] == "directory_removed"


@pytest.mark.parametrize(
    "body, field",
    [
        ({"ttl_seconds": "60"}, "ttl_seconds"),
        ({"ttl_seconds": 60.5}, "ttl_seconds"),
        ({"ttl_seconds": 0}, "ttl_seconds"),
        ({"ttl_seconds": True}, "ttl_seconds"),
        ({"near": "relative/path"}, "near"),
        ({"near": "/tmp/\u0000x"}, "near"),
        ({"near": "/" + "a" * 5000}, "near"),
        ({"placement": "nearby"}, "placement"),
        ({"labels": {"Bad Key": "x"}}, "labels"),
        ({"labels": {"k": "v" * 257}}, "labels"),
        ({"labels": {f"k{i}": "v" for i in range(33)}}, "labels"),
        ({"evictable": "yes"}, "evictable"),
        ({"max_bytes": -1}, "max_bytes"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(daemon, body, field):
    def state() -> tuple:
        leases = daemon.request("GET", "/v1/leases", params={"state": "all"}).json()["leases"]
        return daemon.pool_entries(), [lease["id"] for lease in leases], daemon.newest_seq()

    before = state()
    error = assert_envelope(daemon.request("POST", "/v1/leases", json=body), 422, "invalid_request")
    assert any(name.startswith(field) for name in error["details"]["fields"]), error
    assert state() == before


@pytest.mark.parametrize(
    ("body", "said"),
    [
        ({"ttl_seconds": 0}, "ttl_seconds must be ≥ 1"),
        ({"ttl_seconds": "60"}, "ttl_seconds must be an integer"),
        (
            {"placement": "nearby"},
            "placement must be one of 'prefer-same-filesystem', 'same-filesystem' or 'any'",
        ),
        ({"near": "relative"}, "near must be an absolute path"),
        ({"colour": "red"}, "colour is not a field of this request"),
    ],
)
def test_a_refusal_says_why(daemon, body, said):
    error = assert_envelope(daemon.request("POST", "/v1/leases", json=body), 422, "invalid_request")
    assert error["message"] == f"Invalid request: {said}."


def test_an_integral_number_is_an_integer_as_the_published_schema_says(daemon):
    """JSON Schema's ``integer`` (what /openapi.json publishes) takes ``88.0``; strings stay refused."""
    lease = daemon.lease(ttl_seconds=88.0, max_bytes=1e6)
    assert (lease["ttl_seconds"], lease["max_bytes"]) == (88, 1_000_000)
    renewed = daemon.request("POST", f"/v1/leases/{lease['id']}/renew", json={"ttl_seconds": 99.0})
    assert renewed.status_code == 200 and renewed.json()["ttl_seconds"] == 99


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("OPTIONS", "/v1/leases", "GET, POST"),
        ("PUT", "/v1/leases", "GET, POST"),
        ("PATCH", "/v1/leases/someid", "DELETE, GET"),
        ("GET", "/v1/leases/someid/renew", "POST"),
    ],
)
def test_a_405_names_every_method_of_the_path(daemon, method, path, allowed):
    answer = daemon.request(method, path)
    assert_envelope(answer, 405, "method_not_allowed")
    assert answer.headers["allow"] == allowed


def test_transport_level_errors_use_the_envelope(daemon):
    assert_envelope(
        daemon.request(
            "POST", "/v1/leases", content=b"{not json", headers={"content-type": "application/json"}
        ),
        422,
        "invalid_request",
    )
    assert_envelope(daemon.request("POST", "/v1/leases", json=[1, 2]), 422, "invalid_request")
    assert_envelope(
        daemon.request(
            "POST", "/v1/leases", content=b"x" * (1 << 20), headers={"content-type": "application/json"}
        ),
        413,
        "request_too_large",
    )
    assert_envelope(daemon.request("GET", "/v1/nope"), 404, "not_found")
    assert_envelope(daemon.request("PUT", "/v1/leases"), 405, "method_not_allowed")
    assert_envelope(daemon.request("GET", "/v1/leases/doesnotexist"), 404, "lease_not_found")
    assert_envelope(daemon.request("DELETE", "/v1/leases/doesnotexist"), 404, "lease_not_found")
    assert_envelope(daemon.request("GET", "/v1/leases", params={"state": "gone"}), 422, "invalid_request")
    assert_envelope(daemon.request("POST", "/v1/leases", json={"pool": "nope"}), 404, "pool_not_found")
    assert_envelope(
        daemon.request("POST", "/v1/leases", json={"expected_bytes": 2**53 - 1}), 507, "insufficient_storage"
    )
    assert daemon.pool_entries() == set()


def test_answers_without_a_body_are_sent_whole(daemon):
    """The server holds a response's head back to send it with the body (server.HeadWithBody):
    an answer that has none must still go out at once, on a connection kept alive or closing."""
    head = b"HEAD /healthz HTTP/1.1\r\nhost: scratchd\r\n"  # 405 (GET only): a head, never a body
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(daemon.socket)
        reader = sock.makefile("rb")
        sock.sendall(head + b"\r\n")
        assert reader.readline().startswith(b"HTTP/1.1 405 ")
        while reader.readline() != b"\r\n":
            pass
        # Still the same connection: an answer held until the idle connection closed would fail here.
        sock.sendall(head + b"connection: close\r\n\r\n")
        rest = reader.read()
    assert rest.startswith(b"HTTP/1.1 405 ") and rest.endswith(b"\r\n\r\n")


def test_ttl_limits(make_daemon):
    daemon = make_daemon(
        limits={"default_ttl": "1m", "max_ttl": "1h"},
        tenant=[{"name": _me(), "max_ttl": "10m", "max_leases": 2}],
    )
    assert daemon.lease()["ttl_seconds"] == 60
    error = assert_envelope(
        daemon.request("POST", "/v1/leases", json={"ttl_seconds": 7200}), 422, "invalid_request"
    )
    assert "ttl_seconds" in error["details"]["fields"]
    error = assert_envelope(
        daemon.request("POST", "/v1/leases", json={"ttl_seconds": 1200}), 429, "quota_exceeded"
    )
    assert error["details"]["limit"] == "max_ttl"
    daemon.lease()
    error = assert_envelope(daemon.request("POST", "/v1/leases", json={}), 429, "quota_exceeded")
    assert error["details"]["limit"] == "max_leases"
    assert len(daemon.pool_entries()) == 2


def test_pid_binding_validation(daemon):
    assert_envelope(daemon.request("POST", "/v1/leases", json={"pid": 2**22 - 1}), 422, "invalid_request")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lease = daemon.lease(pid=child.pid)
        assert lease["pid"] == child.pid
    finally:
        child.kill()
        child.wait()


def test_openapi_documents_every_route(daemon):
    spec = daemon.request("GET", "/openapi.json").json()
    paths = spec["paths"]
    for path in (
        "/v1/leases",
        "/v1/leases/{lease_id}",
        "/v1/leases/{lease_id}/renew",
        "/v1/pools",
        "/v1/usage",
        "/v1/events",
        "/healthz",
        "/readyz",
    ):
        assert path in paths, path
    assert "LeaseRequest" in spec["components"]["schemas"]
    assert "ErrorBody" in spec["components"]["schemas"]


def test_bad_config_exits_2_naming_the_key(tmp_path):
    config = tmp_path / "bad.toml"
    pool = tmp_path / "pool"
    pool.mkdir()
    cases = {
        f'[[pool]]\nname = "a"\npath = "{pool}"\n[[pool]]\nname = "b"\npath = "{pool}"\nreserve = "lots"\n': "pool[1].reserve",
        '[server]\nsokcet = "/x"\n': "server.sokcet",
        f'[[pool]]\nname = "a"\npath = "{pool}"\n[[pool]]\nname = "a"\npath = "{pool}"\n': "pool[1].name",
        '[limits]\nmax_ttl = 5\ndefault_ttl = "1h"\n': "limits",
        "[gc]\ninterval = true\n": "gc.interval",
    }
    for text, key in cases.items():
        config.write_text(text)
        result = subprocess.run(
            [sys.executable, "-m", "scratchd", "serve", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 2, (text, result.stderr)
        assert key in result.stderr, (key, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_live_socket_is_never_replaced(daemon, make_daemon):
    twin = make_daemon(start=False, server={"socket": daemon.socket})
    twin.start(wait_ready=False)
    assert twin.process.wait(20) != 0
    assert "another daemon" in twin.log()
    assert daemon.request("GET", "/healthz").status_code == 200


def test_stale_socket_is_replaced(make_daemon):
    daemon = make_daemon()
    daemon.kill()
    assert os.path.exists(daemon.socket)  # left behind by kill -9
    daemon.start()
    assert daemon.request("GET", "/healthz").status_code == 200
    assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o666


def _me() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


# -- root: real mounts --------------------------------------------------------------------------


@needs_root
def test_placement_on_near_mount_and_bind_mount_is_another_filesystem(make_daemon, tmp_path):
    with tmpfs(tmp_path / "fsA") as fs_a, tmpfs(tmp_path / "fsB") as fs_b:
        (fs_a / "pool").mkdir()
        (fs_b / "pool").mkdir()
        (fs_b / "project").mkdir()
        with bind_mount(fs_b, tmp_path / "bindB") as bind_b:
            # The premise: a bind mount of the same tmpfs refuses hard links (EXDEV).
            (fs_b / "project" / "f").write_text("x")
            with pytest.raises(OSError) as excinfo:
                os.link(fs_b / "project" / "f", bind_b / "pool" / "f")
            assert excinfo.value.errno == 18  # EXDEV

            daemon = make_daemon(
                pool=[
                    {"name": "a", "path": str(fs_a / "pool"), "reserve": "0"},
                    {"name": "b", "path": str(fs_b / "pool")},
                ]
            )
            lease = daemon.lease(near=str(fs_b / "project" / "venv-not-yet"))
            assert lease["pool"] == "b" and lease["same_filesystem"] is True
            assert lease["mount_point"] == str(fs_b)

            # near via the bind mount: same device, different mount -> not the same filesystem
            refused = daemon.request(
                "POST", "/v1/leases", json={"near": str(bind_b / "project"), "placement": "same-filesystem"}
            )
            assert_envelope(refused, 409, "no_pool_on_filesystem")
            fallback = daemon.lease(near=str(bind_b / "project"))
            assert fallback["same_filesystem"] is False

            elsewhere = daemon.lease(near=str(tmp_path))
            assert elsewhere["same_filesystem"] is False
            daemon.stop()


@needs_root
def test_lease_directory_owned_by_the_tenant(daemon):
    lease = daemon.lease()
    info = os.stat(lease["path"])
    assert (info.st_uid, info.st_gid) == (0, 0) and lease["uid"] == 0
    assert stat.S_IMODE(info.st_mode) == 0o700


def test_state_is_private_and_the_socket_reachable(daemon):
    assert stat.S_IMODE(os.stat(daemon.state_dir / "scratchd.db").st_mode) == 0o600  # it names every lease
    assert stat.S_IMODE(os.stat(os.path.dirname(daemon.socket)).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o666
