"""Pool directories at run time: which mount each sits on, how much room it has, and its layout on disk.

A pool is bound to the mount it was first seen on. If that mount goes away or
something is mounted over it, the path still resolves (to whatever is there
now), so only the mount id tells the daemon its pool was lost.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import os
import re
import secrets
import stat
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

from scratchd.mounts import Mount, mount_of
from scratchd.pools import PoolReason, PoolState, PoolStatus, pool_state, space_reason
from scratchd.units import format_size

TRASH_DIR = ".trash"
CACHE_DIR = ".caches"  # kept caches, each <pool>/.caches/<cache id> (docs/caches.md)
LOCK_FILE = ".lock"
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


def probe_pool(cfg: ConfiguredPool, mounts: Sequence[Mount], *, expected_mount_id: int | None) -> PoolStatus:
    """Look at a pool's directory as it is now; never creates anything."""

    def status(
        reason: PoolReason | None,
        message: str | None,
        mount: Mount | None = None,
        capacity: int = 0,
        free: int = 0,
    ) -> PoolStatus:
        return PoolStatus(
            name=cfg.name,
            path=cfg.path,
            mount_point=mount.mount_point if mount else None,
            fstype=mount.fstype if mount else None,
            device=mount.device if mount else None,
            mount_id=mount.mount_id if mount else None,
            state=pool_state(reason),
            capacity_bytes=capacity,
            free_bytes=free,
            reserve_bytes=cfg.reserve_bytes(capacity),
            labels=tuple(cfg.labels),
            reason=reason,
            message=message,
        )

    real = os.path.realpath(cfg.path)
    try:
        st = os.stat(real)
    except FileNotFoundError:
        return status(PoolReason.MISSING, f"Pool path {cfg.path} does not exist.")
    except OSError as exc:
        return status(PoolReason.INACCESSIBLE, f"Pool path {cfg.path} cannot be examined: {exc.strerror}.")
    if not stat.S_ISDIR(st.st_mode):
        return status(PoolReason.INACCESSIBLE, f"Pool path {cfg.path} is not a directory.")
    try:
        mount = mount_of(real, mounts)
    except LookupError:
        return status(PoolReason.INACCESSIBLE, f"Pool path {cfg.path} is on no mount in the mount table.")
    # Capacity is only worth reporting for the filesystem the pool belongs on:
    # a pool that fell through to the root filesystem must not show its space.
    if cfg.mount_point is not None and mount.mount_point != os.path.realpath(cfg.mount_point):
        return status(
            PoolReason.NOT_ON_MOUNT_POINT,
            f"Pool path {cfg.path} is on {mount.mount_point}, not on {cfg.mount_point}.",
            mount,
        )
    if expected_mount_id is not None and mount.mount_id != expected_mount_id:
        return status(
            PoolReason.UNMOUNTED,
            f"The filesystem under pool path {cfg.path} was unmounted or replaced.",
            mount,
        )
    try:
        fs = os.statvfs(real)
    except OSError as exc:
        return status(
            PoolReason.INACCESSIBLE, f"Pool path {cfg.path} cannot be examined: {exc.strerror}.", mount
        )
    capacity = fs.f_blocks * fs.f_frsize
    free = fs.f_bavail * fs.f_frsize
    reserve = cfg.reserve_bytes(capacity)
    reason = space_reason(
        read_only=bool(fs.f_flag & os.ST_RDONLY) or mount.read_only, free_bytes=free, reserve_bytes=reserve
    )
    message = None
    if reason is PoolReason.READ_ONLY:
        message = f"Pool path {cfg.path} is on a read-only filesystem ({mount.mount_point})."
    elif reason is PoolReason.FULL:
        message = (
            f"Pool {cfg.name} has {format_size(free)} free, "
            f"not more than its reserve of {format_size(reserve)}."
        )
    return status(reason, message, mount, capacity, free)


