"""Tenants and their quotas: whom a lease is for, and the rules a new or renewed lease must pass.

No I/O: the manager counts what a tenant holds and passes the numbers in; each
rule refuses with the 4xx the API answers.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from typing import Protocol

from scratchd.errors import Refused
from scratchd.leases import Lease

# Without a [[tenant]] entry, one tenant may hold this many active leases: a runaway
# loop must not fill the pool with directories.
DEFAULT_MAX_LEASES_PER_TENANT = 1000


class DirectoryStat(Protocol):
    """What ``may_search`` reads of a directory's ``os.stat_result``."""

    @property
    def st_uid(self) -> int: ...
    @property
    def st_gid(self) -> int: ...
    @property
    def st_mode(self) -> int: ...


class TenantLimits(Protocol):
    """A ``[[tenant]]`` entry's limits; None is no limit of its own."""

    @property
    def max_leases(self) -> int | None: ...
    @property
    def max_bytes(self) -> int | None: ...
    @property
    def max_ttl(self) -> float | None: ...


@dataclass(frozen=True, slots=True)
class Tenant:
    """Whom a lease is for: a name, and the Unix ids its directory is owned by."""

    name: str
    uid: int
    gid: int
    may_bind_any_pid: bool = False
    groups: frozenset[int] = frozenset()

    def may_search(self, directory: DirectoryStat) -> bool:
        """Could this tenant look up names in ``directory``? (mode bits; ACLs are not consulted)"""
        if self.uid == 0:
            return True
        if directory.st_uid == self.uid:
            return bool(directory.st_mode & stat.S_IXUSR)
        if directory.st_gid == self.gid or directory.st_gid in self.groups:
            return bool(directory.st_mode & stat.S_IXGRP)
        return bool(directory.st_mode & stat.S_IXOTH)


def lease_ttl(
    tenant: str, requested: int | None, *, default_ttl: float, max_ttl: float, own: TenantLimits | None
) -> int:
    """The TTL a lease gets: ``requested`` or the default, within the daemon's and the tenant's maximum."""
    ttl = requested if requested is not None else int(default_ttl)
    if ttl > max_ttl:
        raise Refused(
            422,
            "invalid_request",
            f"ttl_seconds may be at most {int(max_ttl)}.",
            {
                "fields": {"ttl_seconds": f"above limits.max_ttl ({int(max_ttl)})"},
                "max_ttl": int(max_ttl),
                "requested": ttl,
            },
        )
    if own is not None and own.max_ttl is not None and ttl > own.max_ttl:
        raise Refused(
            429,
            "quota_exceeded",
            f"Tenant {tenant} may lease for at most {int(own.max_ttl)}s.",
            {"limit": "max_ttl", "max_ttl": int(own.max_ttl), "requested": ttl},
        )
    return ttl


def check_lease_count(tenant: str, held_leases: int, own: TenantLimits | None) -> None:
    """Refuse one more lease to a tenant that holds its maximum already."""
    max_leases = own.max_leases if own and own.max_leases is not None else DEFAULT_MAX_LEASES_PER_TENANT
    if held_leases >= max_leases:
        raise Refused(
            429,
            "quota_exceeded",
            f"Tenant {tenant} already holds {held_leases} active leases.",
            {"limit": "max_leases", "max_leases": max_leases, "active_leases": held_leases},
        )


def check_bytes(tenant: str, held: int, asked: int, max_bytes: int) -> None:
    """Refuse a lease whose charge (``asked``) would take the tenant's (``held``) past ``max_bytes``."""
    if held + asked > max_bytes:
        raise Refused(
            429,
            "quota_exceeded",
            f"Tenant {tenant} would exceed its byte quota.",
            {"limit": "max_bytes", "max_bytes": max_bytes, "held_bytes": held, "requested_bytes": asked},
        )


def tenant_charge(lease: Lease) -> int:
    """What a lease counts against its tenant's byte quota: the larger of what it may use
    (``max_bytes``), said it would use (``expected_bytes``) and is measured to use."""
    return max(lease.max_bytes or 0, lease.expected_bytes or 0, lease.usage.bytes)
