"""Deleting an ended lease's tree without ever leaving it (guarantee 3, README "Guarantees").

A tenant controls every name inside its lease, and a process of its may still
be in there renaming things. So below the top nothing is reached by a path
string: each directory is opened relative to its parent's fd with O_NOFOLLOW,
every entry is removed relative to that fd, and a symlink is only ever
unlinked. Every directory entered must be on the top's mount; the mount id
decides, because a bind mount of the same filesystem shares ``st_dev``. Mounts
inside are detached lazily first where the daemon may, and otherwise left
alone and reported.

A big tree goes to GNU rm, whose C loop is cheaper per file: past RM_AFTER
entries (starting rm costs what some hundreds do; a lease under churn has
dozens) the walk stops, rm removes everything below the top, and the walk runs
again to remove the top and report what stays and why: rm's exit status is not
trusted. rm keeps the walk's rules. ``/proc/self/fd/N/`` hands it the very
directory the walk opened and checked, whatever was renamed or unmounted since;
its fts never follows a symlink (openat from the parent's fd with O_NOFOLLOW,
back up through kept fds or a ``..`` whose dev/ino it checks);
--one-file-system keeps it off other filesystems. A bind mount of the same
filesystem shares ``st_dev``, so rm runs only when a mount table read just
before, once detached, has nothing at or below the top: a mount made in there
while rm runs (by root, here or propagated) is the one thing the walk stops and
rm does not. Only GNU's rm from /usr/bin or /bin (not a wrapper first on PATH),
and never for callers pacing the walk: rm cannot be paced. rm counts no bytes
either: for a caller counting them, what rm is handed is measured first by a
usage scan (:func:`scratchd.scan.scan_tree`, the same walk's rules).

``delete_tree`` runs in a worker process: plain arguments in, a plain
picklable result out, and problems inside the tree are recorded rather than
raised. rm dies with the worker (PR_SET_PDEATHSIG), as the worker does with the
daemon, so none goes on deleting behind a restart; a preexec_fn sets that, so
not from a thread of a threaded process.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import shutil
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field

from scratchd.mounts import Mount, mounts_under, read_mounts
from scratchd.scan import scan_tree
from scratchd.walk import (
    HANDLE_FLAGS,
    PACE_EVERY,
    DirStack,
    DirStat,
    ForeignMount,
    Frame,
    TreeChanged,
    mount_id,
)

# Error lines kept in a result; a tree of a million immutable files says so in one more line.
MAX_ERRORS = 100
# Entries the walk removes before it hands the rest of the tree to rm; checked every PACE_EVERY.
RM_AFTER = 2000
# Looked up once, where the system's rm is, not on PATH.
RM = shutil.which("rm", path="/usr/bin:/bin")

_MNT_DETACH = 2
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(slots=True)
class DeleteResult:
    # Counted by the walk only: what rm removed of a big tree is in neither count (see delete_tree).
    files: int = 0  # non-directories unlinked
    dirs: int = 0  # directories removed, the top included
    # Allocated bytes freed: directories, and files whose last link was ours; what rm is
    # handed is measured just before, like a usage scan (each inode once).
    bytes: int = 0
    complete: bool = False  # the top no longer exists
    left_mounts: list[str] = field(default_factory=list)  # mounts inside that could not be detached
    errors: list[str] = field(default_factory=list)  # one line each, for a reclaim_failed event


def delete_tree(
    path: str,
    pace: Callable[[int], None] | None = None,
    *,
    count_bytes: bool = True,
    mounts: list[Mount] | None = None,
) -> DeleteResult:
    """Delete ``path`` and everything below it on its mount; call again to resume after any interruption.

    ``pace`` is called every PACE_EVERY entries with the count removed so far,
    so the caller can throttle. ``count_bytes=False`` skips the one ``lstat``
    per file that ``bytes`` costs (about a third of the time on tmpfs). ``mounts``
    is the mount table when the caller read it once for many small trees (parsing
    it costs more than deleting one); a mount it lacks is still never entered, as
    every directory's mount id is checked, and is detached on the next call.

    Without ``pace``, a tree past RM_AFTER entries is finished by rm (see the
    module docstring), and ``files`` and ``dirs`` count only what the walk
    removed itself; ``bytes`` counts rm's share too.
    """
    path = os.path.abspath(path)
    parent_path, name = os.path.split(path)
    if not name:
        raise ValueError(f"refusing to delete {path!r}")
    deleter = _Deleter(path, pace, count_bytes, mounts)
    try:
        parent_fd = os.open(parent_path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        deleter.result.complete = True
        return deleter.result
    except OSError as exc:
        deleter.error(parent_path, "cannot open", exc)
        return deleter.finish()
    try:
        deleter.run(parent_fd, name)
    finally:
        os.close(parent_fd)
    return deleter.finish()


def _no_pace(_count: int) -> None:
    pass


class _HandOff(Exception):
    """Raised through the walk once it has removed RM_AFTER entries: rm takes the rest."""


class _Deleter:
    def __init__(
        self, path: str, pace: Callable[[int], None] | None, count_bytes: bool, mounts: list[Mount] | None
    ) -> None:
        self.path = path
        # Without a caller's pace, the walk's own pace hands big trees to rm.
        self.pace = pace or self.hand_off
        self.count_bytes = count_bytes
        self.mounts = mounts
        self.result = DeleteResult()
        self.until_pace = PACE_EVERY
        self.dropped_errors = 0

    def run(self, parent_fd: int, name: str) -> None:
        real_top = os.path.join(os.path.realpath(os.path.dirname(self.path)), name)
        try:
            mounts = self.mounts if self.mounts is not None else read_mounts()
        except (OSError, ValueError) as exc:
            self.error(self.path, f"deleting nothing without the mount table: {exc}")
            return
        self.detach_mounts(parent_fd, real_top, mounts)
        try:
            self.walk_top(parent_fd, name, real_top)
        except _HandOff:
            self.rm_below(parent_fd, name, real_top)
            self.walk_top(parent_fd, name, real_top)  # the top, and whatever rm left, with why it stays

    def walk_top(self, parent_fd: int, name: str, real_top: str) -> None:
        try:
            tree = DirStack(parent_fd, name, make_accessible=True)
        except FileNotFoundError:
            self.result.complete = True
            return
        except ForeignMount:
            self.left_mount(real_top)
            return
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                self.unlink_top(parent_fd, name)  # an orphan file or symlink in the pool
            else:
                self.error(self.path, "cannot open", exc)
            return
        try:
            self.walk(tree, real_top)
        except TreeChanged:
            # Someone is rearranging the tree: stop, and start over from the top next time.
            self.error(os.path.join(self.path, tree.relative()), "moved while being deleted")
        except OSError as exc:  # only re-opening a parent gets here
            self.error(os.path.join(self.path, tree.relative()), "cannot go back up", exc)
        finally:
            tree.close()

    def hand_off(self, removed: int) -> None:
        """The walk's own pace when the caller has none: past RM_AFTER entries, rm is to take the rest."""
        if removed >= RM_AFTER:
            self.pace = _no_pace  # once a tree
            # With an error, the walk after rm would report it again; with a mount left, rm does not run.
            if not (self.result.errors or self.result.left_mounts):
                raise _HandOff

    def rm_below(self, parent_fd: int, name: str, real_top: str) -> None:
        """Have rm remove everything below the top, unless anything there could lead it off the tree."""
        if RM is None or not _is_gnu_rm(RM):
            return
        try:
            self.detach_mounts(parent_fd, real_top, read_mounts())  # the table now: the caller's may be old
        except (OSError, ValueError):
            return
        if self.result.left_mounts:
            return  # one with our st_dev would not stop rm
        try:
            tree = DirStack(parent_fd, name)  # the top, checked again: a directory on our mount
        except OSError:
            return  # the walk says why
        top = tree.current.fd
        try:
            if self.count_bytes:
                self.result.bytes += _allocated_below(self.path, tree.current.stat)
            subprocess.run(
                [RM, "-rf", "--one-file-system", "--", f"/proc/self/fd/{top}/"],
                pass_fds=(top,),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                preexec_fn=functools.partial(_die_with, os.getpid()),
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            pass  # the walk does it all
        finally:
            tree.close()

    def finish(self) -> DeleteResult:
        if self.dropped_errors:
            self.result.errors.append(f"... and {self.dropped_errors} more errors")
        return self.result

    def detach_mounts(self, parent_fd: int, real_top: str, mounts: list[Mount]) -> None:
        """Lazily detach every mount at or below the top; the ones that stay are reported.

        Deepest first, and again while any pass makes progress: a mount can be
        stacked on, or hidden under, another one.
        """
        pending = [mount for mount in mounts if mount.mount_point == real_top]
        pending += mounts_under(real_top, mounts)
        pending.sort(key=lambda mount: (mount.mount_point.count("/"), mount.mount_id), reverse=True)
        base = os.path.dirname(real_top)
        while pending:
            left = [m for m in pending if not _detach(parent_fd, os.path.relpath(m.mount_point, base), m)]
            if len(left) == len(pending):
                break
            pending = left
        for mount in pending:
            self.left_mount(mount.mount_point)

    def walk(self, tree: DirStack, real_top: str) -> None:
        self.empty(tree, tree.current)
        while True:
            frame = tree.current
            if frame.subdirs:
                name = frame.subdirs.pop()
                try:
                    child = tree.push(name)
                except ForeignMount:
                    self.left_mount(os.path.join(real_top, tree.relative(name)))
                    frame.failed = True
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                        self.unlink(tree, frame, name)  # replaced by a non-directory since listed
                    else:
                        self.error(os.path.join(self.path, tree.relative(name)), "cannot open", exc)
                        frame.failed = True
                else:
                    self.empty(tree, child)
                continue
            parent_fd = tree.parent_fd()
            if not frame.failed:
                try:
                    os.rmdir(frame.name, dir_fd=parent_fd)
                    self.result.dirs += 1
                    if self.count_bytes:
                        self.result.bytes += frame.stat.blocks * 512
                    self.progress(1)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    if exc.errno == errno.ENOTEMPTY and not frame.rescanned:
                        frame.rescanned = True  # something was added meanwhile: once more
                        self.empty(tree, frame)
                        continue
                    self.error(os.path.join(self.path, tree.relative()), "cannot remove", exc)
                    frame.failed = True
            tree.pop()
            if not tree.frames:
                self.result.complete = not frame.failed
                return
            if frame.failed:
                tree.current.failed = True

    def empty(self, tree: DirStack, frame: Frame) -> None:
        """Unlink every non-directory in ``frame``, queueing its subdirectories on it.

        The hot loop: d_type from the listing says what is a directory, and
        the one ``lstat`` per file is only for ``bytes``.
        """
        fd, subdirs, count_bytes = frame.fd, frame.subdirs, self.count_bytes
        unlink = os.unlink
        files = blocks = 0
        pace_at = self.until_pace
        try:
            with os.scandir(fd) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        subdirs.append(entry.name)
                        continue
                    name = entry.name
                    try:
                        if count_bytes:
                            found = entry.stat(follow_symlinks=False)
                            unlink(name, dir_fd=fd)
                            if found.st_nlink == 1:
                                blocks += found.st_blocks
                        else:
                            unlink(name, dir_fd=fd)
                    except FileNotFoundError:
                        continue
                    except IsADirectoryError:
                        subdirs.append(name)
                        continue
                    except OSError as exc:
                        self.error(os.path.join(self.path, tree.relative(name)), "cannot remove", exc)
                        frame.failed = True
                        continue
                    files += 1
                    if files == pace_at:
                        self.pace(self.result.files + self.result.dirs + files)
                        pace_at += PACE_EVERY
        except OSError as exc:
            self.error(os.path.join(self.path, tree.relative()), "cannot list", exc)
            frame.failed = True
        finally:
            self.until_pace = pace_at - files
            self.result.files += files
            self.result.bytes += blocks * 512

    def unlink(self, tree: DirStack, frame: Frame, name: str) -> None:
        try:
            unlinked = os.stat(name, dir_fd=frame.fd, follow_symlinks=False)
            os.unlink(name, dir_fd=frame.fd)
        except FileNotFoundError:
            return
        except OSError as exc:
            self.error(os.path.join(self.path, tree.relative(name)), "cannot remove", exc)
            frame.failed = True
            return
        self.count_unlinked(unlinked)

    def unlink_top(self, parent_fd: int, name: str) -> None:
        try:
            unlinked = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
            os.unlink(name, dir_fd=parent_fd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            self.error(self.path, "cannot remove", exc)
            return
        else:
            self.count_unlinked(unlinked)
        self.result.complete = True

    def count_unlinked(self, unlinked: os.stat_result) -> None:
        self.result.files += 1
        if self.count_bytes and unlinked.st_nlink == 1:
            self.result.bytes += unlinked.st_blocks * 512
        self.progress(1)

    def progress(self, entries: int) -> None:
        self.until_pace -= entries
        if self.until_pace <= 0:
            self.pace(self.result.files + self.result.dirs)
            self.until_pace = PACE_EVERY

    def left_mount(self, mount_point: str) -> None:
        if mount_point not in self.result.left_mounts:
            self.result.left_mounts.append(mount_point)

    def error(self, where: str, what: str, exc: OSError | None = None) -> None:
        if len(self.result.errors) < MAX_ERRORS:
            self.result.errors.append(
                f"{where}: {what}: {exc.strerror or exc}" if exc else f"{where}: {what}"
            )
        else:
            self.dropped_errors += 1


@functools.cache
def _is_gnu_rm(path: str) -> bool:
    """Whether ``path`` is GNU coreutils' rm, the one whose traversal the module docstring describes."""
    try:
        version = subprocess.run(
            [path, "--version"], stdin=subprocess.DEVNULL, capture_output=True, check=False
        )
    except OSError:
        return False
    return b"(GNU coreutils)" in version.stdout.partition(b"\n")[0]


def _allocated_below(path: str, top: DirStat) -> int:
    """Allocated bytes of everything below the top at ``path``, as a usage scan counts them; 0 if it cannot."""
    try:
        return scan_tree(path).bytes - top.blocks * 512
    except (OSError, TreeChanged):
        return 0


def _die_with(parent: int) -> None:
    """In the child before rm starts: SIGKILL when the thread that started it ends, not deleting on behind it."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it ended before the prctl took effect
        os._exit(1)


def _detach(parent_fd: int, relative: str, mount: Mount) -> bool:
    """Detach ``mount`` if walking to it from ``parent_fd`` without following symlinks lands on exactly it.

    Never by its path string: a tenant could have swapped a directory on the
    way for a symlink to some other mount point.
    """
    fd = parent_fd
    try:
        for part in relative.split("/"):
            step = os.open(part, HANDLE_FLAGS, dir_fd=fd)
            if fd != parent_fd:
                os.close(fd)
            fd = step
        if fd == parent_fd or mount_id(fd) != mount.mount_id:
            return False
        umount_lazily(f"/proc/self/fd/{fd}")
        return True
    except OSError:
        return False
    finally:
        if fd != parent_fd:
            os.close(fd)


def umount_lazily(target: str) -> None:
    """``umount2(target, MNT_DETACH)``: the mount leaves the tree now and goes away once idle. Root only."""
    if _libc.umount2(os.fsencode(target), _MNT_DETACH) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), target)
