"""The daemon as a service: SIGHUP reload, graceful SIGTERM, systemd notifications."""

from __future__ import annotations

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
