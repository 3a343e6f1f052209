"""Measuring a lease like ``du -s``: allocated bytes, files, and the newest change anywhere under it.

The walk is the deleter's too (:class:`~scratchd.walk.DirStack`):
fd-relative, never following a symlink, never entering another mount, no
recursion and a bounded number of open fds. Directories it may not read are
counted themselves but not entered.

A big tree is shared with one helper process. Per file the walk costs a
listing entry and an ``lstat`` as ``du``'s does, but from Python: a bare
``scandir`` + ``stat`` loop alone takes about 1.5 times ``du``, so one process
cannot come within 1.2 times. Once the walk has seen SPLIT_AFTER entries, it
hands subdirectories still pending to the helper as *parts*: names from the
top down, never a path string. The helper re-opens a part one name at a time
through a DirStack of its own from the top (``O_NOFOLLOW`` and the mount check
at every step), so a tenant who renames a directory or swaps it for a symlink
meanwhile only makes a part skipped, never followed. The helper walks about
HELPER_BUDGET entries a call and hands back the parts it did not get to, so at
the end neither process waits long for the other. Inodes with several links
travel as ``(dev, ino) -> blocks`` and are merged, so each counts once
whichever process met which link.
"""

from __future__ import annotations

import multiprocessing.util
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

from scratchd.offload import disk_worker
from scratchd.walk import PACE_EVERY, DirStack, DirStat, ForeignMount, Frame, TreeChanged

# Entries a scan walks alone: below this a helper's round trips cost more than they save.
SPLIT_AFTER = 5000
# Entries a helper walks a call before handing back what it has not started (about 20 ms).
HELPER_BUDGET = 4000
# Parts handed over at once; each a pickled tuple of names.
MAX_PARTS = 64
# Only directories this close to the top are handed over: re-opening a part costs an
# ``openat`` per name, and a deep chain stays with whoever walks it.
SPLIT_DEPTH = 16

Part = tuple[str, ...]  # the names from the top down to a directory
Inode = tuple[int, int]  # (st_dev, st_ino): btrfs subvolumes each number their own inodes


@dataclass(frozen=True, slots=True)
class UsageSample:
    bytes: int  # allocated (st_blocks * 512), each inode once, directories included, like ``du -s``
    files: int  # non-directory inodes
    # Newest ctime of anything in the tree, the top directory included: every write sets
    # it as well as mtime, and unlike mtime nobody can set it to the future.
    newest_mtime: float
    measured_at: float  # time.time() when the scan ended
    cpu_seconds: float  # of the scanning process and its helper: what a duty cycle must bound
    helper_entries: int  # entries the helper process walked


@dataclass(slots=True)
class Tally:
    """What a walk counted so far; a helper's is pickled back and merged."""

    blocks: int = 0  # 512-byte blocks of directories and of files with one link
    files: int = 0  # files with one link
    newest: float = 0.0
    entries: int = 0
    linked: dict[Inode, int] = field(default_factory=dict)  # blocks of each file with more links
    cpu_seconds: float = 0.0

    def merge(self, other: Tally) -> None:
        self.blocks += other.blocks
        self.files += other.files
        self.newest = max(self.newest, other.newest)
        self.entries += other.entries
        self.linked.update(other.linked)
        self.cpu_seconds += other.cpu_seconds


