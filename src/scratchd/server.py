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
import signal
import socket
import stat
import struct
import sys

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from scratchd import logs
from scratchd.api.app import create_app
from scratchd.api.identity import PEER_KEY
from scratchd.config import Config, ConfigError, embedded_default, load_config
from scratchd.daemon import Daemon

log = logging.getLogger("scratchd")

EXIT_CONFIG = 2
EXIT_START = 1


class PeerCredProtocol(HttpToolsProtocol):
    peer: tuple[int, int, int] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family == socket.AF_UNIX:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            self.peer = struct.unpack("3i", creds)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.peer is not None:
            self.scope[PEER_KEY] = self.peer  # type: ignore[literal-required]

    def send_400_response(self, msg: str) -> None:
        """Bad HTTP framing gets the same error envelope as everything else (SPEC §5)."""
        body = json.dumps({"error": {"code": "invalid_request", "message": f"Malformed HTTP request: {msg}",
                                     "details": None}}).encode()
        self.transport.write(b"".join([
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n",
            b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body), body,
        ]))
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


def _load(config_path: str | None) -> Config:
    if config_path is not None:
        return load_config(config_path)
    config = embedded_default()
    log.info("no config file given: running on the embedded default",
             extra={"socket": config.server.socket, "pool": config.pool[0].path, "listen": config.server.listen,
                    "state_dir": config.server.state_dir})
    return config


def serve(config_path: str | None) -> int:
    logs.setup()
    # Files the daemon makes are its own (the state database names every lease); what
    # tenants must reach (pools, lease directories, the socket) gets its mode explicitly.
    os.umask(0o077)
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

    daemon = Daemon(config, config_path)
    app = create_app(daemon)
    server = uvicorn.Server(uvicorn.Config(
        app, http=PeerCredProtocol, loop="uvloop", lifespan="on", access_log=False, log_config=None,
        timeout_graceful_shutdown=10,
    ))
    log.info("serving", extra={"socket": config.server.socket, "listen": config.server.listen or None,
                               "pools": [p.name for p in config.pool]})
    # uvicorn re-raises the stop signal once it has shut down; a graceful stop exits 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.signal(signal.SIGINT, lambda *_: None)
    try:
        server.run(sockets=sockets)
    finally:
        if os.path.exists(config.server.socket):
            os.unlink(config.server.socket)
    return 0 if server.started else EXIT_START
