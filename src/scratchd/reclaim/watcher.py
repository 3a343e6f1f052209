"""Filesystem events that end leases: a lease directory removed or renamed away by its user.

One non-recursive watchdog watch per pool directory: a pool's direct children are
its leases, so deletions and renames of lease directories arrive as events on the
pool's own inotify watch, whatever the number of leases. (watchdog runs an emitter
thread and an inotify instance per watch, so a watch per lease would exhaust
``fs.inotify.max_user_instances`` long before the lease count gets interesting.)
Activity *inside* leases is read from the usage scan's newest mtime instead.

Events are handed to the event loop; the handler there re-checks the disk, so a
rename the daemon made itself (into the trash) is never mistaken for the user's.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch

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
