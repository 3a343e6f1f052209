"""Faults from outside the daemon: a full state filesystem, a locked state database,
inotify exhausted, and clients that misbehave on the socket.

Each case runs a real daemon, causes the fault for real (a tmpfs filled to ENOSPC, a
second SQLite connection holding the write lock, a lowered ``fs.inotify`` limit, raw
sockets), and checks that the daemon answers in the error envelope, changes nothing it
should not, keeps serving, and afterwards holds in its pool exactly the directories of
its active leases. Every wait is a condition with a deadline.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import shutil
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import IS_ROOT, Daemon, sysctl, tmpfs, wait_for

from scratchd.server import REQUEST_DEADLINE_SECONDS

MakeDaemon = Callable[..., Daemon]

INOTIFY_INSTANCES = Path("/proc/sys/fs/inotify/max_user_instances")

needs_tmpfs = pytest.mark.skipif(
    not IS_ROOT, reason="needs root: mounts a small tmpfs for the state directory"
)
needs_inotify_sysctl = pytest.mark.skipif(
    not (IS_ROOT and os.access(INOTIFY_INSTANCES, os.W_OK)),
    reason=f"needs root and a writable {INOTIFY_INSTANCES} to exhaust inotify",
)


# -- helpers ------------------------------------------------------------------------------------


def active_leases(daemon: Daemon) -> list[dict[str, Any]]:
    response = daemon.request("GET", "/v1/leases")
    assert response.status_code == 200, response.text
    return response.json()["leases"]


def assert_healthy(daemon: Daemon) -> None:
    """Alive, /healthz 200, and the pool holds exactly the active leases' directories."""
    assert daemon.process is not None and daemon.process.poll() is None, daemon.log()[-3000:]
    assert daemon.request("GET", "/healthz").status_code == 200
    leases = active_leases(daemon)
    assert daemon.pool_entries() == {os.path.basename(lease["path"]) for lease in leases}
    for lease in leases:
        assert os.path.isdir(lease["path"]), lease


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, body
    assert body["error"]["code"] == code and body["error"]["message"], body
    return body["error"]


def lease_state(daemon: Daemon, lease_id: str) -> dict[str, Any]:
    response = daemon.request("GET", f"/v1/leases/{lease_id}")
    assert response.status_code == 200, response.text
    return response.json()


def fill(directory: Path) -> Path:
    """Fill the filesystem of ``directory`` with one file until ENOSPC."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        chunk = b"\0" * 65536
        while chunk:
            try:
                os.write(fd, chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                chunk = chunk[: len(chunk) // 2]  # top up the last pages
    finally:
        os.close(fd)
    assert os.statvfs(directory).f_bavail == 0
    return filler


@contextlib.contextmanager
def write_locked(database: Path) -> Iterator[sqlite3.Connection]:
    """Another process's view of the daemon's database, holding its write lock."""
    db = sqlite3.connect(str(database), isolation_level=None, timeout=10)
    try:
        db.execute("BEGIN EXCLUSIVE")
        try:
            yield db
        finally:
            db.execute("ROLLBACK")
    finally:
        db.close()


@contextlib.contextmanager
def nofile_soft_limit(soft: int) -> Iterator[int]:
    """Run the block with RLIMIT_NOFILE's soft limit at ``soft``; yields the hard limit."""
    old_soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        yield hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (old_soft, hard))


def unix_connection(daemon: Daemon, first_bytes: bytes = b"") -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(daemon.socket)
    if first_bytes:
        sock.sendall(first_bytes)
    sock.setblocking(False)  # from here on only looked at, never waited on
    return sock


def closed_by_peer(sock: socket.socket) -> bool:
    """True once the daemon has closed this connection (EOF or reset), without blocking."""
    try:
        data = sock.recv(4096)
    except BlockingIOError:
        return False
    except OSError:
        return True
    return data == b""


def create_and_release(daemon: Daemon, rounds: int, timeout: float) -> float:
    """``rounds`` creates and releases on a fresh connection each; returns the slowest round."""
    slowest = 0.0
    for _ in range(rounds):
        started = time.monotonic()
        with daemon.client(timeout=timeout) as client:
            created = client.post("/v1/leases", json={})
            assert created.status_code == 201, created.text
            lease = created.json()
            released = client.delete(f"/v1/leases/{lease['id']}")
            assert released.status_code == 200, released.text
            assert released.json()["end_reason"] == "released"
        assert not os.path.lexists(lease["path"])
        slowest = max(slowest, time.monotonic() - started)
    return slowest


# -- 1. the state directory on a full filesystem ------------------------------------------------


