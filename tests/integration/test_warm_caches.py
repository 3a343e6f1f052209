"""Warm caches end to end (docs/api.md, "Warm caches"): a real daemon, real directories, real renames.

A kept cache is handed over by a rename: the tests check the directory's inode, not only its
content. Every wait is a condition with a deadline.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import IS_ROOT, Daemon, needs_root, tmpfs, wait_for

MakeDaemon = Callable[..., Daemon]


def caches(daemon: Daemon, **query: str) -> list[dict[str, Any]]:
    response = daemon.request("GET", "/v1/caches", params=query)
    assert response.status_code == 200, response.text
    return response.json()["caches"]


def release(daemon: Daemon, lease: dict[str, Any], keep: str | None = None) -> dict[str, Any]:
    query = "" if keep is None else f"?keep={keep}"
    response = daemon.request("DELETE", f"/v1/leases/{lease['id']}{query}")
    assert response.status_code == 200, response.text
    return response.json()


def kept(daemon: Daemon, key: str, content: str = "warm", **request: Any) -> dict[str, Any]:
    """A lease of ``key`` that writes ``content`` and is released with keep: the kept cache."""
    lease = daemon.lease(cache_key=key, **request)
    Path(lease["path"], "content").write_text(content)
    ended = release(daemon, lease)
    assert ended["cache"]["kept_id"], ended
    return next(c for c in caches(daemon) if c["id"] == ended["cache"]["kept_id"])


def cache_area(daemon: Daemon) -> set[str]:
    return set(os.listdir(os.path.join(daemon.pool_path, ".caches")))


def events(daemon: Daemon, kind: str) -> list[dict[str, Any]]:
    found = daemon.request("GET", "/v1/events", params={"limit": 1000}).json()["events"]
    return [e for e in found if e["kind"] == kind]


def assert_invariants(daemon: Daemon) -> None:
    """Every active lease has its directory; the pool holds nothing else; the cache area holds
    exactly the free caches; a cache in use is an active lease's."""
    active = {lease["id"]: lease for lease in daemon.request("GET", "/v1/leases").json()["leases"]}
    for lease in active.values():
        assert os.path.isdir(lease["path"]), lease
    assert daemon.pool_entries() == set(active)
    listed = caches(daemon)
    assert cache_area(daemon) == {c["id"] for c in listed if c["state"] == "free"}
    for cache in listed:
        if cache["state"] == "in_use":
            assert active[cache["lease_id"]]["cache"]["cache_id"] == cache["id"]


# -- hand-over and keep --------------------------------------------------------------------------


def test_a_miss_then_a_hit_hands_over_the_same_directory_with_its_content(daemon):
    first = daemon.lease(cache_key="proj-lock1")
    assert first["cache"] == {
        "key": "proj-lock1",
        "hit": None,
        "matched_key": None,
        "cache_id": None,
        "kept_at": None,
        "kept_id": None,
    }
    Path(first["path"], "deps").mkdir()
    Path(first["path"], "deps", "wheel").write_bytes(b"x" * 10000)
    inode = os.stat(first["path"]).st_ino
    ended = release(daemon, first)  # keep is the default with a cache_key
    assert ended["state"] == "ended" and ended["end_reason"] == "released"
    assert not os.path.exists(first["path"])
    [cache] = caches(daemon)
    assert cache["id"] == ended["cache"]["kept_id"]
    assert (cache["key"], cache["state"], cache["lease_id"], cache["hits"]) == ("proj-lock1", "free", None, 0)
    wait_for(lambda: caches(daemon)[0]["bytes"] >= 10000, what="the kept cache measured")

    second = daemon.lease(cache_key="proj-lock1")
    assert second["cache"]["hit"] == "exact"
    assert (second["cache"]["matched_key"], second["cache"]["cache_id"]) == ("proj-lock1", cache["id"])
    assert second["cache"]["kept_at"] == cache["kept_at"]
    assert os.path.basename(second["path"]) == second["id"]
    info = os.stat(second["path"])
    assert info.st_ino == inode  # a rename, not a copy
    assert stat.S_IMODE(info.st_mode) == 0o700
    assert Path(second["path"], "deps", "wheel").read_bytes() == b"x" * 10000
    [in_use] = caches(daemon)
    assert (in_use["state"], in_use["lease_id"], in_use["hits"]) == ("in_use", second["id"], 1)
    created = [e for e in events(daemon, "lease_created") if e["lease_id"] == second["id"]]
    assert created[0]["details"] == {"cache_key": "proj-lock1", "cache_hit": "exact"}
    assert_invariants(daemon)

    again = release(daemon, second)
    assert again["cache"]["kept_id"] == cache["id"]  # the cache it came from is this one now
    [back] = caches(daemon)
    assert (back["state"], back["hits"]) == ("free", 1)
    kept_events = events(daemon, "cache_kept")
    assert [e["details"]["cache_id"] for e in kept_events] == [cache["id"]] * 2
    assert_invariants(daemon)