class PoolSet:
    """The daemon's pools, each bound to the mount it was first found on, and locked while served.

    The lock is taken before the daemon does anything else in a pool; one held by another
    daemon makes the pool ``unavailable`` (``locked``), and each refresh tries again.
    """

    def __init__(self, configs: Iterable[ConfiguredPool]) -> None:
        self._configs: dict[str, ConfiguredPool] = {}
        self._mount_ids: dict[str, int] = {}
        self._statuses: dict[str, PoolStatus] = {}
        self._reflink: dict[str, bool] = {}
        self._locks: dict[str, int] = {}  # pool name -> the fd holding its lock; two names may share one
        self.replace_configs(configs)

    def refresh(self, mounts: Sequence[Mount]) -> list[tuple[PoolStatus | None, PoolStatus]]:
        """Probe every pool; returns ``(old, new)`` for each pool whose state or reason changed (old None: new)."""
        changed = []
        for name, cfg in self._configs.items():
            new = probe_pool(cfg, mounts, expected_mount_id=self._mount_ids.get(name))
            if new.state is PoolState.UNAVAILABLE:
                self._unlock(name)  # the next filesystem there gets a lock of its own
            elif name not in self._locks:
                new = self._lock(name, new)
            if new.state is PoolState.UNAVAILABLE:
                self._reflink.pop(name, None)  # probed again when it comes back: maybe on another filesystem
            elif name in self._reflink:
                new = dataclasses.replace(new, reflink=self._reflink[name])
            if new.state is not PoolState.UNAVAILABLE and new.mount_id is not None:
                self._mount_ids.setdefault(name, new.mount_id)
            old = self._statuses.get(name)
            self._statuses[name] = new
            if old is None or (old.state, old.reason) != (new.state, new.reason):
                changed.append((old, new))
        return changed

    def _lock(self, name: str, status: PoolStatus) -> PoolStatus:
        try:
            self._locks[name] = lock_pool(status.path, self._locks.values())
        except PoolLocked as exc:
            holder = "pid unknown" if exc.holder is None else f"pid {exc.holder}"
            return dataclasses.replace(
                status,
                state=PoolState.UNAVAILABLE,
                reason=PoolReason.LOCKED,
                message=f"Pool path {status.path} is locked by another scratchd ({holder}).",
            )
        except OSError as exc:
            if status.state is PoolState.READ_ONLY:
                return status  # nothing can change in it; locked once it is writable
            return dataclasses.replace(
                status,
                state=PoolState.UNAVAILABLE,
                reason=PoolReason.INACCESSIBLE,
                message=f"Pool path {status.path} cannot be locked: {exc.strerror}.",
            )
        return status

    def _unlock(self, name: str) -> None:
        fd = self._locks.pop(name, None)
        if fd is not None and fd not in self._locks.values():
            os.close(fd)

    def holds(self, name: str) -> bool:
        """Whether this daemon holds the pool's lock, so may touch anything inside it."""
        return name in self._locks

    def unlock_dropped(self, keep: Iterable[str]) -> None:
        """Release the pools no longer configured, except ``keep`` (they still have active leases)."""
        for name in set(self._locks) - set(self._configs) - set(keep):
            self._unlock(name)

    def close(self) -> None:
        for name in list(self._locks):
            self._unlock(name)

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
                if cfg is not None:
                    self._unlock(name)  # a new path is a new pool; a dropped one is kept for its leases
        for name in (new.keys() & self._locks.keys()) - self._configs.keys():
            self._unlock(name)  # dropped earlier and back now, perhaps with another path: locked afresh
        self._configs = new


# -- on disk: the lock; pool 0711, lease directories 0700, trash and caches 0700 -----------


class PoolLocked(Exception):
    """Another process holds the pool's lock."""

    def __init__(self, holder: int | None) -> None:
        super().__init__(holder)
        self.holder = holder  # the pid it wrote into the lock file, if any


