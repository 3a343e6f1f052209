"""The CLI without a daemon: parsing, request fields, exit codes, and a light import path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchd import cli
from scratchd.presets import PRESETS

MISSING_SOCKET = "/nonexistent/x.sock"
HEAVY = ("fastapi", "uvicorn", "pydantic", "starlette", "rich", "watchdog", "http.client", "typing", "dataclasses")


def parse(*argv: str):
    return cli.parse_args(argv)


def scratchd(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scratchd", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_lease_options_become_request_fields(tmp_path: Path) -> None:
    args = parse(
        "lease", "--near", str(tmp_path), "--pool", "nvme", "--placement", "same-filesystem",
        "--ttl", "2h", "--idle", "15m", "--max-size", "10G", "--expect", "512M", "--evictable",
        "--label", "job=42", "--label", "team=infra", "--pid", "123",
    )  # fmt: skip
    assert cli._lease_request(args) == {
        "near": str(tmp_path),
        "pool": "nvme",
        "placement": "same-filesystem",
        "ttl_seconds": 7200,
        "idle_timeout_seconds": 900,
        "max_bytes": 10 << 30,
        "expected_bytes": 512 << 20,
        "evictable": True,
        "labels": {"job": "42", "team": "infra"},
    }
    assert args.pid == 123


def test_without_near_the_current_directory_is_sent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli._lease_request(parse("lease")) == {"near": str(tmp_path)}


def test_a_relative_near_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli._lease_request(parse("run", "--near", "venv", "--", "true"))["near"] == str(tmp_path / "venv")


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("90s", 90), ("15m", 900), ("1.5s", 2), ("7d", 604800)])
def test_durations_are_whole_seconds_rounded_up(text: str, seconds: int) -> None:
    assert parse("lease", "--ttl", text).ttl == seconds


def test_run_takes_the_command_after_double_dash() -> None:
    args = parse("run", "--ttl", "1h", "--tool", "uv", "--env", "BUILD=out/x", "--", "sh", "-c", "exit 7")
    assert args.cmd == ["--", "sh", "-c", "exit 7"]
    assert args.tool == ["uv"]
    assert args.env == [("BUILD", "out/x")]


def test_env_without_subdir_is_the_lease_itself() -> None:
    assert parse("run", "--env", "CACHE", "--", "true").env == [("CACHE", "")]


@pytest.mark.parametrize("where", ["before", "after"])
def test_socket_option_before_or_after_the_command(where: str) -> None:
    argv = ["--socket", "/s.sock", "ls"] if where == "before" else ["ls", "--socket", "/s.sock"]
    args = parse(*argv)
    assert args.socket == "/s.sock"
    assert args.url is None


@pytest.mark.parametrize(
    "argv",
    [
        ["lease", "--ttl", "3x"],
        ["lease", "--ttl", "-5"],
        ["lease", "--max-size", "lots"],
        ["lease", "--expect", "1.5TiBs"],
        ["lease", "--idle", ""],
        ["lease", "--placement", "nearby"],
        ["lease", "--label", "novalue"],
        ["lease", "--json", "--shell"],
        ["lease", "--pid", "me"],
        ["run", "--env", "1BAD", "--", "true"],
        ["run", "--env", "X=../escape", "--", "true"],
        ["run", "--env", "X=/abs", "--", "true"],
        ["renew"],
        ["frobnicate"],
        [],
    ],
)
def test_bad_input_is_a_usage_error(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main([*argv])
    assert caught.value.code == 2


def test_unknown_tool_is_exit_2_listing_the_known_ones() -> None:
    result = scratchd("--socket", MISSING_SOCKET, "run", "--tool", "nope", "--", "true")
    assert result.returncode == 2
    assert "nope" in result.stderr
    for tool in PRESETS:
        assert tool in result.stderr


def test_run_without_a_command_is_exit_2() -> None:
    result = scratchd("--socket", MISSING_SOCKET, "run", "--ttl", "1h", "--")
    assert result.returncode == 2
    assert "needs a command" in result.stderr


def test_a_bad_url_is_exit_2() -> None:
    result = scratchd("--url", "ftp://example.org", "ls")
    assert result.returncode == 2
    assert "ftp://example.org" in result.stderr


def test_list_tools_prints_every_preset_without_a_daemon() -> None:
    result = scratchd("--socket", MISSING_SOCKET, "run", "--list-tools")
    assert result.returncode == 0, result.stderr
    listed = {line.split()[0] for line in result.stdout.splitlines()[1:]}
    assert listed == set(PRESETS)
    assert "UV_LINK_MODE=copy" in result.stdout and "UV_LINK_MODE=clone" in result.stdout
    assert "{npm,pnpm}_config_package_import_method=clone" in result.stdout
    assert "symlink" not in result.stdout


@pytest.mark.parametrize(
    "argv",
    [
        ["ls"],
        ["lease"],
        ["run", "--", "true"],
        ["show", "abc"],
        ["pools", "--json"],
        ["events"],
    ],
)
def test_missing_socket_is_exit_3_naming_it(argv: list[str]) -> None:
    result = scratchd("--socket", MISSING_SOCKET, *argv)
    assert result.returncode == 3, result.stderr
    assert MISSING_SOCKET in result.stderr
    assert "Traceback" not in result.stderr


def test_socket_from_the_environment() -> None:
    result = scratchd("ls", env={"SCRATCHD_SOCKET": MISSING_SOCKET, "SCRATCHD_URL": "http://127.0.0.1:9"})
    assert result.returncode == 3
    assert MISSING_SOCKET in result.stderr


def test_url_when_no_socket_is_given() -> None:
    # Port 9 (discard) on loopback: nothing listens, the connection is refused.
    result = scratchd("ls", env={"SCRATCHD_SOCKET": "", "SCRATCHD_URL": "http://127.0.0.1:9"})
    assert result.returncode == 3
    assert "http://127.0.0.1:9" in result.stderr


def test_run_path_imports_nothing_heavy() -> None:
    """`scratchd run` starts on every CI job: no server stack, no rich, no http.client."""
    code = (
        "import sys\n"
        "from scratchd.cli import main\n"
        f"code = main(['--socket', {MISSING_SOCKET!r}, 'run', '--tool', 'uv', '--ttl', '1h', '--', 'true'])\n"
        "print(code)\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    exit_code, modules = result.stdout.splitlines()
    assert exit_code == "3", result.stderr
    loaded = set(modules.split())
    assert "scratchd.client" in loaded
    assert not [name for name in loaded if name.split(".")[0] in HEAVY or name in HEAVY]
    assert "json" not in loaded  # 5 ms: the client speaks JSON through _json, the C accelerator


def test_the_clients_json_is_the_json_modules() -> None:
    """What the client sends and reads through _json is exactly what the json package would."""
    import json

    from scratchd import client

    bodies = [{}, {"near": "/home/ünï/src", "labels": {"k": "a\"b\\c\n\u2028"}, "ttl_seconds": 3600,
                   "evictable": True, "max_bytes": None, "ratio": 0.5, "list": [1, [2, {}]]}]
    for body in bodies:
        assert client._dumps(body) == json.dumps(body)
        assert client._loads(json.dumps(body).encode()) == body
        assert client._loads(f" {json.dumps(body, indent=2)}\n".encode()) == body
    for not_json in (b"{", b"{} {}", b"NaN", b"[Infinity]", b"{'a': 1}", b"\xff", b"[1,]"):
        with pytest.raises(ValueError):
            client._loads(not_json)
    with pytest.raises(ValueError):
        client._dumps({"x": float("nan")})
    with pytest.raises(TypeError, match="cannot be sent as JSON"):
        client._dumps({"x": object()})


def test_importtime_of_the_cli_lists_nothing_heavy() -> None:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import scratchd.cli, scratchd.client, scratchd.presets"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert not [name for name in imported if name.split(".")[0] in HEAVY or name in HEAVY]


RUN_TOKENS = ["--ttl", "2h", "--ttl=90s", "--idle=5m", "--pool", "p", "--near", "/tmp", "--label", "a=b", "--label=c",
              "--tool", "uv", "--tool=nope", "--env", "X", "--env=Y=sub", "--evictable", "--evictable=1", "-v",
              "--verbose", "--placement", "any", "--placement=far", "--max-size", "1G", "--expect", "x", "--",
              "make", "-j4", "--socket", "/s", "--url=http://h", "--po", "--p", "-", "-vx", "--list-tools", "-h"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(RUN_TOKENS), max_size=8))
def test_runs_quick_parse_reads_what_argparse_reads(argv: list[str]) -> None:
    """_quick_parse may decline (argparse then parses), but what it reads must be argparse's reading."""
    def namespace():
        return cli.SimpleNamespace(socket=None, url=None, command="run")

    quick = cli._quick_parse(list(argv), (*cli.WHERE_OPTIONS, *cli.RUN_OPTIONS), "cmd", namespace())
    if quick is not None:
        assert vars(quick) == vars(cli.command_parser("run").parse_args(list(argv), namespace=namespace()))


def test_client_errors_survive_pickling() -> None:
    """A multiprocessing pool of clients hung when a worker raised one it could not send back."""
    import pickle

    from scratchd.client import DaemonUnreachable, ScratchdError

    refused = pickle.loads(pickle.dumps(ScratchdError(404, "lease_not_found", "No lease.", {"id": "x"})))
    assert (refused.status, refused.code, refused.message, refused.details) == (404, "lease_not_found", "No lease.",
                                                                                {"id": "x"})
    gone = pickle.loads(pickle.dumps(DaemonUnreachable("/run/s.sock", "no such file")))
    assert (gone.address, gone.reason, str(gone)) == ("/run/s.sock", "no such file",
                                                      "unreachable: cannot reach scratchd at /run/s.sock: no such file")
