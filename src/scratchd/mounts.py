"""The mount table, as placement and the deleter need it.

"Same filesystem" means same *mount*: Linux refuses hard links and renames
between two mounts of one device (a bind mount shares ``st_dev`` but still
fails with EXDEV), so everything here identifies a filesystem by mount id.
"""

from __future__ import annotations

import os
import re
import select
import stat
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType

MOUNTINFO = "/proc/self/mountinfo"

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True, slots=True)
class Mount:
    """One line of ``/proc/self/mountinfo``."""

    mount_id: int
    parent_id: int
    device: str  # "maj:min"
    root: str  # the directory of the device's filesystem that is mounted (not "/" for bind mounts)
    mount_point: str
    fstype: str
    source: str
    read_only: bool


def parse_mountinfo(text: str) -> list[Mount]:
    """Mounts in the order the kernel lists them, which is the order they were stacked."""
    mounts = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                mounts.append(_parse_line(line))
            except (ValueError, IndexError):
                raise ValueError(f"mountinfo line {number} is malformed: {line!r}") from None
    return mounts


def _parse_line(line: str) -> Mount:
    # 36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
    # Optional fields (shared:N, master:N, ...) come and go; "-" ends them.
    fields = line.split()
    separator = fields.index("-", 6)
    fstype, source, super_options = fields[separator + 1 : separator + 4]
    read_only = "ro" in fields[5].split(",") or "ro" in super_options.split(",")
    return Mount(
        mount_id=int(fields[0]),
        parent_id=int(fields[1]),
        device=fields[2],
        root=_unescape(fields[3]),
        mount_point=_unescape(fields[4]),
        fstype=fstype,
        source=_unescape(source),
        read_only=read_only,
    )


def _unescape(field: str) -> str:
    """The kernel writes space, tab, newline and backslash as ``\\ooo`` octal escapes."""
    return _OCTAL_ESCAPE.sub(lambda match: chr(int(match.group(1), 8)), field)


def read_mounts(path: str = MOUNTINFO) -> list[Mount]:
    with open(path, "rb") as file:
        return parse_mountinfo(os.fsdecode(file.read()))


def mount_of(path: str, mounts: Sequence[Mount]) -> Mount:
    """The mount a lookup of ``path`` (absolute, already real) ends on.

    Follows the mount tree from ``/`` the way the kernel's path walk does, so a
    mount stacked on another wins over it, and a mount hidden by one mounted
    later over one of its ancestors is never the answer. A mount whose parent
    is not in the table (the namespace root) counts as attached where it is.
    """
    known = {mount.mount_id for mount in mounts}
    ancestry = _ancestry(path)
    wanted = set(ancestry)
    on_path = [mount for mount in mounts if mount.mount_point in wanted]
    found: Mount | None = None
    for point in ancestry:
        here = [mount for mount in on_path if mount.mount_point == point]
        attached = [
            mount
            for mount in here
            if mount.parent_id not in known
            or mount.parent_id == mount.mount_id
            or (found is not None and mount.parent_id == found.mount_id)
        ]
        if not attached:
            continue
        top, seen = attached[-1], set()
        while True:
            seen.add(top.mount_id)
            above = [
                mount for mount in here if mount.parent_id == top.mount_id and mount.mount_id not in seen
            ]
            if not above:
                break
            top = above[-1]
        found = top
    if found is None:
        raise LookupError(f"no mount in the table contains {path}")
    return found


def mounts_under(path: str, mounts: Sequence[Mount]) -> list[Mount]:
    """Mounts strictly below ``path``, hidden ones too: a deleter must not enter any of them."""
    return [mount for mount in mounts if mount.mount_point != path and _is_within(mount.mount_point, path)]


def _ancestry(path: str) -> list[str]:
    """``/a/b`` -> ``["/", "/a", "/a/b"]``."""
    points = ["/"]
    for part in path.split("/"):
        if part:
            points.append(points[-1].rstrip("/") + "/" + part)
    return points


def _is_within(path: str, directory: str) -> bool:
    """Component-wise: ``/a/b`` is within ``/a`` but ``/a/bc`` is not."""
    return directory == "/" or path == directory or path.startswith(directory.rstrip("/") + "/")


def resolve_near(path: str, may_search: Callable[[os.stat_result], bool] | None = None) -> str:
    """The real path of ``path``, or of its nearest existing ancestor.

    A venv about to be created does not exist yet; the directory it will be
    created in decides which mount it lands on. With ``may_search`` (the caller's
    permission to look up names in a directory), the walk stops at the last
    directory the caller could pass through itself: a privileged daemon must not
    tell a tenant which mount lies behind a directory the tenant cannot enter.
    """
    if "\0" in path:
        raise ValueError("path contains a NUL byte")
    if not os.path.isabs(path):
        raise ValueError(f"path must be absolute: {path!r}")
    if may_search is None:
        real = os.path.realpath(path)
        while not os.path.exists(real):
            real = os.path.dirname(real)
        return real
    return _walk_as_caller(path, may_search)


_MAX_SYMLINKS = 40  # as the kernel's path walk (ELOOP)


def _walk_as_caller(path: str, may_search: Callable[[os.stat_result], bool]) -> str:
    """realpath, one component at a time, stopping where the caller could not go on."""
    pending = [part for part in reversed(path.split("/")) if part not in ("", ".")]
    current = "/"
    links = 0
    while pending:
        name = pending.pop()
        if name == "..":
            current = os.path.dirname(current)
            continue
        try:
            if not may_search(os.stat(current)):
                return current
            found = os.lstat(os.path.join(current, name))
        except OSError:  # gone, or not a directory: the nearest existing ancestor decides
            return current
        if stat.S_ISLNK(found.st_mode):
            links += 1
            if links > _MAX_SYMLINKS:
                return current
            target = os.readlink(os.path.join(current, name))
            if target.startswith("/"):
                current = "/"
            pending.extend(part for part in reversed(target.split("/")) if part not in ("", "."))
        elif stat.S_ISDIR(found.st_mode):
            current = os.path.join(current, name)
        else:
            return current  # a file: the directory it is in decides
    return current


class MountTable:
    """The current mounts, re-read only when the kernel says they changed.

    An open ``/proc/self/mountinfo`` polls with POLLPRI|POLLERR once the mount
    table changed since the last poll, so a read per lease request is avoided.
    """

    def __init__(self, path: str = MOUNTINFO) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._poller = select.poll()
        self._poller.register(self._fd, select.POLLPRI | select.POLLERR)
        self._lock = threading.Lock()
        self._mounts = self._read()

    def current(self) -> list[Mount]:
        with self._lock:
            # The poll itself consumes the change; a mount after it shows up in the
            # read below or in the next poll, so no change is ever missed.
            if self._poller.poll(0):
                self._mounts = self._read()
            return list(self._mounts)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                self._poller.unregister(self._fd)
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> MountTable:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _read(self) -> list[Mount]:
        os.lseek(self._fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(self._fd, 1 << 16):
            chunks.append(chunk)
        return parse_mountinfo(os.fsdecode(b"".join(chunks)))