def assert_release_recorded(daemon: Daemon, database: Path, lease_id: str) -> None:
    """The release is on record (``manager.retry_unrecorded`` writes one the store refused,
    every GC cycle, once it takes writes again), and still is after a restart."""

    def recorded() -> bool:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
            row = db.execute("SELECT state, end_reason FROM leases WHERE id = ?", (lease_id,)).fetchone()
        return row == ("ended", "released")

    wait_for(recorded, timeout=5, what="the end record written once the store takes writes")
    daemon.restart()
    ended = lease_state(daemon, lease_id)
    assert ended["state"] == "ended" and ended["end_reason"] == "released", ended


def create_until_refused(
    daemon: Daemon, most: int = 300
) -> tuple[list[dict[str, Any]], httpx.Response, set[str]]:
    """Creates on a full state filesystem until one is refused: (the leases created, the refusal,
    the pool's entries just before it).

    The store may still have room in the files it holds (SQLite starts its WAL over from
    the beginning after a checkpoint, and a database page has room for more rows): a
    create then succeeds, durably. Once a commit needs a block the filesystem does not
    have, within a few pages' worth of records, creates are refused.
    """
    created: list[dict[str, Any]] = []
    for _ in range(most):
        before = daemon.pool_entries()
        response = daemon.request("POST", "/v1/leases", json={})
        if response.status_code != 201:
            return created, response, before
        created.append(response.json())
        assert os.path.isdir(created[-1]["path"])
    raise AssertionError(f"{most} creates on a full state filesystem all succeeded")


@needs_tmpfs
@pytest.mark.timeout(60)
def test_full_state_filesystem_refuses_creates_and_still_ends_leases(
    make_daemon: MakeDaemon, tmp_path: Path
) -> None:
    with tmpfs(tmp_path / "statefs", size="2m") as state:
        daemon = make_daemon(server={"state_dir": str(state)})
        try:
            kept = daemon.lease()
            doomed = daemon.lease()
            filler = fill(state)

            # Create: 503 in the envelope, the mkdir undone, nothing else touched.
            created, refusal, entries = create_until_refused(daemon)
            assert entries == {kept["id"], doomed["id"]} | {lease["id"] for lease in created}
            error = assert_error(refusal, 503, "pool_unavailable")
            assert error["details"]["reason"], error
            assert daemon.pool_entries() == entries
            assert os.listdir(os.path.join(daemon.pool_path, ".trash")) == []
            assert lease_state(daemon, kept["id"])["state"] == "active"
            assert os.path.isdir(kept["path"])
            assert daemon.request("GET", "/healthz").status_code == 200

            # Release: the path is gone when the answer comes (guarantee 3) whether or not
            # the record can be written (when not, see the locked-database test).
            released = daemon.request("DELETE", f"/v1/leases/{doomed['id']}")
            assert released.status_code == 200, released.text
            assert released.json()["state"] == "ended" and released.json()["end_reason"] == "released"
            assert not os.path.lexists(doomed["path"])
            still_active = {kept["id"]} | {lease["id"] for lease in created}
            assert {lease["id"] for lease in active_leases(daemon)} == still_active

            # Room again: creates work, and the end is on record (at once, or written later).
            filler.unlink()
            again = daemon.lease()
            assert_healthy(daemon)

            assert_release_recorded(daemon, state / "scratchd.db", doomed["id"])
            # The creates that succeeded on the full filesystem were durable.
            assert {lease["id"] for lease in active_leases(daemon)} == still_active | {again["id"]}
            assert_healthy(daemon)
        finally:
            daemon.stop()


@needs_tmpfs
@pytest.mark.timeout(60)
def test_a_full_disk_refusal_names_its_cause(make_daemon: MakeDaemon, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "statefs", size="2m") as state:
        daemon = make_daemon(server={"state_dir": str(state)})
        try:
            daemon.lease()
            fill(state)
            _, refusal, _ = create_until_refused(daemon)
            error = assert_error(refusal, 503, "pool_unavailable")
            assert "full" in error["details"]["reason"], error
        finally:
            daemon.stop()


# -- 2. the state database locked by another process --------------------------------------------


@pytest.mark.timeout(40)
def test_locked_state_database_refuses_creates_in_bounded_time(make_daemon: MakeDaemon) -> None:
    # gc.interval at the product's default: its own writes wait for the lock too.
    daemon = make_daemon(gc={"interval": "5s"})
    kept = daemon.lease()
    entries = daemon.pool_entries()
    records = len(daemon.request("GET", "/v1/leases", params={"state": "all"}).json()["leases"])

    with write_locked(daemon.state_dir / "scratchd.db") as db:
        events_before = db.execute("SELECT MAX(seq) FROM events").fetchone()[0]
        started = time.monotonic()
        response = daemon.request("POST", "/v1/leases", json={})
        took = time.monotonic() - started
        error = assert_error(response, 503, "pool_unavailable")
        assert "locked" in error["details"]["reason"], error
        # busy_timeout is 2 s; at worst the request also waits behind one GC write (2 s more).
        assert took < 6, f"a create under a locked database took {took:.1f}s"
        assert daemon.pool_entries() == entries
        assert os.listdir(os.path.join(daemon.pool_path, ".trash")) == []
        assert os.path.isdir(kept["path"])
        assert daemon.request("GET", "/healthz").status_code == 200
        assert db.execute("SELECT MAX(seq) FROM events").fetchone()[0] == events_before
        assert db.execute("SELECT COUNT(*) FROM leases").fetchone()[0] == records

    started = time.monotonic()
    created = daemon.lease()
    assert time.monotonic() - started < 2
    assert os.path.isdir(created["path"])
    assert_healthy(daemon)


