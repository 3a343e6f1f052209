"""Processes a lease is bound to: who owns them, when they started, when they exit.

A pid alone is not an identity (pids are reused), so a binding records the process
start time too (field 22 of /proc/PID/stat, in clock ticks since boot) and every
later check compares both. Exit is observed through a pidfd, which becomes readable
when the process ends: no polling.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ProcessIdentity:
    pid: int
    uid: int
    start_time: int


def identify(pid: int) -> ProcessIdentity | None:
    """The live process ``pid`` as (real uid, start time), or None if there is none (zombies and
    threads count as none).

    The real uid, from /proc/PID/status: the owner of /proc/PID is the effective uid,
    and root for non-dumpable processes (ssh-agent, setuid programs).
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read()
        with open(f"/proc/{pid}/status", "rb") as file:
            status = {line.split(b":", 1)[0]: line.split()[1:] for line in file if b":" in line}
        uid, tgid = int(status[b"Uid"][0]), int(status[b"Tgid"][0])
    except (FileNotFoundError, ProcessLookupError, NotADirectoryError, KeyError, IndexError):
        return None
    if tgid != pid:  # a thread's id: /proc answers for it, but it is no process to outlive
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ")".
    fields = stat[stat.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return ProcessIdentity(pid=pid, uid=uid, start_time=int(fields[19]))


def pid_in_daemon_namespace(pid: int, peer_pid: int) -> int | None:
    """The daemon's pid for ``pid`` as the caller (``peer_pid``, from SO_PEERCRED) numbers it.

    A caller in a container sees its own pid namespace: ``scratchd run`` in a pod sends
    ``os.getpid()``, which means another process (or none) out here. SO_PEERCRED's pid
    is already translated by the kernel, and /proc/PID/status lists a process's pid in
    each namespace it lives in (``NSpid:``, outermost first), so a pid the caller sent
    is matched against the innermost column of processes in the caller's namespace.
    None when no such process exists.
    """
    try:
        caller_ns = os.stat(f"/proc/{peer_pid}/ns/pid").st_ino
        if caller_ns == os.stat("/proc/self/ns/pid").st_ino:
            return pid
    except OSError:
        return pid  # the caller is gone or /proc is opaque: take the pid as given
    if _innermost_pid(peer_pid) == pid:
        return peer_pid  # the common case: a process binding its own lease
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and _innermost_pid(int(entry.name)) == pid:
            try:
                if os.stat(f"/proc/{entry.name}/ns/pid").st_ino == caller_ns:
                    return int(entry.name)
            except OSError:
                continue
    return None


def _innermost_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", "rb") as file:
            for line in file:
                if line.startswith(b"NSpid:"):
                    return int(line.split()[-1])
    except (OSError, ValueError):
        pass
    return None


def open_pidfd(pid: int, start_time: int | None) -> int | None:
    """A pidfd for the process that was bound, or None if that process is gone.

    The identity is checked after opening, so a pid reused between the check and the
    open cannot slip through: the fd refers to whatever holds the pid now.
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    current = identify(pid)
    if current is None or (start_time is not None and current.start_time != start_time):
        os.close(fd)
        return None
    return fd


class PidWatch:
    """Ends pid-bound leases when their process exits: each pidfd is a reader on the event loop."""

    def __init__(self, on_exit: Callable[[str], None]) -> None:
        self._on_exit = on_exit
        self._fds: dict[str, int] = {}

    def __contains__(self, lease_id: str) -> bool:
        return lease_id in self._fds

    def bind(self, lease_id: str, pid: int, start_time: int | None) -> bool:
        """Start watching; False when the bound process is already gone."""
        fd = open_pidfd(pid, start_time)
        if fd is None:
            return False
        self._fds[lease_id] = fd
        asyncio.get_running_loop().add_reader(fd, self._exited, lease_id)
        return True

    def unbind(self, lease_id: str) -> None:
        fd = self._fds.pop(lease_id, None)
        if fd is not None:
            asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)

    def close(self) -> None:
        for lease_id in list(self._fds):
            self.unbind(lease_id)

    def _exited(self, lease_id: str) -> None:
        self.unbind(lease_id)
        self._on_exit(lease_id)
