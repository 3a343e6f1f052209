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
from conftest import Daemon, wait_for

MakeDaemon = Callable[..., Daemon]


def caches(daemon: Daemon, **query: str) -> list[dict[str, Any]]:
    response = daemon.request("GET", "/v1/caches", params=query)
    assert response.status_code == 200, response.text
    return response.json()["caches"]  # type: ignore[no-any-return]


def release(daemon: Daemon, lease: dict[str, Any], keep: str | None = None) -> dict[str, Any]:
    query = "" if keep is None else f"?keep={keep}"
    response = daemon.request("DELETE", f"/v1/leases/{lease['id']}{query}")
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def kept(daemon: Daemon, key: str, content: str = "warm", **request: Any) -> dict[str, Any]:
    """A lease of ``key`` that writes ``content`` and is released with keep: the kept cache."""
    lease = daemon.lease(cache_key=key, **request)
    Path(lease["path"], "content").write_text(content)
    ended = release(daemon, lease)
    assert ended["cache"]["kept_id"], ended
    return next(c for c in caches(daemon) if c["id"] == ended["cache"]["kept_id"])


def cache_area(daemon: Daemon) -> set[str]:
    return set(os.listdir(os.path.join(daemon.pool_path, ".caches")))


def pool_entries(daemon: Daemon) -> set[str]:
    return {name for name in os.listdir(daemon.pool_path) if not name.startswith(".")}


def events(daemon: Daemon, kind: str) -> list[dict[str, Any]]:
    found = daemon.request("GET", "/v1/events", params={"limit": 1000}).json()["events"]
    return [e for e in found if e["kind"] == kind]


def assert_invariants(daemon: Daemon) -> None:
    """Every active lease has its directory; the pool holds nothing else; the cache area holds
    exactly the free caches; a cache in use is an active lease's."""
    active = {lease["id"]: lease for lease in daemon.request("GET", "/v1/leases").json()["leases"]}
    for lease in active.values():
        assert os.path.isdir(lease["path"]), lease
    assert pool_entries(daemon) == set(active)
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
def test_bad_cache_requests_are_refused_and_change_nothing(daemon, body, field):
    response = daemon.request("POST", "/v1/leases", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert any(name.startswith(field) for name in error["details"]["fields"]), error
    assert pool_entries(daemon) == set() and caches(daemon) == []


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
        ended = wait_for(
            lambda lease=lease: (
                (got := daemon.request("GET", f"/v1/leases/{lease['id']}").json())["state"] == "ended" and got
            ),
            what=f"{reason} end",
        )
        assert ended["end_reason"] == reason and ended["cache"]["kept_id"] is None
    wait_for(lambda: caches(daemon) == [] and cache_area(daemon) == set(), what="nothing kept")
    assert events(daemon, "cache_kept") and all(
        e["details"]["cache_id"] == warm["id"] for e in events(daemon, "cache_kept")
    )


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
    one = kept(daemon, "a")
    two = kept(daemon, "b")
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
