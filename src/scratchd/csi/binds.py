"""Bind mounts of lease directories at the kubelet's target paths, through mount(2) and umount2(2).

ctypes rather than ``mount --bind``: a publish is on a pod's start-up path, and two
processes (mount, then a remount for ``nosuid,nodev``) would be most of its time.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os

from scratchd.mounts import read_mounts

MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MNT_DETACH = 0x2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _check(result: int, what: str, path: str) -> None:
    if result != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{what}: {os.strerror(error)}", path)


def bind(source: str, target: str) -> None:
    """Mount ``source`` at ``target`` (created if missing), without set-uid programs or device files."""
    os.makedirs(target, mode=0o750, exist_ok=True)
    _check(_libc.mount(os.fsencode(source), os.fsencode(target), None, MS_BIND, None), "bind mount", target)
    flags = MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV
    try:
        _check(_libc.mount(None, os.fsencode(target), None, flags, None), "remount nosuid,nodev", target)
    except OSError:
        unbind(target)
        raise


def unbind(target: str) -> None:
    """Unmount every mount stacked at ``target``; a target that is no mount (or gone) is fine.

    Busy (a process of the pod still holds a file): detached lazily, so the target can go.
    """
    while is_mount(target):
        if _libc.umount2(os.fsencode(target), 0) != 0:
            error = ctypes.get_errno()
            if error in (errno.EINVAL, errno.ENOENT):
                return
            if error != errno.EBUSY:
                raise OSError(error, f"unmount: {os.strerror(error)}", target)
            _check(_libc.umount2(os.fsencode(target), MNT_DETACH), "lazy unmount", target)


def is_mount(target: str) -> bool:
    """Is something mounted at ``target`` (in this mount namespace)?"""
    path = os.path.realpath(target)
    return any(mount.mount_point == path for mount in read_mounts())


def remove_target(target: str) -> None:
    """Remove the (empty, unmounted) target directory; already gone is fine."""
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(target)
