"""inotify(7) through ctypes: an instance, its watches, and the events read from it.

Ours rather than watchdog's: watchdog's public API costs an inotify instance and a
thread per watched directory, and its one shared instance is internal, changed
between minor versions. An instance here is a non-blocking fd, read on the event loop.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import struct
import time
from typing import NamedTuple

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_Q_OVERFLOW = 0x00004000  # events were dropped; wd is -1
IN_IGNORED = 0x00008000  # the watch is gone (removed, or its directory deleted)
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_ISDIR = 0x40000000

_HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then len bytes of name
READ_SIZE = 64 * 1024  # room for at least 200 events with the longest names

_libc = ctypes.CDLL(None, use_errno=True)
_init1 = _libc.inotify_init1
_init1.argtypes = [ctypes.c_int]
_init1.restype = ctypes.c_int
_add_watch = _libc.inotify_add_watch
_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_add_watch.restype = ctypes.c_int
_rm_watch = _libc.inotify_rm_watch
_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
_rm_watch.restype = ctypes.c_int


class Event(NamedTuple):
    wd: int
    mask: int
    cookie: int
    name: bytes  # empty for an event on the watched directory itself


def parse(buffer: bytes) -> list[Event]:
    """The events in what one ``read`` returned (the kernel never splits one across reads)."""
    events = []
    offset, end, size = 0, len(buffer), _HEADER.size
    while offset + size <= end:
        wd, mask, cookie, length = _HEADER.unpack_from(buffer, offset)
        offset += size
        name = buffer[offset : offset + length].split(b"\0", 1)[0]  # NUL-padded to alignment
        offset += length
        events.append(Event(wd, mask, cookie, name))
    return events


class Inotify:
    """One inotify instance, non-blocking and close-on-exec from its creation: spawned workers never hold it."""

    def __init__(self) -> None:
        fd = _init1(os.O_NONBLOCK | os.O_CLOEXEC)  # IN_NONBLOCK and IN_CLOEXEC are these flags
        if fd < 0:
            raise _errno_error()
        self.fd = fd

    def add_watch(self, path: str | bytes, mask: int) -> int:
        """The watch descriptor; the same one again for a directory already watched."""
        wd = _add_watch(self.fd, os.fsencode(path), mask)
        if wd < 0:
            raise _errno_error(path)
        return wd

    def rm_watch(self, wd: int) -> None:
        """Remove a watch; one the kernel dropped already (its directory deleted) is not an error."""
        if _rm_watch(self.fd, wd) < 0 and ctypes.get_errno() != errno.EINVAL:
            raise _errno_error()

    def read(self) -> list[Event]:
        """Whatever events are queued; none if the queue is empty."""
        try:
            return parse(os.read(self.fd, READ_SIZE))
        except (BlockingIOError, InterruptedError):
            return []

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class OverflowLog:
    """A warning for the first overflow of a burst: a flood overflows the queue at every read."""

    BURST_GAP_SECONDS = 10.0

    def __init__(self, log: logging.Logger, watch: str) -> None:
        self._log = log
        self._watch = watch
        self._last = float("-inf")

    def note(self, then: str) -> None:
        """``then``: what the watch does instead of the lost events."""
        now = time.monotonic()
        if now - self._last >= self.BURST_GAP_SECONDS:
            self._log.warning(f"inotify queue overflowed, events lost: {then}", extra={"watch": self._watch})
        self._last = now


def _errno_error(path: str | bytes | None = None) -> OSError:
    code = ctypes.get_errno()
    return OSError(code, os.strerror(code), path)
