"""The walk deletion and usage scans share: down a tree without ever leaving it, and without recursion.

A tenant controls every name inside its lease, and may be renaming things while
the daemon walks. So below the top nothing is reached by a path string: each
directory is opened relative to its parent's fd with O_NOFOLLOW, and every
directory entered must be on the mount of the top's parent (the mount id
decides: a bind mount of the same filesystem shares ``st_dev``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
from dataclasses import dataclass, field

# Open directory fds a walk holds at most, whatever the depth of the tree.
MAX_OPEN_DIRS = 64
# Entries between two calls of ``pace``.
PACE_EVERY = 1000

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
HANDLE_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_AT_EMPTY_PATH = 0x1000
_STATX_BASIC_STATS = 0x7FF
_STATX_MNT_ID = 0x1000
_libc = ctypes.CDLL(None, use_errno=True)


class _StatxTimestamp(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_int64), ("nsec", ctypes.c_uint32), ("_reserved", ctypes.c_int32)]


class _Statx(ctypes.Structure):
    """``struct statx`` (linux/stat.h), the same on every architecture."""

    _fields_ = [
        ("mask", ctypes.c_uint32),
        ("blksize", ctypes.c_uint32),
        ("attributes", ctypes.c_uint64),
        ("nlink", ctypes.c_uint32),
        ("uid", ctypes.c_uint32),
        ("gid", ctypes.c_uint32),
        ("mode", ctypes.c_uint16),
        ("_spare0", ctypes.c_uint16),
        ("ino", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("blocks", ctypes.c_uint64),
        ("attributes_mask", ctypes.c_uint64),
        ("atime", _StatxTimestamp),
        ("btime", _StatxTimestamp),
        ("ctime", _StatxTimestamp),
        ("mtime", _StatxTimestamp),
        ("rdev_major", ctypes.c_uint32),
        ("rdev_minor", ctypes.c_uint32),
        ("dev_major", ctypes.c_uint32),
        ("dev_minor", ctypes.c_uint32),
        ("mnt_id", ctypes.c_uint64),
        ("_spare", ctypes.c_uint64 * 13),
    ]


_statx: ctypes._NamedFuncPointer | None = getattr(_libc, "statx", None)  # glibc 2.28+
if _statx is not None:
    _statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(_Statx)]
    _statx.restype = ctypes.c_int


class _WalkError(OSError):
    """An OSError made from one name, and pickled as such: a worker process can raise it to its parent."""

    def __reduce__(self) -> tuple[object, ...]:
        return type(self), (self.filename,), self.__dict__ or None


class ForeignMount(_WalkError):
    """A directory on another mount than the top's: it is never entered."""

    def __init__(self, name: str) -> None:
        super().__init__(errno.EXDEV, "on another mount", name)


class TreeChanged(_WalkError):
    """A directory re-opened through ``..`` is not the one the walk left there."""

    def __init__(self, where: str) -> None:
        super().__init__(errno.ESTALE, "moved during the walk", where)


