"""Every way a lease ends (docs/api.md) and guarantees 2-5 (README), against a real daemon process."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import bind_mount, needs_root, tmpfs, wait_for

SLOW_GC = {"interval": "30s"}  # only events (pidfd, inotify) can end a lease in time


def state_of(daemon, lease_id: str) -> dict:
    return daemon.request("GET", f"/v1/leases/{lease_id}").json()


def wait_ended(daemon, lease_id: str, timeout: float) -> dict:
    return wait_for(
        lambda: (state := state_of(daemon, lease_id))["state"] == "ended" and state,
        timeout=timeout,
        what=f"lease {lease_id} to end",
    )


def trash_empty(pool_path: str) -> bool:
    return os.listdir(os.path.join(pool_path, ".trash")) == []


def events(daemon, kind: str) -> list[dict]:
    return [
        e
        for e in daemon.request("GET", "/v1/events", params={"limit": 1000}).json()["events"]
        if e["kind"] == kind
    ]


def sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])


# -- process_exited ------------------------------------------------------------------------


def test_bound_process_exit_ends_lease_within_2s(make_daemon):
    daemon = make_daemon(gc=SLOW_GC)
    child = sleeper()
    lease = daemon.lease(pid=child.pid)
    child.kill()
    child.wait()
    ended = wait_ended(daemon, lease["id"], timeout=2.0)
    assert ended["end_reason"] == "process_exited"
    assert not os.path.lexists(lease["path"])


def test_pid_binding_survives_restart(make_daemon):
    daemon = make_daemon(gc=SLOW_GC)
    child, survivor = sleeper(), sleeper()
    try:
        gone = daemon.lease(pid=child.pid)
        kept = daemon.lease(pid=survivor.pid)
        daemon.stop()
        child.kill()
        child.wait()
        daemon.start()
        assert state_of(daemon, gone["id"])["end_reason"] == "process_exited"
        assert state_of(daemon, kept["id"])["state"] == "active"
        survivor.kill()
        survivor.wait()
        assert wait_ended(daemon, kept["id"], timeout=2.0)["end_reason"] == "process_exited"
    finally:
        for process in (child, survivor):
            process.kill()
            process.wait()


def test_pid_reuse_is_not_mistaken_for_the_bound_process():
    from scratchd.reclaim.procs import identify, open_pidfd

    me = identify(os.getpid())
    assert me is not None and me.uid == os.getuid()
    fd = open_pidfd(os.getpid(), me.start_time)
    assert fd is not None
    os.close(fd)
    assert open_pidfd(os.getpid(), me.start_time + 1) is None  # same pid, another start time


@pytest.mark.shared_daemon
def test_a_threads_id_is_not_a_process_to_bind(daemon):
    """/proc answers for a thread's id too, but the kernel gives no pidfd for it: refused, not a crash."""
    started, stop = threading.Event(), threading.Event()
    tids: list[int] = []

    def run() -> None:
        tids.append(threading.get_native_id())
        started.set()
        stop.wait()

    thread = threading.Thread(target=run)
    thread.start()
    try:
        started.wait()
        refused = daemon.request("POST", "/v1/leases", json={"pid": tids[0]})
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"]["details"]["fields"] == {"pid": "not a live process"}
        assert daemon.lease(pid=os.getpid())["pid"] == os.getpid()  # the process itself binds
    finally:
        stop.set()
        thread.join()


# -- directory_removed -----------------------------------------------------------------------


def test_removed_directory_ends_lease_within_2s(make_daemon):
    daemon = make_daemon(gc=SLOW_GC)
    lease = daemon.lease()
    Path(lease["path"], "f").write_text("x")
    subprocess.run(["rm", "-rf", lease["path"]], check=True)
    assert wait_ended(daemon, lease["id"], timeout=2.0)["end_reason"] == "directory_removed"


def test_directory_renamed_away_ends_lease(make_daemon, tmp_path):
    daemon = make_daemon(gc=SLOW_GC)
    lease = daemon.lease()
    os.rename(lease["path"], os.path.join(daemon.pool_path, "moved-by-user"))
    assert wait_ended(daemon, lease["id"], timeout=2.0)["end_reason"] == "directory_removed"


# -- idle, over_quota ------------------------------------------------------------------------


