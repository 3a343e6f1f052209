"""The systemd notify protocol (sd_notify(3)) in the standard library.

libsystemd is not a dependency worth having for one datagram: a notification is
``KEY=VALUE`` lines sent to the socket named by ``$NOTIFY_SOCKET``. Outside
systemd (a terminal, a container, the tests) every call is a cheap no-op, so the
daemon calls these unconditionally.

The unit is ``Type=notify`` with ``ExecReload=kill -HUP``, not ``Type=notify-reload``:
the latter needs systemd 253, newer than what Debian 12, Ubuntu 22.04 and RHEL 9
ship. ``reloading()`` still sends ``MONOTONIC_USEC``, which notify-reload
requires, so switching the unit later needs no code change.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

READY = "READY=1"
STOPPING = "STOPPING=1"
WATCHDOG = "WATCHDOG=1"


def notify(state: str) -> bool:
    """Send ``state`` (newline-separated assignments) to systemd; False when there is nobody to tell.

    A failure to notify is never fatal: the service manager is a spectator of the
    daemon's work, and systemd acts on a missed READY by its own timeout.
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        address = "\0" + address[1:]  # Linux abstract namespace
    elif not address.startswith("/"):
        return False  # unset, or a transport (vsock) this daemon does not speak
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode(), address)
    except OSError:
        return False
    return True


def ready(status: str | None = None) -> bool:
    """Start-up (or a reload) is complete: the sockets listen and the pools were looked at."""
    return notify(READY + (f"\nSTATUS={status}" if status else ""))


def reloading() -> bool:
    """A SIGHUP reload has begun; ``ready()`` ends it. The timestamp is what notify-reload matches."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")


def stopping() -> bool:
    return notify(STOPPING)


def status(text: str) -> bool:
    """A one-line status that ``systemctl status`` shows."""
    return notify(f"STATUS={text}")


def watchdog_interval() -> float | None:
    """Seconds within which systemd wants a ``WATCHDOG=1``, or None when no watchdog is armed.

    ``$WATCHDOG_PID`` names the process the watchdog is meant for; a child that
    inherited the environment must not ping on its parent's behalf.
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid is not None and pid != str(os.getpid()):
        return None
    return int(usec) / 1_000_000


async def watchdog_loop() -> None:
    """Ping at half the interval for as long as the event loop runs; returns at once without a watchdog.

    Run as a task on the event loop itself, so a loop that hangs stops the pings
    and systemd restarts the daemon.
    """
    interval = watchdog_interval()
    if interval is None:
        return
    while True:
        notify(WATCHDOG)
        await asyncio.sleep(interval / 2)
