"""Acting as someone else: throwaway Unix users and groups (root only), code run as one of
them, and plain HTTP over the daemon's sockets, down to raw bytes for framing tricks.

A test that speaks as another user forks: the child takes the user's groups, gid and
uid (in that order: after ``setuid`` it could no longer change the others), runs the
given function, and sends back its JSON-able result through a pipe. So the daemon
sees real kernel credentials (SO_PEERCRED) and the filesystem real permission checks.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class User:
    name: str
    uid: int
    gid: int  # primary group


def _unique(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(4)}"  # short: user names are at most 32 characters


@contextlib.contextmanager
def throwaway_group() -> Iterator[str]:
    name = _unique("sdg")
    subprocess.run(["groupadd", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["groupdel", name], check=False)


@contextlib.contextmanager
def throwaway_user(groups: Sequence[str] = ()) -> Iterator[User]:
    """A new user with its own primary group and a home, removed with both afterwards."""
    name = _unique("sdu")
    extra = ["-G", ",".join(groups)] if groups else []
    subprocess.run(["useradd", "-m", "-s", "/usr/sbin/nologin", *extra, name], check=True)
    try:
        entry = pwd.getpwnam(name)
        yield User(name, entry.pw_uid, entry.pw_gid)
    finally:
        subprocess.run(["userdel", "-r", name], check=False, capture_output=True)


@contextlib.contextmanager
def world_traversable_dir() -> Iterator[Path]:
    """A directory under /tmp that every user may pass through (pytest's own tmp_path is root's, 0700)."""
    path = Path(tempfile.mkdtemp(prefix="scratchd-users-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class FailedAsUser(AssertionError):
    """The function run as another user raised something other than an OSError."""


def as_user(user: User, function: Callable[[], T]) -> T:
    """``function()`` run in a child process with ``user``'s credentials; an OSError it raises is raised here."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        outcome: dict[str, Any]
        try:
            os.close(read_end)
            os.initgroups(user.name, user.gid)
            os.setgid(user.gid)
            os.setuid(user.uid)
            outcome = {"result": function()}
        except OSError as exc:
            outcome = {"errno": exc.errno, "strerror": exc.strerror, "filename": exc.filename}
        except BaseException:
            outcome = {"traceback": traceback.format_exc()}
        try:
            with os.fdopen(write_end, "w") as pipe:
                json.dump(outcome, pipe)
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        text = pipe.read()
    os.waitpid(pid, 0)
    outcome = json.loads(text)
    if "errno" in outcome:
        raise OSError(
            outcome["errno"], outcome["strerror"], outcome["filename"]
        )  # PermissionError for EACCES
    if "traceback" in outcome:
        raise FailedAsUser(f"as {user.name}:\n{outcome['traceback']}")
    return outcome["result"]  # type: ignore[no-any-return]


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
        return probe.getsockname()[1]  # type: ignore[no-any-return]


def spawn_as(user: User, seconds: int = 60) -> subprocess.Popen[bytes]:
    """A process of ``user`` that lives for ``seconds`` (for pid binding)."""
    return subprocess.Popen(["sleep", str(seconds)], user=user.uid, group=user.gid, extra_groups=[])
