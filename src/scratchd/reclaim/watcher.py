"""Filesystem events: lease directories removed by their users, and activity inside leases.

One watch per pool directory, read on the event loop: a pool's direct children are
its leases, so deletions and renames of lease directories arrive on the pool's own
watch, whatever the number of leases. Activity inside leases with an idle timeout
comes from ``ActivityWatch`` below, on watchdog's shared inotify instance (one fd and
one thread for any number of watches), within a budget, and otherwise from the usage
scan's newest ctime.

The handler of a removal re-checks the disk, so a rename the daemon made itself (into
the trash) is never mistaken for the user's.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import struct
import threading
import time
from collections.abc import Callable

from watchdog.observers.inotify_c import (
    InotifyConstants,
    InotifyEvent,
    InotifyFD,
    inotify_add_watch,
    inotify_init,
    inotify_rm_watch,
)

log = logging.getLogger("scratchd.watcher")

EntryGone = Callable[[str, str], None]  # (pool name, entry name)


_POOL_MASK = (InotifyConstants.IN_DELETE | InotifyConstants.IN_MOVED_FROM | InotifyConstants.IN_ONLYDIR
              | InotifyConstants.IN_DONT_FOLLOW)
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then the name
_READ_SIZE = 64 * 1024


class PoolWatcher:
    """Deletions and renames of a pool's entries, read on the event loop itself.

    One watch per pool directory on an inotify fd of our own, added to the loop as a
    reader: every release removes or renames a lease directory, so this fires on every
    lease end, and a thread hop per event (GIL hand-off, ``call_soon_threadsafe``, a loop
    wake-up) cost more than the lease's own syscalls. The kernel filters: creations never
    reach user space. Under load, one read drains every event that queued meanwhile.
    """

    def __init__(self, on_gone: EntryGone) -> None:
        self._on_gone = on_gone
        self._fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wd_of: dict[str, int] = {}
        self._pools_of: dict[int, set[str]] = {}  # two pools may name one directory

    def stop(self) -> None:
        if self._fd >= 0 and self._loop is not None:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
        self._fd, self._loop = -1, None
        self._wd_of.clear()
        self._pools_of.clear()

    def watch(self, pool: str, path: str) -> bool:
        """Watch a pool's directory; False (logged) when inotify refuses, and the GC scan covers for it."""
        if pool in self._wd_of:
            return True
        try:
            wd = self._add_watch(os.path.realpath(path))
        except OSError as exc:
            log.warning("cannot watch pool; falling back to periodic checks",
                        extra={"pool": pool, "error": exc.strerror})
            return False
        self._wd_of[pool] = wd
        self._pools_of.setdefault(wd, set()).add(pool)
        return True

    def unwatch(self, pool: str) -> None:
        wd = self._wd_of.pop(pool, None)
        if wd is None:
            return
        pools = self._pools_of.get(wd, set())
        pools.discard(pool)
        if not pools:
            self._pools_of.pop(wd, None)
            inotify_rm_watch(self._fd, wd)  # EINVAL if the directory went already: nothing to undo

    def _add_watch(self, path: str) -> int:
        if self._fd < 0:
            fd = inotify_init()
            if fd < 0:
                raise _errno_error()
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)  # inotify_init has no CLOEXEC; spawned helpers must not hold it
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(fd, self._read)
            self._fd = fd
        wd = inotify_add_watch(self._fd, os.fsencode(path), _POOL_MASK)
        if wd < 0:
            raise _errno_error()
        return wd

    def _read(self) -> None:
        try:
            buffer = os.read(self._fd, _READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        offset = 0
        while offset + _EVENT.size <= len(buffer):
            wd, mask, _cookie, length = _EVENT.unpack_from(buffer, offset)
            name = buffer[offset + _EVENT.size:offset + _EVENT.size + length].rstrip(b"\0")
            offset += _EVENT.size + length
            if mask & InotifyConstants.IN_IGNORED:  # the pool directory itself went: the GC's pool checks
                for pool in self._pools_of.pop(wd, set()):
                    self._wd_of.pop(pool, None)
            elif name and not name.startswith(b"."):  # a queue overflow has no name: the GC checks
                for pool in tuple(self._pools_of.get(wd, ())):
                    self._on_gone(pool, os.fsdecode(name))


def _errno_error() -> OSError:
    err = ctypes.get_errno()
    return OSError(err, os.strerror(err))


# Budget for activity watches: a lease with 100k subdirectories must not exhaust the
# host's fs.inotify.max_user_watches (8192 on many distributions, shared by every
# program of the user). Past the budget, the usage scan's newest ctime is the signal.
WATCHES_PER_LEASE = 64
WATCHES_TOTAL = 4096
# One report per lease per this many seconds reaches the event loop, however busy the lease.
ACTIVITY_DEBOUNCE_SECONDS = 0.5
_ACTIVITY_MASK = (
    InotifyConstants.IN_MODIFY | InotifyConstants.IN_CLOSE_WRITE | InotifyConstants.IN_CREATE
    | InotifyConstants.IN_DELETE | InotifyConstants.IN_MOVED_FROM | InotifyConstants.IN_MOVED_TO
    | InotifyConstants.IN_ATTRIB | InotifyConstants.IN_DONT_FOLLOW | InotifyConstants.IN_ONLYDIR
)


class ActivityWatch:
    """Immediate write activity for leases with an idle timeout, within an inotify budget.

    Uses watchdog's shared inotify instance (one fd, one thread, any number of
    watches) instead of an observer per lease. A lease's top directory is watched when
    it is bound; subdirectories as they are created, up to the per-lease and total caps.
    """

    def __init__(self, on_activity: Callable[[str, float], None]) -> None:
        self._on_activity = on_activity
        self._leases: dict[str, _LeaseWatch] = {}
        self._lock = threading.Lock()
        self.watches = 0

    def __contains__(self, lease_id: str) -> bool:
        return lease_id in self._leases

    def bind(self, lease_id: str, path: str) -> None:
        watch = _LeaseWatch(self, lease_id, asyncio.get_running_loop())
        self._leases[lease_id] = watch
        watch.add(os.fsencode(path))

    def unbind(self, lease_id: str) -> None:
        watch = self._leases.pop(lease_id, None)
        if watch is not None:
            watch.close()

    def close(self) -> None:
        for lease_id in list(self._leases):
            self.unbind(lease_id)

    def _take(self, held: int) -> bool:
        with self._lock:
            if held >= WATCHES_PER_LEASE or self.watches >= WATCHES_TOTAL:
                return False
            self.watches += 1
            return True

    def _give_back(self, count: int) -> None:
        with self._lock:
            self.watches -= count


class _LeaseWatch:
    """watchdog's WatchCallback for one lease; its methods run on the inotify thread."""

    def __init__(self, owner: ActivityWatch, lease_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self._owner = owner
        self._lease_id = lease_id
        self._loop = loop
        self._dirs: dict[int, bytes] = {}
        self._last_report = 0.0
        self._closed = False

    def add(self, path: bytes) -> None:
        if self._closed or not self._owner._take(len(self._dirs)):
            return
        try:
            wd = InotifyFD.get_instance().add_callback(path, _ACTIVITY_MASK, self, id(self))
        except OSError:
            self._owner._give_back(1)  # gone already, or inotify itself is exhausted
            return
        if wd in self._dirs:
            self._owner._give_back(1)
        self._dirs[wd] = path

    def close(self) -> None:
        self._closed = True
        dirs, self._dirs = self._dirs, {}
        if dirs:  # with none, the shared instance may not exist (inotify exhausted): leave it be
            InotifyFD.get_instance().remove_callbacks([(wd, id(self)) for wd in dirs])
            self._owner._give_back(len(dirs))

    def on_event(self, event: InotifyEvent) -> None:
        now = time.time()
        if now - self._last_report >= ACTIVITY_DEBOUNCE_SECONDS:
            self._last_report = now
            self._loop.call_soon_threadsafe(self._owner._on_activity, self._lease_id, now)
        if event.is_create and event.is_directory and event.wd in self._dirs:
            self.add(os.path.join(self._dirs[event.wd], event.name))

    def on_watch_deleted(self, wd: int) -> None:
        if self._dirs.pop(wd, None) is not None:
            self._owner._give_back(1)

    def on_queue_overflow(self) -> None:
        """Events were lost; the usage scan still sees the writes."""