@pytest.mark.shared_daemon
def test_fallback_prefixes_start_from_the_newest_cache_of_the_first_that_matches(daemon):
    kept(daemon, "main-aaa", "a")
    kept(daemon, "main-bbb", "b")
    kept(daemon, "feat-ccc", "c")
    lease = daemon.lease(cache_key="main-zzz", cache_fallback=["nope-", "main-", "feat-"])
    assert (lease["cache"]["hit"], lease["cache"]["matched_key"]) == ("fallback", "main-bbb")
    assert Path(lease["path"], "content").read_text() == "b"
    ended = release(daemon, lease)
    keys = {c["id"]: c["key"] for c in caches(daemon)}
    assert keys[ended["cache"]["kept_id"]] == "main-zzz"  # kept under its own key
    assert sorted(keys.values()) == ["feat-ccc", "main-aaa", "main-zzz"]
    miss = daemon.lease(cache_key="other", cache_fallback=["x", "y"])
    assert miss["cache"]["hit"] is None and os.listdir(miss["path"]) == []


@pytest.mark.shared_daemon
def test_keep_false_and_a_lease_without_a_key_keep_nothing(daemon):
    lease = daemon.lease(cache_key="k")
    Path(lease["path"], "f").write_text("x")
    assert release(daemon, lease, keep="false")["cache"]["kept_id"] is None
    plain = daemon.lease()
    response = daemon.request("DELETE", f"/v1/leases/{plain['id']}?keep=true")
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"]["fields"] == {"keep": "the lease has no cache_key"}
    assert daemon.request("GET", f"/v1/leases/{plain['id']}").json()["state"] == "active"  # changed nothing
    assert response.json()["error"]["code"] == "invalid_request"
    assert daemon.request("DELETE", f"/v1/leases/{plain['id']}?keep=maybe").status_code == 422
    assert release(daemon, plain)["cache"] is None
    assert caches(daemon) == [] and cache_area(daemon) == set()


