"""scan_tree on real directories: allocated bytes like ``du -s``, never leaving the tree, alone or shared with its helper."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from conftest import bind_mount, needs_root, tmpfs, wait_for
from forked import run_as
from test_deleter import MAX_OPEN_DIRS, NOBODY, deep_chain, fd_limit, open_fds

from scratchd import scan
from scratchd.offload import disk_worker
from scratchd.reclaim.deleter import delete_tree
from scratchd.scan import Tally, scan_parts
from scratchd.usage import UsageSample, scan_tree
from scratchd.walk import ForeignMount

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

    du_bytes = int(
        subprocess.run(
            [du, "-s", "-B1", str(tmp_path)], capture_output=True, text=True, check=True
        ).stdout.split()[0]
    )
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
    with tempfile.TemporaryDirectory(
        prefix="scratchd-test-", dir="/tmp"
    ) as reachable:  # pytest's tmp is 0700
        tree = Path(reachable)
        tree.chmod(0o755)
        (tree / "locked").mkdir()
        (tree / "locked" / "big").write_bytes(b"x" * MiB)
        (tree / "open").write_bytes(b"x")
        (tree / "locked").chmod(0o000)

        sample = run_as(NOBODY, NOBODY, lambda: scan_tree(str(tree)))

        assert isinstance(sample, UsageSample)
        assert sample.files == 1
        assert sample.bytes == own_bytes(tree) + own_bytes(tree / "locked") + own_bytes(tree / "open")


@needs_root
def test_directory_that_is_a_mount_of_its_own_is_refused(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "lease") as lease:
        (lease / "big").write_bytes(b"x" * MiB)
        with pytest.raises(ForeignMount):
            scan_tree(str(lease))


# -- a big tree shared with the helper process -----------------------------------------------


@pytest.fixture
def shared(monkeypatch: pytest.MonkeyPatch) -> None:
    """Scans share with a booted helper after a few entries, in calls of a few entries each."""
    monkeypatch.setattr(scan, "SPLIT_AFTER", 20)
    monkeypatch.setattr(scan, "HELPER_BUDGET", 30)
    wait_for(scan.helper, timeout=60, what="the scan's helper process")


def du(path: Path) -> int:
    out = subprocess.run(["du", "-s", "-B1", str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


GRID_FILES = 8 * 5 * 10


def grid(top: Path) -> list[Path]:
    """``top/a0..a7/b0..b4/f0..f9``: GRID_FILES files of 0 to 8 KB; returns the directories, top first."""
    made = [top]
    for a in range(8):
        made.append(top / f"a{a}")
        for b in range(5):
            directory = top / f"a{a}" / f"b{b}"
            directory.mkdir(parents=True)
            made.append(directory)
            for f in range(10):
                (directory / f"f{f}").write_bytes(b"x" * (f * 900))
    return made


def identity(path: Path) -> tuple[int, int]:
    found = path.stat()
    return found.st_dev, found.st_ino


def test_shared_scan_counts_each_hard_link_once_whichever_process_met_it(
    tmp_path: Path, shared: None
) -> None:
    directories = grid(tmp_path)
    (tmp_path / "shared").write_bytes(os.urandom(256 * 1024))
    for directory in directories[1:]:  # a link in every directory: the helper meets some, this process others
        os.link(tmp_path / "shared", directory / "shared")
    deep = tmp_path / "a3" / "b2" / "f4"
    with open(deep, "ab") as file:
        file.write(b"newest")

    sample = scan_tree(str(tmp_path))

    assert sample.helper_entries > 0
    assert sample.files == GRID_FILES + 1
    assert sample.bytes == du(tmp_path)
    assert sample.newest_mtime == max(path.lstat().st_ctime for path in [tmp_path, *tmp_path.rglob("*")])
    assert sample.cpu_seconds > 0


def test_shared_scan_follows_no_symlink_and_enters_no_mount(tmp_path: Path, shared: None) -> None:
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "big").write_bytes(os.urandom(4 * MiB))
    tree = tmp_path / "tree"
    directories = grid(tree)
    for directory in directories:
        (directory / "out").symlink_to(outside)
    mount_points = [directory / "mnt" for directory in directories[1::7]] if os.geteuid() == 0 else []
    for mount_point in mount_points:
        mount_point.mkdir()
    # Mounted over, a mount point is not the scan's to count: du's figure without them.
    expected = du(tree) - sum(own_bytes(mount_point) for mount_point in mount_points)

    with contextlib.ExitStack() as mounts:
        for mount_point in mount_points:
            mounts.enter_context(bind_mount(outside, mount_point))
        sample = scan_tree(str(tree))

    assert sample.helper_entries > 0
    assert sample.files == GRID_FILES + len(directories)  # the symlinks count as files
    assert sample.bytes == expected


def test_helper_hands_back_what_it_did_not_get_to(tmp_path: Path) -> None:
    grid(tmp_path)
    alone = scan_tree(str(tmp_path))
    parts: list[tuple[str, ...]] = [(f"a{a}",) for a in range(8)]
    total = Tally()
    calls = 0

    while parts:
        tally, parts = scan_parts(str(tmp_path), identity(tmp_path), parts, budget=25)
        total.merge(tally)
        calls += 1

    assert calls > 8
    assert total.files == alone.files
    assert (total.blocks + own_bytes(tmp_path) // 512) * 512 == alone.bytes
    assert total.newest == max(path.lstat().st_ctime for path in tmp_path.rglob("*"))


def test_helper_does_not_follow_a_directory_swapped_for_a_symlink(tmp_path: Path) -> None:
    """A part is names, re-opened one at a time: ``a`` listed as a directory, a symlink by the time the helper comes."""
    outside = tmp_path / "outside"
    (outside / "b").mkdir(parents=True)
    (outside / "b" / "big").write_bytes(os.urandom(MiB))
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a").symlink_to(outside)

    tally, left = scan_parts(str(tree), identity(tree), [("a", "b"), ("a",)], budget=1000)

    assert (tally.entries, tally.files, tally.blocks, tally.linked, left) == (0, 0, 0, {}, [])


def test_helper_refuses_a_replaced_top(tmp_path: Path) -> None:
    (tmp_path / "tree" / "a").mkdir(parents=True)
    (tmp_path / "other").mkdir()

    with pytest.raises(OSError, match="moved during the walk"):
        scan_parts(str(tmp_path / "tree"), identity(tmp_path / "other"), [("a",)], budget=1000)


def test_helper_walks_a_deep_part_with_bounded_fds(tmp_path: Path) -> None:
    deep_chain(tmp_path, 20 * MAX_OPEN_DIRS)
    try:
        with fd_limit(open_fds() + MAX_OPEN_DIRS + 8):
            deepest_part = ("d",) * scan.SPLIT_DEPTH
            tally, left = scan_parts(str(tmp_path), identity(tmp_path), [deepest_part], budget=1)
    finally:
        assert delete_tree(str(tmp_path / "d")).complete

    assert left == []  # below SPLIT_DEPTH: the helper finishes it rather than hand it back
    assert tally.files == 2


@needs_root
def test_helper_does_not_enter_a_mount(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "big").write_bytes(os.urandom(MiB))
    tree = tmp_path / "tree"
    tree.mkdir()
    with bind_mount(outside, tree / "mnt"):
        assert os.stat(tree / "mnt").st_dev == os.stat(tree).st_dev

        tally, left = scan_parts(str(tree), identity(tree), [("mnt", "sub"), ("mnt",)], budget=1000)

    assert (tally.entries, tally.files, tally.blocks, left) == (0, 0, 0, [])


@needs_root
def test_helper_counts_an_unreadable_directory_without_entering_it() -> None:
    with tempfile.TemporaryDirectory(
        prefix="scratchd-test-", dir="/tmp"
    ) as reachable:  # pytest's tmp is 0700
        tree = Path(reachable)
        tree.chmod(0o755)
        (tree / "open" / "locked").mkdir(parents=True)
        (tree / "open" / "locked" / "big").write_bytes(b"x" * MiB)
        (tree / "open" / "locked").chmod(0o000)

        tally, left = run_as(
            NOBODY, NOBODY, lambda: scan_parts(str(tree), identity(tree), [("open", "locked")], budget=1000)
        )

        assert left == []
        assert (tally.files, tally.blocks * 512) == (0, own_bytes(tree / "open" / "locked"))


def test_a_scanner_worker_that_started_a_helper_still_exits(tmp_path: Path) -> None:
    """A multiprocessing worker joins its children before its threads stop: the helper must be stopped first."""
    for d in range(12):
        (tmp_path / f"d{d}").mkdir()
        for f in range(scan.SPLIT_AFTER // 10):
            (tmp_path / f"d{d}" / f"f{f}").touch()
    executor = disk_worker(0, scan_tree)
    worker = executor.submit(os.getpid).result()
    try:
        wait_for(
            lambda: executor.submit(scan_tree, str(tmp_path)).result().helper_entries,
            timeout=60,
            what="a scan in the worker shared with its helper",
        )
        assert Path(f"/proc/{worker}/task/{worker}/children").read_text().split()

        stopping = threading.Thread(target=executor.shutdown)
        stopping.start()
        stopping.join(timeout=30)

        assert not stopping.is_alive()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)  # its helper dies with it


def test_a_disk_worker_has_its_works_module_imported_before_any_work():
    """The first deletion or scan must not wait for the worker's imports (70-90 ms here)."""
    executor = disk_worker(0, scan_tree)
    try:
        assert executor.submit(eval, "'scratchd.scan' in __import__('sys').modules").result(timeout=60)
    finally:
        executor.shutdown()