def scan_tree(path: str, *, pace: Callable[[int], None] | None = None) -> UsageSample:
    """Measure the tree at ``path`` (a directory) the way ``du -s`` would, without leaving its mount.

    ``pace`` is called every PACE_EVERY entries this process walks, with the
    count so far. Raises OSError if ``path`` itself cannot be opened (gone:
    the caller's cue), is a mount of its own (ForeignMount), or is rearranged
    under a deep walk (TreeChanged); problems further down only leave things
    uncounted.
    """
    started = time.process_time()
    path = os.path.abspath(path)
    parent_path, name = os.path.split(path)
    parent_fd = os.open(parent_path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        tree = DirStack(parent_fd, name)
        try:
            scan = _Scan(path, tree, pace)
            scan.run()
        finally:
            tree.close()
    finally:
        os.close(parent_fd)
    tally = scan.tally
    return UsageSample(
        bytes=(tally.blocks + sum(tally.linked.values())) * 512,
        files=tally.files + len(tally.linked),
        newest_mtime=tally.newest,
        measured_at=time.time(),
        cpu_seconds=tally.cpu_seconds + time.process_time() - started,
        helper_entries=scan.helper_entries,
    )


def scan_parts(top: str, identity: Inode, parts: list[Part], budget: int) -> tuple[Tally, list[Part]]:
    """A helper's share: walk ``parts`` of the tree at ``top`` until ``budget`` entries; return the rest.

    ``identity`` is the top's ``(st_dev, st_ino)`` as the scan opened it: a
    top replaced since is not walked. Directories deeper than SPLIT_DEPTH are
    finished rather than handed back.
    """
    started = time.process_time()
    parent_path, name = os.path.split(top)
    parent_fd = os.open(parent_path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        tree = DirStack(parent_fd, name)
        try:
            if (tree.current.stat.dev, tree.current.stat.ino) != identity:
                raise TreeChanged("")
            walk = _Walk(tree, None)
            left = list(parts)

            def hand_back() -> None:
                if walk.tally.entries >= budget:
                    left.extend(walk.take(share=1.0))

            while left and walk.tally.entries < budget:
                if walk.enter(left.pop()):
                    walk.drain(hand_back)
        finally:
            tree.close()
    except (ForeignMount, TreeChanged) as exc:  # their __init__ does not unpickle
        raise OSError(exc.errno, exc.strerror, exc.filename) from None
    finally:
        os.close(parent_fd)
    walk.tally.cpu_seconds = time.process_time() - started
    return walk.tally, left


class _Walk:
    """One process's walk: a DirStack from the top, into the directories it finds or is given."""

    def __init__(self, tree: DirStack, pace: Callable[[int], None] | None) -> None:
        self.tree = tree
        self.pace = pace
        self.until_pace = PACE_EVERY
        self.tally = Tally()

    def enter(self, part: Part) -> bool:
        """Go to ``part``'s parent, keeping the directories on the way already open, and queue ``part`` there.

        False if the way is gone, moved or swapped for something else: whoever
        listed the part counted the way; a tree changing meanwhile may miss some.
        """
        *way, name = part
        tree = self.tree
        kept = 0
        for frame, step in zip(tree.frames[1:], way, strict=False):  # the common prefix of the two
            if frame.name != step:
                break
            kept += 1
        while len(tree.frames) > kept + 1:
            tree.pop()
        try:
            for step in way[kept:]:
                tree.push(step)
        except OSError:
            return False
        tree.current.subdirs.append(name)
        return True

    def drain(self, between: Callable[[], None]) -> None:
        """Walk everything pending in the current directory and below, calling ``between`` after each directory."""
        tree = self.tree
        floor = len(tree.frames)
        while True:
            frame = tree.current
            if not frame.subdirs:
                if len(tree.frames) == floor:
                    return
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
            between()

    def take(self, share: float, most: int = sys.maxsize) -> list[Part]:
        """``share`` of the directories pending near the top (rounded down), shallowest first: likely the biggest.

        At most ``most``; they leave this walk, whoever gets them walks them.
        """
        frames = self.tree.frames
        taken: list[Part] = []
        for depth, frame in enumerate(frames[:SPLIT_DEPTH]):
            count = min(most - len(taken), int(len(frame.subdirs) * share))
            if count > 0:
                way = tuple(above.name for above in frames[1 : depth + 1])
                taken += [(*way, name) for name in frame.subdirs[:count]]
                del frame.subdirs[:count]
        return taken

    def count_dir(self, found: DirStat) -> None:
        self.tally.blocks += found.blocks
        if found.ctime > self.tally.newest:
            self.tally.newest = found.ctime

    def count_unreadable(self, dir_fd: int, name: str) -> None:
        try:
            found = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            return
        self.tally.blocks += found.st_blocks
        self.tally.newest = max(self.tally.newest, found.st_ctime)

    def scan_dir(self, frame: Frame) -> None:
        """Count the non-directories in ``frame``, queueing its subdirectories on it."""
        tally, pace = self.tally, self.pace
        subdirs, linked, device = frame.subdirs, tally.linked, frame.stat.dev
        blocks = files = entries = 0
        newest = tally.newest
        pace_at = self.until_pace
        try:
            with os.scandir(frame.fd) as listing:
                for entry in listing:
                    entries += 1
                    if entries == pace_at:
                        if pace is not None:
                            pace(tally.entries + entries)
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
                    if found.st_ctime > newest:
                        newest = found.st_ctime
                    if found.st_nlink > 1:
                        linked[device, found.st_ino] = found.st_blocks
                    else:
                        blocks += found.st_blocks
                        files += 1
        except OSError:
            pass  # what was listed until then counts
        finally:
            self.until_pace = pace_at - entries
            tally.entries += entries
            tally.blocks += blocks
            tally.files += files
            tally.newest = newest


class _Scan(_Walk):
    """The scanning process's walk: from the top, sharing with the helper once the tree proves big."""

    def __init__(self, path: str, tree: DirStack, pace: Callable[[int], None] | None) -> None:
        super().__init__(tree, pace)
        self.path = path
        self.identity = (tree.current.stat.dev, tree.current.stat.ino)
        self.parts: list[Part] = []  # handed back by the helper, not walked yet
        self.given: list[Part] = []  # what the helper is walking
        self.pending: Future[tuple[Tally, list[Part]]] | None = None
        self.helper_entries = 0
        self.alone = False  # the helper died during this scan

    def run(self) -> None:
        top = self.tree.current
        self.count_dir(top.stat)
        self.scan_dir(top)
        self.drain(self.share)
        while True:
            if self.parts:
                if self.enter(self.parts.pop()):
                    self.drain(self.share)
            elif self.pending is not None:
                self.collect()
            else:
                return

    def share(self) -> None:
        """Between two directories: merge what the helper finished, and give it more."""
        if self.tally.entries < SPLIT_AFTER or self.alone:
            return
        if self.pending is not None:
            if not self.pending.done():
                return
            self.collect()
        executor = helper()
        if executor is None:
            return
        if self.parts:  # half of them, the other half for this process once its own are done
            count = min(MAX_PARTS, (len(self.parts) + 1) // 2)
            self.given, self.parts = self.parts[:count], self.parts[count:]
        else:
            self.given = self.take(share=0.5, most=MAX_PARTS)
        if self.given:
            try:
                self.pending = executor.submit(
                    scan_parts, self.path, self.identity, self.given, HELPER_BUDGET
                )
            except BrokenProcessPool:
                self.helper_lost()

    def collect(self) -> None:
        """Merge the helper's call, waiting for it; its errors are the scan's, except the helper dying."""
        assert self.pending is not None
        try:
            tally, left = self.pending.result()
        except BrokenProcessPool:
            self.helper_lost()
            return
        finally:
            self.pending = None
        self.tally.merge(tally)
        self.helper_entries += tally.entries
        self.parts += left

    def helper_lost(self) -> None:
        """Walk here what the helper had been given; a new one starts with the next scan that needs it."""
        global _helper
        self.parts += self.given
        self.given = []
        self.alone = True
        if _helper is not None:
            _helper[1].shutdown(wait=False)
            _helper = None


# The helper: (the pid it belongs to, its executor, a future done once it has booted).
_helper: tuple[int, ProcessPoolExecutor, Future[int]] | None = None


def helper() -> ProcessPoolExecutor | None:
    """The helper process once it has booted (the first call starts it), or None: meanwhile, walk alone.

    None too where this process may only use one CPU. ``os.nice`` is relative,
    so ``disk_worker(0, …)`` leaves the helper at the scanner's own niceness. A
    forked child starts its own: its parent's executor has no threads here.
    """
    global _helper
    if _helper is None or _helper[0] != os.getpid():
        if len(os.sched_getaffinity(0)) < 2:
            return None
        executor = disk_worker(0, scan_parts)
        _helper = (os.getpid(), executor, executor.submit(os.getpid))
    return _helper[1] if _helper[2].done() else None


def _stop_helper() -> None:
    if _helper is not None and _helper[0] == os.getpid():
        _helper[1].shutdown()


# A worker process joins its children before its threads stop: without this, its idle
# helper would keep it, and the daemon waiting for it, from ever exiting. Before the
# finalizers of priority 10 that close the queue the helper's stop order goes through.
multiprocessing.util.Finalize(None, _stop_helper, exitpriority=20)