@pytest.mark.parametrize(
    "body, field",
    [
        ({"cache_key": ""}, "cache_key"),
        ({"cache_key": "-starts-with-dash"}, "cache_key"),
        ({"cache_key": "has space"}, "cache_key"),
        ({"cache_key": "k" * 129}, "cache_key"),
        ({"cache_key": 5}, "cache_key"),
        ({"cache_key": "k", "cache_fallback": ["a"] * 9}, "cache_fallback"),
        ({"cache_key": "k", "cache_fallback": ["bad prefix"]}, "cache_fallback"),
        ({"cache_key": "k", "cache_fallback": "main-"}, "cache_fallback"),
        ({"cache_fallback": ["main-"]}, "cache_fallback"),
    ],
)
@pytest.mark.shared_daemon
def test_bad_cache_requests_are_refused_and_change_nothing(daemon, body, field):
    response = daemon.request("POST", "/v1/leases", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert any(name.startswith(field) for name in error["details"]["fields"]), error
    assert daemon.pool_entries() == set() and caches(daemon) == []


def test_every_end_but_a_release_keeps_nothing(make_daemon):
    daemon = make_daemon()
    warm = kept(daemon, "k")
    ends = {
        "expired": daemon.lease(cache_key="k", ttl_seconds=1),
        "idle": daemon.lease(cache_key="k2", idle_timeout_seconds=1),
        "over_quota": daemon.lease(cache_key="k3", max_bytes=1),
        "directory_removed": daemon.lease(cache_key="k4"),
    }
    assert ends["expired"]["cache"]["cache_id"] == warm["id"]  # a hit that then dies keeps nothing either
    Path(ends["over_quota"]["path"], "big").write_bytes(b"x" * 100000)
    os.rmdir(ends["directory_removed"]["path"])
    for reason, lease in ends.items():

        def ended_record(lease: dict[str, Any] = lease) -> dict[str, Any] | None:
            got = daemon.request("GET", f"/v1/leases/{lease['id']}").json()
            return got if got["state"] == "ended" else None

        ended = wait_for(ended_record, what=f"{reason} end")
        assert ended["end_reason"] == reason and ended["cache"]["kept_id"] is None
    wait_for(lambda: caches(daemon) == [] and cache_area(daemon) == set(), what="nothing kept")
    assert events(daemon, "cache_kept") and all(
        e["details"]["cache_id"] == warm["id"] for e in events(daemon, "cache_kept")
    )


@pytest.mark.shared_daemon
def test_a_process_that_exits_keeps_nothing(daemon):
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    lease = daemon.lease(cache_key="k", pid=child.pid)
    Path(lease["path"], "half").write_text("half-written")
    child.stdin.close()  # type: ignore[union-attr]
    child.wait()
    wait_for(
        lambda: daemon.request("GET", f"/v1/leases/{lease['id']}").json()["end_reason"] == "process_exited",
        what="process_exited",
    )
    assert caches(daemon) == [] and cache_area(daemon) == set()


@pytest.mark.shared_daemon
def test_concurrent_creates_of_one_key_never_share_a_cache(daemon):
    held = [daemon.lease(cache_key="shared") for _ in range(2)]  # two jobs at once: both miss
    for lease in held:
        release(daemon, lease)
    assert len(caches(daemon)) == 2
    got: list[dict[str, Any]] = []
    lock = threading.Lock()

    def create() -> None:
        lease = daemon.lease(cache_key="shared")
        with lock:
            got.append(lease)

    threads = [threading.Thread(target=create) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    hits = [lease["cache"]["cache_id"] for lease in got if lease["cache"]["hit"]]
    assert len(hits) == 2 and len(set(hits)) == 2  # both caches handed out, each to one lease
    inodes = [os.stat(lease["path"]).st_ino for lease in got]
    assert len(set(inodes)) == len(got)
    assert all(c["state"] == "in_use" for c in caches(daemon))
    assert_invariants(daemon)


def test_keep_per_key_replaces_the_least_recently_used(make_daemon):
    daemon = make_daemon(caches={"keep_per_key": 2})
    jobs = [daemon.lease(cache_key="k") for _ in range(3)]  # three at once: all miss
    first, second = (release(daemon, job)["cache"]["kept_id"] for job in jobs[:2])
    used = daemon.lease(cache_key="k")  # the newest: second
    assert used["cache"]["cache_id"] == second
    release(daemon, used)  # second is now the most recently used
    third = release(daemon, jobs[2])["cache"]["kept_id"]  # one too many: first goes
    assert {c["id"] for c in caches(daemon)} == {second, third}
    [drop] = events(daemon, "cache_dropped")
    assert (drop["reason"], drop["details"]["cache_id"]) == ("replaced", first)
    assert_invariants(daemon)


def test_cache_max_zero_keeps_nothing(make_daemon, tmp_path):
    pool = tmp_path / "nocache"
    pool.mkdir()
    daemon = make_daemon(pool=[{"name": "main", "path": str(pool), "cache_max": 0}])
    assert daemon.pool("main")["cache_max_bytes"] == 0
    lease = daemon.lease(cache_key="k")
    Path(lease["path"], "f").write_text("x")
    assert release(daemon, lease)["cache"]["kept_id"] is None
    assert caches(daemon) == [] and cache_area(daemon) == set()


# -- the API around caches -------------------------------------------------------------------------


def test_list_get_and_remove_caches(daemon):
    kept(daemon, "a")
    two = kept(daemon, "b")
    # Measured once after the keep, in the background: compare records after that, not across it.
    one = wait_for(
        lambda: next((c for c in caches(daemon, key="a") if c["files"] == 1), None),
        what="the kept cache measured",
    )
    assert [c["id"] for c in caches(daemon, key="a")] == [one["id"]]
    assert caches(daemon, pool="elsewhere") == []
    assert daemon.request("GET", f"/v1/caches/{one['id']}").json() == one
    busy = daemon.lease(cache_key="b")
    conflict = daemon.request("DELETE", f"/v1/caches/{two['id']}")
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "cache_in_use"
    removed = daemon.request("DELETE", f"/v1/caches/{one['id']}")
    assert removed.status_code == 200 and removed.json()["id"] == one["id"]
    for method in ("GET", "DELETE"):
        missing = daemon.request(method, f"/v1/caches/{one['id']}")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "cache_not_found"
    assert daemon.request("GET", "/v1/caches/NOT-AN-ID").status_code == 404
    [drop] = events(daemon, "cache_dropped")
    assert (drop["reason"], drop["details"]["cache_id"]) == ("removed", one["id"])
    release(daemon, busy)
    wait_for(lambda: caches(daemon, key="b")[0]["files"] == 1, what="the cache kept again measured")
    pool = daemon.pool("main")
    assert pool["cache_entries"] == 1 and pool["cache_max_bytes"] > 0
    usage = daemon.request("GET", "/v1/usage").json()
    assert usage["caches"]["entries"] == 1
    assert (usage["caches"]["hits_total"], usage["caches"]["misses_total"]) == (1, 2)
    assert usage["caches"]["by_reason"] == {"removed": 1}
    assert usage["tenants"][0]["cache_bytes"] == pool["cache_bytes"]
    metrics = daemon.request("GET", "/metrics").text
    assert 'scratchd_cache_requests_total{pool="main",result="hit"} 1.0' in metrics
    assert 'scratchd_cache_entries{pool="main"} 1.0' in metrics
    assert 'scratchd_cache_dropped_total{pool="main",reason="removed"} 1.0' in metrics
    assert_invariants(daemon)


# -- drops ------------------------------------------------------------------------------------------


def wait_dropped(daemon: Daemon, cache_id: str, reason: str) -> None:
    def dropped() -> bool:
        return any(e["details"]["cache_id"] == cache_id for e in events(daemon, "cache_dropped"))

    wait_for(dropped, what=f"cache {cache_id} dropped ({reason})")
    [drop] = [e for e in events(daemon, "cache_dropped") if e["details"]["cache_id"] == cache_id]
    assert drop["reason"] == reason, drop
    assert cache_id not in {c["id"] for c in caches(daemon)}
    wait_for(lambda: cache_id not in cache_area(daemon), what="its directory gone from the cache area")
    wait_for(lambda: not os.listdir(os.path.join(daemon.pool_path, ".trash")), what="its content deleted")


def test_a_cache_unused_for_max_age_is_dropped(make_daemon):
    daemon = make_daemon(caches={"max_age": "1s"})
    wait_dropped(daemon, kept(daemon, "k")["id"], "max_age")


def test_a_pools_cache_max_drops_the_least_recently_used(make_daemon, tmp_path):
    pool = tmp_path / "capped"
    pool.mkdir()
    daemon = make_daemon(pool=[{"name": "main", "path": str(pool), "cache_max": "16K"}])
    older, newer = daemon.lease(cache_key="a"), daemon.lease(cache_key="b")
    for lease in (older, newer):
        Path(lease["path"], "f").write_bytes(b"x" * 12000)  # 12 KiB each, 16 KiB allowed: one stays
    first = release(daemon, older)["cache"]["kept_id"]
    wait_for(lambda: caches(daemon)[0]["bytes"] >= 12000, what="the first cache measured")
    second = release(daemon, newer)["cache"]["kept_id"]
    wait_dropped(daemon, first, "pool_cap")
    assert [c["id"] for c in caches(daemon)] == [second]


def test_a_tenants_max_cache_bytes_drops_its_caches(make_daemon):
    daemon = make_daemon(tenant=[{"name": "root", "max_cache_bytes": "1K"}])
    lease = daemon.lease(cache_key="k")
    Path(lease["path"], "f").write_bytes(b"x" * 8192)
    wait_dropped(daemon, release(daemon, lease)["cache"]["kept_id"], "tenant_cap")


@needs_root
def test_under_pressure_free_caches_go_before_any_evictable_lease(make_daemon, tmp_path):
    with tmpfs(tmp_path / "fs", size="16m") as fs:
        daemon = make_daemon(pool=[{"name": "main", "path": str(fs), "reserve": "4M", "cache_max": "100%"}])
        warm = daemon.lease(cache_key="k")
        Path(warm["path"], "deps").write_bytes(os.urandom(6 << 20))
        cache_id = release(daemon, warm)["cache"]["kept_id"]
        wait_for(lambda: caches(daemon)[0]["bytes"] >= 6 << 20, what="the kept cache measured")
        evictable = daemon.lease(evictable=True)
        Path(evictable["path"], "f").write_bytes(os.urandom(1 << 20))
        filler = daemon.lease()
        Path(filler["path"], "big").write_bytes(os.urandom(8 << 20))  # free falls below the reserve
        wait_dropped(daemon, cache_id, "pressure")
        wait_for(lambda: daemon.pool("main")["free_bytes"] > 4 << 20, what="free space back above reserve")
        assert daemon.request("GET", f"/v1/leases/{evictable['id']}").json()["state"] == "active"
        assert_invariants(daemon)
        daemon.stop()


# -- tenants --------------------------------------------------------------------------------------


@pytest.mark.skipif(not IS_ROOT, reason="needs root: creates Unix users and drops to their credentials")
def test_two_unix_users_never_see_each_others_caches(make_daemon):
    from users import call_as, throwaway_user, world_traversable_dir

    with world_traversable_dir() as shared, throwaway_user() as alice, throwaway_user() as bob:
        (shared / "run").mkdir()
        (shared / "pool").mkdir()
        socket = str(shared / "run" / "scratchd.sock")
        daemon = make_daemon(
            start=False,
            server={"socket": socket},
            pool=[{"name": "main", "path": str(shared / "pool")}],
        )
        daemon.socket = socket
        daemon.start()
        try:
            status, lease = call_as(alice, socket, "POST", "/v1/leases", {"cache_key": "shared-name"})
            assert status == 201, lease
            status, ended = call_as(alice, socket, "DELETE", f"/v1/leases/{lease['id']}")
            cache_id = ended["cache"]["kept_id"]
            assert status == 200 and cache_id
            status, theirs = call_as(
                bob, socket, "POST", "/v1/leases", {"cache_key": "shared-name", "cache_fallback": ["shared"]}
            )
            assert status == 201 and theirs["cache"]["hit"] is None and os.listdir(theirs["path"]) == []
            assert call_as(bob, socket, "GET", "/v1/caches")[1] == {"caches": []}
            assert call_as(bob, socket, "GET", f"/v1/caches?tenant={alice.name}")[1] == {"caches": []}
            for method in ("GET", "DELETE"):
                status, body = call_as(bob, socket, method, f"/v1/caches/{cache_id}")
                assert (status, body["error"]["code"]) == (404, "cache_not_found")
            assert [c["id"] for c in call_as(alice, socket, "GET", "/v1/caches")[1]["caches"]] == [cache_id]
            assert len(caches(daemon)) == 1  # root, an admin, sees all
            status, again = call_as(alice, socket, "POST", "/v1/leases", {"cache_key": "shared-name"})
            assert again["cache"]["cache_id"] == cache_id
            info = os.stat(again["path"])
            assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (alice.uid, alice.gid, 0o700)
        finally:
            daemon.stop()


# -- crashes and upgrades ---------------------------------------------------------------------------


def crash_at(daemon: Daemon, point: str, monkeypatch: pytest.MonkeyPatch, request: Callable[[], Any]) -> None:
    """Restart ``daemon`` so that it kills itself (SIGKILL) at ``point``, make ``request``, then
    start it again as usual."""
    daemon.stop()
    monkeypatch.setenv("SCRATCHD_CRASH_AT", point)
    daemon.start()
    monkeypatch.delenv("SCRATCHD_CRASH_AT")
    with pytest.raises(Exception):  # noqa: B017  # the connection dies with the daemon
        request()
    assert daemon.process is not None and daemon.process.wait(10) == -9
    daemon.start()


def test_kill_9_in_the_middle_of_a_hand_over_then_the_cache_is_handed_out_again(make_daemon, monkeypatch):
    daemon = make_daemon(gc={"interval": "0.2s", "orphan_grace": "1s"})
    cache = kept(daemon, "k", "precious")
    crash_at(
        daemon, "handover", monkeypatch, lambda: daemon.request("POST", "/v1/leases", json={"cache_key": "k"})
    )
    assert daemon.request("GET", "/v1/leases").json()["leases"] == []
    [back] = caches(daemon)
    assert (back["id"], back["state"]) == (cache["id"], "free")
    assert_invariants(daemon)
    lease = daemon.lease(cache_key="k")
    assert lease["cache"]["cache_id"] == cache["id"]
    assert Path(lease["path"], "content").read_text() == "precious"


def test_kill_9_in_the_middle_of_a_keep_then_the_cache_is_handed_out_again(make_daemon, monkeypatch):
    daemon = make_daemon(gc={"interval": "0.2s", "orphan_grace": "1s"})
    cache = kept(daemon, "k", "first")
    lease = daemon.lease(cache_key="k")
    Path(lease["path"], "content").write_text("second")
    crash_at(daemon, "keep", monkeypatch, lambda: release(daemon, lease))
    ended = daemon.request("GET", f"/v1/leases/{lease['id']}").json()
    assert (ended["state"], ended["end_reason"]) == ("ended", "directory_removed")
    [back] = caches(daemon)
    assert (back["id"], back["state"], back["lease_id"]) == (cache["id"], "free", None)
    assert_invariants(daemon)
    again = daemon.lease(cache_key="k")
    assert Path(again["path"], "content").read_text() == "second"


def test_kill_9_keeping_a_first_cache_leaves_at_worst_an_orphan(make_daemon, monkeypatch):
    daemon = make_daemon(gc={"interval": "0.2s", "orphan_grace": "1s"})
    lease = daemon.lease(cache_key="k")
    Path(lease["path"], "content").write_text("x")
    crash_at(daemon, "keep", monkeypatch, lambda: release(daemon, lease))
    assert daemon.request("GET", f"/v1/leases/{lease['id']}").json()["end_reason"] == "directory_removed"
    assert caches(daemon) == [] and len(cache_area(daemon)) == 1  # kept on disk, not recorded
    wait_for(lambda: cache_area(daemon) == set(), what="the unrecorded cache reclaimed as an orphan")
    assert any(e["details"]["entry"].startswith(".caches/") for e in events(daemon, "orphan_reclaimed"))
    assert_invariants(daemon)


def test_kept_caches_survive_kill_9_and_are_never_orphans(make_daemon):
    daemon = make_daemon(gc={"interval": "0.2s", "orphan_grace": "0.5s"})
    cache = kept(daemon, "k", "survives")
    daemon.kill()
    Path(
        daemon.pool_path, "stray"
    ).mkdir()  # an orphan: once it is reclaimed, orphan review has run past grace
    daemon.start()
    wait_for(lambda: not Path(daemon.pool_path, "stray").exists(), what="the stray directory reclaimed")
    assert [c["id"] for c in caches(daemon, key="k")] == [cache["id"]]
    assert [e["details"]["entry"] for e in events(daemon, "orphan_reclaimed")] == ["stray"]
    assert Path(daemon.lease(cache_key="k")["path"], "content").read_text() == "survives"


@pytest.mark.parametrize("version", [0, 1])
def test_an_earlier_state_dir_upgrades_in_place_with_a_real_daemon(make_daemon, version):
    import sqlite3

    from scratchd.store import MIGRATIONS

    daemon = make_daemon(start=False, gc={"interval": "0.2s", "orphan_grace": "0.5s"})
    daemon.state_dir.mkdir()
    db = sqlite3.connect(daemon.state_dir / "scratchd.db", isolation_level=None)
    db.executescript((Path(__file__).parent.parent / "data" / "state-v0.sql").read_text())
    if version == 1:
        db.executescript(f"BEGIN; {MIGRATIONS[0]} PRAGMA user_version = 1; COMMIT;")
    ids = [row[0] for row in db.execute("SELECT id FROM leases WHERE state = 'active'")]
    for lease_id in ids:
        path = Path(daemon.pool_path, lease_id)
        path.mkdir(mode=0o700)
        (path / "kept").write_text(lease_id)
        db.execute("UPDATE leases SET path = ?, expires_at = 4e9 WHERE id = ?", (str(path), lease_id))
    db.close()
    daemon.start()
    active = daemon.request("GET", "/v1/leases", params={"tenant": "ci"}).json()["leases"]
    assert sorted(lease["id"] for lease in active) == sorted(ids)
    assert all(lease["cache"] is None for lease in active)
    # Warm caches work on the upgraded state, and no leased directory is taken for an orphan.
    cache = kept(daemon, "after-upgrade")
    Path(daemon.pool_path, "stray").mkdir()  # once it is reclaimed, orphan review has run past grace
    wait_for(lambda: not Path(daemon.pool_path, "stray").exists(), what="the stray directory reclaimed")
    daemon.stop()
    daemon.start()
    assert [c["id"] for c in caches(daemon)] == [cache["id"]]
    for lease_id in ids:
        assert Path(daemon.pool_path, lease_id, "kept").read_text() == lease_id
    assert [e["details"]["entry"] for e in events(daemon, "orphan_reclaimed")] == ["stray"]
