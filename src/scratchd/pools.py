"""Pools at run time: which mount each sits on, how much room it has, and its layout on disk.

A pool is bound to the mount it was first seen on. If that mount goes away or
something is mounted over it, the path still resolves (to whatever is there
now), so only the mount id tells the daemon its pool was lost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import re
import secrets
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from scratchd.mounts import Mount, mount_of
from scratchd.units import format_size

TRASH_DIR = ".trash"
FICLONE = 0x40049409  # _IOW(0x94, 9, int) in linux/fs.h

_LEASE_ID = re.compile(r"[a-z0-9-]+")
# Room for ".<16 hex>" after the name within NAME_MAX (255 bytes).
_TRASH_STEM_BYTES = 200


class ConfiguredPool(Protocol):
    """What this module needs from a ``[[pool]]`` entry of the config."""

    @property
    def name(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def mount_point(self) -> str | None: ...
    @property
    def labels(self) -> Sequence[str]: ...
    def reserve_bytes(self, capacity_bytes: int) -> int: ...


class PoolState(StrEnum):
    OK = "ok"
    FULL = "full"
    READ_ONLY = "read_only"
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True, slots=True)
class PoolStatus:
    name: str
    path: str
    mount_point: str | None
    fstype: str | None
    device: str | None
    mount_id: int | None
    state: PoolState
    capacity_bytes: int
    free_bytes: int
    reserve_bytes: int
    labels: tuple[str, ...]
    reason: str | None  # why it is not ok, one sentence for logs and events
    reflink: bool = False  # its filesystem clones files (FICLONE), as probed when the pool came up


def pool_state(
    *, exists: bool, on_expected_mount: bool, read_only: bool, free_bytes: int, reserve_bytes: int
) -> PoolState:
    """The worst thing that is true of a pool: a lost pool is not merely full."""
    if not exists or not on_expected_mount:
        return PoolState.UNAVAILABLE
    if read_only:
        return PoolState.READ_ONLY
    if free_bytes == 0 or (reserve_bytes > 0 and free_bytes <= reserve_bytes):
        return PoolState.FULL
    return PoolState.OK


def probe_pool(cfg: ConfiguredPool, mounts: Sequence[Mount], *, expected_mount_id: int | None) -> PoolStatus:
    """Look at a pool's directory as it is now; never creates anything."""

    def status(state: PoolState, reason: str | None, mount: Mount | None = None, capacity: int = 0,
               free: int = 0) -> PoolStatus:
        return PoolStatus(
            name=cfg.name,
            path=cfg.path,
            mount_point=mount.mount_point if mount else None,
            fstype=mount.fstype if mount else None,
            device=mount.device if mount else None,
            mount_id=mount.mount_id if mount else None,
            state=state,
            capacity_bytes=capacity,
            free_bytes=free,
            reserve_bytes=cfg.reserve_bytes(capacity),
            labels=tuple(cfg.labels),
            reason=reason,
        )

    unavailable = PoolState.UNAVAILABLE
    real = os.path.realpath(cfg.path)
    try:
        st = os.stat(real)
    except FileNotFoundError:
        return status(unavailable, f"Pool path {cfg.path} does not exist.")
    except OSError as exc:
        return status(unavailable, f"Pool path {cfg.path} cannot be examined: {exc.strerror}.")
    if not stat.S_ISDIR(st.st_mode):
        return status(unavailable, f"Pool path {cfg.path} is not a directory.")
    try:
        mount = mount_of(real, mounts)
    except LookupError:
        return status(unavailable, f"Pool path {cfg.path} is on no mount in the mount table.")
    # Capacity is only worth reporting for the filesystem the pool belongs on:
    # a pool that fell through to the root filesystem must not show its space.
    if cfg.mount_point is not None and mount.mount_point != os.path.realpath(cfg.mount_point):
        return status(unavailable, f"Pool path {cfg.path} is on {mount.mount_point}, not on {cfg.mount_point}.",
                      mount)
    if expected_mount_id is not None and mount.mount_id != expected_mount_id:
        return status(unavailable, f"The filesystem under pool path {cfg.path} was unmounted or replaced.", mount)
    try:
        fs = os.statvfs(real)
    except OSError as exc:
        return status(unavailable, f"Pool path {cfg.path} cannot be examined: {exc.strerror}.", mount)
    capacity = fs.f_blocks * fs.f_frsize
    free = fs.f_bavail * fs.f_frsize
    reserve = cfg.reserve_bytes(capacity)
    read_only = bool(fs.f_flag & os.ST_RDONLY) or mount.read_only
    state = pool_state(exists=True, on_expected_mount=True, read_only=read_only, free_bytes=free,
                       reserve_bytes=reserve)
    reason = None
    if state is PoolState.READ_ONLY:
        reason = f"Pool path {cfg.path} is on a read-only filesystem ({mount.mount_point})."
    elif state is PoolState.FULL:
        reason = f"Pool {cfg.name} has {format_size(free)} free, not more than its reserve of {format_size(reserve)}."
    return status(state, reason, mount, capacity, free)