def mount_id(fd: int) -> int:
    """The id of the mount ``fd`` is on, from ``/proc/self/fdinfo``: for kernels before 5.8, without statx's."""
    info = os.open(f"/proc/self/fdinfo/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        text = os.read(info, 4096)
    finally:
        os.close(info)
    start = text.index(b"mnt_id:") + 7
    return int(text[start : text.index(b"\n", start)])


@dataclass(frozen=True, slots=True)
class DirStat:
    """What a walk needs to know of a directory it opened."""

    mode: int
    dev: int
    ino: int
    mount: int  # mount id: unlike ``dev`` it tells bind mounts of one filesystem apart
    blocks: int
    ctime: float


@dataclass(slots=True)
class Frame:
    """A directory on the walk's current path."""

    name: str  # its entry in the parent
    fd: int  # -1 while it is out of the window of open fds
    stat: DirStat
    subdirs: list[str] = field(default_factory=list)  # entries still to walk into
    failed: bool = False  # something below stays, so this directory stays too
    rescanned: bool = False


class DirStack:
    """The directories from the top down to the current one, for a depth-first walk without recursion.

    At most MAX_OPEN_DIRS fds are held whatever the depth: going down, the
    directory leaving the window of the deepest ones is closed; coming back up
    to it, it is re-opened as ``..`` of its child and accepted only if it is
    the very inode left there, so a tree rearranged meanwhile cannot lead the
    walk outside. Re-opening costs one ``openat`` per level beyond the window,
    where re-walking from the top by name would cost the whole depth.

    Every directory entered, the top too, must be on the mount of the top's
    parent: one ``statx`` tells (1.5 µs where ``fstat`` plus reading
    ``/proc/self/fdinfo`` take 5). ``make_accessible`` chmods directories
    lacking owner rwx to 0700, a mode-000 one through an O_PATH handle,
    which needs no permission on it.
    """

    def __init__(self, parent_fd: int, name: str, *, make_accessible: bool = False) -> None:
        # Its own statx buffer: threads may walk at once.
        self._statx = (_statx, _Statx()) if _statx is not None else None
        self._mount = self._identify(parent_fd).mount
        self._parent_fd = parent_fd
        self._make_accessible = make_accessible
        self.frames = [self._enter(parent_fd, name)]

    @property
    def current(self) -> Frame:
        return self.frames[-1]

    def push(self, name: str) -> Frame:
        """Enter the subdirectory ``name`` of the current directory."""
        frame = self._enter(self.frames[-1].fd, name)
        self.frames.append(frame)
        leaving = len(self.frames) - 1 - MAX_OPEN_DIRS
        if leaving > 0 and self.frames[leaving].fd >= 0:
            os.close(self.frames[leaving].fd)
            self.frames[leaving].fd = -1
        return frame

    def parent_fd(self) -> int:
        """The current directory's parent, re-opened if it left the window."""
        if len(self.frames) == 1:
            return self._parent_fd
        child, parent = self.frames[-1], self.frames[-2]
        if parent.fd < 0:
            fd = os.open("..", DIR_FLAGS, dir_fd=child.fd)
            found = os.fstat(fd)
            if (found.st_dev, found.st_ino) != (parent.stat.dev, parent.stat.ino):
                os.close(fd)
                raise TreeChanged(self.relative())
            parent.fd = fd
        return parent.fd

    def pop(self) -> Frame:
        """Leave the current directory for its parent."""
        self.parent_fd()
        frame = self.frames.pop()
        os.close(frame.fd)
        frame.fd = -1
        return frame

    def close(self) -> None:
        for frame in self.frames:
            if frame.fd >= 0:
                os.close(frame.fd)
                frame.fd = -1
        self.frames.clear()

    def relative(self, name: str = "") -> str:
        """``a/b/name``: where the current directory (or ``name`` in it) is, for messages."""
        return "/".join([frame.name for frame in self.frames[1:]] + ([name] if name else []))

    def _enter(self, dir_fd: int, name: str) -> Frame:
        try:
            fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
        except PermissionError:
            if not self._make_accessible:
                raise
            fd = self._open_locked(dir_fd, name)
        try:
            found = self._on_our_mount(fd, name)
            if self._make_accessible and found.mode & 0o700 != 0o700:
                # Immutable, or not ours: removing its entries will say so.
                with contextlib.suppress(OSError):
                    os.fchmod(fd, stat.S_IMODE(found.mode) | 0o700)
        except BaseException:
            os.close(fd)
            raise
        return Frame(name, fd, found)

    def _open_locked(self, dir_fd: int, name: str) -> int:
        """Open a directory whose mode keeps even its owner out, by making it 0700 first."""
        handle = os.open(name, HANDLE_FLAGS, dir_fd=dir_fd)
        try:
            self._on_our_mount(handle, name)
            os.chmod(f"/proc/self/fd/{handle}", 0o700)
            return os.open(".", DIR_FLAGS, dir_fd=handle)
        finally:
            os.close(handle)

    def _on_our_mount(self, fd: int, name: str) -> DirStat:
        found = self._identify(fd)
        if found.mount != self._mount:
            raise ForeignMount(name)
        return found

    def _identify(self, fd: int) -> DirStat:
        if self._statx is not None:
            statx, found = self._statx
            if statx(fd, b"", _AT_EMPTY_PATH, _STATX_BASIC_STATS | _STATX_MNT_ID, found) == 0 and (
                found.mask & _STATX_MNT_ID
            ):
                ctime = found.ctime.sec + found.ctime.nsec * 1e-9  # as os.stat computes st_ctime
                device = os.makedev(found.dev_major, found.dev_minor)
                return DirStat(found.mode, device, found.ino, found.mnt_id, found.blocks, ctime)
        st = os.fstat(fd)
        return DirStat(st.st_mode, st.st_dev, st.st_ino, mount_id(fd), st.st_blocks, st.st_ctime)
