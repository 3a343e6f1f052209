"""Processes a lease is bound to: who owns them, when they started, when they exit.

A pid alone is not an identity (pids are reused), so a binding records the process
start time too (field 22 of /proc/PID/stat, in clock ticks since boot) and every
later check compares both. Exit is observed through a pidfd, which becomes readable
when the process ends: no polling.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ProcessIdentity:
    pid: int
    uid: int
    start_time: int


def identify(pid: int) -> ProcessIdentity | None:
    """The live process ``pid`` as (real uid, start time), or None if there is none (zombies count as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read()
        uid = os.stat(f"/proc/{pid}").st_uid
    except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ")".
    fields = stat[stat.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return ProcessIdentity(pid=pid, uid=uid, start_time=int(fields[19]))


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
