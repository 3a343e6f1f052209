"""The ``scratchd`` command and the Python client against a real daemon process."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pty
import pwd
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
from conftest import wait_for

import scratchd

pytestmark = pytest.mark.shared_daemon

SCRATCHD = [sys.executable, "-m", "scratchd"]
CLI_DOC = Path(__file__).parents[2] / "docs" / "cli.md"
HEAVY = ("fastapi", "uvicorn", "pydantic", "starlette", "rich", "watchdog", "http", "typing")


def cli(daemon, *argv: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SCRATCHD, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SCRATCHD_SOCKET": daemon.socket, **(env or {})},
        **kwargs,
    )


def on_a_terminal(daemon, *argv: str, columns: int = 80) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of a command whose stdout is a terminal ``columns`` wide."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = {**os.environ, "SCRATCHD_SOCKET": daemon.socket}
    env.pop("COLUMNS", None)
    process = subprocess.Popen(
        [*SCRATCHD, *argv], stdout=terminal, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env
    )
    os.close(terminal)
    output = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the terminal's last writer has gone
            break
        if not chunk:
            break
        output += chunk
    os.close(controller)
    _, stderr = process.communicate(timeout=60)
    return process.returncode, output.decode().replace("\r\n", "\n"), stderr.decode()


def into_a_closed_pipe(daemon, *argv: str) -> subprocess.CompletedProcess[str]:
    """The command with stdout a pipe whose reader has already gone."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(
            [*SCRATCHD, *argv],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            env={**os.environ, "SCRATCHD_SOCKET": daemon.socket},
        )
    finally:
        os.close(write)


def lease_state(daemon, lease_id: str) -> dict:
    response = daemon.request("GET", f"/v1/leases/{lease_id}")
    assert response.status_code == 200, response.text
    return response.json()


