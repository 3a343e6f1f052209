"""A real daemon whose inotify queues overflow: it says so, lives on, and its watches still work."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import QUEUED_EVENTS, needs_queue_sysctl, sysctl, wait_for


@contextlib.contextmanager
def stopped(daemon) -> Iterator[None]:
    """The daemon's process stopped (SIGSTOP) for the block."""
    os.kill(daemon.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(daemon.process.pid, signal.SIGCONT)


def state_of(daemon, lease_id: str) -> dict:
    response = daemon.request("GET", f"/v1/leases/{lease_id}")
    assert response.status_code == 200, response.text
    return response.json()


def ended_reasons(daemon) -> dict[str, str]:
    response = daemon.request("GET", "/v1/leases", params={"state": "ended"})
    assert response.status_code == 200, response.text
    return {lease["id"]: lease["end_reason"] for lease in response.json()["leases"]}


def overflow_warnings(daemon) -> set[str]:
    """The watches ("pools", "activity") that logged an overflow."""
    return {
        watch
        for line in daemon.log().splitlines()
        if "inotify queue overflowed" in line
        for watch in ("pools", "activity")
        if f'"watch": "{watch}"' in line
    }


@needs_queue_sysctl
@pytest.mark.timeout(60)
def test_watches_outlive_overflowing_queues(make_daemon):
    # A GC cycle every 5 s, an idle timeout of 1 s: between two cycles' scans, only the
    # activity watch can tell a lease is being written; and the GC re-checks no watched
    # pool's directories, so only the pool watch can end a removed lease within 2 s.
    daemon = make_daemon(start=False, gc={"interval": "5s"})
    with sysctl(QUEUED_EVENTS, 16):  # only as long as the daemon takes to make its two instances
        daemon.start()
        flooded = daemon.lease(idle_timeout_seconds=600)  # the activity watch's instance starts here
    doomed = [daemon.lease() for _ in range(60)]

    with stopped(daemon):  # every event queues unread: both queues overflow, whatever the host's speed
        for i in range(5000):
            Path(flooded["path"], f"f{i}").write_bytes(b"")
        for lease in doomed:
            os.rmdir(lease["path"])
    removed_at = time.monotonic()
    wait_for(
        lambda: overflow_warnings(daemon) == {"pools", "activity"},
        timeout=5,
        what=f"both watches to log an overflow (log: {daemon.log_path})",
    )

    ids = {lease["id"] for lease in doomed}
    ended = wait_for(
        lambda: ids <= (reasons := ended_reasons(daemon)).keys() and reasons,
        timeout=2,
        what="every lease removed while events were lost to end within 2 s",
    )
    assert time.monotonic() - removed_at <= 2
    assert {ended[lease_id] for lease_id in ids} == {"directory_removed"}

    gone = daemon.lease()  # removed after the overflows, alone
    os.rmdir(gone["path"])
    wait_for(
        lambda: state_of(daemon, gone["id"])["state"] == "ended",
        timeout=2,
        what="a lease removed after the overflows to end within 2 s",
    )
    assert state_of(daemon, gone["id"])["end_reason"] == "directory_removed"

    writer = daemon.lease(idle_timeout_seconds=1)
    until = time.monotonic() + 11  # two GC cycles
    while time.monotonic() < until:
        try:
            Path(writer["path"], "log").write_text(str(time.time()))
        except FileNotFoundError:
            pytest.fail(f"ended while being written: {state_of(daemon, writer['id'])['end_reason']}")
        time.sleep(0.1)  # the writer's own pace, not a wait for the daemon
    assert daemon.process.poll() is None
    assert daemon.request("GET", "/healthz").status_code == 200
