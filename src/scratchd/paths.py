"""Where things live by default, for the daemon and its clients alike.

``os.path`` only: a ``scratchd run`` without ``$SCRATCHD_SOCKET`` imports this, and
``pathlib`` would cost it ~5 ms.
"""

from __future__ import annotations

import os

ROOT_SOCKET = "/run/scratchd/scratchd.sock"
ROOT_STATE_DIR = "/var/lib/scratchd"


def default_socket_path(uid: int | None = None) -> str:
    """Root uses /run/scratchd; others their runtime dir, else /tmp/scratchd-$UID (docs/configuration.md)."""
    uid = os.getuid() if uid is None else uid
    if uid == 0:
        return ROOT_SOCKET
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "scratchd", "scratchd.sock")
    return f"/tmp/scratchd-{uid}/scratchd.sock"


def default_state_dir(uid: int | None = None) -> str:
    """Root keeps state in /var/lib; a user in $XDG_STATE_HOME (or ~/.local/state)."""
    uid = os.getuid() if uid is None else uid
    if uid == 0:
        return ROOT_STATE_DIR
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "scratchd")