def test_active_writer_stays_and_idle_lease_ends(make_daemon):
    daemon = make_daemon(gc={"interval": "0.2s"})
    busy = daemon.lease(idle_timeout_seconds=2)
    idle = daemon.lease(idle_timeout_seconds=2)
    deep = Path(busy["path"], "a", "b", "c")
    deep.mkdir(parents=True)
    stop = time.monotonic() + 4.5
    while time.monotonic() < stop:  # a write deep in the tree every 0.5 s
        (deep / "log").write_text(str(time.time()))
        time.sleep(0.5)
        assert state_of(daemon, busy["id"])["state"] == "active"
    assert state_of(daemon, idle["id"])["end_reason"] == "idle"
    assert wait_ended(daemon, busy["id"], timeout=6)["end_reason"] == "idle"


def test_over_quota_ends_lease(make_daemon):
    daemon = make_daemon(gc={"interval": "0.2s"})
    lease = daemon.lease(max_bytes=1 << 20)
    with open(os.path.join(lease["path"], "big"), "wb") as f:
        f.write(os.urandom(2 << 20))
    ended = wait_ended(daemon, lease["id"], timeout=10)
    assert ended["end_reason"] == "over_quota"
    event = next(e for e in events(daemon, "lease_ended") if e["lease_id"] == lease["id"])
    assert event["reason"] == "over_quota" and event["details"]["bytes"] > 1 << 20


def test_usage_counts_hard_links_once(make_daemon):
    daemon = make_daemon(gc={"interval": "0.2s"})
    lease = daemon.lease(max_bytes=3 << 20)  # counted twice, it would also end over_quota
    data = Path(lease["path"], "data")
    data.write_bytes(os.urandom(2 << 20))
    os.link(data, Path(lease["path"], "again"))
    linked_at = time.time()

    def measured() -> dict | None:
        lease_now = state_of(daemon, lease["id"])
        usage = lease_now["usage"]
        if lease_now["state"] != "active" or (
            usage["measured_at"] and _epoch(usage["measured_at"]) > linked_at
        ):
            return lease_now
        return None

    lease_now = wait_for(measured, timeout=10, what="usage measured after the link")
    assert lease_now["state"] == "active", lease_now
    assert 2 << 20 <= lease_now["usage"]["bytes"] < 3 << 20  # 2 MiB, not 4
    assert lease_now["usage"]["files"] == 1  # one inode


