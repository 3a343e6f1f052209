"""delete_tree on real, hostile trees: nothing outside the tree may change (guarantee 3, README "Guarantees")."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pickle
import resource
import stat
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from conftest import IS_ROOT, bind_mount, needs_root, tmpfs
from forked import run_as

from scratchd import walk
from scratchd.mounts import Mount
from scratchd.reclaim import deleter
from scratchd.reclaim.deleter import DeleteResult, delete_tree
from scratchd.scan import scan_tree
from scratchd.walk import MAX_OPEN_DIRS

NOBODY = 65534
T = TypeVar("T")
DEPTH = 10_000


def snapshot(root: Path) -> dict[str, tuple[int, bytes | str | None]]:
    """Every path under ``root`` with its mode and content (or link target)."""
    seen: dict[str, tuple[int, bytes | str | None]] = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory, name)
            found = path.lstat()
            if stat.S_ISLNK(found.st_mode):
                content: bytes | str | None = os.readlink(path)
            elif stat.S_ISREG(found.st_mode):
                content = path.read_bytes()
            else:
                content = None
            seen[str(path.relative_to(root))] = (found.st_mode, content)
    return seen


def deep_chain(top: Path, depth: int) -> None:
    """``top/d/d/.../d`` ``depth`` levels down, far past PATH_MAX, with a file and a symlink at the bottom."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            below = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = below
        os.close(os.open("bottom", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd))
        os.symlink("/", "root-link", dir_fd=fd)
    finally:
        os.close(fd)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@contextlib.contextmanager
def fd_limit(fds: int) -> Iterator[None]:
    """Lower this process's open-file limit for the duration: a walk holding one fd per level fails with EMFILE."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (fds, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """Canaries a hostile tree points at."""
    root = tmp_path / "outside"
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "dir" / "canary").write_bytes(b"keep me\n")
    (root / "dir" / "sub" / "canary").write_bytes(b"me too\n")
    (root / "file").write_bytes(b"outside file\n")
    (root / "linked").write_bytes(b"hard-linked from the tree\n")
    return root


@pytest.fixture
def hostile(tmp_path: Path, outside: Path) -> Iterator[Path]:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "to-dir").symlink_to(outside / "dir")
    (tree / "to-file").symlink_to(outside / "file")
    (tree / "loop-a").symlink_to(tree / "loop-b")
    (tree / "loop-b").symlink_to(tree / "loop-a")
    (tree / "up").symlink_to("..")
    os.link(outside / "linked", tree / "hardlink")
    os.mkfifo(tree / "fifo")
    os.mknod(tree / "socket", stat.S_IFSOCK | 0o600)
    if IS_ROOT:
        os.mknod(tree / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    locked = tree / "locked"
    (locked / "inner").mkdir(parents=True)
    (locked / "inner" / "file").write_bytes(b"x" * 10_000)
    (locked / "to-outside").symlink_to(outside)
    readonly = tree / "readonly"
    (readonly / "sub").mkdir(parents=True)
    (readonly / "file").write_bytes(b"y")
    (readonly / "sub" / "file").write_bytes(b"z")
    (readonly / "sub").chmod(0o500)
    readonly.chmod(0o500)
    locked.chmod(0o000)
    yield tree
    if os.path.lexists(tree):  # a failed test: pytest's own cleanup would recurse too deep for the chain
        delete_tree(str(tree))


@pytest.fixture(params=["statx", "fdinfo"])
def mount_ids(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways a walk learns mount ids: statx (Linux 5.8+) and /proc/self/fdinfo before that."""
    if request.param == "fdinfo":
        monkeypatch.setattr(walk, "_statx", None)
    return str(request.param)


