from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
import subprocess
import sys
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import mounted

from scratchd import pool_dirs
from scratchd.api.models import PoolOut
from scratchd.mounts import Mount, MountTable, mount_of, read_mounts
from scratchd.pool_dirs import (
    LOCK_FILE,
    TRASH_DIR,
    PoolLocked,
    PoolSet,
    list_entries,
    lock_pool,
    make_lease_dir,
    move_to_trash,
    prepare_pool_dir,
    probe_pool,
    remove_if_empty,
)
from scratchd.pools import REASON_STATES, PoolReason, PoolState, pool_state, space_reason

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="mounting tmpfs and chown to other users need root")
MiB = 1 << 20


@dataclass
class PoolCfg:
    """Stands in for config.PoolConfig: the same duck type."""

    name: str
    path: str
    mount_point: str | None = None
    labels: list[str] = field(default_factory=list)
    reserve_fixed: int = 0
    reserve_fraction: float = 0.0

    def reserve_bytes(self, capacity_bytes: int) -> int:
        return self.reserve_fixed + int(capacity_bytes * self.reserve_fraction)


def mode(path: str | Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@contextlib.contextmanager
def umask(value: int) -> Iterator[None]:
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def with_fake_mounts(mounts: list[Mount], points: dict[Path, int]) -> list[Mount]:
    """The real table plus pretend mounts ``{point: mount_id}``: mount changes played without root."""
    fakes = []
    for point, mount_id in points.items():
        real = os.path.realpath(point)
        fakes.append(
            Mount(mount_id, mount_of(real, mounts).mount_id, "0:999", "/", real, "fakefs", "fake", False)
        )
    return [*mounts, *fakes]


# -- state and reason -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "state"),
    [
        (None, PoolState.OK),
        (PoolReason.MISSING, PoolState.UNAVAILABLE),
        (PoolReason.NOT_ON_MOUNT_POINT, PoolState.UNAVAILABLE),
        (PoolReason.UNMOUNTED, PoolState.UNAVAILABLE),
        (PoolReason.LOCKED, PoolState.UNAVAILABLE),
        (PoolReason.INACCESSIBLE, PoolState.UNAVAILABLE),
        (PoolReason.READ_ONLY, PoolState.READ_ONLY),
        (PoolReason.FULL, PoolState.FULL),
    ],
)
def test_pool_state_of_each_reason(reason: PoolReason | None, state: PoolState) -> None:
    assert pool_state(reason) is state


def test_every_reason_has_a_state_and_only_ok_has_none() -> None:
    assert set(REASON_STATES) == set(PoolReason)
    assert PoolState.OK not in REASON_STATES.values()


@pytest.mark.parametrize(
    ("facts", "reason"),
    [
        ({}, None),
        ({"read_only": True}, PoolReason.READ_ONLY),
        ({"read_only": True, "free_bytes": 0}, PoolReason.READ_ONLY),  # read-only trumps full
        ({"free_bytes": 0}, PoolReason.FULL),
        ({"free_bytes": 0, "reserve_bytes": 0}, PoolReason.FULL),
        ({"free_bytes": 100, "reserve_bytes": 100}, PoolReason.FULL),
        ({"free_bytes": 99, "reserve_bytes": 100}, PoolReason.FULL),
        ({"free_bytes": 101, "reserve_bytes": 100}, None),
        ({"free_bytes": 1, "reserve_bytes": 0}, None),
    ],
)
def test_space_reason(facts: dict[str, object], reason: PoolReason | None) -> None:
    given: dict[str, object] = {"read_only": False, "free_bytes": 10 * MiB, "reserve_bytes": MiB, **facts}
    assert space_reason(**given) is reason  # type: ignore[arg-type]


def test_pool_state_and_reason_values_are_the_api_spelling() -> None:
    assert [state.value for state in PoolState] == ["ok", "full", "read_only", "unavailable"]
    assert {reason.value for reason in PoolReason} == {
        "missing",
        "not_on_mount_point",
        "unmounted",
        "locked",
        "inaccessible",
        "read_only",
        "full",
    }
    literal, none = typing.get_args(PoolOut.model_fields["reason"].annotation)
    assert set(typing.get_args(literal)) == set(PoolReason) and none is type(None)


# -- probe_pool -----------------------------------------------------------------------------