@pytest.mark.timeout(30)
def test_a_release_whose_record_cannot_be_written_ends_all_the_same(make_daemon: MakeDaemon) -> None:
    daemon = make_daemon()
    lease = daemon.lease()
    with write_locked(daemon.state_dir / "scratchd.db") as db:
        released = daemon.request("DELETE", f"/v1/leases/{lease['id']}")
        # Guarantee 3: the path is gone when the answer comes, though the record is not written.
        assert released.status_code == 200, released.text
        assert released.json()["state"] == "ended" and released.json()["end_reason"] == "released"
        assert not os.path.lexists(lease["path"])
        wait_for(
            lambda: "cannot record end of lease" in daemon.log() and lease["id"] in daemon.log(),
            timeout=5,
            what="the lost end record in the log (manager._record_lost)",
        )
        assert lease_state(daemon, lease["id"])["state"] == "ended"
        assert active_leases(daemon) == []
        assert db.execute("SELECT state FROM leases WHERE id = ?", (lease["id"],)).fetchone() == ("active",)

    assert_release_recorded(daemon, daemon.state_dir / "scratchd.db", lease["id"])
    assert_healthy(daemon)


@pytest.mark.timeout(30)
def test_a_locked_state_database_does_not_stall_unrelated_requests(make_daemon: MakeDaemon) -> None:
    daemon = make_daemon()  # gc.interval 0.2 s: a GC write every cycle waits for the lock
    with write_locked(daemon.state_dir / "scratchd.db"), daemon.client(timeout=10) as client:
        slowest = 0.0
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            started = time.monotonic()
            assert client.get("/healthz").status_code == 200
            slowest = max(slowest, time.monotonic() - started)
    assert slowest < 0.5, f"/healthz took {slowest:.2f}s while the database was locked"


# -- 3. inotify exhausted -----------------------------------------------------------------------


@needs_inotify_sysctl
@pytest.mark.timeout(30)
def test_pool_watch_refused_by_inotify_falls_back_to_gc(make_daemon: MakeDaemon) -> None:
    # Each watch makes its inotify instance at its first watch: with no instance left for
    # root, the daemon's pool watch is refused.
    daemon = make_daemon(start=False, gc={"interval": "0.5s"})
    with sysctl(INOTIFY_INSTANCES, 0):
        daemon.start()
        wait_for(
            lambda: "cannot watch pool" in daemon.log(), timeout=5, what="'cannot watch pool' in the log"
        )
        kept = daemon.lease()
        removed = daemon.lease()
        released = daemon.lease()
        assert daemon.request("DELETE", f"/v1/leases/{released['id']}").status_code == 200
        assert not os.path.lexists(released["path"])

        shutil.rmtree(removed["path"])  # the user removes the directory: only the GC scan can tell
        started = time.monotonic()
        wait_for(
            lambda: lease_state(daemon, removed["id"])["state"] == "ended",
            timeout=2,
            what="the removed directory's lease to end (guarantee 5: within 2 s)",
        )
        took = time.monotonic() - started
        assert lease_state(daemon, removed["id"])["end_reason"] == "directory_removed"
        assert took <= 0.5 + 1.0, f"ended after {took:.2f}s; gc.interval is 0.5s"
        assert {lease["id"] for lease in active_leases(daemon)} == {kept["id"]}
        assert_healthy(daemon)
    assert_healthy(daemon)


@needs_inotify_sysctl
@pytest.mark.timeout(30)
def test_ending_an_idle_timeout_lease_while_inotify_is_exhausted(make_daemon: MakeDaemon) -> None:
    daemon = make_daemon(start=False)
    with sysctl(INOTIFY_INSTANCES, 0):
        daemon.start()
        lease = daemon.lease(idle_timeout_seconds=600)
        response = daemon.request("DELETE", f"/v1/leases/{lease['id']}")
        assert not os.path.lexists(lease["path"])  # ended all the same; only the answer is wrong
        assert response.status_code == 200, response.text
    assert_healthy(daemon)