def test_hostile_tree_goes_and_nothing_outside_changes(hostile: Path, outside: Path) -> None:
    deep_chain(hostile, DEPTH)
    before = snapshot(outside)
    baseline = open_fds()

    with fd_limit(baseline + MAX_OPEN_DIRS + 8):  # far fewer than the chain is deep
        result = delete_tree(str(hostile), lambda _count: None)  # paced: the walk does it all, no rm

    assert result.complete, result
    assert result.errors == [] and result.left_mounts == []
    assert not os.path.lexists(hostile)
    assert snapshot(outside) == before
    assert (outside / "linked").stat().st_nlink == 1
    assert result.dirs == DEPTH + 5  # the chain, locked, locked/inner, readonly, readonly/sub, the top
    assert result.files == 14 + IS_ROOT  # every non-directory, the device node only as root
    assert result.bytes >= 10_000  # locked/inner/file; the hard-linked file freed nothing
    assert open_fds() == baseline


def test_mount_ids_from_fdinfo_where_statx_has_none(
    hostile: Path, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(walk, "_statx", None)
    before = snapshot(outside)

    result = delete_tree(str(hostile))

    assert result.complete and result.errors == []
    assert not os.path.lexists(hostile)
    assert snapshot(outside) == before


def test_top_missing_is_complete(tmp_path: Path) -> None:
    assert delete_tree(str(tmp_path / "gone")) == DeleteResult(complete=True)
    assert delete_tree(str(tmp_path / "no" / "parent")) == DeleteResult(complete=True)


def test_top_symlink_is_unlinked_not_followed(tmp_path: Path, outside: Path) -> None:
    before = snapshot(outside)
    (tmp_path / "top").symlink_to(outside / "dir")

    result = delete_tree(str(tmp_path / "top"))

    assert result.complete and result.files == 1 and result.dirs == 0
    assert not os.path.lexists(tmp_path / "top")
    assert snapshot(outside) == before


@pytest.mark.parametrize("exc", [walk.ForeignMount("mnt"), walk.TreeChanged("a/b")])
def test_walk_errors_survive_pickling_out_of_a_worker_process(exc: OSError) -> None:
    """Raised in a ProcessPoolExecutor worker, an unpicklable one would break the pool instead."""
    exc.add_note("from the scan worker")
    copy = pickle.loads(pickle.dumps(exc))
    assert type(copy) is type(exc) and str(copy) == str(exc)
    assert (copy.errno, copy.strerror, copy.filename, copy.args) == (
        exc.errno,
        exc.strerror,
        exc.filename,
        exc.args,
    )
    assert copy.__notes__ == ["from the scan worker"]


def test_pace_sees_progress_and_an_interrupted_run_resumes(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    for group in range(3):
        (tree / f"g{group}").mkdir(parents=True)
        for i in range(1000):
            (tree / f"g{group}" / f"f{i}").touch()
    counts: list[int] = []

    class Killed(Exception):
        pass

    def killed_midway(count: int) -> None:
        counts.append(count)
        if count >= 1500:
            raise Killed

    with pytest.raises(Killed):
        delete_tree(str(tree), killed_midway)
    assert counts == sorted(counts) and 0 < counts[0] <= 1100
    left = sum(1 for path in tree.rglob("*") if path.is_file())
    assert 0 < left <= 3000 - 1500 + 3

    result = delete_tree(str(tree))

    assert result.complete and result.errors == []
    assert result.files == left
    assert not tree.exists()


@contextlib.contextmanager
def stuck_file(tree: Path) -> Iterator[None]:
    """``tree/a/b/stuck``, immutable for the block (no one may remove it), beside ``tree/a/gone``."""
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "stuck").write_bytes(b"s")
    (tree / "a" / "gone").write_bytes(b"g")
    try:
        set_immutable(tree / "a" / "b" / "stuck", True)
    except OSError as exc:
        pytest.skip(f"no immutable flag on this filesystem: {exc}")
    try:
        yield
    finally:
        set_immutable(tree / "a" / "b" / "stuck", False)


@needs_root
def test_immutable_file_is_reported_and_a_rerun_finishes(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "other").mkdir(parents=True)
    (tree / "other" / "gone").write_bytes(b"g")
    with stuck_file(tree):
        result = delete_tree(str(tree))
        assert not result.complete
        assert len(result.errors) == 1 and result.errors[0].startswith(f"{tree}/a/b/stuck: cannot remove")
        assert sorted(p.name for p in tree.rglob("*")) == ["a", "b", "stuck"]

    result = delete_tree(str(tree))

    assert result.complete and result.files == 1 and result.dirs == 3
    assert not tree.exists()


def set_immutable(path: Path, on: bool) -> None:
    fs_ioc_getflags, fs_ioc_setflags, fs_immutable_fl = 0x80086601, 0x40086602, 0x10
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        (flags,) = struct.unpack("l", fcntl.ioctl(fd, fs_ioc_getflags, b"\0" * 8))
        flags = flags | fs_immutable_fl if on else flags & ~fs_immutable_fl
        fcntl.ioctl(fd, fs_ioc_setflags, struct.pack("l", flags))
    finally:
        os.close(fd)


# -- mounts inside the tree ---------------------------------------------------------------------


def refuse_detach(target: str) -> None:
    raise OSError(errno.EPERM, "not allowed", target)


@needs_root
def test_tmpfs_inside_is_detached_and_its_content_untouched(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    with tmpfs(tree / "a" / "mnt"):
        (tree / "a" / "mnt" / "canary").write_bytes(b"on the tmpfs\n")
        mounted_root = os.open(tree / "a" / "mnt", os.O_RDONLY | os.O_DIRECTORY)
        try:
            result = delete_tree(str(tree))

            assert result.complete and result.left_mounts == [] and result.errors == []
            assert not tree.exists()
            # The detached tmpfs lives on while we hold it, with its canary.
            with open(os.open("canary", os.O_RDONLY, dir_fd=mounted_root), "rb") as canary:
                assert canary.read() == b"on the tmpfs\n"
        finally:
            os.close(mounted_root)


@needs_root
def test_bind_mount_of_the_same_filesystem_is_detached(tmp_path: Path, outside: Path) -> None:
    tree = tmp_path / "tree"
    before = snapshot(outside)
    with bind_mount(outside, tree / "bound"):
        assert os.stat(tree / "bound").st_dev == os.stat(tree).st_dev
        result = delete_tree(str(tree))

    assert result.complete and result.left_mounts == [] and result.errors == []
    assert not tree.exists()
    assert snapshot(outside) == before


@needs_root
def test_mount_that_cannot_be_detached_is_left_alone(
    tmp_path: Path, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(deleter, "umount_lazily", refuse_detach)
    tree = tmp_path / "tree"
    (tree / "sibling").mkdir(parents=True)
    (tree / "sibling" / "file").write_bytes(b"goes")
    before = snapshot(outside)
    with bind_mount(outside, tree / "x" / "bound"):
        result = delete_tree(str(tree))

        assert not result.complete
        assert result.left_mounts == [str(tree / "x" / "bound")]
        assert result.errors == []  # a mount left in place is reported there, not as an error
        assert snapshot(tree / "x" / "bound") == before
        assert sorted(p.name for p in tree.iterdir()) == ["x"]
    assert snapshot(outside) == before


@needs_root
@pytest.mark.usefixtures("mount_ids")
def test_mount_missing_from_the_table_is_still_never_entered(
    tmp_path: Path, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mount made after the table was read: the per-directory mount id check alone must stop the walk."""
    monkeypatch.setattr(deleter, "read_mounts", lambda: [])
    tree = tmp_path / "tree"
    before = snapshot(outside)
    with bind_mount(outside, tree / "deep" / "bound"):
        result = delete_tree(str(tree))

        assert not result.complete and result.errors == []
        assert result.left_mounts == [str(tree / "deep" / "bound")]
        assert snapshot(outside) == before


@needs_root
def test_top_that_is_a_mount_is_left_alone(
    tmp_path: Path, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(deleter, "umount_lazily", refuse_detach)
    before = snapshot(outside)
    with bind_mount(outside, tmp_path / "top"):
        result = delete_tree(str(tmp_path / "top"))

        assert result == DeleteResult(left_mounts=[str(tmp_path / "top")])
        assert snapshot(outside) == before


@needs_root
def test_unprivileged_owner_deletes_its_locked_directories() -> None:
    """As the tree's owner, not root: mode-000 and read-only directories need a chmod first."""
    with tempfile.TemporaryDirectory(
        prefix="scratchd-test-", dir="/tmp"
    ) as reachable:  # pytest's tmp is 0700
        os.chmod(reachable, 0o755)
        owner_deletes_locked_directories(Path(reachable, "home"))


def owner_deletes_locked_directories(home: Path) -> None:
    tree = home / "tree"
    (tree / "locked" / "inner").mkdir(parents=True)
    (tree / "locked" / "inner" / "file").write_bytes(b"data")
    (tree / "readonly").mkdir()
    (tree / "readonly" / "file").write_bytes(b"data")
    for path in [home, *home.rglob("*")]:
        os.chown(path, NOBODY, NOBODY, follow_symlinks=False)
    (tree / "readonly").chmod(0o500)
    (tree / "locked" / "inner").chmod(0o000)
    (tree / "locked").chmod(0o000)

    result = run_as(NOBODY, NOBODY, lambda: delete_tree(str(tree)))

    assert result.complete and result.errors == [], result
    assert (result.files, result.dirs) == (2, 4)
    assert not tree.exists()


# -- big trees: rm takes over from the walk -----------------------------------------------------

SPILL = 100  # files at a big tree's top beyond RM_AFTER


def big_tree(tree: Path) -> None:
    """``tree`` with RM_AFTER + SPILL files at its top: the walk, which empties a directory before
    entering its subdirectories, hands the tree to rm before it enters any of them."""
    tree.mkdir(parents=True, exist_ok=True)
    fd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(deleter.RM_AFTER + SPILL):
            os.close(os.open(f"f{i}", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd))
    finally:
        os.close(fd)


def test_big_tree_goes_to_rm_which_follows_no_link(hostile: Path, outside: Path) -> None:
    """Every hostile entry below the top is rm's to remove: nothing outside may change."""
    for name in ["to-dir", "to-file", "loop-a", "up", "hardlink", "fifo", "locked"]:
        os.rename(hostile / name, hostile / "readonly" / name)  # below the top: rm's
    (hostile / "readonly" / "to-outside").symlink_to(outside)
    big_tree(hostile)
    before = snapshot(outside)

    result = delete_tree(str(hostile), count_bytes=False)

    assert result.complete and result.errors == [] and result.left_mounts == [], result
    assert not os.path.lexists(hostile)
    assert snapshot(outside) == before
    assert (outside / "linked").stat().st_nlink == 1
    # The walk removed RM_AFTER files and, after rm, the top: all else was rm's.
    assert (result.files, result.dirs) == (deleter.RM_AFTER, 1)


def test_pacing_keeps_the_walk(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    big_tree(tree / "sub")

    result = delete_tree(str(tree), lambda _count: None)

    assert result.complete and (result.files, result.dirs) == (deleter.RM_AFTER + SPILL, 2)


def test_bytes_counted_include_what_rm_was_handed(tmp_path: Path) -> None:
    """The walk's share counted as it unlinks, rm's measured just before it runs: together, the tree's size."""
    tree = tmp_path / "tree"
    big_tree(tree)  # the walk's: RM_AFTER empty files at the top
    (tree / "sub").mkdir()
    for i in range(SPILL):  # rm's: the top's SPILL last files, and all of sub
        (tree / "sub" / f"f{i}").write_bytes(os.urandom(10_000))
    (tree / "sub" / "linked").write_bytes(os.urandom(10_000))
    os.link(tree / "sub" / "linked", tree / "sub" / "link")  # counted once
    size = scan_tree(str(tree)).bytes

    result = delete_tree(str(tree))

    assert result.complete and (result.files, result.dirs) == (deleter.RM_AFTER, 1)  # rm ran
    assert result.bytes == size


@pytest.mark.parametrize("rm", ["missing", "failing"])
def test_without_a_working_rm_the_walk_removes_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rm: str
) -> None:
    fake = tmp_path / "rm"
    if rm == "failing":  # says it is GNU's, then removes nothing
        fake.write_text(
            '#!/bin/sh\n[ "$1" = --version ] && echo "rm (GNU coreutils) 9.1" && exit 0\nexit 1\n'
        )
        fake.chmod(0o755)
    monkeypatch.setattr(deleter, "RM", str(fake))
    tree = tmp_path / "tree"
    big_tree(tree)
    big_tree(tree / "a" / "b")

    result = delete_tree(str(tree), count_bytes=False)

    assert result.complete and result.errors == []
    assert (result.files, result.dirs) == (2 * (deleter.RM_AFTER + SPILL), 3)
    assert not tree.exists()


@needs_root
def test_rm_never_gets_a_tree_with_a_mount_the_callers_table_lacks(tmp_path: Path, outside: Path) -> None:
    """A mount made after the caller read the table: rm would go through a bind mount of our
    filesystem (it shares ``st_dev``), so it must be found and detached first."""
    tree = tmp_path / "tree"
    big_tree(tree)
    before = snapshot(outside)
    with bind_mount(outside, tree / "x" / "bound"):
        result = delete_tree(str(tree), count_bytes=False, mounts=[])

        assert result.complete and result.errors == [] and result.left_mounts == [], result
        assert not tree.exists()
        assert snapshot(outside) == before
        assert (result.files, result.dirs) == (deleter.RM_AFTER, 1)


@needs_root
def test_rm_never_gets_a_tree_with_a_mount_left_in_place(
    tmp_path: Path, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(deleter, "umount_lazily", refuse_detach)
    tree = tmp_path / "tree"
    before = snapshot(outside)
    with bind_mount(outside, tree / "x" / "bound"):
        mounts: list[Mount] | None
        for mounts in [None, []]:  # in the caller's table, or only in the one read before rm
            big_tree(tree)
            (tree / "x" / "sibling").mkdir()

            result = delete_tree(str(tree), count_bytes=False, mounts=mounts)

            assert not result.complete and result.errors == []
            assert result.left_mounts == [str(tree / "x" / "bound")]
            assert snapshot(tree / "x" / "bound") == before
            assert os.listdir(tree) == ["x"] and os.listdir(tree / "x") == ["bound"]
    assert snapshot(outside) == before


@needs_root
def test_what_rm_cannot_remove_is_reported_by_the_walk(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    big_tree(tree)
    with stuck_file(tree):
        result = delete_tree(str(tree), count_bytes=False)

        assert not result.complete
        assert result.errors == [f"{tree}/a/b/stuck: cannot remove: Operation not permitted"]
        assert sorted(p.name for p in tree.rglob("*")) == ["a", "b", "stuck"]


@needs_root
def test_unprivileged_owner_finishes_the_locked_directories_rm_cannot_enter() -> None:
    with tempfile.TemporaryDirectory(
        prefix="scratchd-test-", dir="/tmp"
    ) as reachable:  # pytest's tmp is 0700
        os.chmod(reachable, 0o755)
        home = Path(reachable, "home")
        tree = home / "tree"
        big_tree(tree)
        (tree / "locked" / "inner").mkdir(parents=True)
        (tree / "locked" / "inner" / "file").write_bytes(b"data")
        (tree / "open" / "sub").mkdir(parents=True)
        for path in [home, *home.rglob("*")]:
            os.chown(path, NOBODY, NOBODY, follow_symlinks=False)
        (tree / "locked" / "inner").chmod(0o000)
        (tree / "locked").chmod(0o000)

        result = run_as(NOBODY, NOBODY, lambda: delete_tree(str(tree), count_bytes=False))

        assert result.complete and result.errors == [], result
        # rm took "open" and the top's files; the walk the locked ones, which rm could not enter.
        assert (result.files, result.dirs) == (deleter.RM_AFTER + 1, 3)
        assert not tree.exists()