def _epoch(timestamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


# -- orphans (guarantee 4) ---------------------------------------------------------------------


def test_orphans_reclaimed_after_grace_counted_from_first_sighting(make_daemon):
    daemon = make_daemon(gc={"interval": "0.2s", "orphan_grace": "2s"})
    lease = daemon.lease()
    stray_dir = Path(daemon.pool_path, "stray-copy")
    stray_dir.mkdir()
    (stray_dir / "f").write_text("x")
    stray_file = Path(daemon.pool_path, "stray-file")
    stray_file.write_text("x")
    wait_for(lambda: not stray_dir.exists() and not stray_file.exists(), timeout=10, what="orphans reclaimed")
    reclaimed = {e["details"]["entry"] for e in events(daemon, "orphan_reclaimed")}
    assert reclaimed == {"stray-copy", "stray-file"}
    assert os.path.isdir(lease["path"])  # the lease is not an orphan
    wait_for(lambda: trash_empty(daemon.pool_path), what="trash drained")


def test_orphan_grace_is_not_reset_by_restart(make_daemon):
    daemon = make_daemon(gc={"interval": "0.2s", "orphan_grace": "3s"})
    stray = Path(daemon.pool_path, "stray")
    stray.mkdir()
    first_seen = time.monotonic()
    wait_for(lambda: "stray" in _sighted(daemon), timeout=5, what="orphan sighted")
    daemon.stop()
    daemon.start()
    wait_for(lambda: not stray.exists(), timeout=10, what="orphan reclaimed")
    # Reclaimed at first sighting + grace, not restart + grace: the restart itself took time.
    assert events(daemon, "orphan_reclaimed")
    assert time.monotonic() - first_seen >= 3


def _sighted(daemon) -> set[str]:
    import sqlite3

    with sqlite3.connect(daemon.state_dir / "scratchd.db") as db:
        return {name for (name,) in db.execute("SELECT name FROM orphans")}


# -- safe deletion (guarantee 3) ------------------------------------------------------------------


def build_hostile_tree(root: Path, outside: Path) -> dict[Path, bytes]:
    """Everything a tenant could leave behind; returns the canaries that must survive."""
    outside.mkdir()
    canaries = {
        outside / "canary-dir" / "keep": b"dir canary",
        outside / "canary-file": b"file canary",
        outside / "linked": b"hard linked",
    }
    for path, content in canaries.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    (root / "to-dir").symlink_to(outside / "canary-dir")
    (root / "to-file").symlink_to(outside / "canary-file")
    (root / "loop").symlink_to(root / "loop")
    os.link(outside / "linked", root / "hardlink")
    locked = root / "locked"
    (locked / "inner").mkdir(parents=True)
    (locked / "inner" / "secret").write_text("x")
    os.chmod(locked / "inner", 0)
    os.chmod(locked, 0)
    readonly = root / "readonly"
    readonly.mkdir()
    (readonly / "f").write_text("x")
    os.chmod(readonly, 0o500)
    fd = os.open(root, os.O_RDONLY)
    for _ in range(10_000):  # deeper than PATH_MAX: built fd-relative
        os.mkdir("d", dir_fd=fd)
        child = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = child
    with open(os.open("bottom", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd), "w") as f:
        f.write("bottom")
    os.close(fd)
    os.mkfifo(root / "fifo")
    return canaries


def test_release_of_hostile_tree_touches_nothing_outside(daemon, tmp_path):
    lease = daemon.lease()
    canaries = build_hostile_tree(Path(lease["path"]), tmp_path / "outside")
    released = daemon.request("DELETE", f"/v1/leases/{lease['id']}")
    assert released.status_code == 200 and not os.path.lexists(lease["path"])
    wait_for(lambda: trash_empty(daemon.pool_path), timeout=60, what="trash drained")
    for path, content in canaries.items():
        assert path.read_bytes() == content, path
    assert os.stat(tmp_path / "outside" / "linked").st_nlink == 1
    assert not events(daemon, "reclaim_failed")


@pytest.mark.shared_daemon
@needs_root
def test_bind_mount_inside_lease_is_detached_never_descended(daemon, tmp_path):
    outside = tmp_path / "outside-mounted"
    outside.mkdir()
    (outside / "canary").write_text("keep me")
    lease = daemon.lease()
    with bind_mount(outside, Path(lease["path"], "mnt")):
        daemon.request("DELETE", f"/v1/leases/{lease['id']}")
        wait_for(lambda: trash_empty(daemon.pool_path), timeout=30, what="trash drained")
    assert (outside / "canary").read_text() == "keep me"


def _niceness(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[16])


@pytest.mark.shared_daemon
def test_the_deleter_keeps_the_daemons_priority_and_the_scanner_yields(daemon):
    """A niced deleter starves on a busy host while the trash fills (offload's docstring)."""
    leased = daemon.lease()
    Path(leased["path"], "f").write_bytes(b"x")
    daemon.request("DELETE", f"/v1/leases/{leased['id']}")  # both workers have been used now

    def workers() -> list[int]:  # multiprocessing's resource tracker is a child too
        with open(f"/proc/{daemon.process.pid}/task/{daemon.process.pid}/children") as f:
            children = [int(pid) for pid in f.read().split()]
        return [pid for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]

    own = _niceness(daemon.process.pid)
    # A worker process exists a little before its initializer has set its niceness.
    wait_for(
        lambda: sorted(_niceness(pid) - own for pid in workers()) == [0, 10],
        what="the deleter at the daemon's niceness and the scanner 10 above it",
    )


def test_trash_resumes_after_kill_mid_deletion(daemon):
    lease = daemon.lease()
    root = Path(lease["path"])
    for i in range(200):
        sub = root / f"d{i}"
        sub.mkdir()
        for j in range(100):
            (sub / f"f{j}").write_bytes(b"x")
    daemon.request("DELETE", f"/v1/leases/{lease['id']}")
    daemon.kill()  # most likely mid-deletion; either way the trash must end up empty
    daemon.start()
    wait_for(lambda: trash_empty(daemon.pool_path), timeout=60, what="trash drained after restart")


# -- pools going away (guarantee 2: nothing deleted there) -------------------------------------------


@needs_root
def test_pool_unmounted_under_the_daemon(make_daemon, tmp_path):
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    underlying = mount_point / "pool"
    underlying.mkdir()
    (underlying / "canary").write_text("underneath")
    healthy = tmp_path / "healthy"
    healthy.mkdir()
    with tmpfs(mount_point):
        (mount_point / "pool").mkdir()
        daemon = make_daemon(
            pool=[
                {"name": "disk", "path": str(mount_point / "pool")},
                {"name": "healthy", "path": str(healthy)},
            ],
            gc={"interval": "0.2s", "orphan_grace": "1s"},
        )
        lease = daemon.lease(pool="disk")
        Path(lease["path"], "work").write_text("job output")
        subprocess.run(["umount", "-l", str(mount_point)], check=True)
        ended = wait_ended(daemon, lease["id"], timeout=10)
        assert ended["end_reason"] == "pool_lost"
        pools = {p["name"]: p for p in daemon.request("GET", "/v1/pools").json()["pools"]}
        assert pools["disk"]["state"] == "unavailable"
        refused = daemon.request("POST", "/v1/leases", json={"pool": "disk"})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "pool_unavailable"
        # An orphan in the healthy pool is reclaimed after grace, which shows orphan review
        # ran past grace; whatever is now at the lost pool's path was left alone meanwhile.
        (healthy / "stray").mkdir()
        wait_for(lambda: not (healthy / "stray").exists(), timeout=10, what="orphan review past grace")
        assert (underlying / "canary").read_text() == "underneath"
        assert sorted(os.listdir(underlying)) == ["canary"]
        daemon.stop()


@needs_root
def test_full_filesystem(make_daemon, tmp_path):
    with tmpfs(tmp_path / "small", size="4m") as small:
        (small / "pool").mkdir()
        daemon = make_daemon(pool=[{"name": "small", "path": str(small / "pool")}], gc={"interval": "0.2s"})
        lease = daemon.lease()
        with pytest.raises(OSError) as excinfo, open(os.path.join(lease["path"], "fill"), "wb") as f:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        assert excinfo.value.errno == 28  # ENOSPC
        wait_for(
            lambda: daemon.request("GET", "/v1/pools").json()["pools"][0]["state"] == "full", what="pool full"
        )
        refused = daemon.request("POST", "/v1/leases", json={})
        assert refused.status_code == 507 and refused.json()["error"]["code"] == "insufficient_storage"
        assert state_of(daemon, lease["id"])["state"] == "active"  # guarantee 2
        assert os.path.getsize(os.path.join(lease["path"], "fill")) > 0
        assert daemon.request("DELETE", f"/v1/leases/{lease['id']}").status_code == 200
        wait_for(
            lambda: daemon.request("GET", "/v1/pools").json()["pools"][0]["state"] == "ok",
            timeout=10,
            what="space back",
        )
        daemon.lease()
        daemon.stop()


@needs_root
def test_pool_remounted_read_only(make_daemon, tmp_path):
    with tmpfs(tmp_path / "ro") as fs:
        (fs / "pool").mkdir()
        daemon = make_daemon(pool=[{"name": "ro", "path": str(fs / "pool")}], gc={"interval": "0.2s"})
        lease = daemon.lease(ttl_seconds=1)
        subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
        wait_for(
            lambda: daemon.request("GET", "/v1/pools").json()["pools"][0]["state"] == "read_only",
            what="pool read-only",
        )
        refused = daemon.request("POST", "/v1/leases", json={})
        assert refused.status_code == 503
        # expired, but its directory cannot be moved: it stays active and intact (guarantee 2/3)
        wait_for(lambda: "cannot end lease yet" in daemon.log(), timeout=10, what="end attempt")
        assert state_of(daemon, lease["id"])["state"] == "active" and os.path.isdir(lease["path"])
        subprocess.run(["mount", "-o", "remount,rw", str(fs)], check=True)
        assert wait_ended(daemon, lease["id"], timeout=10)["end_reason"] == "expired"
        daemon.stop()


@needs_root
def test_eviction_takes_evictable_least_recently_active_first(make_daemon, tmp_path):
    with tmpfs(tmp_path / "ev", size="16m") as fs:
        (fs / "pool").mkdir()
        daemon = make_daemon(
            pool=[{"name": "ev", "path": str(fs / "pool"), "reserve": "6M"}], gc={"interval": "0.2s"}
        )
        pinned = daemon.lease()
        first = daemon.lease(evictable=True)
        second = daemon.lease(evictable=True)

        def written(lease: dict, after: str) -> bool:
            """Measured, and active since ``after``: activity seen in one batch shares one time."""
            now = state_of(daemon, lease["id"])
            return now["usage"]["bytes"] >= 4 << 20 and now["last_activity_at"] > after

        Path(second["path"], "data").write_bytes(b"\1" * (4 << 20))
        wait_for(lambda: written(second, second["last_activity_at"]), what="second written and measured")
        since = state_of(daemon, second["id"])["last_activity_at"]
        Path(first["path"], "data").write_bytes(b"\1" * (4 << 20))  # first is now the most recently active
        wait_for(lambda: written(first, since), what="first written later and measured")
        Path(pinned["path"], "data").write_bytes(b"\1" * (4 << 20))  # free now below the reserve
        assert wait_ended(daemon, second["id"], timeout=10)["end_reason"] == "evicted"
        wait_for(
            lambda: daemon.request("GET", "/v1/pools").json()["pools"][0]["free_bytes"] >= 6 << 20,
            timeout=10,
            what="free space back above reserve",
        )
        assert state_of(daemon, first["id"])["state"] == "active"
        assert state_of(daemon, pinned["id"])["state"] == "active"
        daemon.stop()


# -- crash loops (guarantee 2) -----------------------------------------------------------------------


def test_kill_9_at_random_points_never_loses_an_active_directory(make_daemon):
    daemon = make_daemon(gc={"interval": "0.1s", "orphan_grace": "1s"})
    rng = random.Random(1234)
    for _ in range(12):
        stop = threading.Event()

        def churn(stop: threading.Event) -> None:
            try:
                with daemon.client(timeout=5) as client:
                    while not stop.is_set():
                        lease = client.post("/v1/leases", json={"ttl_seconds": rng.choice([1, 60])}).json()
                        Path(lease["path"], "f").write_text("x")
                        if rng.random() < 0.5:
                            client.delete(f"/v1/leases/{lease['id']}")
            except (httpx.HTTPError, KeyError, OSError, ValueError):
                pass  # the daemon died under us: expected

        worker = threading.Thread(target=churn, args=(stop,))
        worker.start()
        wait_for(lambda: len(os.listdir(daemon.pool_path)) > 3, what="some churn")
        time.sleep(rng.uniform(0, 0.2))  # a random moment, on purpose
        daemon.process.send_signal(signal.SIGKILL)
        daemon.process.wait()
        stop.set()
        worker.join()
        daemon.start()
        for lease in daemon.request("GET", "/v1/leases").json()["leases"]:
            # A 1 s lease may expire between the listing and the look: then it must have ended.
            assert os.path.isdir(lease["path"]) or state_of(daemon, lease["id"])["state"] == "ended", lease

    def no_leaks() -> bool:
        active = {lease["id"] for lease in daemon.request("GET", "/v1/leases").json()["leases"]}
        entries = daemon.pool_entries()
        return entries == active and trash_empty(daemon.pool_path)

    wait_for(no_leaks, timeout=15, what="no leaks: orphans and trash reclaimed")


@needs_root
def test_pid_binding_from_another_pid_namespace(make_daemon):
    """``scratchd run`` in a container sends its own pid, numbered in the container's namespace."""
    daemon = make_daemon(gc=SLOW_GC)
    src = str(Path(__file__).resolve().parents[2] / "src")
    code = (
        f"import json, os, sys; sys.path.insert(0, {src!r});"
        "from scratchd.client import Client;"
        f"lease = Client(socket={daemon.socket!r}).create_lease(pid=os.getpid());"
        "print(json.dumps({'lease': lease, 'ns_pid': os.getpid()}), flush=True); sys.stdin.read()"
    )
    inner = subprocess.Popen(
        ["unshare", "--pid", "--fork", sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert inner.stdin is not None and inner.stdout is not None
    try:
        import json

        answer = json.loads(inner.stdout.readline())
        lease = answer["lease"]
        assert answer["ns_pid"] == 1 and lease["pid"] != 1  # bound to the process, not to host pid 1
        assert state_of(daemon, lease["id"])["state"] == "active"
    finally:
        inner.stdin.close()
        inner.wait(10)
    assert wait_ended(daemon, lease["id"], timeout=2.0)["end_reason"] == "process_exited"


# -- fresh usage -----------------------------------------------------------------------------


@pytest.mark.shared_daemon
def test_usage_is_measured_again_within_5s_after_writes_stop(daemon):
    # No idle timeout, no byte limit: the periodic pass would measure this lease a minute from now.
    lease = daemon.lease()
    with open(os.path.join(lease["path"], "data"), "wb") as f:
        f.write(os.urandom(3 << 20))
    stopped = time.monotonic()
    wait_for(
        lambda: state_of(daemon, lease["id"])["usage"]["bytes"] >= 3 << 20,
        timeout=5 + 5,
        what="usage of 3 MiB (5 s, and as much again for a loaded host; the periodic pass is 60 s)",
    )
    assert time.monotonic() - stopped < 10
