"""Warm caches from the command line and the Python client, against a real daemon, and a real uv."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import wait_for
from test_cli import cli
from test_uv_preset import build_wheel, uv_env

import scratchd
from scratchd.client import Client

UV = shutil.which("uv", path=os.path.dirname(sys.executable)) or shutil.which("uv")
SCRATCHD = [sys.executable, "-m", "scratchd"]


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stderr
    return result


def lease(daemon, *argv: str) -> dict:
    return json.loads(ok(cli(daemon, "lease", "--json", *argv)).stdout)


def caches(daemon, *argv: str) -> list[dict]:
    return json.loads(ok(cli(daemon, "caches", "--json", *argv)).stdout)["caches"]


@pytest.mark.shared_daemon
def test_a_released_lease_is_handed_to_the_next_one_of_its_key(daemon) -> None:
    cold = lease(daemon, "--cache-key", "uv-main")
    assert cold["cache"]["key"] == "uv-main" and cold["cache"]["hit"] is None
    Path(cold["path"], "wheels").write_text("unpacked")
    inode = os.stat(cold["path"]).st_ino
    ok(cli(daemon, "release", cold["id"]))  # a --cache-key lease is kept by default
    (kept,) = caches(daemon)
    assert (kept["key"], kept["state"], kept["pool"]) == ("uv-main", "free", "main")

    warm = lease(daemon, "--cache-key", "uv-main")
    assert warm["cache"]["hit"] == "exact" and warm["cache"]["cache_id"] == kept["id"]
    assert Path(warm["path"], "wheels").read_text() == "unpacked"
    assert os.stat(warm["path"]).st_ino == inode  # the same directory, renamed, not copied
    assert warm["path"].endswith(warm["id"])
    assert caches(daemon) == []  # in use: listed with --all only
    (in_use,) = caches(daemon, "--all")
    assert (in_use["state"], in_use["lease_id"]) == ("in_use", warm["id"])

    ok(cli(daemon, "release", "--discard", warm["id"]))
    assert caches(daemon, "--all") == []
    assert lease(daemon, "--cache-key", "uv-main")["cache"]["hit"] is None


@pytest.mark.shared_daemon
def test_a_fallback_prefix_starts_a_new_key_from_the_newest_of_the_branch(daemon) -> None:
    first = lease(daemon, "--cache-key", "uv-main-lock1")
    ok(cli(daemon, "release", first["id"]))
    changed = lease(
        daemon, "--cache-key", "uv-main-lock2", "--cache-fallback", "pnpm-", "--cache-fallback", "uv-main-"
    )
    assert changed["cache"]["hit"] == "fallback" and changed["cache"]["matched_key"] == "uv-main-lock1"
    ok(cli(daemon, "release", changed["id"]))
    assert [cache["key"] for cache in caches(daemon)] == ["uv-main-lock2"]  # kept under its own key


def run(daemon, *argv: str, script: str) -> subprocess.CompletedProcess[str]:
    return cli(daemon, "run", "-v", "--cache-key", "build", *argv, "--", "sh", "-c", script)


@pytest.mark.shared_daemon
def test_run_keeps_on_success_by_default_always_or_never(daemon) -> None:
    failed = run(daemon, script='echo half > "$SCRATCHD_LEASE_PATH/f"; exit 3')
    assert failed.returncode == 3
    assert "cold start" in failed.stderr and "cache not kept (--keep success, exit status 3)" in failed.stderr
    assert caches(daemon) == []  # a failed job may have left a half-written cache

    kept_anyway = run(daemon, "--keep", "always", script='echo whole > "$SCRATCHD_LEASE_PATH/f"; exit 1')
    assert kept_anyway.returncode == 1 and "kept as cache" in kept_anyway.stderr
    (cache,) = caches(daemon)

    warm = run(daemon, script='grep -q whole "$SCRATCHD_LEASE_PATH/f"')
    assert warm.returncode == 0, warm.stderr
    assert f"warm start: cache {cache['id']} of key build (exact)" in warm.stderr
    (again,) = caches(daemon)
    assert again["hits"] == 1

    never = run(daemon, "--keep", "never", script='test -f "$SCRATCHD_LEASE_PATH/f"')
    assert never.returncode == 0 and "warm start" in never.stderr and "cache not kept" in never.stderr
    assert caches(daemon, "--all") == []  # handed over, then not kept: gone


def test_the_caches_table_json_and_rm(daemon) -> None:
    ids = []
    for key in ("uv-a", "npm-b"):
        held = lease(daemon, "--cache-key", key)
        Path(held["path"], "blob").write_bytes(b"x" * 50_000)
        ok(cli(daemon, "release", held["id"]))
        ids.append(caches(daemon, "--key", key)[0]["id"])
    wait_for(lambda: all(c["bytes"] >= 50_000 for c in caches(daemon)), what="kept caches measured")

    table = ok(cli(daemon, "caches", env={"COLUMNS": "20"})).stdout.splitlines()  # off a terminal
    assert table[0].split() == ["ID", "KEY", "POOL", "STATE", "SIZE", "KEPT", "LAST", "USED", "HITS"]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert set(rows) == set(ids) and rows[ids[0]][1:4] == ["uv-a", "main", "free"]
    assert ok(cli(daemon, "caches", "--json")).stdout.strip() == json.dumps(
        daemon.request("GET", "/v1/caches").json()
    )
    only = ok(cli(daemon, "caches", "--key", "npm-b")).stdout.splitlines()
    assert len(only) == 2 and only[1].split()[0] == ids[1]

    pools = ok(cli(daemon, "pools")).stdout.splitlines()
    assert pools[0].split()[-2:] == ["CACHES", "PATH"] and " 2 (" in pools[1]
    usage = ok(cli(daemon, "usage")).stdout
    assert "caches: 2 kept (" in usage and "0 hits, 2 misses (0% hit)" in usage

    holder = lease(daemon, "--cache-key", "uv-a")
    in_use = cli(daemon, "caches", "rm", holder["cache"]["cache_id"])
    assert in_use.returncode == 1 and "cache_in_use" in in_use.stderr
    removed = cli(daemon, "caches", "rm", "nosuchcache", ids[1])
    assert removed.returncode == 1 and "nosuchcache: cache_not_found: " in removed.stderr
    assert [cache["id"] for cache in caches(daemon, "--all")] == [ids[0]]  # the other one went all the same
    ok(cli(daemon, "release", holder["id"]))
    assert "removed 1" in ok(cli(daemon, "usage")).stdout


@pytest.mark.shared_daemon
def test_the_python_client_keeps_a_block_that_succeeded(daemon) -> None:
    with Client(socket=daemon.socket) as client:
        with scratchd.lease(cache_key="py", client=client, pid=None) as held:
            Path(held, "out").write_text("built")
        kept_id = held.data["cache"]["kept_id"]
        assert kept_id and client.get_cache(kept_id)["key"] == "py"
        with pytest.raises(RuntimeError), scratchd.lease(cache_key="py", client=client, pid=None) as failed:
            assert Path(failed, "out").read_text() == "built"
            raise RuntimeError("the build failed")
        assert failed.data["cache"]["kept_id"] is None and client.caches(key="py")["caches"] == []


@pytest.mark.shared_daemon
@pytest.mark.skipif(UV is None, reason="uv is not installed (pip install uv)")
def test_a_second_uv_job_finds_uvs_cache_warm(daemon, tmp_path) -> None:
    """Two CI jobs, each `scratchd run --cache-key K --tool uv -- uv pip install …` into a fresh venv."""
    build_wheel(tmp_path / "wheelhouse")
    outputs = []
    for job in ("one", "two"):
        project = tmp_path / job
        project.mkdir()
        env = uv_env(daemon, project)
        install = (
            f'"{UV}" pip install --python "{project}/.venv/bin/python" --no-index '
            f'--find-links "{tmp_path}/wheelhouse" tinypkg'
        )
        options = ["-v", "--near", str(project), "--cache-key", "uv-tinypkg", "--tool", "uv"]
        result = subprocess.run(
            [*SCRATCHD, "run", *options, "--", "sh", "-c", install],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert any((project / ".venv" / "lib").glob("python*/site-packages/tinypkg/__init__.py"))
        outputs.append(result.stderr)
    first, second = outputs
    assert "cold start" in first and "Prepared 1 package" in first  # uv unpacked the wheel into its cache
    assert "warm start" in second and "(exact)" in second
    assert "Prepared" not in second and "Installed 1 package" in second  # straight from the kept cache
