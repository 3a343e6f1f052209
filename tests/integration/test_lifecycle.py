"""The daemon as a service: SIGHUP reload, graceful SIGTERM, systemd notifications."""

from __future__ import annotations

import itertools
import os
import signal
import socket
from pathlib import Path

from conftest import wait_for


def pool_names(daemon) -> set[str]:
    return {p["name"] for p in daemon.request("GET", "/v1/pools").json()["pools"]}


def reloaded(daemon, count: int) -> bool:
    events = daemon.request("GET", "/v1/events", params={"limit": 1000}).json()["events"]
    return sum(e["kind"] == "config_reloaded" for e in events) >= count


def test_sighup_adds_and_drops_pools_and_refuses_bad_config(daemon, tmp_path):
    old = daemon.lease()
    extra = tmp_path / "extra"
    extra.mkdir()
    daemon.config["pool"].append({"name": "extra", "path": str(extra)})
    daemon.write_config()
    daemon.process.send_signal(signal.SIGHUP)
    wait_for(lambda: pool_names(daemon) == {"main", "extra"}, what="new pool after reload")
    assert daemon.lease(pool="extra")["path"].startswith(str(extra))

    # drop the first pool: no new leases there, its active lease lives on
    daemon.config["pool"] = [{"name": "extra", "path": str(extra)}]
    daemon.write_config()
    daemon.process.send_signal(signal.SIGHUP)
    wait_for(lambda: pool_names(daemon) == {"extra"}, what="pool dropped after reload")
    refused = daemon.request("POST", "/v1/leases", json={"pool": "main"})
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "pool_not_found"
    assert daemon.request("GET", f"/v1/leases/{old['id']}").json()["state"] == "active"
    assert os.path.isdir(old["path"])
    assert daemon.request("DELETE", f"/v1/leases/{old['id']}").status_code == 200
    assert not os.path.lexists(old["path"])

    # a bad config is refused, logged, and changes nothing
    daemon.config_path.write_text(daemon.config_path.read_text() + "\n[surprise]\n")
    daemon.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in daemon.log(), what="refusal logged")
    assert pool_names(daemon) == {"extra"}
    assert reloaded(daemon, 2) and not reloaded(daemon, 3)
    assert daemon.request("GET", "/healthz").status_code == 200


def test_sigterm_is_graceful_and_keeps_every_lease(daemon):
    lease = daemon.lease()
    Path(lease["path"], "work").write_text("keep")
    assert daemon.stop(signal.SIGTERM) == 0
    assert Path(lease["path"], "work").read_text() == "keep"
    assert not os.path.exists(daemon.socket)
    daemon.start()
    assert daemon.request("GET", f"/v1/leases/{lease['id']}").json()["state"] == "active"


def test_systemd_notifications(make_daemon, tmp_path, monkeypatch):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_path = str(tmp_path / "notify.sock")
    listener.bind(notify_path)
    listener.settimeout(20)
    monkeypatch.setenv("NOTIFY_SOCKET", notify_path)
    try:
        daemon = make_daemon()  # started with NOTIFY_SOCKET in its environment
        first = listener.recv(4096).decode()
        assert "READY=1" in first
        assert daemon.request("GET", "/readyz").status_code == 200  # READY came when serving
        daemon.process.send_signal(signal.SIGHUP)
        assert "RELOADING=1" in listener.recv(4096).decode()
        assert "READY=1" in listener.recv(4096).decode()
        daemon.stop()
        assert "STOPPING=1" in listener.recv(4096).decode()
    finally:
        listener.close()


def test_event_paging_is_gap_free_across_restarts(daemon):
    def page_all(since: int) -> list[dict]:
        seen: list[dict] = []
        while True:
            page = daemon.request("GET", "/v1/events", params={"since": since, "limit": 2}).json()["events"]
            if not page:
                return seen
            seen += page
            since = page[-1]["seq"]

    for _ in range(3):
        daemon.request("DELETE", f"/v1/leases/{daemon.lease()['id']}")
    before = page_all(0)
    daemon.kill()  # kill -9: nothing flushed on purpose
    daemon.start()
    daemon.lease()
    after = page_all(before[-1]["seq"])
    everything = daemon.request("GET", "/v1/events", params={"limit": 1000}).json()["events"]
    assert [e["seq"] for e in before + after] == [e["seq"] for e in everything]
    assert all(b["seq"] > a["seq"] for a, b in itertools.pairwise(everything))
    assert after and after[-1]["kind"] == "lease_created"


def test_logs_one_json_line_per_start_and_end_at_debug_and_never_a_token(make_daemon):
    import hashlib
    import json

    from users import free_port

    token = "s3cret-token-" + "z" * 30
    port = free_port()
    daemon = make_daemon(
        start=False,
        server={"listen": f"127.0.0.1:{port}"},
        token=[
            {
                "name": "ci",
                "sha256": hashlib.sha256(token.encode()).hexdigest(),
                "role": "tenant",
                "tenant": "ci",
            }
        ],
    )
    daemon.log_level = "debug"
    daemon.start()
    import httpx

    with httpx.Client(base_url=f"http://127.0.0.1:{port}", verify=False) as tcp:
        created = tcp.post("/v1/leases", json={}, headers={"authorization": f"Bearer {token}"}).json()
        tcp.delete(f"/v1/leases/{created['id']}", headers={"authorization": f"Bearer {token}"})
        assert tcp.get("/v1/leases", headers={"authorization": f"Bearer {token}x"}).status_code == 401
    daemon.stop()
    lines = [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]
    mine = [line for line in lines if line.get("lease") == created["id"]]
    assert [line["msg"] for line in mine] == ["lease started", "lease ended"]
    assert mine[1]["reason"] == "released" and mine[0]["tenant"] == "ci"
    assert token not in daemon.log()


def test_logs_the_leases_the_daemon_ends_not_the_ones_clients_start_and_release(daemon):
    """At the default level the log is for operators: the lease cycle's requests are in the
    events (a line each would cost the hot path a tenth of its time), reclaims are not."""
    import json

    released = daemon.lease()
    daemon.request("DELETE", f"/v1/leases/{released['id']}")
    expiring = daemon.lease(ttl_seconds=1)
    wait_for(
        lambda: daemon.request("GET", f"/v1/leases/{expiring['id']}").json()["state"] == "ended",
        timeout=10,
        what="the lease to expire",
    )
    daemon.stop()
    lines = [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]
    assert not [line for line in lines if line.get("lease") == released["id"]]
    assert [(line["msg"], line["reason"]) for line in lines if line.get("lease") == expiring["id"]] == [
        ("lease ended", "expired")
    ]