def test_probe_ok_pool_reports_its_mount_and_space(tmp_path: Path) -> None:
    mounts = read_mounts()
    status = probe_pool(
        PoolCfg("main", str(tmp_path), labels=["fast", "local"]), mounts, expected_mount_id=None
    )
    mount = mount_of(os.path.realpath(tmp_path), mounts)
    fs = os.statvfs(tmp_path)
    assert status.state is PoolState.OK and (status.reason, status.message) == (None, None)
    assert (status.name, status.path, status.labels) == ("main", str(tmp_path), ("fast", "local"))
    assert (status.mount_point, status.fstype, status.device, status.mount_id) == (
        mount.mount_point,
        mount.fstype,
        mount.device,
        mount.mount_id,
    )
    assert status.capacity_bytes == fs.f_blocks * fs.f_frsize
    assert abs(status.free_bytes - fs.f_bavail * fs.f_frsize) < 64 * MiB
    assert status.reserve_bytes == 0


def test_probe_computes_reserve_from_capacity(tmp_path: Path) -> None:
    status = probe_pool(
        PoolCfg("p", str(tmp_path), reserve_fraction=0.01), read_mounts(), expected_mount_id=None
    )
    assert status.reserve_bytes == int(status.capacity_bytes * 0.01)


def test_probe_missing_path_is_unavailable_and_not_created(tmp_path: Path) -> None:
    path = tmp_path / "gone"
    status = probe_pool(PoolCfg("p", str(path), reserve_fixed=5), read_mounts(), expected_mount_id=None)
    assert (status.state, status.reason) == (PoolState.UNAVAILABLE, PoolReason.MISSING)
    assert status.message == f"Pool path {path} does not exist."
    assert (status.mount_id, status.mount_point, status.capacity_bytes, status.free_bytes) == (
        None,
        None,
        0,
        0,
    )
    assert not path.exists()


def test_probe_file_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    status = probe_pool(PoolCfg("p", str(tmp_path / "file")), read_mounts(), expected_mount_id=None)
    assert (status.state, status.reason) == (PoolState.UNAVAILABLE, PoolReason.INACCESSIBLE)
    assert "not a directory" in (status.message or "")


def test_probe_follows_a_configured_symlink(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    status = probe_pool(PoolCfg("p", str(tmp_path / "link")), read_mounts(), expected_mount_id=None)
    assert status.state is PoolState.OK
    assert status.path == str(tmp_path / "link")


def test_probe_full_when_free_space_is_within_the_reserve(tmp_path: Path) -> None:
    status = probe_pool(
        PoolCfg("p", str(tmp_path), reserve_fraction=1.0), read_mounts(), expected_mount_id=None
    )
    assert (status.state, status.reason) == (PoolState.FULL, PoolReason.FULL)
    assert status.message is not None and "reserve" in status.message
    assert status.free_bytes > 0  # full, but the numbers are still true


def test_probe_read_only_from_the_mount_table(tmp_path: Path) -> None:
    mounts = read_mounts()
    own = mount_of(os.path.realpath(tmp_path), mounts)
    marked = [dataclasses.replace(m, read_only=True) if m == own else m for m in mounts]
    status = probe_pool(PoolCfg("p", str(tmp_path)), marked, expected_mount_id=None)
    assert (status.state, status.reason) == (PoolState.READ_ONLY, PoolReason.READ_ONLY)
    assert "read-only" in (status.message or "")


def test_probe_on_its_mount_point(tmp_path: Path) -> None:
    (tmp_path / "pool").mkdir()
    mounts = with_fake_mounts(read_mounts(), {tmp_path: 4242})
    status = probe_pool(
        PoolCfg("p", str(tmp_path / "pool"), mount_point=str(tmp_path)), mounts, expected_mount_id=None
    )
    assert status.state is PoolState.OK
    assert (status.mount_id, status.fstype) == (4242, "fakefs")


def test_probe_mount_point_compared_after_resolving_symlinks(tmp_path: Path) -> None:
    (tmp_path / "disk").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "disk")
    mounts = with_fake_mounts(read_mounts(), {tmp_path / "disk": 4242})
    status = probe_pool(
        PoolCfg("p", str(tmp_path / "disk"), mount_point=str(tmp_path / "alias")),
        mounts,
        expected_mount_id=None,
    )
    assert status.state is PoolState.OK


