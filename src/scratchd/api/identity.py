"""Who is calling (docs/security.md, "Callers and roles").

Unix socket: the kernel's word (SO_PEERCRED, put in the ASGI scope by the server's
protocol class), mapped to a user name and groups through the host's user database.
Nothing the peer says about itself counts there, an ``Authorization`` header included.
TCP: a bearer token. The config holds only its sha256, compared in constant time.
"""

from __future__ import annotations

import grp
import hashlib
import hmac
import os
import pwd
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from starlette.requests import Request

from scratchd.config import Config
from scratchd.errors import Refused
from scratchd.tenant import Tenant

PEER_KEY = "scratchd.peer"
# A Unix user's name, groups and role are looked up again after this long: every
# request is too often (NSS may be LDAP), never would keep a user removed from an
# admin group an admin until the daemon restarts.
USER_CACHE_SECONDS = 60.0
USER_CACHE_SIZE = 4096


class Role(StrEnum):
    TENANT = "tenant"
    VIEWER = "viewer"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class Caller:
    role: Role
    tenant: Tenant | None  # None for viewers and admins over TCP: they hold no leases

    @property
    def name(self) -> str:
        return self.tenant.name if self.tenant else self.role.value

    def sees_all(self) -> bool:
        return self.role is not Role.TENANT


ANONYMOUS = Caller(Role.VIEWER, None)


class Identities:
    """Maps Unix peers and bearer tokens to callers under one config."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._tokens = [(bytes.fromhex(token.sha256), token) for token in config.token]
        self._admin_users = {a for a in config.server.admins if not a.startswith("@")}
        self._admin_groups = {a[1:] for a in config.server.admins if a.startswith("@")}
        self._users: dict[tuple[int, int], tuple[float, Caller]] = {}

    def unknown_admins(self) -> list[str]:
        """Admins named in the config that this host does not have (a warning, not an error: docs/configuration.md)."""
        missing = [user for user in self._admin_users if not _exists(pwd.getpwnam, user)]
        missing += ["@" + group for group in self._admin_groups if not _exists(grp.getgrnam, group)]
        return sorted(missing)

    def from_peer(self, uid: int, gid: int) -> Caller:
        """The Unix user behind a socket peer; ``gid`` is the peer's effective group."""
        now = self._clock()
        cached = self._users.get((uid, gid))
        if cached is not None and cached[0] > now:
            return cached[1]
        if len(self._users) >= USER_CACHE_SIZE:
            self._users.clear()
        caller = self._unix_caller(uid, gid)
        self._users[uid, gid] = (now + USER_CACHE_SECONDS, caller)
        return caller

    def _unix_caller(self, uid: int, gid: int) -> Caller:
        try:
            entry = pwd.getpwuid(uid)
        except KeyError:  # no passwd entry (e.g. a container's uid): the number is the name
            name, primary_gid, gids = str(uid), gid, [gid]
        else:
            name, primary_gid = entry.pw_name, entry.pw_gid
            gids = [*os.getgrouplist(name, primary_gid), gid]
        groups = {_group_name(g) for g in gids}
        # root is always an admin: it owns the daemon's files and could do anything anyway.
        admin = uid == 0 or name in self._admin_users or not groups.isdisjoint(self._admin_groups)
        tenant = Tenant(
            name=name, uid=uid, gid=primary_gid, may_bind_any_pid=uid == 0, groups=frozenset(gids)
        )
        return Caller(Role.ADMIN if admin else Role.TENANT, tenant)

    def from_token(self, token: str) -> Caller | None:
        """The caller a bearer token stands for, or None if no configured token matches."""
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for expected, entry in self._tokens:  # no early exit: the time taken says nothing
            if hmac.compare_digest(digest, expected):
                found = entry
        if found is None:
            return None
        role = Role(found.role)
        if role is Role.TENANT:
            # A TCP tenant has no Unix user: its directories belong to the daemon's user.
            return Caller(role, Tenant(name=found.tenant, uid=os.geteuid(), gid=os.getegid()))
        return Caller(role, None)


def authenticate(request: Request, *, anonymous_ok: bool) -> Caller:
    """The caller of ``request``; 401 unless it proved who it is or may stay anonymous.

    ``anonymous_ok`` marks a read, which a TCP caller without a token may make when
    ``server.anonymous = "viewer"``. A token that is sent must be valid even then.
    """
    identities: Identities = request.app.state.identities  # replaced on every config reload
    peer = request.scope.get(PEER_KEY)
    if peer is not None:
        _pid, uid, gid = peer
        return identities.from_peer(uid, gid)
    authorization = request.headers.get("authorization")
    if authorization:
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        caller = identities.from_token(token) if scheme.lower() == "bearer" and token else None
        if caller is None:
            raise Refused(401, "unauthenticated", "The bearer token is not valid.")
        return caller
    if anonymous_ok and identities.config.server.anonymous == "viewer":
        return ANONYMOUS
    raise Refused(401, "unauthenticated", "Send 'Authorization: Bearer <token>'.")


def _exists(lookup: Callable[[str], object], name: str) -> bool:
    try:
        lookup(name)
    except KeyError:
        return False
    return True


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
