"""Resolving `near` as the caller would: symlinks, `..`, missing tails, and doors it cannot open."""

import os

from scratchd.mounts import resolve_near
from scratchd.tenant import Tenant


def test_agrees_with_realpath_where_everything_is_open(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "a")
    (tmp_path / "rel").symlink_to("a/b")
    for near in ("link/b/venv-to-be", "rel/../b", "a/./b/../../a", "missing/deeper", "rel"):
        path = str(tmp_path / near)
        assert resolve_near(path, lambda st: True) == resolve_near(path), near


def test_stops_at_a_directory_the_caller_cannot_search(tmp_path):
    private = tmp_path / "private"
    (private / "inside").mkdir(parents=True)
    (private / "link").symlink_to("/")
    closed = os.stat(private).st_ino
    near = str(private / "link" / "no-such-dir-here")
    # not "/": that is behind the door the caller cannot open
    assert resolve_near(near, lambda directory: directory.st_ino != closed) == str(private)
    assert resolve_near(near) == "/"  # the daemon itself sees through


def test_a_symlink_loop_ends_the_walk(tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    assert resolve_near(str(tmp_path / "loop" / "x"), lambda st: True) == str(tmp_path)


def test_a_file_counts_as_its_directory(tmp_path):
    (tmp_path / "f").write_text("x")
    assert resolve_near(str(tmp_path / "f" / "x"), lambda st: True) == str(tmp_path)


def test_permission_bits_by_owner_group_other():
    class Dir:
        def __init__(self, uid, gid, mode):
            self.st_uid, self.st_gid, self.st_mode = uid, gid, mode

    alice = Tenant(name="alice", uid=1000, gid=1000, groups=frozenset({1000, 50}))
    assert alice.may_search(Dir(1000, 0, 0o100))
    assert not alice.may_search(Dir(1000, 50, 0o011))  # the owner's bits decide for the owner
    assert alice.may_search(Dir(0, 50, 0o010))
    assert not alice.may_search(Dir(0, 0, 0o770))
    assert alice.may_search(Dir(0, 0, 0o001))
    assert Tenant(name="root", uid=0, gid=0).may_search(Dir(5, 5, 0o000))
