"""Link modes on real mounts: what a tool can do between its lease and ``near`` (hardlink, clone, copy)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import bind_mount, mounted, needs_root, tmpfs, wait_for

from scratchd.pool_dirs import FICLONE

STATE_V0 = Path(__file__).parent.parent / "data" / "state-v0.sql"


@contextlib.contextmanager
def xfs_with_reflink(root: Path) -> Iterator[Path]:
    """A real XFS (reflink on) on a loop file, mounted at ``root/xfs``."""
    if shutil.which("mkfs.xfs") is None:
        pytest.skip("mkfs.xfs not installed (Debian package xfsprogs): no reflink filesystem to test on")
    image = root / "xfs.img"
    with open(image, "wb") as file:
        file.truncate(320 << 20)  # XFS wants at least 300 MiB
    made = subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"mkfs.xfs cannot make a reflink filesystem here: {made.stderr.strip()}")
    target = root / "xfs"
    target.mkdir()
    try:
        with mounted("-o", "loop", str(image), str(target)):
            yield target
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot mount a loop device here: {exc.stderr.decode(errors='replace').strip()}")


def clone(source: Path, target: Path) -> None:
    with open(source, "rb") as src, open(target, "wb") as dst:
        fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())


def test_a_pool_on_an_ordinary_filesystem_does_not_clone(daemon, tmp_path) -> None:
    assert daemon.pool("main")["reflink"] is False
    lease = daemon.lease(near=str(tmp_path))
    assert (lease["link_mode"], lease["same_filesystem"]) == ("hardlink", True)
    assert daemon.lease()["link_mode"] is None  # no near, nothing to say
    assert not [name for name in os.listdir(Path(daemon.pool_path, ".trash"))]  # the probe cleaned up


@needs_root
def test_a_bind_mount_of_tmpfs_is_copy(make_daemon, tmp_path) -> None:
    with tmpfs(tmp_path / "fs") as fs:
        (fs / "pool").mkdir()
        (fs / "project").mkdir()
        with bind_mount(fs / "project", tmp_path / "bound"):
            daemon = make_daemon(pool=[{"name": "tmp", "path": str(fs / "pool")}])
            assert daemon.pool("tmp")["reflink"] is False
            lease = daemon.lease(near=str(tmp_path / "bound"))
            assert (lease["link_mode"], lease["same_filesystem"]) == ("copy", False)
            with pytest.raises(OSError):  # what copy mode is for: a hard link fails here
                Path(lease["path"], "f").write_text("x")
                os.link(Path(lease["path"], "f"), tmp_path / "bound" / "f")


@needs_root
def test_xfs_with_reflink_clones_through_a_bind_mount(make_daemon, tmp_path) -> None:
    with xfs_with_reflink(tmp_path) as xfs:
        (xfs / "pool").mkdir()
        (xfs / "project").mkdir()
        with (
            bind_mount(xfs / "project", tmp_path / "checkout"),
            tmpfs(tmp_path / "other", size="2g") as other,
        ):
            (other / "pool").mkdir()
            # The tmpfs pool has more room than the XFS one...
            daemon = make_daemon(
                pool=[
                    {"name": "xfs", "path": str(xfs / "pool")},
                    {"name": "tmp", "path": str(other / "pool")},
                ]
            )
            wait_for(lambda: daemon.pool("xfs")["reflink"], what="the XFS pool probed as cloning")
            assert daemon.pool("tmp")["reflink"] is False

            # ...but a clone beats a copy: the pool on the same filesystem wins, by another mount.
            lease = daemon.lease(near=str(tmp_path / "checkout"))
            assert (lease["pool"], lease["link_mode"], lease["same_filesystem"]) == ("xfs", "clone", False)
            cached = Path(lease["path"], "wheel")
            cached.write_bytes(os.urandom(1 << 16))
            clone(cached, tmp_path / "checkout" / "installed")  # what the tool will do: it works
            assert (tmp_path / "checkout" / "installed").read_bytes() == cached.read_bytes()
            with pytest.raises(OSError):  # and what it must not try: a hard link across mounts
                os.link(cached, tmp_path / "checkout" / "linked")

            on_xfs = daemon.lease(near=str(xfs / "project"))
            assert (on_xfs["pool"], on_xfs["link_mode"]) == ("xfs", "hardlink")
            forced = daemon.lease(near=str(tmp_path / "checkout"), pool="tmp")
            assert forced["link_mode"] == "copy"


@needs_root
def test_uv_clones_on_clone(make_daemon, tmp_path) -> None:
    """The uv preset sets UV_LINK_MODE from the lease's link mode."""
    with xfs_with_reflink(tmp_path) as xfs:
        (xfs / "pool").mkdir()
        (xfs / "project").mkdir()
        with bind_mount(xfs / "project", tmp_path / "checkout"):
            daemon = make_daemon(pool=[{"name": "xfs", "path": str(xfs / "pool")}])
            wait_for(lambda: daemon.pool("xfs")["reflink"], what="the XFS pool probed as cloning")
            env = {key: value for key, value in os.environ.items() if not key.startswith("UV_")}
            env["SCRATCHD_SOCKET"] = daemon.socket
            shown = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "scratchd",
                    "lease",
                    "--shell",
                    "--tool",
                    "uv",
                    "--near",
                    str(tmp_path / "checkout"),
                ],
                capture_output=True,
                text=True,
                env=env,
                timeout=60,
                check=True,
            ).stdout
            assert "export UV_LINK_MODE=clone" in shown.splitlines()


def test_a_state_directory_of_the_first_release_upgrades_on_start(make_daemon) -> None:
    """Leases recorded by 0.1.0 are still active after the upgrade, with a link mode, and nothing is an orphan."""
    daemon = make_daemon(start=False, gc={"interval": "0.2s", "orphan_grace": "0.5s"})
    daemon.state_dir.mkdir()
    db = sqlite3.connect(daemon.state_dir / "scratchd.db")
    db.executescript(STATE_V0.read_text())
    rows = db.execute("SELECT id FROM leases WHERE state = 'active'").fetchall()
    uid, gid = os.geteuid(), os.getegid()
    for (lease_id,) in rows:
        path = Path(daemon.pool_path, lease_id)
        path.mkdir(mode=0o700)
        (path / "kept").write_text(lease_id)
        db.execute(
            "UPDATE leases SET path = ?, uid = ?, gid = ?, expires_at = 4e9 WHERE id = ?",
            (str(path), uid, gid, lease_id),
        )
    db.commit()
    db.close()
    daemon.start()
    leases = daemon.request("GET", "/v1/leases", params={"tenant": "ci"}).json()["leases"]
    assert sorted((lease["labels"]["job"], lease["link_mode"]) for lease in leases) == [
        ("1", "hardlink"),
        ("2", "copy"),
        ("3", None),
    ]
    # Past the orphan grace, several GC cycles later, every leased directory is still there.
    seq = daemon.request("GET", "/v1/events", params={"limit": 1000}).json()["events"][-1]["seq"]
    daemon.lease()
    wait_for(
        lambda: any(
            event["kind"] == "lease_created"
            for event in daemon.request("GET", "/v1/events", params={"since": seq}).json()["events"]
        )
    )
    stray = Path(daemon.pool_path, "stray")
    stray.mkdir()
    wait_for(lambda: not stray.exists(), what="a real orphan reclaimed (so orphan review ran)")
    for (lease_id,) in rows:
        assert Path(daemon.pool_path, lease_id, "kept").read_text() == lease_id
