"""Filesystem events: lease directories removed by their users, and writes inside leases.

Two inotify instances of our own (:mod:`scratchd.reclaim.inotify`), each an fd read on
the event loop: no thread, no hop between threads per event. One watches pool
directories: a pool's direct children are its leases, so deletions and renames of lease
directories arrive on the pool's own watch, whatever the number of leases. The other
watches inside leases, within a budget; beyond it, the usage scan's newest ctime and
its periodic pass stand in.

A full queue drops events (``IN_Q_OVERFLOW``); each watch then falls back to what a
scan can tell: the pool watch has every lease of its pools re-checked on disk, the
activity watch reports every lease it watches as written, so each is measured again.

The handler of a removal re-checks the disk, so a rename the daemon made itself (into
the trash) is never mistaken for the user's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable

from scratchd.reclaim.inotify import (
    IN_ATTRIB,
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE,
    IN_DONT_FOLLOW,
    IN_IGNORED,
    IN_ISDIR,
    IN_MODIFY,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_ONLYDIR,
    IN_Q_OVERFLOW,
    Event,
    Inotify,
    OverflowLog,
)

log = logging.getLogger("scratchd.watcher")

EntryGone = Callable[[str, str], None]  # (pool name, entry name)
PoolsLost = Callable[[set[str]], None]  # pools whose removals may have been missed

_POOL_MASK = IN_DELETE | IN_MOVED_FROM | IN_ONLYDIR | IN_DONT_FOLLOW


class _OnLoop:
    """An inotify instance of a watcher's own, made on first use and read on the event loop."""

    def __init__(self, on_events: Callable[[list[Event]], None]) -> None:
        self._on_events = on_events
        self._loop: asyncio.AbstractEventLoop | None = None
        self.inotify: Inotify | None = None  # None until the first watch

    def instance(self) -> Inotify:
        if self.inotify is None:
            inotify = Inotify()
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(inotify.fd, self._read)
            self.inotify = inotify
        return self.inotify

    def close(self) -> None:
        if self.inotify is not None and self._loop is not None:
            self._loop.remove_reader(self.inotify.fd)
            self.inotify.close()
        self.inotify, self._loop = None, None

    def _read(self) -> None:
        if self.inotify is not None:
            self._on_events(self.inotify.read())


class PoolWatcher:
    """Deletions and renames of a pool's entries, read on the event loop itself.

    Every release removes or renames a lease directory, so this fires on every lease
    end; a thread hop per event (GIL hand-off, ``call_soon_threadsafe``, a loop
    wake-up) cost more than the lease's own syscalls. The kernel filters: creations
    never reach user space. Under load, one read drains every event that queued meanwhile.
    """

    def __init__(self, on_gone: EntryGone, on_lost: PoolsLost) -> None:
        self._on_gone = on_gone
        self._on_lost = on_lost
        self._events = _OnLoop(self._handle)
        self._wd_of: dict[str, int] = {}
        self._pools_of: dict[int, set[str]] = {}  # two pools may name one directory
        self._overflows = OverflowLog(log, "pools")

    def stop(self) -> None:
        self._events.close()
        self._wd_of.clear()
        self._pools_of.clear()

    def watch(self, pool: str, path: str) -> bool:
        """Watch a pool's directory; False (logged) when inotify refuses, and the GC scan covers for it."""
        if pool in self._wd_of:
            return True
        try:
            wd = self._events.instance().add_watch(os.path.realpath(path), _POOL_MASK)
        except OSError as exc:
            log.warning(
                "cannot watch pool; falling back to periodic checks",
                extra={"pool": pool, "error": exc.strerror},
            )
            return False
        self._wd_of[pool] = wd
        self._pools_of.setdefault(wd, set()).add(pool)
        return True

    def watching(self, pool: str) -> bool:
        """Whether the pool's removals are reported (else the GC cycle checks its leases' directories)."""
        return pool in self._wd_of

    def unwatch(self, pool: str) -> None:
        wd = self._wd_of.pop(pool, None)
        inotify = self._events.inotify
        if wd is None or inotify is None:
            return
        pools = self._pools_of.get(wd, set())
        pools.discard(pool)
        if not pools:
            self._pools_of.pop(wd, None)
            inotify.rm_watch(wd)

    def _handle(self, events: list[Event]) -> None:
        for event in events:
            if event.mask & IN_Q_OVERFLOW:
                self._overflows.note("re-checking every lease of the watched pools")
                self._on_lost(set(self._wd_of))
            elif event.mask & IN_IGNORED:  # the pool directory itself went: the GC's pool checks
                for pool in self._pools_of.pop(event.wd, set()):
                    self._wd_of.pop(pool, None)
            elif event.name and not event.name.startswith(b"."):
                for pool in tuple(self._pools_of.get(event.wd, ())):
                    self._on_gone(pool, os.fsdecode(event.name))


