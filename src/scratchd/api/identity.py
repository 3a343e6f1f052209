"""Who is calling (SPEC §5, identity and roles).

Unix socket: the kernel's word (SO_PEERCRED, put in the ASGI scope by the server's
protocol class). TCP: a bearer token, compared by its sha256 in constant time.
"""

from __future__ import annotations

import grp
import hashlib
import hmac
import os
import pwd
from dataclasses import dataclass
from enum import StrEnum

from scratchd.config import Config
from scratchd.errors import Refused
from scratchd.manager import Tenant

PEER_KEY = "scratchd.peer"


class Role(StrEnum):
    TENANT = "tenant"
    VIEWER = "viewer"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class Caller:
    role: Role
    tenant: Tenant | None  # None for viewers and admins over TCP: they own no leases

    @property
    def name(self) -> str:
        return self.tenant.name if self.tenant else self.role.value

    def sees_all(self) -> bool:
        return self.role is not Role.TENANT


class Identities:
    """Maps peers and tokens to callers; cached per uid until the config changes."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._by_uid: dict[int, Caller] = {}
        self._tokens = [(bytes.fromhex(t.sha256.lower()), t) for t in config.token]
        admin_users = {a for a in config.server.admins if not a.startswith("@")}
        self._admin_users = admin_users
        self._admin_groups = {a[1:] for a in config.server.admins if a.startswith("@")}

    def unknown_admins(self) -> list[str]:
        """Admins named in the config that this host does not have (logged, not fatal)."""
        missing = []
        for user in self._admin_users:
            try:
                pwd.getpwnam(user)
            except KeyError:
                missing.append(user)
        for group in self._admin_groups:
            try:
                grp.getgrnam(group)
            except KeyError:
                missing.append("@" + group)
        return sorted(missing)

    def from_peer(self, uid: int, gid: int) -> Caller:
        caller = self._by_uid.get(uid)
        if caller is None:
            caller = self._by_uid[uid] = self._unix_caller(uid, gid)
        return caller

    def _unix_caller(self, uid: int, gid: int) -> Caller:
        try:
            entry = pwd.getpwuid(uid)
            name, primary_gid = entry.pw_name, entry.pw_gid
            groups = {_group_name(g) for g in os.getgrouplist(name, primary_gid)}
        except KeyError:
            name, primary_gid, groups = str(uid), gid, set()
        admin = uid == 0 or name in self._admin_users or bool(groups & self._admin_groups)
        tenant = Tenant(name=name, uid=uid, gid=primary_gid, may_bind_any_pid=uid == 0)
        return Caller(Role.ADMIN if admin else Role.TENANT, tenant)

    def from_token(self, token: str) -> Caller | None:
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for expected, entry in self._tokens:  # no early exit: constant time over all tokens
            if hmac.compare_digest(digest, expected):
                found = entry
        if found is None:
            return None
        role = Role(found.role)
        if role is Role.TENANT:
            # A TCP tenant has no Unix user: its directories belong to the daemon's user.
            return Caller(role, Tenant(name=found.tenant, uid=os.geteuid(), gid=os.getegid()))
        return Caller(role, None)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def caller_from_scope(scope: dict, headers_authorization: str | None, identities: Identities,
                      anonymous_viewer: bool) -> Caller | None:
    """The caller, or None when TCP brought no valid token (the route decides: 401 or viewer)."""
    peer = scope.get(PEER_KEY)
    if peer is not None:
        _pid, uid, gid = peer
        return identities.from_peer(uid, gid)
    if headers_authorization:
        scheme, _, token = headers_authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Refused(401, "unauthenticated", "Use 'Authorization: Bearer <token>'.")
        caller = identities.from_token(token.strip())
        if caller is None:
            raise Refused(401, "unauthenticated", "The token is not valid.")
        return caller
    if anonymous_viewer:
        return Caller(Role.VIEWER, None)
    return None
