"""Filesystem events: lease directories removed by their users, and activity inside leases.

Both use watchdog's shared inotify instance (one fd and one thread for any number of
watches; an Observer would add an emitter thread per watch and two thread hand-offs
per event). One watch per pool directory: a pool's direct children are its leases,
so deletions and renames of lease directories arrive on the pool's own watch,
whatever the number of leases. Activity inside leases with an idle timeout comes
from ``ActivityWatch`` below, within a budget, and otherwise from the usage scan's
newest ctime.

Events are handed to the event loop; the handler there re-checks the disk, so a
rename the daemon made itself (into the trash) is never mistaken for the user's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable

from watchdog.observers.inotify_c import InotifyConstants, InotifyEvent, InotifyFD

log = logging.getLogger("scratchd.watcher")

EntryGone = Callable[[str, str], None]  # (pool name, entry name)


_POOL_MASK = (InotifyConstants.IN_DELETE | InotifyConstants.IN_MOVED_FROM | InotifyConstants.IN_ONLYDIR
              | InotifyConstants.IN_DONT_FOLLOW)


class _PoolCallback:
    """watchdog's WatchCallback for one pool directory; runs on the inotify thread."""

    def __init__(self, pool: str, loop: asyncio.AbstractEventLoop, on_gone: EntryGone) -> None:
        self._pool = pool
        self._loop = loop
        self._on_gone = on_gone

    def on_event(self, event: InotifyEvent) -> None:
        if event.name and not event.name.startswith(b"."):
            self._loop.call_soon_threadsafe(self._on_gone, self._pool, os.fsdecode(event.name))

    def on_watch_deleted(self, wd: int) -> None:
        """The pool directory itself went: the GC loop's pool checks take it from here."""

    def on_queue_overflow(self) -> None:
        """Events were lost; the GC loop checks lease directories of unwatched pools."""


class PoolWatcher:
    """Deletions and renames of a pool's entries, filtered by the kernel: creations never
    reach user space, so a busy pool costs one event per lease end, not three."""

    def __init__(self, on_gone: EntryGone) -> None:
        self._on_gone = on_gone
        self._watches: dict[str, tuple[int, _PoolCallback]] = {}

    def stop(self) -> None:
        for pool in list(self._watches):
            self.unwatch(pool)

    def watch(self, pool: str, path: str) -> bool:
        """Watch a pool's directory; False (logged) when inotify refuses, and the GC scan covers for it."""
        if pool in self._watches:
            return True
        callback = _PoolCallback(pool, asyncio.get_running_loop(), self._on_gone)
        try:
            wd = InotifyFD.get_instance().add_callback(os.fsencode(os.path.realpath(path)), _POOL_MASK,
                                                       callback, id(callback))
        except OSError as exc:
            log.warning("cannot watch pool; falling back to periodic checks",
                        extra={"pool": pool, "error": exc.strerror})
            return False
        self._watches[pool] = (wd, callback)
        return True

    def unwatch(self, pool: str) -> None:
        watch = self._watches.pop(pool, None)
        if watch is not None:
            wd, callback = watch
            InotifyFD.get_instance().remove_callbacks([(wd, id(callback))])


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
