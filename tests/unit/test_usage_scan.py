"""scan_tree on real directories: allocated bytes like ``du -s``, never leaving the tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from conftest import bind_mount, needs_root, tmpfs
from test_deleter import MAX_OPEN_DIRS, NOBODY, deep_chain, fd_limit, open_fds, run_as

from scratchd.reclaim.deleter import ForeignMount, delete_tree
from scratchd.usage import UsageSample, scan_tree

MiB = 1 << 20


def own_bytes(path: Path) -> int:
    return path.lstat().st_blocks * 512


def test_hard_link_inside_counts_once(tmp_path: Path) -> None:
    (tmp_path / "data").write_bytes(os.urandom(2 * MiB))
    os.link(tmp_path / "data", tmp_path / "again")

    sample = scan_tree(str(tmp_path))

    assert sample.files == 1
    assert sample.bytes == own_bytes(tmp_path) + own_bytes(tmp_path / "data")
    assert 2 * MiB <= sample.bytes < 2 * MiB + 64 * 1024


def test_sparse_file_counts_allocated_blocks(tmp_path: Path) -> None:
    with open(tmp_path / "sparse", "wb") as file:
        file.seek(1 << 30)
        file.write(b"end")

    sample = scan_tree(str(tmp_path))

    assert (tmp_path / "sparse").stat().st_size > 1 << 30
    assert sample.bytes == own_bytes(tmp_path) + own_bytes(tmp_path / "sparse") < MiB


def test_symlinks_are_counted_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "big").write_bytes(b"x" * MiB)
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "to-dir").symlink_to(outside)
    (tree / "to-file").symlink_to(outside / "big")
    (tree / "loop").symlink_to("loop")

    sample = scan_tree(str(tree))

    assert sample.files == 3
    assert sample.bytes < 64 * 1024


def test_agrees_with_du(tmp_path: Path) -> None:
    du = shutil.which("du")
    if du is None:
        pytest.skip("no du on this host")
    for group in range(3):
        (tmp_path / f"g{group}" / "sub").mkdir(parents=True)
        for i in range(20):
            (tmp_path / f"g{group}" / f"f{i}").write_bytes(b"x" * (i * 700))
        os.link(tmp_path / f"g{group}" / "f3", tmp_path / f"g{group}" / "sub" / "link")
    (tmp_path / "g0" / "sub" / "fifo").touch()

    sample = scan_tree(str(tmp_path))

    du_bytes = int(subprocess.run([du, "-s", "-B1", str(tmp_path)], capture_output=True, text=True, check=True).stdout.split()[0])
    assert sample.bytes == du_bytes
    assert sample.files == 3 * 20 + 1


def test_newest_change_reflects_a_write_deep_down(tmp_path: Path) -> None:
    deep = tmp_path.joinpath(*"abcdefgh")
    deep.mkdir(parents=True)
    (tmp_path / "early").write_bytes(b"1")
    (deep / "file").write_bytes(b"1")
    # A timestamp set into the future is no sign of activity.
    os.utime(tmp_path / "early", (time.time() + 86400 * 365, time.time() + 86400 * 365))
    with open(deep / "file", "ab") as file:
        file.write(b"2")

    sample = scan_tree(str(tmp_path))

    assert sample.newest_mtime == (deep / "file").stat().st_ctime
    assert sample.newest_mtime <= sample.measured_at <= time.time()


def test_deep_chain_with_bounded_fds(tmp_path: Path) -> None:
    deep_chain(tmp_path, 20 * MAX_OPEN_DIRS)
    try:
        with fd_limit(open_fds() + MAX_OPEN_DIRS + 8):
            sample = scan_tree(str(tmp_path))
    finally:
        assert delete_tree(str(tmp_path / "d")).complete  # pytest's own cleanup would recurse too deep

    assert sample.files == 2  # the file and the symlink at the bottom


def test_pace_is_called_as_it_goes(tmp_path: Path) -> None:
    for i in range(2500):
        (tmp_path / f"f{i}").touch()
    counts: list[int] = []

    scan_tree(str(tmp_path), pace=counts.append)

    assert counts == [1000, 2000]


def test_missing_directory_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        scan_tree(str(tmp_path / "gone"))


@needs_root
def test_mounts_inside_are_not_counted(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "big").write_bytes(os.urandom(MiB))
    tree = tmp_path / "tree"
    (tree / "own").mkdir(parents=True)
    (tree / "own" / "file").write_bytes(b"x")
    with tmpfs(tree / "fs") as fs, bind_mount(outside, tree / "same-fs"):
        (fs / "big").write_bytes(os.urandom(MiB))
        assert os.stat(tree / "same-fs").st_dev == os.stat(tree).st_dev

        sample = scan_tree(str(tree))

    assert sample.files == 1
    assert sample.bytes < 64 * 1024


@needs_root
def test_unreadable_directory_is_skipped() -> None:
    """As an unprivileged scanner: a mode-000 directory counts itself, not its content."""
    with tempfile.TemporaryDirectory(prefix="scratchd-test-", dir="/tmp") as reachable:  # pytest's tmp is 0700
        tree = Path(reachable)
        tree.chmod(0o755)
        (tree / "locked").mkdir()
        (tree / "locked" / "big").write_bytes(b"x" * MiB)
        (tree / "open").write_bytes(b"x")
        (tree / "locked").chmod(0o000)

        sample = run_as(NOBODY, lambda: scan_tree(str(tree)))

        assert isinstance(sample, UsageSample)
        assert sample.files == 1
        assert sample.bytes == own_bytes(tree) + own_bytes(tree / "locked") + own_bytes(tree / "open")


@needs_root
def test_directory_that_is_a_mount_of_its_own_is_refused(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "lease") as lease:
        (lease / "big").write_bytes(b"x" * MiB)
        with pytest.raises(ForeignMount):
            scan_tree(str(lease))
