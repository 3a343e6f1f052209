"""Measuring a lease: allocated bytes, files, and the newest change anywhere under it.

The walk is the deleter's (:class:`~scratchd.reclaim.deleter.DirStack`):
fd-relative, never following a symlink, never entering another mount, no
recursion and a bounded number of open fds. Directories it may not read are
counted themselves but not entered.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from scratchd.reclaim.deleter import PACE_EVERY, DirStack, DirStat, ForeignMount, Frame


@dataclass(frozen=True, slots=True)
class UsageSample:
    bytes: int  # allocated (st_blocks * 512), each inode once, directories included, like ``du -s``
    files: int  # non-directory inodes
    # Newest ctime of anything in the tree, directories included: every write sets it
    # as well as mtime, and unlike mtime nobody can set it to the future. 0.0 if empty.
    newest_mtime: float
    measured_at: float  # time.time() when the scan ended


def scan_tree(path: str, *, pace: Callable[[int], None] | None = None) -> UsageSample:
    """Measure the tree at ``path`` (a directory) the way ``du -s`` would, without leaving its mount.

    Raises OSError if ``path`` itself cannot be opened (it is gone: the
    caller's cue), and TreeChanged if the tree is rearranged under a deep
    walk; problems further down only leave things uncounted.
    """
    parent_path, name = os.path.split(os.path.abspath(path))
    parent_fd = os.open(parent_path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        tree = DirStack(parent_fd, name)
        try:
            return _Scan(pace).run(tree)
        finally:
            tree.close()
    finally:
        os.close(parent_fd)


class _Scan:
    def __init__(self, pace: Callable[[int], None] | None) -> None:
        self.pace = pace
        self.until_pace = PACE_EVERY
        self.entries = 0
        self.blocks = 0
        self.files = 0
        self.newest = 0.0
        self.linked: set[tuple[int, int]] = set()  # inodes with more than one link, once seen

    def run(self, tree: DirStack) -> UsageSample:
        top = tree.current
        self.count_dir(top.stat)
        self.scan_dir(top)
        while tree.frames:
            frame = tree.current
            if not frame.subdirs:
                tree.pop()
                continue
            name = frame.subdirs.pop()
            try:
                child = tree.push(name)
            except ForeignMount:
                continue
            except PermissionError:
                self.count_unreadable(frame.fd, name)
                continue
            except OSError:
                continue  # gone, or replaced by a non-directory, since it was listed
            self.count_dir(child.stat)
            self.scan_dir(child)
        return UsageSample(self.blocks * 512, self.files, self.newest, time.time())

    def count_dir(self, found: DirStat) -> None:
        self.blocks += found.blocks
        if found.ctime > self.newest:
            self.newest = found.ctime

    def count_unreadable(self, dir_fd: int, name: str) -> None:
        try:
            found = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            return
        self.blocks += found.st_blocks
        self.newest = max(self.newest, found.st_ctime)

    def scan_dir(self, frame: Frame) -> None:
        """Count the non-directories in ``frame``, queueing its subdirectories on it."""
        subdirs, linked, device = frame.subdirs, self.linked, frame.stat.dev
        blocks = files = entries = 0
        newest = self.newest
        pace_at = self.until_pace
        try:
            with os.scandir(frame.fd) as listing:
                for entry in listing:
                    entries += 1
                    if entries == pace_at:
                        if self.pace is not None:
                            self.pace(self.entries + entries)
                        pace_at += PACE_EVERY
                    if entry.is_dir(follow_symlinks=False):
                        subdirs.append(entry.name)
                        continue
                    try:
                        found = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    if found.st_dev != device:
                        continue  # a file bind-mounted over an entry
                    if found.st_nlink > 1:
                        inode = (device, found.st_ino)  # btrfs subvolumes each number their own inodes
                        if inode in linked:
                            continue
                        linked.add(inode)
                    blocks += found.st_blocks
                    files += 1
                    if found.st_ctime > newest:
                        newest = found.st_ctime
        except OSError:
            pass  # what was listed until then counts
        finally:
            self.until_pace = pace_at - entries
            self.entries += entries
            self.blocks += blocks
            self.files += files
            self.newest = newest
