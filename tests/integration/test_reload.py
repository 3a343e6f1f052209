"""What a SIGHUP applies of ``[server]``: who is an admin and what anonymous callers may do,
at the next request; what was bound or opened at start stays as it is until a restart."""

from __future__ import annotations

import os
import signal
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Daemon, needs_root, wait_for
from users import User, call_as, free_port, throwaway_group, throwaway_user, world_traversable_dir


def reloads(daemon: Daemon) -> int:
    events = daemon.request("GET", "/v1/events", params={"limit": 1000}).json()["events"]
    return sum(event["kind"] == "config_reloaded" for event in events)


def reload(daemon: Daemon, **server: Any) -> None:
    """Rewrite ``[server]`` with ``server`` and SIGHUP; return once the reload is recorded."""
    before = reloads(daemon)
    daemon.config["server"].update(server)
    daemon.write_config()
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGHUP)
    wait_for(lambda: reloads(daemon) > before, what="the config_reloaded event")


@pytest.fixture
def shared(make_daemon: Callable[..., Daemon]) -> Iterator[Callable[..., Daemon]]:
    """Daemons whose socket other users can reach (pytest's tmp_path is root's, mode 0700)."""
    with world_traversable_dir() as root:
        counter = iter(range(100))

        def start(**server: Any) -> Daemon:
            run = root / f"d{next(counter)}"
            run.mkdir()
            server.setdefault("socket", str(run / "scratchd.sock"))
            return make_daemon(server=server)

        yield start


@needs_root
def test_admins_apply_at_the_reload_both_ways(shared: Callable[..., Daemon]) -> None:
    with throwaway_group() as group, throwaway_user() as alice, throwaway_user(groups=[group]) as bob:
        daemon = shared(admins=["root"])

        def metrics_status(user: User) -> int:
            return call_as(user, daemon.socket, "GET", "/metrics")[0]  # metrics are for admins and viewers

        assert metrics_status(alice) == metrics_status(bob) == 403
        reload(daemon, admins=["root", alice.name, f"@{group}"])
        assert metrics_status(alice) == metrics_status(bob) == 200
        reload(daemon, admins=["root"])
        assert metrics_status(alice) == metrics_status(bob) == 403
        assert "take effect at the next restart" not in daemon.log()


def test_anonymous_applies_at_the_reload(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon(server={"listen": f"127.0.0.1:{free_port()}", "anonymous": "none"})

    def anonymous_status() -> int:
        return httpx.get(
            f"http://{daemon.config['server']['listen']}/v1/pools", timeout=10, verify=False
        ).status_code

    assert anonymous_status() == 401
    reload(daemon, anonymous="viewer")
    assert anonymous_status() == 200
    reload(daemon, anonymous="none")
    assert anonymous_status() == 401


def test_what_was_bound_at_start_waits_for_a_restart_and_the_log_says_so(
    make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    daemon = make_daemon(server={"socket_mode": "0666"})
    socket_path, state_dir = daemon.socket, daemon.config["server"]["state_dir"]
    lease = daemon.lease()
    reload(
        daemon, socket_mode="0600", listen=f"127.0.0.1:{free_port()}", state_dir=str(tmp_path / "elsewhere")
    )

    assert stat.S_IMODE(os.stat(socket_path).st_mode) == 0o666
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://{daemon.config['server']['listen']}/healthz", timeout=2, verify=False)
    assert daemon.request("GET", f"/v1/leases/{lease['id']}").json()["state"] == "active"  # the same state
    assert not os.path.exists(tmp_path / "elsewhere")
    assert os.path.exists(state_dir)
    warning = next(line for line in daemon.log().splitlines() if "take effect at the next restart" in line)
    for key in ("socket_mode", "listen", "state_dir"):
        assert key in warning, warning
    assert "admins" not in warning and "anonymous" not in warning