def test_probe_off_its_mount_point_is_unavailable(tmp_path: Path) -> None:
    # The disk failed to mount: the pool path falls through to the parent filesystem.
    mounts = read_mounts()
    status = probe_pool(
        PoolCfg("p", str(tmp_path), mount_point=str(tmp_path)), mounts, expected_mount_id=None
    )
    below = mount_of(os.path.realpath(tmp_path), mounts)
    assert (status.state, status.reason) == (PoolState.UNAVAILABLE, PoolReason.NOT_ON_MOUNT_POINT)
    assert status.message == f"Pool path {tmp_path} is on {below.mount_point}, not on {tmp_path}."
    assert status.mount_id == below.mount_id  # says where it really is
    assert (status.capacity_bytes, status.free_bytes) == (0, 0)  # but not that filesystem's space


def test_probe_on_another_mount_than_expected_is_unavailable(tmp_path: Path) -> None:
    mounts = read_mounts()
    own = mount_of(os.path.realpath(tmp_path), mounts)
    assert (
        probe_pool(PoolCfg("p", str(tmp_path)), mounts, expected_mount_id=own.mount_id).state is PoolState.OK
    )
    status = probe_pool(PoolCfg("p", str(tmp_path)), mounts, expected_mount_id=own.mount_id + 100000)
    assert (status.state, status.reason) == (PoolState.UNAVAILABLE, PoolReason.UNMOUNTED)
    assert "unmounted or replaced" in (status.message or "")


# -- PoolSet --------------------------------------------------------------------------------


