"""The in-process tier's parts: the whole app driven through an ASGI transport, on an injected clock.

The daemon is the real one (real pool directories, SQLite, worker processes), only not
behind a socket: requests reach the app as uvicorn would hand them on, with the peer's
credentials in the scope where ``server.PeerCredProtocol`` puts them. Time is the test's
to move, so a TTL or an idle timeout passes in a call instead of in seconds of waiting.
The guarantees that need a real process (crashes, signals, sockets) stay in
``tests/integration``.
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path
from typing import Any

import httpx
from starlette.types import ASGIApp, Receive, Scope, Send

from scratchd.api.identity import PEER_KEY
from scratchd.daemon import Daemon

START = 1_800_000_000.0


class Clock:
    """Wall time that moves only when told to."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Peer:
    """Puts a Unix peer's (pid, uid, gid) in each request's scope, as the server's protocol does."""

    def __init__(self, app: ASGIApp, uid: int, gid: int) -> None:
        self.app, self.peer = app, (os.getpid(), uid, gid)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope = {**scope, PEER_KEY: self.peer}
        await self.app(scope, receive, send)


class InProcess:
    def __init__(self, daemon: Daemon, app: ASGIApp, clock: Clock) -> None:
        self.daemon, self.app, self.clock = daemon, app, clock

    def client(self, user: str | None = None) -> httpx.AsyncClient:
        """A client that is ``user`` on the Unix socket (the test's own user by default)."""
        entry = pwd.getpwnam(user) if user else pwd.getpwuid(os.geteuid())
        transport = httpx.ASGITransport(app=Peer(self.app, entry.pw_uid, entry.pw_gid))
        return httpx.AsyncClient(transport=transport, base_url="http://scratchd")

    def collect(self) -> None:
        """One GC cycle now, at the clock's time."""
        self.daemon.gc.collect()


def config(tmp_path: Path, **sections: Any) -> dict[str, Any]:
    pool = tmp_path / "pool"
    pool.mkdir(exist_ok=True)
    server = {"socket": str(tmp_path / "unused.sock"), "state_dir": str(tmp_path / "state"), "listen": ""}
    server.update(sections.pop("server", {}))
    return {"server": server, "pool": [{"name": "main", "path": str(pool)}], **sections}
