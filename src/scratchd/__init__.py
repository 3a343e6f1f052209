"""scratchd: lease scratch directories on the right filesystem from a per-host daemon.

For build tools written in Python::

    with scratchd.lease(ttl_seconds=3600) as lease:
        build(cache_dir=lease.path)
"""

from __future__ import annotations

from scratchd.client import Client, DaemonUnreachable, Lease, ScratchdError, lease

__all__ = ["Client", "DaemonUnreachable", "Lease", "ScratchdError", "lease"]
