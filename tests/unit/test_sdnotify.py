"""sd_notify against a real AF_UNIX datagram socket, bound by path and in the abstract namespace."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from scratchd import sdnotify


def _receive(sock: socket.socket) -> str:
    sock.settimeout(2)
    return sock.recv(4096).decode()


@pytest.fixture
def path_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


@pytest.fixture
def abstract_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    name = f"scratchd-test-{secrets.token_hex(8)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        yield sock


def test_unset_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify(sdnotify.READY) is False
    assert sdnotify.ready() is False


@pytest.mark.parametrize("value", ["", "relative.sock", "vsock:2:1234"])
def test_unusable_address_is_a_no_op(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert sdnotify.notify(sdnotify.READY) is False


def test_nobody_listening_is_not_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert sdnotify.notify(sdnotify.READY) is False


def test_path_socket(path_socket: socket.socket) -> None:
    assert sdnotify.ready("serving 2 pools") is True
    assert _receive(path_socket) == "READY=1\nSTATUS=serving 2 pools"
    assert sdnotify.stopping() is True
    assert _receive(path_socket) == "STOPPING=1"
    assert sdnotify.status("reclaiming") is True
    assert _receive(path_socket) == "STATUS=reclaiming"


def test_abstract_socket(abstract_socket: socket.socket) -> None:
    assert sdnotify.ready() is True
    assert _receive(abstract_socket) == "READY=1"


def test_reloading_carries_the_monotonic_clock(path_socket: socket.socket) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sdnotify.reloading() is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    fields = dict(line.split("=", 1) for line in _receive(path_socket).split("\n"))
    assert fields["RELOADING"] == "1"
    assert before <= int(fields["MONOTONIC_USEC"]) <= after


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "{pid}"}, 0.5),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "1"}, None),  # meant for another process
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: float | None
) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value.format(pid=os.getpid()))
    assert sdnotify.watchdog_interval() == expected


def test_watchdog_loop_pings_at_half_the_interval(
    path_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))

    async def run() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(sdnotify.watchdog_loop(), timeout=0.22)

    asyncio.run(run())
    path_socket.setblocking(False)
    pings = []
    while True:
        try:
            pings.append(path_socket.recv(64).decode())
        except BlockingIOError:
            break
    assert pings and set(pings) == {"WATCHDOG=1"}
    assert 2 <= len(pings) <= 6  # due at 0, 0.05, 0.10, 0.15, 0.20 s; a busy machine may run late


def test_watchdog_loop_returns_without_a_watchdog(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    asyncio.run(asyncio.wait_for(sdnotify.watchdog_loop(), timeout=1))