def test_pool_set_first_refresh_reports_every_pool(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    cfgs = [PoolCfg("b", str(tmp_path / "missing")), PoolCfg("a", str(tmp_path / "a"))]
    pool_set = PoolSet(cfgs)
    assert pool_set.statuses() == [] and pool_set.get("a") is None
    changes = pool_set.refresh(read_mounts())
    assert [(old, new.name, new.state) for old, new in changes] == [
        (None, "b", PoolState.UNAVAILABLE),
        (None, "a", PoolState.OK),
    ]
    assert [status.name for status in pool_set.statuses()] == ["b", "a"]  # config order
    assert pool_set.get("a") == changes[1][1]


def test_pool_set_reports_state_changes_only(tmp_path: Path) -> None:
    pool_set = PoolSet([PoolCfg("p", str(tmp_path / "p"))])
    mounts = read_mounts()
    pool_set.refresh(mounts)
    assert pool_set.refresh(mounts) == []
    (tmp_path / "p").mkdir()
    [(old, new)] = pool_set.refresh(mounts)
    assert old is not None and (old.state, new.state) == (PoolState.UNAVAILABLE, PoolState.OK)
    assert pool_set.refresh(mounts) == []


def test_pool_set_binds_a_pool_to_the_mount_it_was_first_found_on(tmp_path: Path) -> None:
    real = read_mounts()
    pool_set = PoolSet([PoolCfg("p", str(tmp_path), mount_point=str(tmp_path))])

    pool_set.refresh(real)  # disk not mounted yet: nothing learned
    assert pool_set.get("p").state is PoolState.UNAVAILABLE  # type: ignore[union-attr]

    [(_, new)] = pool_set.refresh(with_fake_mounts(real, {tmp_path: 1001}))  # mounted
    assert (new.state, new.mount_id) == (PoolState.OK, 1001)

    [(_, new)] = pool_set.refresh(with_fake_mounts(real, {tmp_path: 1002}))  # unmounted and mounted again
    assert (new.state, new.reason, new.mount_id) == (PoolState.UNAVAILABLE, PoolReason.UNMOUNTED, 1002)

    [(_, new)] = pool_set.refresh(with_fake_mounts(real, {tmp_path: 1001}))  # the original is back on top
    assert new.state is PoolState.OK


def test_pool_set_a_missing_pool_is_learned_when_it_appears(tmp_path: Path) -> None:
    pool_set = PoolSet([PoolCfg("p", str(tmp_path / "p"))])
    mounts = with_fake_mounts(read_mounts(), {tmp_path / "p": 1001})
    pool_set.refresh(mounts)
    (tmp_path / "p").mkdir()
    pool_set.refresh(mounts)
    assert pool_set.get("p").mount_id == 1001  # type: ignore[union-attr]
    [(_, new)] = pool_set.refresh(with_fake_mounts(read_mounts(), {tmp_path / "p": 1002}))
    assert new.state is PoolState.UNAVAILABLE


def test_pool_set_replace_configs(tmp_path: Path) -> None:
    for name in ("kept", "moved", "dropped", "new", "elsewhere"):
        (tmp_path / name).mkdir()
    real = read_mounts()
    first = with_fake_mounts(real, {tmp_path / "kept": 1001, tmp_path / "moved": 1002})
    pool_set = PoolSet(
        [
            PoolCfg("kept", str(tmp_path / "kept")),
            PoolCfg("moved", str(tmp_path / "moved")),
            PoolCfg("dropped", str(tmp_path / "dropped")),
        ]
    )
    pool_set.refresh(first)

    pool_set.replace_configs(
        [
            PoolCfg("new", str(tmp_path / "new")),
            PoolCfg("kept", str(tmp_path / "kept")),
            PoolCfg("moved", str(tmp_path / "elsewhere")),
        ]
    )
    assert pool_set.get("dropped") is None
    assert [status.name for status in pool_set.statuses()] == ["kept"]  # the rest not probed yet

    second = with_fake_mounts(real, {tmp_path / "kept": 2001, tmp_path / "elsewhere": 2002})
    changes = {new.name: (old, new) for old, new in pool_set.refresh(second)}
    assert changes["new"][0] is None and changes["new"][1].state is PoolState.OK
    assert changes["moved"][0] is None and changes["moved"][1].mount_id == 2002  # a new path is a new pool
    assert changes["kept"][1].state is PoolState.UNAVAILABLE  # still bound to mount 1001
    assert [status.name for status in pool_set.statuses()] == ["new", "kept", "moved"]


# -- one daemon per pool: the lock -----------------------------------------------------------


def test_lock_pool_writes_the_holders_pid_into_a_private_file(tmp_path: Path) -> None:
    fd = lock_pool(str(tmp_path))
    try:
        assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        assert mode(tmp_path / LOCK_FILE) == 0o600
        assert list_entries(str(tmp_path)) == []  # the daemon's own: never an orphan
    finally:
        os.close(fd)


def test_lock_pool_refuses_a_held_lock_naming_the_holder(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import os, sys; from scratchd.pool_dirs import lock_pool; lock_pool(sys.argv[1]); print(os.getpid(), flush=True);"
                " sys.stdin.read()"
            ),
            str(tmp_path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        pid = int(holder.stdout.readline())
        with pytest.raises(PoolLocked) as refused:
            lock_pool(str(tmp_path))
        assert refused.value.holder == pid == holder.pid
    finally:
        holder.communicate("")  # the holder exits: its lock goes with it
    os.close(lock_pool(str(tmp_path)))


def test_lock_pool_shares_a_lock_this_process_holds_on_the_same_file(tmp_path: Path) -> None:
    (tmp_path / "alias").symlink_to(tmp_path)
    fd = lock_pool(str(tmp_path))
    try:
        assert lock_pool(str(tmp_path / "alias"), [fd]) == fd
        with pytest.raises(PoolLocked):  # without being told, its own lock refuses it
            lock_pool(str(tmp_path / "alias"))
    finally:
        os.close(fd)


def test_lock_pool_in_a_missing_pool_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        lock_pool(str(tmp_path / "gone"))
    assert not (tmp_path / "gone").exists()


def test_pool_set_a_pool_locked_by_another_is_unavailable_until_released(tmp_path: Path) -> None:
    mounts = read_mounts()
    first, second = PoolSet([PoolCfg("p", str(tmp_path))]), PoolSet([PoolCfg("p", str(tmp_path))])
    first.refresh(mounts)
    [(_, locked)] = second.refresh(mounts)
    assert (locked.state, locked.reason) == (PoolState.UNAVAILABLE, PoolReason.LOCKED)
    assert locked.message == f"Pool path {tmp_path} is locked by another scratchd (pid {os.getpid()})."
    assert (first.holds("p"), second.holds("p")) == (True, False)
    assert second.refresh(mounts) == []  # retried, still locked: no change to report
    first.close()
    [(_, free)] = second.refresh(mounts)
    assert (free.state, free.reason, second.holds("p")) == (PoolState.OK, None, True)
    second.close()


def test_pool_set_two_pools_naming_one_directory_share_its_lock(tmp_path: Path) -> None:
    (tmp_path / "alias").symlink_to(tmp_path)
    pool_set = PoolSet([PoolCfg("a", str(tmp_path)), PoolCfg("b", str(tmp_path / "alias"))])
    assert [new.state for _, new in pool_set.refresh(read_mounts())] == [PoolState.OK, PoolState.OK]
    pool_set.replace_configs([PoolCfg("b", str(tmp_path / "alias"))])
    pool_set.unlock_dropped(keep=())
    assert (pool_set.holds("a"), pool_set.holds("b")) == (False, True)
    with pytest.raises(PoolLocked):  # "b" still holds it
        lock_pool(str(tmp_path))
    pool_set.close()


def test_pool_set_releases_an_unavailable_pool_and_locks_it_again_when_back(tmp_path: Path) -> None:
    pool = tmp_path / "p"
    pool.mkdir()
    pool_set = PoolSet([PoolCfg("p", str(pool))])
    pool_set.refresh(read_mounts())
    pool.rename(tmp_path / "away")
    [(_, gone)] = pool_set.refresh(read_mounts())
    assert (gone.reason, pool_set.holds("p")) == (PoolReason.MISSING, False)
    os.close(lock_pool(str(tmp_path / "away")))  # free: nothing holds the old directory's lock
    pool.mkdir()
    [(_, back)] = pool_set.refresh(read_mounts())
    assert (back.state, pool_set.holds("p")) == (PoolState.OK, True)
    assert (pool / LOCK_FILE).exists()
    pool_set.close()


def test_pool_set_dropped_pool_keeps_its_lock_while_it_has_leases(tmp_path: Path) -> None:
    for name in ("kept", "dropped", "moved", "elsewhere"):
        (tmp_path / name).mkdir()
    pool_set = PoolSet([PoolCfg(name, str(tmp_path / name)) for name in ("kept", "dropped", "moved")])
    pool_set.refresh(read_mounts())
    pool_set.replace_configs(
        [PoolCfg("kept", str(tmp_path / "kept")), PoolCfg("moved", str(tmp_path / "elsewhere"))]
    )
    os.close(lock_pool(str(tmp_path / "moved")))  # a new path is a new pool: the old one is free at once
    pool_set.unlock_dropped(keep={"dropped"})
    assert pool_set.holds("dropped")
    pool_set.unlock_dropped(keep=())
    assert not pool_set.holds("dropped")
    os.close(lock_pool(str(tmp_path / "dropped")))
    pool_set.refresh(read_mounts())
    assert (pool_set.holds("kept"), pool_set.holds("moved")) == (True, True)
    pool_set.close()


def test_pool_set_close_releases_every_lock(tmp_path: Path) -> None:
    pool_set = PoolSet([PoolCfg("p", str(tmp_path))])
    pool_set.refresh(read_mounts())
    pool_set.close()
    assert not pool_set.holds("p")
    os.close(lock_pool(str(tmp_path)))


# -- on disk: prepare_pool_dir --------------------------------------------------------------


def test_prepare_pool_dir_modes(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    pool.mkdir(mode=0o755)
    with umask(0o022):
        prepare_pool_dir(str(pool))
    assert mode(pool) == 0o711
    assert mode(pool / TRASH_DIR) == 0o700
    assert stat.S_ISDIR(os.lstat(pool / TRASH_DIR).st_mode)


@pytest.mark.parametrize("mask", [0o077, 0o022, 0o777, 0o000])
def test_prepare_pool_dir_modes_do_not_depend_on_umask(tmp_path: Path, mask: int) -> None:
    with umask(mask):
        prepare_pool_dir(str(tmp_path))
    assert (mode(tmp_path), mode(tmp_path / TRASH_DIR)) == (0o711, 0o700)


def test_prepare_pool_dir_fixes_an_existing_trash_and_keeps_its_content(tmp_path: Path) -> None:
    (tmp_path / TRASH_DIR / "old-lease.1234").mkdir(parents=True)
    os.chmod(tmp_path / TRASH_DIR, 0o777)
    prepare_pool_dir(str(tmp_path))
    prepare_pool_dir(str(tmp_path))
    assert mode(tmp_path / TRASH_DIR) == 0o700
    assert os.listdir(tmp_path / TRASH_DIR) == ["old-lease.1234"]


def test_prepare_pool_dir_never_creates_the_pool(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        prepare_pool_dir(str(tmp_path / "pool"))
    assert not (tmp_path / "pool").exists()


def test_prepare_pool_dir_refuses_a_symlinked_trash(tmp_path: Path) -> None:
    pool, outside = tmp_path / "pool", tmp_path / "outside"
    pool.mkdir()
    outside.mkdir(mode=0o755)
    (pool / TRASH_DIR).symlink_to(outside)
    with pytest.raises(OSError):
        prepare_pool_dir(str(pool))
    assert mode(outside) == 0o755


@needs_root
def test_prepare_pool_dir_takes_ownership(tmp_path: Path) -> None:
    (tmp_path / TRASH_DIR).mkdir()
    os.chown(tmp_path, 12345, 12345)
    os.chown(tmp_path / TRASH_DIR, 12345, 12345)
    prepare_pool_dir(str(tmp_path))
    assert os.stat(tmp_path).st_uid == 0
    assert os.stat(tmp_path / TRASH_DIR).st_uid == 0


# -- on disk: make_lease_dir ----------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o077, 0o022, 0o777])
def test_make_lease_dir_is_0700_whatever_the_umask(tmp_path: Path, mask: int) -> None:
    with umask(mask):
        path = make_lease_dir(str(tmp_path), "k3j5-9xq", uid=None, gid=None)
    assert path == os.path.join(str(tmp_path), "k3j5-9xq")
    assert mode(path) == 0o700
    assert os.listdir(path) == []


def test_make_lease_dir_never_reuses_an_existing_entry(tmp_path: Path) -> None:
    (tmp_path / "abc").mkdir(mode=0o755)
    with pytest.raises(FileExistsError):
        make_lease_dir(str(tmp_path), "abc", uid=None, gid=None)
    assert mode(tmp_path / "abc") == 0o755


@pytest.mark.parametrize(
    "lease_id", ["", "ABC", "a_b", "a.b", "..", ".trash", "a/b", "../x", "a\n", "a b", "é"]
)
def test_make_lease_dir_rejects_bad_ids_before_touching_disk(tmp_path: Path, lease_id: str) -> None:
    with pytest.raises(ValueError, match="not a lease id"):
        make_lease_dir(str(tmp_path), lease_id, uid=None, gid=None)
    assert os.listdir(tmp_path) == []


def test_make_lease_dir_leaves_nothing_behind_when_it_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(pool_dirs.os, "fchown", refuse)
    with pytest.raises(PermissionError):
        make_lease_dir(str(tmp_path), "abc", uid=12345, gid=12345)
    assert os.listdir(tmp_path) == []


def test_make_lease_dir_in_a_missing_pool(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        make_lease_dir(str(tmp_path / "gone"), "abc", uid=None, gid=None)


@needs_root
def test_make_lease_dir_gives_the_directory_to_the_tenant(tmp_path: Path) -> None:
    path = make_lease_dir(str(tmp_path), "abc", uid=12345, gid=23456)
    st = os.stat(path)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (12345, 23456, 0o700)


@needs_root
def test_make_lease_dir_chowns_only_what_is_given(tmp_path: Path) -> None:
    st = os.stat(make_lease_dir(str(tmp_path), "abc", uid=12345, gid=None))
    assert (st.st_uid, st.st_gid) == (12345, os.getegid())


# -- on disk: remove_if_empty ---------------------------------------------------------------


def test_remove_if_empty_removes_only_an_empty_directory(tmp_path: Path) -> None:
    prepare_pool_dir(str(tmp_path))
    empty = Path(make_lease_dir(str(tmp_path), "empty", uid=None, gid=None))
    used = Path(make_lease_dir(str(tmp_path), "used", uid=None, gid=None))
    (used / "data").write_text("content")
    assert remove_if_empty(str(tmp_path), "empty") and not empty.exists()
    assert not remove_if_empty(str(tmp_path), "used")
    assert (used / "data").read_text() == "content"
    assert not remove_if_empty(str(tmp_path), "never-was")
    with pytest.raises(ValueError):
        remove_if_empty(str(tmp_path), TRASH_DIR)


# -- on disk: move_to_trash -----------------------------------------------------------------


def test_move_to_trash_renames_in_place(tmp_path: Path) -> None:
    prepare_pool_dir(str(tmp_path))
    lease = Path(make_lease_dir(str(tmp_path), "abc-123", uid=None, gid=None))
    (lease / "data").write_text("content")
    inode = os.stat(lease).st_ino
    trashed = move_to_trash(str(tmp_path), "abc-123")
    assert trashed is not None
    assert not lease.exists()
    assert os.path.dirname(trashed) == os.path.join(str(tmp_path), TRASH_DIR)
    assert os.path.basename(trashed).startswith("abc-123.")
    assert os.stat(trashed).st_ino == inode  # renamed, not copied
    assert Path(trashed, "data").read_text() == "content"
    assert list_entries(str(tmp_path)) == []


def test_move_to_trash_an_open_file_stays_open(tmp_path: Path) -> None:
    lease = Path(make_lease_dir(str(tmp_path), "abc", uid=None, gid=None))
    with open(lease / "log", "w") as log:
        trashed = move_to_trash(str(tmp_path), "abc")
        log.write("still writing")
    assert Path(trashed or "", "log").read_text() == "still writing"


def test_move_to_trash_missing_entry_is_none(tmp_path: Path) -> None:
    prepare_pool_dir(str(tmp_path))
    assert move_to_trash(str(tmp_path), "never-was") is None
    assert os.listdir(tmp_path / TRASH_DIR) == []


def test_move_to_trash_never_collides(tmp_path: Path) -> None:
    trashed = set()
    for _ in range(3):
        (tmp_path / "abc").mkdir()
        trashed.add(move_to_trash(str(tmp_path), "abc"))
    assert len(trashed) == 3
    assert len(os.listdir(tmp_path / TRASH_DIR)) == 3


def test_move_to_trash_creates_a_missing_trash(tmp_path: Path) -> None:
    (tmp_path / "abc").mkdir()
    with umask(0o022):
        assert move_to_trash(str(tmp_path), "abc") is not None
    assert mode(tmp_path / TRASH_DIR) == 0o700


def test_move_to_trash_takes_orphans_of_any_name(tmp_path: Path) -> None:
    odd = "Stray copy (2) \udcff" + "x" * 230
    os.mkdir(os.path.join(tmp_path, odd))
    (tmp_path / "file-orphan").write_text("")
    assert move_to_trash(str(tmp_path), odd) is not None
    assert move_to_trash(str(tmp_path), "file-orphan") is not None
    assert list_entries(str(tmp_path)) == []


@pytest.mark.parametrize("name", ["", ".", "..", TRASH_DIR, ".hidden", "a/b", "../abc", "a\0b"])
def test_move_to_trash_refuses_names_that_are_not_entries(tmp_path: Path, name: str) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "b").mkdir()
    with pytest.raises(ValueError, match="not an entry"):
        move_to_trash(str(tmp_path / "a"), name)
    assert (tmp_path / "a" / "b").is_dir()


def test_move_to_trash_through_a_symlinked_pool_path(tmp_path: Path) -> None:
    (tmp_path / "real" / "abc").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    trashed = move_to_trash(str(tmp_path / "link"), "abc")
    assert trashed is not None and trashed.startswith(str(tmp_path / "link" / TRASH_DIR) + "/")
    assert os.path.isdir(trashed)
    assert not (tmp_path / "real" / "abc").exists()


def test_move_to_trash_does_not_follow_a_symlinked_trash(tmp_path: Path) -> None:
    pool, outside = tmp_path / "pool", tmp_path / "outside"
    (pool / "abc").mkdir(parents=True)
    outside.mkdir()
    (pool / TRASH_DIR).symlink_to(outside)
    with pytest.raises(OSError):
        move_to_trash(str(pool), "abc")
    assert (pool / "abc").is_dir()
    assert os.listdir(outside) == []


# -- on disk: list_entries ------------------------------------------------------------------


def test_list_entries_skips_the_daemons_own(tmp_path: Path) -> None:
    prepare_pool_dir(str(tmp_path))
    for name in ("zz-lease", "aa-lease", ".state"):
        (tmp_path / name).mkdir()
    (tmp_path / "stray-file").write_text("")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert list_entries(str(tmp_path)) == ["aa-lease", "dangling", "stray-file", "zz-lease"]


def test_list_entries_of_an_empty_pool(tmp_path: Path) -> None:
    assert list_entries(str(tmp_path)) == []


# -- real mounts (root) ---------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    point = tmp_path / "fs"
    point.mkdir()
    with mounted("-t", "tmpfs", "-o", "size=8m", "tmpfs", str(point)):
        yield point


@needs_root
def test_real_tmpfs_pool_is_lost_when_unmounted(tmp_path: Path) -> None:
    point = tmp_path / "fs"
    point.mkdir()
    pool_set = PoolSet([PoolCfg("p", str(point)), PoolCfg("inner", str(point / "pool"))])
    with MountTable() as table:
        with mounted("-t", "tmpfs", "-o", "size=8m", "tmpfs", str(point)):
            (point / "pool").mkdir()
            pool_set.refresh(table.current())
            status = pool_set.get("p")
            assert status is not None and status.state is PoolState.OK
            assert (status.fstype, status.mount_point) == ("tmpfs", os.path.realpath(point))
            assert status.capacity_bytes == 8 * MiB
            assert pool_set.get("inner").mount_id == status.mount_id  # type: ignore[union-attr]
        # The pool path still exists (on the parent filesystem): only the mount id tells.
        assert point.is_dir()
        changes = {new.name: (old, new) for old, new in pool_set.refresh(table.current())}
    assert (changes["p"][1].state, changes["p"][1].reason) == (PoolState.UNAVAILABLE, PoolReason.UNMOUNTED)
    assert (changes["inner"][1].state, changes["inner"][1].reason) == (
        PoolState.UNAVAILABLE,
        PoolReason.MISSING,
    )


@needs_root
def test_real_tmpfs_pool_is_lost_when_mounted_over_and_back_when_uncovered(tmpfs: Path) -> None:
    pool_set = PoolSet([PoolCfg("p", str(tmpfs))])
    pool_set.refresh(read_mounts())
    with mounted("-t", "tmpfs", "-o", "size=4m", "tmpfs", str(tmpfs)):
        [(_, covered)] = pool_set.refresh(read_mounts())
        assert covered.state is PoolState.UNAVAILABLE
    [(_, uncovered)] = pool_set.refresh(read_mounts())
    assert uncovered.state is PoolState.OK


@needs_root
def test_real_bind_mount_pools_are_different_filesystems(tmpfs: Path, tmp_path: Path) -> None:
    (tmpfs / "pool").mkdir()
    bind = tmp_path / "bind"
    bind.mkdir()
    with mounted("--bind", str(tmpfs / "pool"), str(bind)):
        pool_set = PoolSet([PoolCfg("source", str(tmpfs / "pool")), PoolCfg("bound", str(bind))])
        pool_set.refresh(read_mounts())
        source, bound = pool_set.get("source"), pool_set.get("bound")
        assert source is not None and bound is not None
        assert (source.state, bound.state) == (PoolState.OK, PoolState.OK)
        assert source.device == bound.device
        assert source.mount_id != bound.mount_id


@needs_root
def test_real_mount_point_check(tmpfs: Path) -> None:
    cfg = PoolCfg("p", str(tmpfs), mount_point=str(tmpfs))
    assert probe_pool(cfg, read_mounts(), expected_mount_id=None).state is PoolState.OK
    subprocess.run(["umount", str(tmpfs)], check=True)
    status = probe_pool(cfg, read_mounts(), expected_mount_id=None)
    assert (status.state, status.reason) == (PoolState.UNAVAILABLE, PoolReason.NOT_ON_MOUNT_POINT)
    assert f"not on {tmpfs}" in (status.message or "")


@needs_root
def test_real_read_only_and_back(tmpfs: Path) -> None:
    pool_set = PoolSet([PoolCfg("p", str(tmpfs))])
    pool_set.refresh(read_mounts())
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    [(_, new)] = pool_set.refresh(read_mounts())
    assert new.state is PoolState.READ_ONLY
    subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=True)
    [(_, new)] = pool_set.refresh(read_mounts())
    assert new.state is PoolState.OK


@needs_root
def test_real_full_pool_and_back(tmpfs: Path) -> None:
    pool_set = PoolSet([PoolCfg("p", str(tmpfs), reserve_fixed=4 * MiB)])
    pool_set.refresh(read_mounts())
    filler = tmpfs / "filler"
    filler.write_bytes(b"\0" * 5 * MiB)
    [(_, new)] = pool_set.refresh(read_mounts())
    assert new.state is PoolState.FULL
    assert new.free_bytes <= new.reserve_bytes
    filler.unlink()
    [(_, new)] = pool_set.refresh(read_mounts())
    assert new.state is PoolState.OK


@needs_root
def test_real_trash_is_on_the_pools_filesystem(tmpfs: Path) -> None:
    prepare_pool_dir(str(tmpfs))
    make_lease_dir(str(tmpfs), "abc", uid=12345, gid=12345)
    trashed = move_to_trash(str(tmpfs), "abc")
    assert trashed is not None
    assert mount_of(trashed, read_mounts()).mount_point == os.path.realpath(tmpfs)


@needs_root
def test_real_read_only_pool_is_locked_through_an_existing_lock_file_else_once_writable(tmpfs: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    pool_set = PoolSet([PoolCfg("p", str(tmpfs))])
    [(_, ro)] = pool_set.refresh(read_mounts())
    assert (ro.state, ro.reason, pool_set.holds("p")) == (PoolState.READ_ONLY, PoolReason.READ_ONLY, False)
    subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=True)
    [(_, rw)] = pool_set.refresh(read_mounts())
    assert (rw.state, pool_set.holds("p")) == (PoolState.OK, True)
    # The lock is held on a read-only fd: it never stops a remount read-only.
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    with pytest.raises(PoolLocked):
        lock_pool(str(tmpfs))
    pool_set.close()
    os.close(lock_pool(str(tmpfs)))  # an existing lock file locks on a read-only filesystem