def lock_pool(path: str, held: Iterable[int] = ()) -> int:
    """Take ``<pool>/.lock`` exclusively without waiting; returns the fd that holds it while open.

    ``held``: fds of locks this process already holds; one on the same file (two pools
    naming one directory) is returned instead of a new fd, which its own lock would refuse.
    The lock is held on a read-only fd: a writable one would stop the filesystem from
    being remounted read-only (flock needs no write access, so an existing lock file
    locks on a read-only filesystem too).
    """
    lock_path = os.path.join(path, LOCK_FILE)
    fd = os.open(lock_path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        st = os.fstat(fd)
        for other in held:
            theirs = os.fstat(other)
            if (theirs.st_dev, theirs.st_ino) == (st.st_dev, st.st_ino):
                os.close(fd)
                return other
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PoolLocked(_lock_holder(fd)) from None
    except BaseException:
        os.close(fd)
        raise
    with contextlib.suppress(OSError):  # read-only: locked all the same, without the pid
        writer = os.open(lock_path, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.write(writer, f"{os.getpid()}\n".encode())
        finally:
            os.close(writer)
    return fd


def _lock_holder(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def prepare_pool_dir(path: str) -> None:
    """Make a pool reachable but not listable by tenants, with a private trash and cache area on its
    filesystem (a kept cache out of its tenant's reach: nothing writes into it while it waits)."""
    pool_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _make_private(pool_fd, 0o711)
        for name in (TRASH_DIR, CACHE_DIR):
            area_fd = _open_area(pool_fd, name)
            try:
                _make_private(area_fd, 0o700)
            finally:
                os.close(area_fd)
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
        trash_fd = _open_area(pool_fd, TRASH_DIR)
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
        _own_lease_dir(path, uid, gid)
    except BaseException:
        with contextlib.suppress(OSError):
            os.rmdir(path)  # a refused request changes nothing
        raise
    return path


def cache_to_lease(pool_path: str, cache_id: str, lease_id: str, *, uid: int | None, gid: int | None) -> str:
    """Hand a kept cache over: ``<pool>/.caches/<cache_id>`` becomes ``<pool>/<lease_id>`` by one
    rename (whatever its size), its root 0700 and the tenant's. On failure it is put back."""
    _check_lease_id(cache_id)
    _check_lease_id(lease_id)
    path = os.path.join(pool_path, lease_id)
    with _dir_fd(pool_path) as pool_fd, _area_fd(pool_fd, CACHE_DIR) as cache_fd:
        _rename_new(cache_id, cache_fd, lease_id, pool_fd)
        try:
            _own_lease_dir(path, uid, gid)
        except BaseException:
            with contextlib.suppress(OSError):
                _rename_new(lease_id, pool_fd, cache_id, cache_fd)
            raise
    return path


def lease_to_cache(pool_path: str, lease_id: str, cache_id: str) -> None:
    """Keep a lease's directory: ``<pool>/<lease_id>`` becomes ``<pool>/.caches/<cache_id>`` by one
    rename. FileNotFoundError if the directory is gone."""
    _check_lease_id(cache_id)
    _check_lease_id(lease_id)
    with _dir_fd(pool_path) as pool_fd, _area_fd(pool_fd, CACHE_DIR) as cache_fd:
        _rename_new(lease_id, pool_fd, cache_id, cache_fd)


def list_caches(pool_path: str) -> list[str]:
    """The names in a pool's cache area: each a kept cache's id, if it has a record."""
    try:
        return sorted(os.listdir(os.path.join(pool_path, CACHE_DIR)))
    except FileNotFoundError:
        return []


def cache_path(pool_path: str, cache_id: str) -> str:
    _check_lease_id(cache_id)
    return os.path.join(pool_path, CACHE_DIR, cache_id)


def _own_lease_dir(path: str, uid: int | None, gid: int | None) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if uid is not None or gid is not None:
            os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
        os.fchmod(fd, 0o700)  # mkdir's mode went through the umask; a kept cache's root may have changed
    finally:
        os.close(fd)


RENAME_NOREPLACE = 1  # linux/fs.h
_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]


def _rename_new(name: str, from_fd: int, new_name: str, to_fd: int) -> None:
    """Rename into a name that must not exist yet: never over an entry, even an empty directory."""
    if _libc.renameat2(from_fd, os.fsencode(name), to_fd, os.fsencode(new_name), RENAME_NOREPLACE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), name)


@contextlib.contextmanager
def _dir_fd(path: str) -> Iterator[int]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def _area_fd(pool_fd: int, name: str) -> Iterator[int]:
    fd = _open_area(pool_fd, name)
    try:
        yield fd
    finally:
        os.close(fd)


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


def move_to_trash(pool_path: str, lease_id: str, *, area: str | None = None) -> str | None:
    """Rename ``<pool>/<lease_id>`` (or, with ``area``, ``<pool>/<area>/<lease_id>``: a kept cache)
    into the trash in one step; None if it is already gone.

    Works relative to directory descriptors, so only the configured pool path
    is looked up by name, and the rename never leaves the pool's filesystem.
    ``lease_id`` may be any entry ``list_entries`` returns: orphans are trashed too.
    """
    _check_entry_name(lease_id)
    with _dir_fd(pool_path) as pool_fd, _area_fd(pool_fd, TRASH_DIR) as trash_fd:
        stem = os.fsdecode(os.fsencode(lease_id)[:_TRASH_STEM_BYTES])
        trashed = f"{stem}.{secrets.token_hex(8)}"
        try:
            if area is None:
                os.rename(lease_id, trashed, src_dir_fd=pool_fd, dst_dir_fd=trash_fd)
            else:
                with _area_fd(pool_fd, area) as area_fd:
                    os.rename(lease_id, trashed, src_dir_fd=area_fd, dst_dir_fd=trash_fd)
        except FileNotFoundError:
            return None
    return os.path.join(pool_path, TRASH_DIR, trashed)


def list_entries(pool_path: str) -> list[str]:
    """Names in a pool that should belong to leases (names starting with "." are the daemon's)."""
    return sorted(name for name in os.listdir(pool_path) if not name.startswith("."))


def _open_area(pool_fd: int, name: str) -> int:
    """A daemon-owned area of the pool (the trash, the caches), created if missing: the rename into
    it must not fail on a cleaned-up pool."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(name, flags, dir_fd=pool_fd)  # the common case: one syscall
    except FileNotFoundError:
        pass
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, 0o700, dir_fd=pool_fd)
    fd = os.open(name, flags, dir_fd=pool_fd)
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
