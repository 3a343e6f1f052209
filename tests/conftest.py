"""Shared fixtures: a real daemon process on a real Unix socket, real mounts when root."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

# The daemons, CLIs and workers the tests start load scratchd as pip installs it: compiled once.
# An environment that forbids writing bytecode (PYTHONDONTWRITEBYTECODE, set on some CI images)
# would have each of these processes compile the package again, about 0.1 s of CPU a daemon.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root: mounts, chown and other Unix users")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that starts a real daemon process is ``slow``: every test under ``integration``, and
    any other that asks for ``make_daemon``. ``-m "not slow"`` is the fast tier: the unit tests
    and the in-process ones (``tests/inprocess``)."""
    for item in items:
        if "integration" in item.path.parts or "make_daemon" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


# Tests run in parallel (pytest-xdist) share one host. Every test holds HOST_LOCK shared;
# ``sysctl`` changes a host-wide setting (an inotify limit) only while it holds the lock
# exclusively, so no other test runs during that block, and for no longer. A writer waiting
# at the TURNSTILE keeps new tests out, so it is not starved by tests that follow each other
# back to back. The files are host-wide on purpose: two suites on one host share its sysctls too.
HOST_LOCK = Path("/tmp/scratchd-tests-host.lock")
TURNSTILE = Path("/tmp/scratchd-tests-turnstile.lock")
_host_hold: IO[str] | None = None  # this test's hold on HOST_LOCK


@pytest.fixture(autouse=True)
def _host_share() -> Iterator[None]:
    global _host_hold
    with open(TURNSTILE, "a") as turnstile, open(HOST_LOCK, "a") as host:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        fcntl.flock(host, fcntl.LOCK_SH)
        fcntl.flock(turnstile, fcntl.LOCK_UN)
        _host_hold = host
        try:
            yield
        finally:
            _host_hold = None


