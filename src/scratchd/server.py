"""Serving: the config, the listening sockets, uvicorn, and the process's signals.

uvicorn does not expose SO_PEERCRED, so the HTTP protocol class reads the peer's
credentials when a Unix-socket connection is made and puts them in every request's
ASGI scope; that is the whole of Unix-socket authentication.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import resource
import signal
import socket
import stat
import struct
import sys
import time

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from scratchd import logs
from scratchd.api.app import create_app
from scratchd.api.identity import PEER_KEY
from scratchd.config import Config, ConfigError, embedded_default, load_config
from scratchd.daemon import Daemon
from scratchd.store import StoreError

log = logging.getLogger("scratchd")

EXIT_CONFIG = 2
EXIT_START = 1


# A request must arrive whole (line, headers, body) within this many seconds of the
# connection, or of its first byte on a kept-alive connection; else the connection is
# closed. uvicorn has no such timeout (its keep-alive timer runs only between requests,
# and any byte cancels it), so a client that connects and sends nothing, or half a
# request line (slow loris), would hold a connection and a file descriptor for ever; the
# socket is 0666, so any local user could. Local clients write a whole request (at most
# api.app.MAX_BODY_BYTES) at once: 10 s is generous even on a loaded host.
REQUEST_DEADLINE_SECONDS = 10.0
_SLOW_LOG_EVERY_SECONDS = 60.0


class HeadWithBody:
    """The connection's transport, writing a response's head together with its first body bytes.

    uvicorn writes the two separately, and over a Unix socket each write can wake the
    client, which reads the head, finds no body and sleeps again: two context switches
    per answer on each side where one does. Once a request is complete the next write
    (the head) is held; the following one, or the end of the response, sends it. A lease
    cycle's p50: 1.05 ms against 1.15 ms with uvicorn's two writes, 884 cycles/s against 819
    for one client (``bench/tricks.py``).
    """

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._hold_next = False
        self._held = b""

    def hold_next_write(self) -> None:
        self._hold_next = True

    def write(self, data: bytes) -> None:
        if self._hold_next:
            self._hold_next, self._held = False, data
            return
        if self._held:
            data, self._held = self._held + data, b""
        self._transport.write(data)

    def flush(self) -> None:
        if self._held:
            self._transport.write(self._held)
            self._held = b""

    def close(self) -> None:
        self.flush()  # uvicorn closes a connection: close before it reports the response complete
        self._transport.close()

    def __getattr__(self, name: str) -> object:
        return getattr(self._transport, name)


class PeerCredProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, which has no hook for a connection's peer, with the peer's
    credentials in every request's scope, a deadline for whole requests, and ``HeadWithBody``.
    It overrides private methods of uvicorn: pyproject.toml pins the versions tested."""

    peer: tuple[int, int, int] | None = None
    _deadline: asyncio.TimerHandle | None = None
    _slow_closed = 0  # connections closed for slowness since the last log line (class-wide)
    _slow_logged_at = -_SLOW_LOG_EVERY_SECONDS

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(HeadWithBody(transport))  # type: ignore[arg-type]
        self._arm_deadline()
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family == socket.AF_UNIX:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            self.peer = struct.unpack("3i", creds)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.cycle is None or self.cycle.response_complete:
            self._arm_deadline()  # bytes of a next request (uvicorn just cancelled its keep-alive timer)
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_deadline()  # a request pipelined behind one in flight
        if self.peer is not None:
            self.scope[PEER_KEY] = self.peer  # type: ignore[literal-required]

    def on_message_complete(self) -> None:
        self._disarm_deadline()
        self.transport.hold_next_write()  # type: ignore[attr-defined]  # the app has the request: next comes a head
        super().on_message_complete()

    def on_response_complete(self) -> None:
        self.transport.flush()  # type: ignore[attr-defined]  # a head without a body (HEAD, 204, 304)
        super().on_response_complete()

    def handle_websocket_upgrade(self) -> None:
        self._disarm_deadline()  # the transport is about to belong to another protocol
        super().handle_websocket_upgrade()

    def _arm_deadline(self) -> None:
        if self._deadline is None:  # never pushed back: trickling bytes does not buy time
            self._deadline = self.loop.call_later(REQUEST_DEADLINE_SECONDS, self._too_slow)

    def _disarm_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        self.transport.close()  # an app waiting for the rest of a body sees a disconnect
        cls = PeerCredProtocol
        cls._slow_closed += 1
        now = time.monotonic()
        if now - cls._slow_logged_at >= _SLOW_LOG_EVERY_SECONDS:  # one line a minute, even under a flood
            log.warning(
                "closed connections that did not send a whole request in time",
                extra={
                    "connections": cls._slow_closed,
                    "deadline_seconds": REQUEST_DEADLINE_SECONDS,
                    "last_peer_pid_uid_gid": self.peer,
                },
            )
            cls._slow_closed, cls._slow_logged_at = 0, now

    def send_400_response(self, msg: str) -> None:
        """Bad HTTP framing gets the same error envelope as everything else (docs/api.md, "Errors")."""
        body = json.dumps(
            {
                "error": {
                    "code": "invalid_request",
                    "message": f"Malformed HTTP request: {msg}",
                    "details": None,
                }
            }
        ).encode()
        self.transport.write(
            b"".join(
                [
                    b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n",
                    b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body),
                    body,
                ]
            )
        )
        self.transport.close()


