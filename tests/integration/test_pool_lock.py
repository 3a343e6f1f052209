"""One daemon per pool: a second daemon configured with a pool the first serves never touches it.

Real daemons on real sockets. The second daemon is given a tiny ``gc.orphan_grace`` and an
orphan of its own in a pool of its own: seeing that orphan reclaimed proves its orphan review
ran past its grace, with the shared pool configured, and still left the first's leases alone.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from conftest import Daemon, wait_for

GRACE = {"interval": "0.2s", "orphan_grace": "0.5s"}


def reclaimed_orphans(daemon: Daemon, pool_name: str) -> set[str]:
    events = daemon.request("GET", "/v1/events", params={"since": 0, "limit": 1000}).json()["events"]
    return {
        e["details"]["entry"] for e in events if e["kind"] == "orphan_reclaimed" and e["pool"] == pool_name
    }


def snapshot(path: str) -> dict[str, tuple[int, int]]:
    """Every name in the pool and its trash, with mode and mtime: what a daemon touching it would change."""
    names = {name: os.lstat(os.path.join(path, name)) for name in os.listdir(path)}
    names |= {
        f".trash/{name}": os.lstat(os.path.join(path, ".trash", name))
        for name in os.listdir(os.path.join(path, ".trash"))
    }
    names["."] = os.lstat(path)
    return {name: (st.st_mode, st.st_mtime_ns) for name, st in names.items()}


def test_a_second_daemon_never_touches_a_pool_the_first_serves(make_daemon: Any, tmp_path: Path) -> None:
    first = make_daemon()
    shared = first.pool_path
    lease = first.lease(ttl_seconds=600)
    Path(lease["path"], "work").write_text("the first daemon's tenant's data")
    stray = Path(shared, "stray")  # an orphan to the first, not due for its 10 minutes
    stray.mkdir()
    os.chmod(shared, 0o755)  # the second preparing the pool would make it 0711 again
    before = snapshot(shared)

    own = tmp_path / "own"
    own.mkdir()
    second = make_daemon(
        gc=GRACE, pool=[{"name": "own", "path": str(own)}, {"name": "shared", "path": shared}]
    )

    # Refused at once, and said why: unavailable, locked, the holder's pid.
    holder = first.process.pid
    status = second.pool("shared")
    assert (status["state"], status["reason"]) == ("unavailable", "locked"), status
    assert f"pid {holder}" in status["message"], status
    assert second.pool_up("shared") == 0 and second.pool_up("own") == 1
    assert f"pid {holder}" in second.log() and "locked" in second.log()
    refused = second.request("POST", "/v1/leases", json={"pool": "shared"})
    assert refused.status_code == 503, refused.text
    error = refused.json()["error"]
    assert (error["code"], error["details"]["reason"]) == ("pool_unavailable", "locked"), error
    assert second.lease()["pool"] == "own"  # its other pool serves

    # Well past the second's grace, twice over: orphans of its own pool come and go ...
    for name in ("orphan-1", "orphan-2"):
        (own / name).mkdir()

        def reclaimed(name: str = name) -> bool:
            return name in reclaimed_orphans(second, "own")

        wait_for(reclaimed, timeout=15, what=f"the second daemon reclaiming its own {name}")
    # ... while the shared pool is exactly as the first left it: nothing read into leases,
    # created, chmod-ed or deleted, and the first's lease still active with its data.
    assert snapshot(shared) == before
    assert stat.S_IMODE(os.stat(shared).st_mode) == 0o755
    assert Path(lease["path"], "work").read_text() == "the first daemon's tenant's data"
    assert first.request("GET", f"/v1/leases/{lease['id']}").json()["state"] == "active"
    assert reclaimed_orphans(second, "shared") == set()
    assert second.pool("shared")["reason"] == "locked"

    # The first stops (its lease and directory stay, guarantee 2): the second takes the pool
    # within gc.interval. To the second, the first's directories are orphans, reclaimed only
    # once its own grace has passed since it first saw them.
    first.stop()
    wait_for(lambda: second.pool("shared")["state"] == "ok", timeout=5, what="the second taking the pool")
    assert second.pool("shared")["reason"] is None and second.pool_up("shared") == 1
    assert Path(shared, ".lock").read_text() == f"{second.process.pid}\n"
    wait_for(
        lambda: reclaimed_orphans(second, "shared") == {lease["id"], "stray"},
        timeout=15,
        what="the first's directories reclaimed as orphans after the second's grace",
    )
    assert second.lease(pool="shared")["pool"] == "shared"


def test_the_first_daemon_back_finds_its_pool_taken_and_waits(make_daemon: Any) -> None:
    first = make_daemon()
    lease = first.lease(ttl_seconds=600)
    first.stop()
    second = make_daemon(gc={"orphan_grace": "10m"}, pool=[{"name": "main", "path": first.pool_path}])
    first.start()

    # Its lease is neither lost nor ended by the first: the pool is someone else's now.
    status = first.pool("main")
    assert (status["state"], status["reason"]) == ("unavailable", "locked"), status
    assert f"pid {second.process.pid}" in status["message"]
    got = first.request("GET", f"/v1/leases/{lease['id']}").json()
    assert got["state"] == "active", got
    assert os.path.isdir(lease["path"])
    # Not even its owner's release moves anything in a pool the first does not hold.
    refused = first.request("DELETE", f"/v1/leases/{lease['id']}")
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "pool_unavailable", refused.text
    assert os.path.isdir(lease["path"])
    assert first.request("GET", f"/v1/leases/{lease['id']}").json()["state"] == "active"

    second.stop()
    wait_for(lambda: first.pool("main")["state"] == "ok", timeout=5, what="the first taking its pool back")
    assert first.request("GET", f"/v1/leases/{lease['id']}").json()["state"] == "active"
    assert os.path.isdir(lease["path"])
