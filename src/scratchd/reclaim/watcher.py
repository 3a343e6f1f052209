"""Filesystem events: lease directories removed by their users, and activity inside leases.

One non-recursive watchdog watch per pool directory: a pool's direct children are
its leases, so deletions and renames of lease directories arrive as events on the
pool's own inotify watch, whatever the number of leases. (watchdog runs an emitter
thread per watch, so an observer watch per lease would not scale.) Activity inside
leases with an idle timeout comes from ``ActivityWatch`` below, within a budget,
and otherwise from the usage scan's newest ctime.

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

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.observers.inotify_c import InotifyConstants, InotifyEvent, InotifyFD

log = logging.getLogger("scratchd.watcher")

EntryGone = Callable[[str, str], None]  # (pool name, entry name)


class _PoolHandler(FileSystemEventHandler):
    def __init__(self, pool: str, path: str, loop: asyncio.AbstractEventLoop, on_gone: EntryGone) -> None:
        self._pool = pool
        self._path = path
        self._loop = loop
        self._on_gone = on_gone

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in ("deleted", "moved"):
            return
        source = os.fsdecode(event.src_path)
        if os.path.dirname(source) != self._path:
            return
        name = os.path.basename(source)
        if not name.startswith("."):
            self._loop.call_soon_threadsafe(self._on_gone, self._pool, name)


class PoolWatcher:
    def __init__(self, on_gone: EntryGone) -> None:
        self._on_gone = on_gone
        self._observer: BaseObserver = Observer()
        self._watches: dict[str, ObservedWatch] = {}

    def start(self) -> None:
        self._observer.daemon = True
        self._observer.start()

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join(timeout=5)

    def watch(self, pool: str, path: str) -> bool:
        """Watch a pool's directory; False (logged) when inotify refuses, and the GC scan covers for it."""
        if pool in self._watches:
            return True
        real = os.path.realpath(path)
        handler = _PoolHandler(pool, real, asyncio.get_running_loop(), self._on_gone)
        try:
            self._watches[pool] = self._observer.schedule(handler, real, recursive=False)
        except OSError as exc:
            log.warning("cannot watch pool; falling back to periodic checks",
                        extra={"pool": pool, "error": exc.strerror})
            return False
        return True

    def unwatch(self, pool: str) -> None:
        watch = self._watches.pop(pool, None)
        if watch is not None:
            try:
                self._observer.unschedule(watch)
            except (KeyError, OSError):
                pass  # the directory is already gone, and its watch with it


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
