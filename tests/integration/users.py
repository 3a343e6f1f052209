"""Acting as someone else: throwaway Unix users and groups (root only), code run as one of
them (``forked.run_as``: real kernel credentials for SO_PEERCRED and the disk's permission
checks), and plain HTTP over the daemon's sockets, down to raw bytes for framing tricks.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import json
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from forked import run_as

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class User:
    name: str
    uid: int
    gid: int  # primary group


# Tests running in parallel add and remove users at once: shadow-utils refuses to wait for
# each other's lock on /etc/passwd ("cannot lock /etc/passwd; try again later").
_PASSWD_LOCK = Path("/tmp/scratchd-tests-passwd.lock")


def _passwd(*argv: str, check: bool = True) -> None:
    """``useradd``/``userdel``/``groupadd``/``groupdel``, one at a time across test processes."""
    with open(_PASSWD_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        subprocess.run(argv, check=check, capture_output=not check)


def _unique(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(4)}"  # short: user names are at most 32 characters


@contextlib.contextmanager
def throwaway_group() -> Iterator[str]:
    name = _unique("sdg")
    _passwd("groupadd", name)
    try:
        yield name
    finally:
        _passwd("groupdel", name, check=False)


@contextlib.contextmanager
def throwaway_user(groups: Sequence[str] = ()) -> Iterator[User]:
    """A new user with its own primary group and a home, removed with both afterwards."""
    name = _unique("sdu")
    extra = ["-G", ",".join(groups)] if groups else []
    _passwd("useradd", "-m", "-s", "/usr/sbin/nologin", *extra, name)
    try:
        entry = pwd.getpwnam(name)
        yield User(name, entry.pw_uid, entry.pw_gid)
    finally:
        _passwd("userdel", "-r", name, check=False)


@contextlib.contextmanager
def world_traversable_dir() -> Iterator[Path]:
    """A directory under /tmp that every user may pass through (pytest's own tmp_path is root's, 0700)."""
    path = Path(tempfile.mkdtemp(prefix="scratchd-users-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def as_user(user: User, function: Callable[[], T]) -> T:
    """``function()`` run in a forked child with ``user``'s credentials (``forked.run_as``)."""
    return run_as(user.uid, user.gid, function, user=user.name)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: str, timeout: float) -> None:
        super().__init__("scratchd", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


def call(socket_path: str, method: str, path: str, body: Any = None, timeout: float = 10) -> tuple[int, Any]:
    """One request over the Unix socket with the standard library: ``(status, decoded JSON or None)``."""
    connection = _UnixConnection(socket_path, timeout)
    try:
        headers = {"content-type": "application/json"} if body is not None else {}
        connection.request(method, path, json.dumps(body) if body is not None else None, headers)
        response = connection.getresponse()
        data = response.read()
    finally:
        connection.close()
    is_json = response.getheader("content-type", "").startswith("application/json")
    return response.status, json.loads(data) if data and is_json else None


def calls_as(user: User, socket_path: str, requests: Sequence[tuple[str, str, Any]]) -> list[tuple[int, Any]]:
    """Several ``(method, path, body)`` requests as ``user``, in order, in one child process."""
    answers = as_user(user, lambda: [call(socket_path, *request) for request in requests])
    return [(status, body) for status, body in answers]  # JSON made the pairs lists


def call_as(user: User, socket_path: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    return calls_as(user, socket_path, [(method, path, body)])[0]


def raw_http(socket_path: str, request: bytes, answers: int = 1) -> list[tuple[int, dict[str, str], bytes]]:
    """Send raw bytes (one request, or several pipelined) and read ``answers`` answers:
    ``(status, headers with lower-case names, body)`` each."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(socket_path)
        sock.sendall(request)
        reader = sock.makefile("rb")
        found = []
        for _ in range(answers):
            status = int(reader.readline().split()[1])
            headers = {}
            while (line := reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            found.append((status, headers, reader.read(int(headers.get("content-length", 0)))))
        return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now (for ``server.listen``)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def spawn_as(user: User, seconds: int = 60) -> subprocess.Popen[bytes]:
    """A process of ``user`` that lives for ``seconds`` (for pid binding)."""
    return subprocess.Popen(["sleep", str(seconds)], user=user.uid, group=user.gid, extra_groups=[])
