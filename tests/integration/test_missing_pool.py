"""A pool missing at start is not fatal: the daemon serves the rest, and the pool comes up by itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conftest import needs_root, tmpfs, wait_for


def test_a_pool_missing_at_start_comes_up_when_its_directory_appears(
    make_daemon: Any, tmp_path: Path
) -> None:
    main, later = tmp_path / "main", tmp_path / "later"
    main.mkdir()
    daemon = make_daemon(pool=[{"name": "main", "path": str(main)}, {"name": "later", "path": str(later)}])

    status = daemon.pool("later")
    assert (status["state"], status["reason"]) == ("unavailable", "missing"), status
    assert status["message"] == f"Pool path {later} does not exist."
    assert (daemon.pool("main")["state"], daemon.pool("main")["reason"]) == ("ok", None)
    assert (daemon.pool_up("later"), daemon.pool_up("main")) == (0, 1)
    warning = next(line for line in daemon.log().splitlines() if '"pool": "later"' in line)
    assert '"level": "warning"' in warning and "does not exist" in warning, warning
    assert daemon.lease()["pool"] == "main"
    refused = daemon.request("POST", "/v1/leases", json={"pool": "later"})
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["details"]["reason"] == "missing"
    assert not later.exists()  # never created by the daemon

    later.mkdir()
    wait_for(lambda: daemon.pool("later")["state"] == "ok", timeout=5, what="the pool coming up")
    assert daemon.pool_up("later") == 1
    assert daemon.lease(pool="later")["path"].startswith(f"{later}/")
    assert (later / ".lock").read_text() == f"{daemon.process.pid}\n"


def test_no_pool_at_all_yet_the_daemon_still_starts(make_daemon: Any, tmp_path: Path) -> None:
    daemon = make_daemon(pool=[{"name": "later", "path": str(tmp_path / "later")}])
    assert daemon.request("GET", "/healthz").status_code == 200
    assert daemon.request("GET", "/readyz").status_code == 503  # ready = at least one pool ok
    (tmp_path / "later").mkdir()
    wait_for(lambda: daemon.request("GET", "/readyz").status_code == 200, timeout=5, what="ready")


def test_pool_up_is_0_only_when_unavailable(make_daemon: Any, tmp_path: Path) -> None:
    # A full pool is still mounted and served (its leases work): up, though it takes no new leases.
    (tmp_path / "full").mkdir()
    daemon = make_daemon(
        pool=[
            {"name": "full", "path": str(tmp_path / "full"), "reserve": "100%"},
            {"name": "gone", "path": str(tmp_path / "gone")},
        ]
    )
    assert (daemon.pool("full")["state"], daemon.pool("full")["reason"]) == ("full", "full")
    assert (daemon.pool_up("full"), daemon.pool_up("gone")) == (1, 0)


@needs_root
def test_a_pool_whose_disk_is_mounted_after_start(make_daemon: Any, tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()  # the mount point exists; nothing is mounted on it yet
    (tmp_path / "main").mkdir()
    daemon = make_daemon(
        pool=[
            {"name": "main", "path": str(tmp_path / "main")},
            {"name": "disk", "path": str(disk), "mount_point": str(disk)},
        ]
    )
    status = daemon.pool("disk")
    assert (status["state"], status["reason"]) == ("unavailable", "not_on_mount_point"), status
    assert daemon.pool_up("disk") == 0
    assert not (disk / ".lock").exists()  # nothing written on the parent filesystem

    with tmpfs(disk, size="8m"):
        wait_for(lambda: daemon.pool("disk")["state"] == "ok", timeout=5, what="the pool coming up")
        status = daemon.pool("disk")
        assert (status["reason"], status["fstype"], status["mount_point"]) == (None, "tmpfs", str(disk))
        assert daemon.pool_up("disk") == 1
        lease = daemon.lease(pool="disk")
        assert Path(lease["path"]).parent == disk