# Budget for activity watches: a lease with 100k subdirectories must not exhaust the
# host's fs.inotify.max_user_watches (8192 on many distributions, shared by every
# program of the user). Past the budget, the usage scan's newest ctime is the signal.
WATCHES_PER_LEASE = 64
WATCHES_TOTAL = 4096
# One report per lease per this many seconds, however busy the lease.
ACTIVITY_DEBOUNCE_SECONDS = 0.5
_ACTIVITY_MASK = (
    IN_MODIFY
    | IN_CLOSE_WRITE
    | IN_CREATE
    | IN_DELETE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_ATTRIB
    | IN_DONT_FOLLOW
    | IN_ONLYDIR
)
_NEW_DIRECTORY = IN_CREATE | IN_MOVED_TO


class _Lease:
    __slots__ = ("id", "last_report", "wds")

    def __init__(self, lease_id: str) -> None:
        self.id = lease_id
        self.wds: set[int] = set()
        self.last_report = float("-inf")


class ActivityWatch:
    """Writes under active leases, as they happen, within an inotify budget.

    A lease's top directory is watched when it is bound; subdirectories as they are
    created, up to WATCHES_PER_LEASE a lease and WATCHES_TOTAL in all. A lease beyond
    the budget is told of by the usage scan alone (logged once while the budget is spent).
    """

    def __init__(self, on_activity: Callable[[str, float], None]) -> None:
        self._on_activity = on_activity
        self._events = _OnLoop(self._handle)
        self._leases: dict[str, _Lease] = {}
        self._owner: dict[int, tuple[_Lease, bytes]] = {}  # wd -> the lease, and the directory's path
        self._overflows = OverflowLog(log, "activity")
        self._spent = False  # the total budget ran out (logged once until a watch fits again)
        self.watches = 0

    def __contains__(self, lease_id: str) -> bool:
        return lease_id in self._leases

    def bind(self, lease_id: str, path: str) -> None:
        lease = self._leases[lease_id] = _Lease(lease_id)
        self._add(lease, os.fsencode(path))

    def unbind(self, lease_id: str) -> None:
        lease = self._leases.pop(lease_id, None)
        inotify = self._events.inotify
        if lease is None or inotify is None:
            return
        for wd in lease.wds:
            del self._owner[wd]
            inotify.rm_watch(wd)
        self.watches -= len(lease.wds)

    def close(self) -> None:
        self._events.close()
        self._leases.clear()
        self._owner.clear()
        self.watches = 0

    def _add(self, lease: _Lease, path: bytes) -> None:
        if len(lease.wds) >= WATCHES_PER_LEASE:
            return
        if self.watches >= WATCHES_TOTAL:
            if not self._spent:
                self._spent = True
                log.warning(
                    "activity watch budget spent: more leases are measured by the periodic scan alone",
                    extra={"watches": self.watches},
                )
            return
        try:
            wd = self._events.instance().add_watch(path, _ACTIVITY_MASK)
        except OSError:
            return  # gone already, or inotify itself is exhausted: the scan covers for it
        if wd in self._owner:  # one directory reached twice (a bind mount inside): already watched
            return
        self._spent = False
        lease.wds.add(wd)
        self._owner[wd] = (lease, path)
        self.watches += 1

    def _handle(self, events: list[Event]) -> None:
        written: set[_Lease] = set()
        for event in events:
            if event.mask & IN_Q_OVERFLOW:
                self._overflows.note("every watched lease counts as written and is measured again")
                written.update(self._leases.values())
                continue
            owner = self._owner.get(event.wd)
            if owner is None:  # a lease unbound since
                continue
            lease, path = owner
            if event.mask & IN_IGNORED:  # the directory was deleted
                del self._owner[event.wd]
                lease.wds.discard(event.wd)
                self.watches -= 1
                continue
            written.add(lease)
            if event.mask & IN_ISDIR and event.mask & _NEW_DIRECTORY:
                self._add(lease, path + b"/" + event.name)
        if not written:
            return
        now = time.time()
        for lease in written:
            if now - lease.last_report >= ACTIVITY_DEBOUNCE_SECONDS and lease.id in self._leases:
                lease.last_report = now
                self._on_activity(lease.id, now)