class PoolSet:
    """The daemon's pools, each bound to the mount it was first found on."""

    def __init__(self, configs: Iterable[ConfiguredPool]) -> None:
        self._configs: dict[str, ConfiguredPool] = {}
        self._mount_ids: dict[str, int] = {}
        self._statuses: dict[str, PoolStatus] = {}
        self._reflink: dict[str, bool] = {}
        self.replace_configs(configs)

    def refresh(self, mounts: Sequence[Mount]) -> list[tuple[PoolStatus | None, PoolStatus]]:
        """Probe every pool; returns ``(old, new)`` for each pool whose state changed (old is None when new)."""
        changed = []
        for name, cfg in self._configs.items():
            new = probe_pool(cfg, mounts, expected_mount_id=self._mount_ids.get(name))
            if new.state is PoolState.UNAVAILABLE:
                self._reflink.pop(name, None)  # probed again when it comes back: maybe on another filesystem
            elif name in self._reflink:
                new = dataclasses.replace(new, reflink=self._reflink[name])
            if new.state is not PoolState.UNAVAILABLE and new.mount_id is not None:
                self._mount_ids.setdefault(name, new.mount_id)
            old = self._statuses.get(name)
            self._statuses[name] = new
            if old is None or old.state is not new.state:
                changed.append((old, new))
        return changed

    def set_reflink(self, name: str, reflink: bool) -> None:
        """Record what ``probe_reflink`` found when the pool came up, until it next does."""
        self._reflink[name] = reflink
        status = self._statuses.get(name)
        if status is not None:
            self._statuses[name] = dataclasses.replace(status, reflink=reflink)

    def get(self, name: str) -> PoolStatus | None:
        return self._statuses.get(name)

    def statuses(self) -> list[PoolStatus]:
        return [self._statuses[name] for name in self._configs if name in self._statuses]

    def replace_configs(self, configs: Iterable[ConfiguredPool]) -> None:
        """Take a reloaded config; a kept pool stays bound to its mount unless its path or mount point changed."""
        new = {cfg.name: cfg for cfg in configs}
        for name, old in self._configs.items():
            cfg = new.get(name)
            if cfg is None or (cfg.path, cfg.mount_point) != (old.path, old.mount_point):
                self._mount_ids.pop(name, None)
                self._statuses.pop(name, None)
        self._configs = new


# -- on disk (SPEC §8) --------------------------------------------------------------------


def prepare_pool_dir(path: str) -> None:
    """Make a pool reachable but not listable by tenants, with a private trash on its filesystem."""
    pool_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _make_private(pool_fd, 0o711)
        trash_fd = _open_trash(pool_fd)
        try:
            _make_private(trash_fd, 0o700)
        finally:
            os.close(trash_fd)
    finally:
        os.close(pool_fd)


def probe_reflink(pool_path: str) -> bool:
    """Whether the pool's filesystem clones files (FICLONE): tried on two files of the daemon's own.

    They are made in the trash, so a crash half-way leaves nothing that the trash's own
    resumption does not delete. Errors mean no: a tool then copies, which always works.
    """
    names = [f"reflink-probe.{secrets.token_hex(8)}" for _ in range(2)]
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC  # a clone's source is read
    try:
        pool_fd = os.open(pool_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        trash_fd = _open_trash(pool_fd)
    except OSError:
        os.close(pool_fd)
        return False
    try:
        source = os.open(names[0], flags, 0o600, dir_fd=trash_fd)
        try:
            os.write(source, bytes(4096))  # an empty file clones anywhere a no-op would
            target = os.open(names[1], flags, 0o600, dir_fd=trash_fd)
            try:
                fcntl.ioctl(target, FICLONE, source)
            finally:
                os.close(target)
        finally:
            os.close(source)
    except OSError:
        return False
    else:
        return True
    finally:
        for name in names:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=trash_fd)
        os.close(trash_fd)
        os.close(pool_fd)