# -- 4. clients that misbehave ------------------------------------------------------------------


@pytest.mark.timeout(40)
def test_slow_loris_connections_do_not_block_others_and_are_closed(make_daemon: MakeDaemon) -> None:
    daemon = make_daemon()
    partial = [
        b"GET /heal",  # half a request line
        b"POST /v1/leases HTTP/1.1\r\nHost: scratchd\r\nContent-Type: app",  # half the headers
        b"POST /v1/leases HTTP/1.1\r\nHost: scratchd\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"labels":',  # headers, then a tenth of the body
        b"",  # nothing at all
    ]
    opened = time.monotonic()
    loris = [unix_connection(daemon, partial[i % len(partial)]) for i in range(50)]
    # Some stay inside their request line or headers by sending one more byte each round:
    # that must not push their deadline back.
    trickling = [sock for i, sock in enumerate(loris) if i % len(partial) in (0, 1)][:6]
    try:
        slowest = create_and_release(daemon, rounds=10, timeout=5)
        assert slowest < 2, f"a create and release took {slowest:.2f}s next to 50 stalled connections"
        assert not any(closed_by_peer(sock) for sock in loris)  # nothing closed them early either

        def all_closed() -> bool:
            for sock in trickling:
                with contextlib.suppress(OSError):
                    sock.send(b"l")  # "GET /heall…", "Content-Type: appl…"
            return all(closed_by_peer(sock) for sock in loris)

        wait_for(
            all_closed,
            timeout=REQUEST_DEADLINE_SECONDS + 5 - (time.monotonic() - opened),
            interval=0.25,
            what="the daemon to close connections that never finish their request",
        )
        assert time.monotonic() - opened >= REQUEST_DEADLINE_SECONDS - 0.5
    finally:
        for sock in loris:
            sock.close()
    assert "did not send a whole request in time" in daemon.log()
    assert "internal error" not in daemon.log()
    assert active_leases(daemon) == []
    assert_healthy(daemon)


@pytest.mark.timeout(40)
def test_two_thousand_idle_connections_leave_room_for_a_new_client(make_daemon: MakeDaemon) -> None:
    idle_count = 2000
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < idle_count + 200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low to hold {idle_count} connections")
    # Started with the soft limit most hosts give a process (1024, the hard limit above
    # it): past it, libuv accepts and drops every new connection without a word.
    with nofile_soft_limit(1024):
        daemon = make_daemon()
    assert daemon.process is not None
    pid = daemon.process.pid

    idle: list[socket.socket] = []
    with nofile_soft_limit(hard):
        try:
            for _ in range(idle_count):
                idle.append(unix_connection(daemon))
            # The backlog holds 1024: the last connect returned once the daemon had taken
            # the rest, so this client queues behind all of them.
            started = time.monotonic()
            assert daemon.request("GET", "/healthz", timeout=5).status_code == 200
            slowest = create_and_release(daemon, rounds=3, timeout=5)
            assert slowest < 2 and time.monotonic() - started < 5
            wait_for(
                lambda: len(os.listdir(f"/proc/{pid}/fd")) > idle_count,
                timeout=5,
                what=f"the daemon to hold {idle_count} connections",
            )
            assert not any(closed_by_peer(sock) for sock in idle)
            assert_healthy(daemon)
        finally:
            for sock in idle:
                sock.close()
    limits = Path(f"/proc/{pid}/limits").read_text()
    nofile = next(line.split()[3:5] for line in limits.splitlines() if line.startswith("Max open files"))
    assert nofile == [str(hard), str(hard)], f"the daemon's open-files limit (soft, hard): {nofile}"
    assert_healthy(daemon)


@pytest.mark.timeout(30)
def test_body_cut_short_creates_nothing(make_daemon: MakeDaemon) -> None:
    daemon = make_daemon()
    records = len(daemon.request("GET", "/v1/leases", params={"state": "all"}).json()["leases"])
    body = b'{"ttl_secs'  # 10 of the 100 bytes announced
    request = (
        b"POST /v1/leases HTTP/1.1\r\nHost: scratchd\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n" + body
    )
    assert len(body) == 10
    for _ in range(20):  # the daemon reads headers and 10 bytes, then the end of the stream
        sock = unix_connection(daemon, request)
        sock.shutdown(socket.SHUT_WR)
        sock.close()
        assert daemon.request("GET", "/healthz").status_code == 200
    kept = daemon.lease()
    assert create_and_release(daemon, rounds=3, timeout=5) < 2
    assert {lease["id"] for lease in active_leases(daemon)} == {kept["id"]}
    assert len(daemon.request("GET", "/v1/leases", params={"state": "all"}).json()["leases"]) == records + 4
    assert "internal error" not in daemon.log()
    assert_healthy(daemon)