def test_lease_show_ls_renew_release(daemon, tmp_path) -> None:
    created = cli(daemon, "lease", "--json", "--ttl", "10m", "--label", "job=42", "--near", str(tmp_path))
    assert created.returncode == 0, created.stderr
    lease = json.loads(created.stdout)
    assert lease["state"] == "active" and lease["ttl_seconds"] == 600 and lease["labels"] == {"job": "42"}
    assert os.path.isdir(lease["path"])

    shown = cli(daemon, "show", lease["id"], "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["id"] == lease["id"]
    human = cli(daemon, "show", lease["id"])
    assert human.returncode == 0, human.stderr
    assert lease["path"] in human.stdout and "job=42" in human.stdout

    listed = cli(daemon, "ls", "--json")
    assert lease["id"] in [item["id"] for item in json.loads(listed.stdout)["leases"]]
    assert lease["id"] in cli(daemon, "ls").stdout

    renewed = cli(daemon, "renew", lease["id"], "--ttl", "2h")
    assert renewed.returncode == 0, renewed.stderr
    assert lease_state(daemon, lease["id"])["expires_at"] > lease["expires_at"]

    released = cli(daemon, "release", lease["id"])
    assert released.returncode == 0, released.stderr
    ended = lease_state(daemon, lease["id"])
    assert (ended["state"], ended["end_reason"]) == ("ended", "released")
    assert not os.path.exists(lease["path"])
    assert lease["id"] not in cli(daemon, "ls").stdout
    assert lease["id"] in cli(daemon, "ls", "--all").stdout


def test_lease_prints_its_path_and_sends_the_current_directory(daemon, tmp_path) -> None:
    result = cli(daemon, "lease", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    path = result.stdout.strip()
    assert os.path.isdir(path)
    lease = lease_state(daemon, os.path.basename(path))
    assert lease["same_filesystem"] is not None  # `near` was sent


def test_lease_shell_is_eval_able(daemon) -> None:
    lease_cmd = shlex.join([*SCRATCHD, "lease", "--shell", "--tool", "uv", "--tool", "go"])
    script = (
        f'eval "$({lease_cmd})" || exit 10\n'
        'test -d "$SCRATCHD_LEASE_PATH" || exit 11\n'
        'test "$UV_CACHE_DIR" = "$SCRATCHD_LEASE_PATH/uv" && test -d "$UV_CACHE_DIR" || exit 12\n'
        'test -d "$GOTMPDIR" && test "$GOFLAGS" = -modcacherw || exit 13\n'
        'echo "$SCRATCHD_LEASE_ID"\n'
    )
    env = {**os.environ, "SCRATCHD_SOCKET": daemon.socket, "GOFLAGS": ""}
    result = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    assert lease_state(daemon, result.stdout.strip())["state"] == "active"


def test_run_gives_the_command_a_lease_and_releases_it(daemon) -> None:
    script = 'test -d "$SCRATCHD_LEASE_PATH" && test -d "$OUT" && test -d "$UV_CACHE_DIR" && echo "$SCRATCHD_LEASE_ID"'
    result = cli(daemon, "run", "--tool", "uv", "--env", "OUT=build/out", "--", "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    lease = lease_state(daemon, result.stdout.strip())
    assert (lease["state"], lease["end_reason"]) == ("ended", "released")
    assert lease["pid"] is not None
    assert not os.path.exists(lease["path"])


def test_run_exits_with_the_commands_status(daemon) -> None:
    assert cli(daemon, "run", "--", "sh", "-c", "exit 7").returncode == 7


def test_run_reports_a_signal_as_128_plus_n(daemon) -> None:
    assert cli(daemon, "run", "--", "sh", "-c", "kill -KILL $$").returncode == 128 + signal.SIGKILL


def test_run_of_a_missing_command_is_127_and_releases(daemon) -> None:
    result = cli(daemon, "run", "--", "no-such-command-scratchd")
    assert result.returncode == 127
    assert "no-such-command-scratchd" in result.stderr
    assert daemon.request("GET", "/v1/leases").json()["leases"] == []


def test_sigterm_is_forwarded_to_the_command(daemon) -> None:
    process = subprocess.Popen(
        [*SCRATCHD, "run", "--", "sh", "-c", 'echo "$SCRATCHD_LEASE_ID"; exec sleep 60'],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "SCRATCHD_SOCKET": daemon.socket},
    )
    assert process.stdout is not None
    try:
        lease_id = process.stdout.readline().strip()  # the command is running
        assert lease_id
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        process.kill()
        process.wait()
    assert lease_state(daemon, lease_id)["end_reason"] == "released"


def test_run_renews_the_lease_while_the_command_runs(daemon) -> None:
    # A 3 s lease outlives 5 s of work only if it is renewed (every second here).
    script = 'sleep 5; test -d "$SCRATCHD_LEASE_PATH" && echo "$SCRATCHD_LEASE_ID"'
    result = cli(daemon, "run", "--ttl", "3s", "--", "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    assert lease_state(daemon, result.stdout.strip())["end_reason"] == "released"


@pytest.mark.parametrize("command", [["lease"], ["run", "--", "true"]])
def test_a_refusal_is_exit_1_with_the_code(daemon, command: list[str]) -> None:
    result = cli(daemon, command[0], "--pool", "nope", *command[1:])
    assert result.returncode == 1
    assert "pool_not_found" in result.stderr
    assert result.stderr.startswith("scratchd: pool_not_found: ")


def test_unknown_lease_is_exit_1(daemon) -> None:
    result = cli(daemon, "show", "nosuchlease0000000000")
    assert result.returncode == 1
    assert "lease_not_found" in result.stderr


def test_tables_fit_80_columns_on_a_terminal(daemon) -> None:
    for n in range(3):
        daemon.lease(labels={"job": f"build-{n}", "branch": "feature/a-rather-long-branch-name-here"})
    ended = daemon.lease()
    daemon.request("DELETE", f"/v1/leases/{ended['id']}")
    for command in (["ls"], ["ls", "--all"], ["pools"], ["usage"]):
        status, stdout, stderr = on_a_terminal(daemon, *command, columns=80)
        assert status == 0, stderr
        lines = stdout.splitlines()
        assert lines, command
        too_long = [line for line in lines if len(line) > 80]
        assert not too_long, (command, too_long)
    assert ended["id"] in on_a_terminal(daemon, "ls", "--all", columns=80)[1]
    _, narrow, _ = on_a_terminal(daemon, "usage", columns=40)
    totals = narrow[narrow.index("reclaim: ") :].splitlines()  # the lines of totals, after the tables
    assert len(totals) > 2 and all(len(line) <= 40 for line in totals), totals
    assert "released" in " ".join(totals)


def test_off_a_terminal_each_row_is_one_line_however_wide(daemon) -> None:
    branch = "feature/" + "a-very-long-branch-name-" * 8
    leases = [daemon.lease(labels={"job": f"test-shard-{n}", "branch": branch}) for n in range(5)]
    grep = f"{shlex.join(SCRATCHD)} ls | grep job=test-shard-3"
    found = subprocess.run(
        ["sh", "-c", grep],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SCRATCHD_SOCKET": daemon.socket, "COLUMNS": "80"},
    )
    assert found.returncode == 0, found.stderr
    (line,) = found.stdout.splitlines()
    assert line.split()[0] == leases[3]["id"] and f"branch={branch}" in line
    mine = ("--label", f"branch={branch}")  # not other tests' ended leases
    everything = cli(daemon, "ls", "--all", *mine, env={"COLUMNS": "20"}).stdout.splitlines()
    assert len(everything) == 1 + len(leases) and all(f"branch={branch}" in line for line in everything[1:])
    pools = cli(daemon, "pools", env={"COLUMNS": "20"}).stdout.splitlines()
    assert len(pools) == 2 and pools[1].endswith(daemon.pool_path)


CLOSED_PIPE_COMMANDS = [
    ["ls"],
    ["ls", "--json"],
    ["ls", "--all"],
    ["show", "{id}"],
    ["show", "{id}", "--json"],
    ["pools"],
    ["pools", "--json"],
    ["usage"],
    ["usage", "--json"],
    ["events"],
    ["events", "--json"],
    ["events", "--follow"],
    ["events", "-n", "0", "--follow"],
    ["lease"],
    ["lease", "--shell"],
    ["renew", "{id}"],
    ["--help"],
    ["ls", "--help"],
    ["--version"],
    ["run", "--list-tools"],
    ["completion", "bash"],
]


@pytest.mark.parametrize("argv", CLOSED_PIPE_COMMANDS, ids=" ".join)
def test_a_closed_pipe_ends_quietly_with_141(daemon, argv: list[str]) -> None:
    lease = daemon.lease(labels={"job": "x" * 200})
    result = into_a_closed_pipe(daemon, *(arg.format(id=lease["id"]) for arg in argv))
    assert result.stderr == ""
    # argparse's help ignores a failed write, and exits 0 as after any help.
    assert result.returncode in ((0, 141) if "--help" in argv else (141,))


def into_head(daemon, command: str) -> tuple[str, str, str]:
    """``scratchd COMMAND | head -1`` in bash: the line head printed, both exit statuses, stderr."""
    script = f'{shlex.join(SCRATCHD)} {command} | head -1; echo "${{PIPESTATUS[*]}}"'
    result = subprocess.run(
        ["bash", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SCRATCHD_SOCKET": daemon.socket},
    )
    first, status = result.stdout.splitlines()
    return first, status, result.stderr


@pytest.mark.parametrize("command", ["ls", "ls --json", "events --since {since}", "usage"])
def test_piped_into_head_the_status_is_a_shells(daemon, command: str) -> None:
    since = daemon.newest_seq()  # this test's events, not a hint about older ones
    for n in range(40):
        daemon.lease(labels={"job": f"shard-{n}"})
    first, status, stderr = into_head(daemon, command.format(since=since))
    assert first and status in ("0 0", "141 0") and stderr == ""


def test_events_follow_into_head_ends_when_head_does(daemon) -> None:
    since = daemon.newest_seq()  # this test's events, not a hint about older ones
    daemon.lease()
    first, status, stderr = into_head(daemon, f"events --since {since} --follow")
    assert first and status == "141 0" and stderr == ""


def test_events_prints_the_newest_oldest_first_and_says_how_to_see_more(make_daemon) -> None:
    daemon = make_daemon()  # its own: every event it has is counted
    for _ in range(55):
        daemon.lease()
    every = daemon.request("GET", "/v1/events", params={"limit": 1000}).json()["events"]
    seqs = [event["seq"] for event in every]
    assert len(seqs) > 55

    def printed(result: subprocess.CompletedProcess[str]) -> list[int]:
        assert result.returncode == 0, result.stderr
        return [int(line.split()[0]) for line in result.stdout.splitlines()]

    default = cli(daemon, "events")
    assert printed(default) == seqs[-50:]
    assert "-n N" in default.stderr and "--since SEQ" in default.stderr and str(seqs[-50]) in default.stderr
    assert printed(cli(daemon, "events", "-n", "3")) == seqs[-3:]
    everything = cli(daemon, "events", "-n", "100")
    assert printed(everything) == seqs and everything.stderr == ""
    after = cli(daemon, "events", "--since", str(seqs[1]), "-n", "2")
    assert printed(after) == seqs[2:4] and f"--since {seqs[3]}" in after.stderr
    assert printed(cli(daemon, "events", "--since", str(seqs[1]))) == seqs[2:]
    as_json = cli(daemon, "events", "--json", "-n", "2")
    assert json.loads(as_json.stdout) == {"events": every[-2:]}
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # as users run it
    together = subprocess.run(  # `scratchd events >log 2>&1`: the hint follows the rows it is about
        [*SCRATCHD, "events"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
        env={**buffered, "SCRATCHD_SOCKET": daemon.socket},
    ).stdout.splitlines()
    assert len(together) == 51 and together[-1].startswith("scratchd: the newest events"), together[:2]


def test_events_follow_goes_on_from_the_newest(daemon) -> None:
    first, last = daemon.lease(), daemon.lease()
    follower = subprocess.Popen(
        [*SCRATCHD, "events", "-n", "1", "--follow", "--json"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "SCRATCHD_SOCKET": daemon.socket},
    )
    assert follower.stdout is not None
    try:
        assert json.loads(follower.stdout.readline())["lease_id"] == last["id"]
        daemon.request("DELETE", f"/v1/leases/{first['id']}")
        ended = json.loads(follower.stdout.readline())
        assert (ended["kind"], ended["lease_id"]) == ("lease_ended", first["id"])
    finally:
        follower.kill()
        follower.wait()


def test_refusals_say_why_in_the_users_units(make_daemon) -> None:
    me = pwd.getpwuid(os.getuid()).pw_name
    daemon = make_daemon(limits={"max_ttl": "7d"}, tenant=[{"name": me, "max_ttl": "2h"}])
    lease = daemon.lease(ttl_seconds=60)
    said = {
        ("lease", "--ttl", "0"): "invalid_request: Invalid request: ttl_seconds must be ≥ 1.",
        ("lease", "--ttl", "30d"): "invalid_request: --ttl 30d is over the daemon's limit: at most 7d",
        (
            "run",
            "--ttl",
            "200h",
            "--",
            "true",
        ): "invalid_request: --ttl 200h is over the daemon's limit: at most 168h",
        ("lease", "--ttl", "3h"): "quota_exceeded: --ttl 3h is over your tenant's limit: at most 2h",
        (
            "renew",
            lease["id"],
            "--ttl",
            "150m",
        ): "quota_exceeded: --ttl 150m is over your tenant's limit: at most 120m",
        ("lease", "--pool", "nope"): "pool_not_found: ",
    }
    for argv, message in said.items():
        result = cli(daemon, *argv)
        assert result.returncode == 1, (argv, result.stderr)
        assert result.stderr.startswith(f"scratchd: {message}"), (argv, result.stderr)


def test_ls_filters_by_labels(daemon) -> None:
    wanted = daemon.lease(labels={"job": "test-shard-3", "team": "infra"})
    other_team = daemon.lease(labels={"job": "test-shard-3", "team": "web"})
    other_job = daemon.lease(labels={"job": "test-shard-4", "team": "infra"})

    def listed(*labels: str) -> set[str]:
        result = cli(daemon, "ls", "--json", *(arg for label in labels for arg in ("--label", label)))
        assert result.returncode == 0, result.stderr
        return {lease["id"] for lease in json.loads(result.stdout)["leases"]}

    assert listed("job=test-shard-3") == {wanted["id"], other_team["id"]}
    assert listed("job=test-shard-3", "team=infra") == {wanted["id"]}
    assert listed("team=infra") == {wanted["id"], other_job["id"]}
    assert listed("team=infra", "job=nope") == set()
    table = cli(daemon, "ls", "--label", "job=test-shard-3", "--label", "team=infra").stdout
    assert wanted["id"] in table and other_team["id"] not in table


def test_the_docs_curl_recipes(daemon, tmp_path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("needs curl")
    (block,) = [b for b in re.findall(r"```sh\n(.*?)```", CLI_DOC.read_text(), re.S) if "scratchd_run()" in b]
    setup = block.replace("S=/run/scratchd/scratchd.sock", f"S={shlex.quote(daemon.socket)}", 1)
    script = setup + (
        'echo "$id" "$path"\n'
        """scratchd_run sh -c 'test -d "$SCRATCHD_LEASE_PATH" && echo "$SCRATCHD_LEASE_ID"; exit 7'\n"""
        'echo "status $?"\n'
    )
    result = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0 and len(result.stdout.splitlines()) == 3, (result.stdout, result.stderr)
    (by_hand, path), (by_function,), (_, status) = (line.split() for line in result.stdout.splitlines())
    assert status == "7"
    for lease_id in (by_hand, by_function):
        lease = lease_state(daemon, lease_id)
        assert (lease["state"], lease["end_reason"], lease["pid"]) == ("ended", "released", lease["pid"])
        assert lease["pid"] is not None and not os.path.exists(lease["path"])
    assert lease_state(daemon, by_hand)["path"] == path


def test_pools_json_is_the_api_body(daemon) -> None:
    def steady(body: dict) -> dict:
        """Free space moves between two calls on a shared filesystem; everything else may not."""
        return {"pools": [{**pool, "free_bytes": None} for pool in body["pools"]]}

    result = cli(daemon, "pools", "--json")
    assert result.returncode == 0, result.stderr
    assert steady(json.loads(result.stdout)) == steady(daemon.request("GET", "/v1/pools").json())


def test_events_and_follow(daemon) -> None:
    lease = daemon.lease()
    events = json.loads(cli(daemon, "events", "--json").stdout)["events"]
    assert any(e["kind"] == "lease_created" and e["lease_id"] == lease["id"] for e in events)

    follower = subprocess.Popen(
        [*SCRATCHD, "events", "--follow", "--json", "--since", str(events[-1]["seq"])],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "SCRATCHD_SOCKET": daemon.socket},
        # As from a terminal: a suite started in the background (`cmd &` without job
        # control) ignores SIGINT, the follower would inherit that, and Python then
        # leaves it ignored -- rightly, so a Ctrl-C would never reach it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert follower.stdout is not None
    try:
        daemon.request("DELETE", f"/v1/leases/{lease['id']}")
        seen: list[dict] = []
        while not any(e["kind"] == "lease_ended" and e["lease_id"] == lease["id"] for e in seen):
            line = follower.stdout.readline()
            assert line, "follower stopped"
            seen.append(json.loads(line))
        follower.send_signal(signal.SIGINT)
        assert follower.wait(timeout=30) == 0
    finally:
        follower.kill()
        follower.wait()


def test_run_path_imports_nothing_heavy(daemon) -> None:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "scratchd", "run", "--tool", "uv", "--", "true"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SCRATCHD_SOCKET": daemon.socket},
    )
    assert result.returncode == 0, result.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "scratchd.client" in imported
    assert not [name for name in imported if name.split(".")[0] in HEAVY]


def test_over_tcp_with_a_token(make_daemon) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    secret = "ci-secret"
    make_daemon(
        server={"listen": f"127.0.0.1:{port}"},
        token=[
            {
                "name": "ci",
                "sha256": hashlib.sha256(secret.encode()).hexdigest(),
                "role": "tenant",
                "tenant": "ci",
            }
        ],
    )
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "SCRATCHD_SOCKET": "", "SCRATCHD_URL": url}
    run = [*SCRATCHD, "lease", "--json", "--near", "/"]
    refused = subprocess.run(run, capture_output=True, text=True, timeout=60, env=env)
    assert refused.returncode == 1
    assert "unauthenticated" in refused.stderr
    leased = subprocess.run(
        run, capture_output=True, text=True, timeout=60, env={**env, "SCRATCHD_TOKEN": secret}
    )
    assert leased.returncode == 0, leased.stderr
    assert json.loads(leased.stdout)["tenant"] == "ci"


# -- the Python client ---------------------------------------------------------------


def test_lease_context_manager_renews_and_releases(daemon, tmp_path) -> None:
    client = scratchd.Client(socket=daemon.socket)
    with scratchd.lease(near=str(tmp_path), ttl_seconds=60, client=client, labels={"tool": "py"}) as held:
        assert os.path.isdir(held) and held.data["labels"] == {"tool": "py"}
        assert client.get_lease(held.id)["state"] == "active"
    assert not os.path.exists(held.path)
    assert client.get_lease(held.id)["end_reason"] == "released"


def test_a_python_job_killed_by_sigkill_loses_its_lease_within_2_s(daemon) -> None:
    holder = (
        "import sys, time, scratchd\n"
        f"with scratchd.lease(client=scratchd.Client(socket={daemon.socket!r})) as held:\n"
        "    print(held.id, held.data['pid'], flush=True)\n"
        "    time.sleep(120)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    try:
        lease_id, pid = process.stdout.readline().split()
        assert int(pid) == process.pid  # bound to the process that holds it, by default
        process.kill()
        process.wait()
        ended = wait_for(
            lambda: lease_state(daemon, lease_id)["end_reason"], timeout=2 + 3, what="the lease's end"
        )
        assert ended == "process_exited"
    finally:
        process.kill()
        process.wait()


def test_a_python_lease_may_opt_out_of_the_binding(daemon) -> None:
    client = scratchd.Client(socket=daemon.socket)
    with scratchd.lease(pid=None, client=client) as unbound:
        assert unbound.data["pid"] is None
    with scratchd.lease(pid=os.getppid(), client=client) as other:
        assert other.data["pid"] == os.getppid()


def test_lease_context_manager_releases_on_errors(daemon, monkeypatch) -> None:
    monkeypatch.setenv("SCRATCHD_SOCKET", daemon.socket)
    with pytest.raises(RuntimeError), scratchd.lease() as held:
        raise RuntimeError("build failed")
    assert lease_state(daemon, held.id)["end_reason"] == "released"


def test_client_errors_carry_the_envelope(daemon) -> None:
    with scratchd.Client(socket=daemon.socket) as client:
        with pytest.raises(scratchd.ScratchdError) as caught:
            client.create_lease(ttl_seconds="60")
        assert (caught.value.status, caught.value.code) == (422, "invalid_request")
        assert caught.value.message and caught.value.details


def test_client_reconnects_after_the_daemon_restarts(make_daemon) -> None:
    daemon = make_daemon()
    with scratchd.Client(socket=daemon.socket) as client:
        assert client.health()["status"]
        daemon.restart()
        assert client.health()["status"]  # the kept-alive connection was closed
        daemon.restart()
        lease = client.create_lease(ttl_seconds=60)  # a POST, not sent on the dead connection
        assert client.get_lease(lease["id"])["state"] == "active"


def test_client_unreachable(tmp_path) -> None:
    client = scratchd.Client(socket=str(tmp_path / "none.sock"))
    with pytest.raises(scratchd.DaemonUnreachable) as caught:
        client.health()
    assert caught.value.code == "unreachable"
    assert str(tmp_path / "none.sock") in caught.value.message


def test_renewal_keeps_a_short_lease_alive(daemon) -> None:
    with scratchd.lease(ttl_seconds=2, client=scratchd.Client(socket=daemon.socket)) as held:
        first = held.data["expires_at"]
        wait_for(lambda: lease_state(daemon, held.id)["expires_at"] > first, timeout=10, what="a renewal")
        assert lease_state(daemon, held.id)["state"] == "active"