def make_lease_dir(pool_path: str, lease_id: str, *, uid: int | None, gid: int | None) -> str:
    """Create a lease's directory, private to its tenant; runs on the event loop, so no more than that."""
    _check_lease_id(lease_id)
    path = os.path.join(pool_path, lease_id)
    os.mkdir(path, 0o700)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if uid is not None or gid is not None:
                os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
            os.fchmod(fd, 0o700)  # mkdir's mode went through the umask
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.rmdir(path)  # a refused request changes nothing
        raise
    return path


def remove_if_empty(pool_path: str, lease_id: str) -> bool:
    """``rmdir`` a lease's directory if it is empty; False if anything stopped that.

    Many leases end unused. For them one syscall replaces a rename into the trash and
    a trip through the deleter, whose work in the trash directory would contend with
    the renames of other leases ending (ext4 serialises them on its journal). Only the
    daemon writes in a pool, so the name cannot have been swapped; on any error the
    caller falls back to ``move_to_trash``, whose errors say what is wrong.
    """
    _check_entry_name(lease_id)
    try:
        os.rmdir(os.path.join(pool_path, lease_id))
    except OSError:
        return False
    return True


def move_to_trash(pool_path: str, lease_id: str) -> str | None:
    """Rename ``<pool>/<lease_id>`` into the trash in one step; None if it is already gone.

    Works relative to directory descriptors, so only the configured pool path
    is looked up by name, and the rename never leaves the pool's filesystem.
    ``lease_id`` may be any entry ``list_entries`` returns: orphans are trashed too.
    """
    _check_entry_name(lease_id)
    pool_fd = os.open(pool_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        trash_fd = _open_trash(pool_fd)
        try:
            stem = os.fsdecode(os.fsencode(lease_id)[:_TRASH_STEM_BYTES])
            trashed = f"{stem}.{secrets.token_hex(8)}"
            try:
                os.rename(lease_id, trashed, src_dir_fd=pool_fd, dst_dir_fd=trash_fd)
            except FileNotFoundError:
                return None
        finally:
            os.close(trash_fd)
    finally:
        os.close(pool_fd)
    return os.path.join(pool_path, TRASH_DIR, trashed)


def list_entries(pool_path: str) -> list[str]:
    """Names in a pool that should belong to leases (names starting with "." are the daemon's)."""
    return sorted(name for name in os.listdir(pool_path) if not name.startswith("."))


def _open_trash(pool_fd: int) -> int:
    """The trash, created if missing: the rename into it must not fail on a cleaned-up pool."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(TRASH_DIR, flags, dir_fd=pool_fd)  # the common case: one syscall
    except FileNotFoundError:
        pass
    with contextlib.suppress(FileExistsError):
        os.mkdir(TRASH_DIR, 0o700, dir_fd=pool_fd)
    fd = os.open(TRASH_DIR, flags, dir_fd=pool_fd)
    os.fchmod(fd, 0o700)  # mkdir's mode went through the umask
    return fd


def _make_private(fd: int, mode: int) -> None:
    """Owned by the daemon's user with exactly ``mode``: only the owner may list it."""
    euid = os.geteuid()
    if euid == 0 and os.fstat(fd).st_uid != euid:
        os.fchown(fd, euid, -1)
    os.fchmod(fd, mode)


def _check_lease_id(lease_id: str) -> None:
    if not _LEASE_ID.fullmatch(lease_id):
        raise ValueError(f"not a lease id: {lease_id!r}")


def _check_entry_name(name: str) -> None:
    if not name or name.startswith(".") or "/" in name or "\0" in name:
        raise ValueError(f"not an entry of a pool: {name!r}")