class StartError(Exception):
    pass


def unix_listener(path: str, mode: int) -> socket.socket:
    """Bind the Unix socket, replacing a stale socket file but never a live one."""
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        os.makedirs(parent, exist_ok=True)
        os.chmod(parent, 0o755)  # every local user must reach the socket; the umask says 0700
    try:
        existing = os.lstat(path)
    except FileNotFoundError:
        existing = None
    if existing is not None:
        if not stat.S_ISSOCK(existing.st_mode):
            raise StartError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise StartError(f"cannot check socket {path}: {exc.strerror}") from None
            os.unlink(path)  # nobody listens: stale
        else:
            raise StartError(f"another daemon is listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, mode)
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def tcp_listener(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def _raise_fd_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit.

    Every client connection holds a descriptor. At a soft limit of 1024 (the usual
    default outside the shipped unit, which sets LimitNOFILE) a thousand idle clients
    exhaust it: libuv then accepts and drops every new connection without a word, and
    the daemon can no longer open lease directories or its database either. Nothing in
    the daemon uses select(), so descriptors above 1024 are safe.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if 0 <= soft < hard:  # RLIM_INFINITY is -1 (and the kernel caps this limit at fs.nr_open anyway)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning(
                "cannot raise the open-files limit", extra={"soft": soft, "hard": hard, "error": str(exc)}
            )


def _load(config_path: str | None) -> Config:
    if config_path is not None:
        return load_config(config_path)
    config = embedded_default()
    log.info(
        "no config file given: running on the embedded default",
        extra={
            "socket": config.server.socket,
            "pool": config.pool[0].path,
            "listen": config.server.listen,
            "state_dir": config.server.state_dir,
        },
    )
    return config


def serve(config_path: str | None, log_level: str = "info") -> int:
    logs.setup(logging.getLevelName(log_level.upper()))
    # Files the daemon makes are its own (the state database names every lease); what
    # tenants must reach (pools, lease directories, the socket) gets its mode explicitly.
    os.umask(0o077)
    _raise_fd_limit()
    try:
        config = _load(config_path)
    except ConfigError as exc:
        print(f"scratchd: bad config: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        sockets = [unix_listener(config.server.socket, int(config.server.socket_mode, 8))]
        if config.server.listen_address:
            sockets.append(tcp_listener(*config.server.listen_address))
    except (StartError, OSError) as exc:
        print(f"scratchd: {exc}", file=sys.stderr)
        return EXIT_START

    try:
        daemon = Daemon(config, config_path)
    except StoreError as exc:  # a state database it must not touch (a later release's), or cannot open
        print(f"scratchd: state database: {exc}", file=sys.stderr)
        for sock in sockets:
            sock.close()
        os.unlink(config.server.socket)
        return EXIT_START
    app = create_app(daemon)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            http=PeerCredProtocol,
            loop="uvloop",
            lifespan="on",
            access_log=False,
            log_config=None,
            timeout_graceful_shutdown=10,
            # No proxy stands in front: X-Forwarded-For from a local TCP client would only let it
            # pose as another address, and the middleware that reads it is on every request's path.
            proxy_headers=False,
            # Idle connections: uvicorn's keep-alive timeout (5 s) closes them between requests,
            # REQUEST_DEADLINE_SECONDS before and during one. limit_concurrency stays off: it
            # counts idle connections too, and answers 503 in plain text, outside the API's
            # error envelope, to every client once a few slow ones hold the slots.
        )
    )
    log.info(
        "serving",
        extra={
            "socket": config.server.socket,
            "listen": config.server.listen or None,
            "pools": [p.name for p in config.pool],
        },
    )
    # uvicorn re-raises the stop signal once it has shut down; a graceful stop exits 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.signal(signal.SIGINT, lambda *_: None)
    try:
        server.run(sockets=sockets)
    finally:
        if os.path.exists(config.server.socket):
            os.unlink(config.server.socket)
    return 0 if server.started else EXIT_START