@contextlib.contextmanager
def _alone_on_host() -> Iterator[None]:
    """Trade this test's shared hold for the exclusive one for the block, then back."""
    host = _host_hold
    assert host is not None
    # Let go first: a test waiting at the turnstile while holding a share would deadlock
    # with the writer already past it, who waits for every share to go.
    fcntl.flock(host, fcntl.LOCK_UN)
    with open(TURNSTILE, "a") as turnstile:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        fcntl.flock(host, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(host, fcntl.LOCK_SH)


def wait_for(
    condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = "condition"
) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(value)


def to_toml(config: dict[str, Any]) -> str:
    lines: list[str] = []
    for section, body in config.items():
        if isinstance(body, list):
            for item in body:
                lines.append(f"[[{section}]]")
                lines += [f"{k} = {toml_value(v)}" for k, v in item.items()]
        else:
            lines.append(f"[{section}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in body.items()]
    return "\n".join(lines) + "\n"


class Daemon:
    """A real ``scratchd serve`` process with its own config, state dir, socket and pools."""

    def __init__(self, root: Path, config: dict[str, Any]) -> None:
        self.root = root
        self.state_dir = root / "state"
        self.socket = str(root / "run" / "scratchd.sock")
        self.log_path = root / "daemon.log"
        self.config_path = root / "config.toml"
        server: dict[str, Any] = {
            "socket": self.socket,
            "state_dir": str(self.state_dir),
            "listen": "",
            "admins": ["root"],
        }
        server.update(config.pop("server", {}))
        self.socket = server["socket"]
        gc = {"interval": "0.2s", "orphan_grace": "10m"}
        gc.update(config.pop("gc", {}))
        self.config: dict[str, Any] = {"server": server, "gc": gc, **config}
        if "pool" not in self.config:
            pool = root / "pool"
            pool.mkdir()
            self.config["pool"] = [{"name": "main", "path": str(pool)}]
        self.process: subprocess.Popen[bytes] | None = None
        self.log_level: str | None = None  # serve's --log-level, when set
        self.write_config()

    @property
    def pool_path(self) -> str:
        return self.config["pool"][0]["path"]

    def write_config(self) -> None:
        self.config_path.write_text(to_toml(self.config))

    def command(self) -> list[str]:
        level = ["--log-level", self.log_level] if self.log_level else []
        return [sys.executable, "-m", "scratchd", "serve", "--config", str(self.config_path), *level]

    def start(self, wait_ready: bool = True) -> Daemon:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        if wait_ready:
            wait_for(self._ready_or_dead, timeout=20, what=f"daemon ready (log: {self.log_path})")
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited {self.process.returncode}:\n{self.log()}")
        return self

    def _ready_or_dead(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            return True
        try:
            with self.client() as client:
                return client.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, **kwargs: Any) -> httpx.Client:
        # No TLS on a Unix socket: verify=True would build an SSL context, 27 ms of CPU a client,
        # and the readiness poll alone makes one every 20 ms.
        transport = httpx.HTTPTransport(uds=self.socket, verify=False)
        kwargs.setdefault("timeout", 10)
        return httpx.Client(transport=transport, base_url="http://scratchd", **kwargs)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        with self.client() as client:
            return client.request(method, path, **kwargs)

    def pool(self, name: str) -> dict[str, Any]:
        """One pool as ``/v1/pools`` describes it."""
        return next(p for p in self.request("GET", "/v1/pools").json()["pools"] if p["name"] == name)

    def pool_up(self, name: str) -> float:
        """``scratchd_pool_up`` of one pool, as scraped."""
        prefix = f'scratchd_pool_up{{pool="{name}"}}'
        line = next(
            line for line in self.request("GET", "/metrics").text.splitlines() if line.startswith(prefix)
        )
        return float(line.split()[-1])

    def pool_entries(self) -> set[str]:
        """What the first pool holds besides its own directories (``.trash``, ``.caches``)."""
        return {name for name in os.listdir(self.pool_path) if not name.startswith(".")}

    def newest_seq(self) -> int:
        """The newest event's seq (0 before any): a test on a shared daemon reads what came after."""
        newest = self.request("GET", "/v1/events", params={"order": "desc", "limit": 1}).json()["events"]
        return newest[0]["seq"] if newest else 0

    def lease(self, **body: Any) -> dict[str, Any]:
        response = self.request("POST", "/v1/leases", json=body)
        assert response.status_code == 201, response.text
        return response.json()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"daemon did not stop on {sig}:\n{self.log()}") from None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> Daemon:
        if self.process is not None and self.process.poll() is None:
            self.stop()
        return self.start()


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []
    counter = iter(range(100))

    def make(start: bool = True, **config: Any) -> Daemon:
        root = tmp_path / f"d{next(counter)}"
        root.mkdir()
        daemon = Daemon(root, config)
        started.append(daemon)
        return daemon.start() if start else daemon

    yield make
    for daemon in started:
        if daemon.process is not None and daemon.process.poll() is None:
            with contextlib.suppress(AssertionError):
                daemon.stop()


@pytest.fixture(scope="session")
def _worker_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    # Started in the setup of the first test that asks, under that test's share of the host:
    # never while a sysctl block holds an inotify limit at 0.
    daemon = Daemon(tmp_path_factory.mktemp("shared"), {}).start()
    yield daemon
    if daemon.process is not None and daemon.process.poll() is None:
        daemon.stop()


def _quiesce(daemon: Daemon) -> None:
    """End every lease, drop every kept cache and wait for the trash to drain: the next test
    starts with nothing active, as on a fresh daemon."""
    for lease in daemon.request("GET", "/v1/leases").json()["leases"]:
        assert daemon.request("DELETE", f"/v1/leases/{lease['id']}").status_code == 200
    for cache in daemon.request("GET", "/v1/caches").json()["caches"]:
        assert daemon.request("DELETE", f"/v1/caches/{cache['id']}").status_code == 200
    trash = Path(daemon.pool_path, ".trash")
    wait_for(lambda: not any(trash.iterdir()), what=f"{trash} drained")
    assert not (strays := daemon.pool_entries()), f"left in the shared daemon's pool, not a lease: {strays}"


@pytest.fixture
def daemon(request: pytest.FixtureRequest, make_daemon: Callable[..., Daemon]) -> Iterator[Daemon]:
    """A daemon on the default config: the test's own or, for a test or module marked
    ``shared_daemon``, this test worker's one, shared by tests that neither stop it nor
    change its config.

    A start costs about 0.9 s of CPU, and a third of the suite's went to starts. A shared test
    finds no active lease, no kept cache and an empty trash, as on a fresh daemon; it may find
    other tests' ended leases, events and counters, and must not count on their absence.
    """
    if request.node.get_closest_marker("shared_daemon") is None:
        yield make_daemon()
        return
    shared: Daemon = request.getfixturevalue("_worker_daemon")
    yield shared
    assert shared.process is not None
    if shared.process.poll() is not None:
        shared.start()
        pytest.fail("the test stopped the shared daemon: a test that stops one takes make_daemon")
    _quiesce(shared)


QUEUED_EVENTS = Path("/proc/sys/fs/inotify/max_queued_events")
needs_queue_sysctl = pytest.mark.skipif(
    not (IS_ROOT and os.access(QUEUED_EVENTS, os.W_OK)),
    reason=f"needs root and a writable {QUEUED_EVENTS} to make an inotify queue overflow",
)


@contextlib.contextmanager
def sysctl(path: Path, value: int) -> Iterator[None]:
    """Set a ``/proc/sys`` value host-wide for the block, then put the old one back; no other test
    runs meanwhile. For inotify limits, instances created in the block (a daemon started there,
    say) keep it for life."""
    with _alone_on_host():
        original = path.read_text()
        path.write_text(f"{value}\n")
        try:
            yield
        finally:
            path.write_text(original)


@contextlib.contextmanager
def mounted(*args: str) -> Iterator[None]:
    """``mount ARGS…`` for the duration (root only); the last argument is the target."""
    subprocess.run(["mount", *args], check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", args[-1]], check=False, capture_output=True)


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "16m", options: str = "") -> Iterator[Path]:
    """A real tmpfs mounted at ``path`` for the duration (root only)."""
    path.mkdir(parents=True, exist_ok=True)
    with mounted(
        "-t", "tmpfs", "-o", f"size={size}" + (f",{options}" if options else ""), "tmpfs", str(path)
    ):
        yield path


@contextlib.contextmanager
def bind_mount(source: Path, target: Path) -> Iterator[Path]:
    target.mkdir(parents=True, exist_ok=True)
    with mounted("--bind", str(source), str(target)):
        yield target
