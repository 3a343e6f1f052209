"""The product's origin story, end to end: uv hard-links from a lease on the project's mount.

A real uv (from PyPI, in the test environment), real tmpfs mounts, a wheel built here (no
network), and `scratchd run --tool uv` against a real daemon.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import needs_root, tmpfs

UV = shutil.which("uv", path=os.path.dirname(sys.executable)) or shutil.which("uv")
SCRATCHD = [sys.executable, "-m", "scratchd"]

pytestmark = [needs_root, pytest.mark.skipif(UV is None, reason="uv is not installed (pip install uv)")]


def build_wheel(directory: Path) -> Path:
    """A minimal pure-Python wheel, made by hand: enough for uv to unpack, cache and link."""
    files = {
        "tinypkg/__init__.py": b"DATA = " + repr("x" * 20000).encode() + b"\n",
        "tinypkg-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: tinypkg\nVersion: 1.0\n",
        "tinypkg-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: scratchd-tests\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    record = []
    for name, content in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(content).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(content)}")
    record.append("tinypkg-1.0.dist-info/RECORD,,")
    files["tinypkg-1.0.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / "tinypkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return wheel


def uv_env(daemon, project: Path) -> dict[str, str]:
    """The environment of a job that knows nothing of uv's settings, and a venv in ``project`` for it."""
    assert UV is not None  # else pytestmark skips
    env = {**os.environ, "UV_OFFLINE": "1", "UV_PYTHON_DOWNLOADS": "never", "SCRATCHD_SOCKET": daemon.socket}
    for name in ("UV_CACHE_DIR", "UV_LINK_MODE", "UV_NO_CACHE", "TMPDIR"):
        env.pop(name, None)
    subprocess.run(
        [UV, "venv", "--python", sys.executable, str(project / ".venv")],
        check=True,
        env=env,
        capture_output=True,
    )
    return env


def run_with_uv_preset(project: Path, env: dict[str, str], script: str) -> subprocess.CompletedProcess[str]:
    """`scratchd run --near PROJECT --tool uv -- sh -c SCRIPT`."""
    return subprocess.run(
        [*SCRATCHD, "run", "--near", str(project), "--tool", "uv", "--", "sh", "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def install_in_a_lease(daemon, project: Path, wheel: Path) -> tuple[subprocess.CompletedProcess[str], int]:
    """`scratchd run --tool uv -- uv pip install …`; returns the run and the installed file's link count
    as seen while the lease (and so uv's cache) still exists."""
    env = uv_env(daemon, project)
    installed = (
        project
        / ".venv"
        / "lib"
        / f"python{sys.version_info.major}.{sys.version_info.minor}"
        / "site-packages"
        / "tinypkg"
        / "__init__.py"
    )
    script = (
        f'"{UV}" pip install --python "{project}/.venv/bin/python" --no-index "{wheel}" '
        f'&& stat -c %h "{installed}" > "{project}/nlink"'
    )
    result = run_with_uv_preset(project, env, script)
    nlink = int((project / "nlink").read_text()) if result.returncode == 0 else 0
    return result, nlink


def test_uv_hardlinks_when_a_pool_shares_the_projects_mount(make_daemon, tmp_path):
    wheel = build_wheel(tmp_path / "dist")
    with tmpfs(tmp_path / "A", size="64m") as fs_a, tmpfs(tmp_path / "B", size="64m") as fs_b:
        for fs in (fs_a, fs_b):
            (fs / "pool").mkdir()
        project = fs_a / "project"
        project.mkdir()
        # B first and roomier would win on free space alone; near must pick A.
        daemon = make_daemon(
            pool=[{"name": "b", "path": str(fs_b / "pool")}, {"name": "a", "path": str(fs_a / "pool")}]
        )
        result, nlink = install_in_a_lease(daemon, project, wheel)
        daemon.stop()
    assert result.returncode == 0, result.stderr
    assert "failed to hardlink" not in result.stderr.lower(), result.stderr
    assert nlink > 1  # linked from the lease's uv cache, not copied


def test_uv_copies_quietly_when_the_only_pool_is_elsewhere(make_daemon, tmp_path):
    wheel = build_wheel(tmp_path / "dist")
    with tmpfs(tmp_path / "A", size="64m") as fs_a, tmpfs(tmp_path / "B", size="64m") as fs_b:
        (fs_b / "pool").mkdir()
        project = fs_a / "project"
        project.mkdir()
        daemon = make_daemon(pool=[{"name": "b", "path": str(fs_b / "pool")}])
        result, nlink = install_in_a_lease(daemon, project, wheel)
        daemon.stop()
    assert result.returncode == 0, result.stderr
    assert "failed to hardlink" not in result.stderr.lower(), result.stderr  # UV_LINK_MODE=copy: no warning
    assert nlink == 1


def uv_temp_dirs() -> set[str]:
    """What uv leaves in the system temp directory: its temporary dirs are ``.tmpXXXXXX``."""
    return {name for name in os.listdir("/tmp") if name.startswith(".tmp")}


def test_the_seed_uv_no_cache_links_from_a_temporary_cache_in_the_lease(make_daemon, tmp_path):
    """`uv --no-cache pip install` with TMPDIR unset and the project on a tmpfs other than /tmp.

    uv makes its throw-away cache in the temp directory and links out of it;
    `/tmp` is another mount, so without the preset's TMPDIR it warns and copies.
    """
    wheel = build_wheel(tmp_path / "dist")
    with tmpfs(tmp_path / "A", size="64m") as fs:
        (fs / "pool").mkdir()
        project = fs / "project"
        project.mkdir()
        daemon = make_daemon(pool=[{"name": "a", "path": str(fs / "pool")}])
        env = uv_env(daemon, project)
        before = uv_temp_dirs()
        # -vv: uv's trace names the files of its temporary cache.
        script = (
            f'echo "$SCRATCHD_LEASE_PATH"; exec "{UV}" --no-cache -vv pip install '
            f'--python "{project}/.venv/bin/python" --no-index "{wheel}"'
        )
        result = run_with_uv_preset(project, env, script)
        daemon.stop()
    assert result.returncode == 0, result.stderr
    assert "failed to hardlink" not in result.stderr.lower(), result.stderr
    lease_path = result.stdout.splitlines()[0]
    assert lease_path.startswith(f"{fs}/pool/")  # the lease is on the project's mount
    temporary_caches = set(re.findall(r"(/[^\s`'\"]*/\.tmp\w+)/", result.stderr))
    assert temporary_caches, result.stderr
    assert all(path.startswith(f"{lease_path}/tmp/") for path in temporary_caches), temporary_caches
    assert uv_temp_dirs() <= before  # nothing left in /tmp
