"""The running daemon: its parts wired together, start-up reconciliation, reload, and pools coming and going.

Everything here runs on the event loop; the only blocking work it starts (tree
deletion, usage scans) goes to worker processes. The GC cycle is ``reclaim.gc``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable

from scratchd import sdnotify
from scratchd.config import Config, ConfigError, load_config
from scratchd.leases import EndReason, Lease
from scratchd.manager import LeaseManager
from scratchd.mounts import MountTable
from scratchd.offload import stop_task
from scratchd.pool_dirs import PoolSet, prepare_pool_dir, probe_reflink
from scratchd.pools import PoolState, PoolStatus
from scratchd.reclaim.deleter import DeleteResult
from scratchd.reclaim.gc import Collector
from scratchd.reclaim.procs import PidWatch
from scratchd.reclaim.trash import Trash, TrashItem
from scratchd.reclaim.watcher import ActivityWatch, PoolWatcher
from scratchd.store import NewEvent, Store, StoreError
from scratchd.usage import UsageMonitor

log = logging.getLogger("scratchd")

# [server] keys a reload cannot apply: the socket and the listener are bound, the state opened.
RESTART_ONLY = frozenset({"socket", "socket_mode", "listen", "state_dir"})


class Daemon:
    def __init__(
        self, config: Config, config_path: str | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.clock = clock
        self.reload_listeners: list[Callable[[Config], None]] = []
        self.store = Store(config.server.state_dir)
        self.mounts = MountTable()
        self.pools = PoolSet(config.pool)
        self.trash = Trash(self._reclaim_failed)
        self.manager = LeaseManager(
            config, self.store, self.pools, self.mounts, self.trash.add, self.trash.removed, clock
        )
        self.manager.listeners.append(self._lease_changed)
        self.pids = PidWatch(self._process_exited)
        self.watcher = PoolWatcher(self._entry_gone, self._removals_missed)
        self.activity = ActivityWatch(self._activity)
        self.gc = Collector(
            self.manager,
            self.pools,
            self.trash,
            self.store,
            gc=lambda: self.config.gc,
            refresh_pools=self._refresh_pools,
            watching=self.watcher.watching,
            clock=clock,
        )
        self.usage = UsageMonitor(
            self.manager,
            self.store,
            directory_gone=self.gc.directory_gone,
            interval=lambda: self.config.gc.interval,
            clock=clock,
        )
        self._gc_task: asyncio.Task[None] | None = None
        self._watchdog_task: asyncio.Task[None] | None = None
        self.ready = False

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        self._refresh_pools()
        self._reconcile()
        self.trash.start()
        self.usage.start()
        loop = asyncio.get_running_loop()
        self._gc_task = loop.create_task(self.gc.run(), name="scratchd-gc")
        self._watchdog_task = loop.create_task(sdnotify.watchdog_loop(), name="scratchd-watchdog")
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        self.ready = True
        sdnotify.ready(f"{len(self.manager.active)} active leases")

    async def stop(self) -> None:
        """Stop background work; every active lease and its directory stay as they are."""
        sdnotify.stopping()
        self.ready = False
        asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        for task in (self._gc_task, self._watchdog_task):
            await stop_task(task)
        await self.usage.stop()
        await self.trash.stop()
        self.pids.close()
        self.activity.close()
        self.watcher.stop()
        self.mounts.close()
        self.pools.close()
        self.store.close()

    def is_ready(self) -> bool:
        """Ready (``/readyz``): started, its state store open, and at least one pool ``ok``."""
        return self.ready and any(p.state is PoolState.OK for p in self.pools.statuses())

    def _reconcile(self) -> None:
        """Bring records and disk into agreement after whatever happened while we were down.

        Kept caches first (``LeaseManager.reconcile_caches``): a keep cut short leaves its lease
        without a directory, which must not take the cache with it. A record whose directory
        is gone ends as ``directory_removed`` (ARCHITECTURE.md, crash safety); a
        bound process that exited (or whose pid now belongs to another process) ends
        its lease as ``process_exited``. Leases of unavailable pools are left for the
        GC loop (``pool_lost``); directories without records are left to orphan review.
        """
        self.manager.reconcile_caches(
            status
            for status in self.pools.statuses()
            if status.state is not PoolState.UNAVAILABLE and self.pools.holds(status.name)
        )
        for lease in list(self.manager.active.values()):
            pool = self.pools.get(lease.pool)
            if pool is not None and pool.state is PoolState.UNAVAILABLE:
                continue
            if not os.path.lexists(lease.path):
                self.manager.end(lease, EndReason.DIRECTORY_REMOVED)
            elif lease.pid is not None and not self.pids.bind(lease.id, lease.pid, lease.pid_start_time):
                self.manager.end(lease, EndReason.PROCESS_EXITED, pid=lease.pid)
            else:
                self.activity.bind(lease.id, lease.path)

    def reload(self) -> bool:
        """SIGHUP: take the config file again (docs/configuration.md); a bad one is refused and changes nothing.

        New pools start taking leases; a dropped pool takes no new ones, and its active
        leases live on until they end. Of ``[server]``, ``admins`` and ``anonymous`` apply
        to the next request; what the daemon bound or opened at start (``RESTART_ONLY``)
        keeps its running value until a restart, and the log names what changed.
        """
        if self.config_path is None:
            log.warning("reload: running on the embedded default, there is no config file to read")
            return False
        sdnotify.reloading()
        try:
            config = load_config(self.config_path)
        except ConfigError as exc:
            log.error("reload refused: bad config; keeping the running one", extra={"error": str(exc)})
            sdnotify.ready("reload refused: bad config")
            return False
        running = self.config.server.model_dump(include=set(RESTART_ONLY))
        if changed := sorted(key for key, value in running.items() if getattr(config.server, key) != value):
            log.warning(
                "reload: these [server] keys take effect at the next restart", extra={"keys": changed}
            )
            config = config.model_copy(update={"server": config.server.model_copy(update=running)})
        old_pools = {p.name for p in self.config.pool}
        self.config = self.manager.config = config
        self.pools.replace_configs(config.pool)
        for name in old_pools - {p.name for p in config.pool}:
            self.watcher.unwatch(name)
        for listener in self.reload_listeners:
            listener(config)
        self._refresh_pools()
        try:
            self.store.append_events(
                [NewEvent("config_reloaded", details={"pools": [p.name for p in config.pool]})], self.clock()
            )
        except StoreError as exc:
            log.warning("cannot record reload", extra={"error": str(exc)})
        log.info("config reloaded", extra={"pools": [p.name for p in config.pool]})
        sdnotify.ready(f"{len(self.manager.active)} active leases")
        return True

    # -- pools coming and going -------------------------------------------------------------

    def _refresh_pools(self) -> None:
        changes = self.pools.refresh(self.mounts.current())
        events = [self._pool_event(old, new) for old, new in changes]
        for _, status in changes:
            if status.state is PoolState.UNAVAILABLE:
                self.watcher.unwatch(status.name)
            elif not self.watcher.watching(status.name) and self.pools.holds(status.name):
                try:
                    prepare_pool_dir(status.path)
                except OSError as exc:  # a read-only pool serves no new leases anyway
                    log.warning(
                        "cannot prepare pool directory", extra={"pool": status.name, "error": exc.strerror}
                    )
                self.pools.set_reflink(status.name, probe_reflink(status.path))
                self.trash.resume(status.name, status.path)
                self.watcher.watch(status.name, status.path)
        if events:
            try:
                self.store.append_events(events, self.clock())
            except StoreError as exc:
                log.warning("cannot record pool state change", extra={"error": str(exc)})

    def _pool_event(self, old: PoolStatus | None, new: PoolStatus) -> NewEvent:
        level = logging.WARNING if new.state is PoolState.UNAVAILABLE else logging.INFO
        log.log(
            level,
            "pool state",
            extra={"pool": new.name, "state": new.state.value, "reason": new.reason, "why": new.message},
        )
        return NewEvent(
            "pool_state_changed",
            pool=new.name,
            reason=new.state.value,
            details={
                "from": old.state.value if old else None,
                "to": new.state.value,
                "reason": new.reason,
                "why": new.message,
            },
        )

    # -- event sources --------------------------------------------------------------------------

    def _lease_changed(self, lease: Lease) -> None:
        if not lease.active:
            self.pids.unbind(lease.id)
            self.activity.unbind(lease.id)
            return
        if lease.id not in self.activity:
            self.activity.bind(lease.id, lease.path)
        if (
            lease.pid is not None
            and lease.id not in self.pids
            and not self.pids.bind(lease.id, lease.pid, lease.pid_start_time)
        ):
            # Exited between the request's check and now.
            asyncio.get_running_loop().call_soon(self._process_exited, lease.id)

    def _activity(self, lease_id: str, at: float) -> None:
        lease = self.manager.active.get(lease_id)
        if lease is not None and (lease.last_activity_at is None or at > lease.last_activity_at):
            lease.last_activity_at = at
        self.usage.written(lease_id, at)

    def _process_exited(self, lease_id: str) -> None:
        lease = self.manager.active.get(lease_id)
        if lease is not None:
            self.manager.end(lease, EndReason.PROCESS_EXITED, pid=lease.pid)

    def _entry_gone(self, pool: str, name: str) -> None:
        lease = self.manager.active.get(name)
        if lease is not None and lease.pool == pool:
            self.gc.directory_gone(lease)

    def _removals_missed(self, pools: set[str]) -> None:
        for lease in list(self.manager.active.values()):
            if lease.pool in pools:
                self.gc.directory_gone(lease)

    # -- reclaim callbacks ----------------------------------------------------------------------

    def _reclaim_failed(self, item: TrashItem, result: DeleteResult | BaseException) -> None:
        if isinstance(result, DeleteResult):
            details = {"path": item.path, "errors": result.errors[:20], "left_mounts": result.left_mounts}
        else:
            details = {"path": item.path, "errors": [repr(result)]}
        log.warning("reclaim failed", extra=details)
        with contextlib.suppress(StoreError):
            self.store.append_events(
                [NewEvent("reclaim_failed", item.lease_id, item.pool, item.tenant, None, details)],
                self.clock(),
            )
