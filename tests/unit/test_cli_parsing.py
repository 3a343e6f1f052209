"""The CLI without a daemon: parsing, request fields, exit codes, and a light import path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchd import cli
from scratchd.client import Client, keeps
from scratchd.client import lease as scratchd_lease
from scratchd.presets import PRESETS

MISSING_SOCKET = "/nonexistent/x.sock"
HEAVY = (
    "fastapi",
    "uvicorn",
    "pydantic",
    "starlette",
    "rich",
    "watchdog",
    "http.client",
    "typing",
    "dataclasses",
)


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


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("90s", 90), ("15m", 900), ("1.5s", 2), ("7d", 604800)]
)
def test_durations_are_whole_seconds_rounded_up(text: str, seconds: int) -> None:
    assert parse("lease", "--ttl", text).ttl == seconds


def test_cache_options_become_request_fields() -> None:
    args = parse(
        "lease",
        "--cache-key",
        "uv-linux:3.11/lock=ab12",
        "--cache-fallback",
        "uv-linux:3.11/",
        "--cache-fallback=uv-",
    )
    assert cli._lease_request(args) == {
        "near": os.getcwd(),
        "cache_key": "uv-linux:3.11/lock=ab12",
        "cache_fallback": ["uv-linux:3.11/", "uv-"],
    }
    run = parse("run", "--cache-key", "k", "--keep", "never", "--", "make")
    assert (run.cache_key, run.keep, run.cmd) == ("k", "never", ["--", "make"])


@pytest.mark.parametrize(
    ("keep", "succeeded", "kept"),
    [("success", True, True), ("success", False, False), ("always", False, True), ("never", True, False)],
)
def test_when_a_cache_is_kept(keep: str, succeeded: bool, kept: bool) -> None:
    assert keeps(keep, succeeded) is kept


def test_release_discard_and_caches_options() -> None:
    assert parse("release", "L1").discard is False and parse("release", "L1", "--discard").discard is True
    listing = parse("caches", "--key", "uv-main", "--all", "--json")
    assert (listing.action, listing.key, listing.all, listing.json) == (None, "uv-main", True, True)
    removal = parse("--socket", "/a.sock", "caches", "rm", "C1", "C2", "--socket", "/b.sock")
    assert (removal.action, removal.cache_ids, removal.socket) == ("rm", ["C1", "C2"], "/b.sock")


def test_the_python_api_refuses_a_keep_it_cannot_honour() -> None:
    bads: tuple[dict[str, Any], ...] = ({"keep": "sometimes", "cache_key": "k"}, {"keep": "always"})
    for bad in bads:
        with pytest.raises(ValueError):
            scratchd_lease(**bad)


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
        ["lease", "--cache-key", "-lead"],
        ["lease", "--cache-key", "has space"],
        ["lease", "--cache-key", "k" * 129],
        ["lease", "--cache-key", "k", "--cache-fallback", "a%b"],
        ["lease", "--cache-fallback", "uv-"],
        ["run", "--keep", "always", "--", "true"],
        ["run", "--cache-key", "k", "--keep", "sometimes", "--", "true"],
        ["caches", "rm"],
        ["caches", "--key", "bad key"],
        ["release"],
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
    result = scratchd("ls", env={"SCRATCHD_SOCKET": MISSING_SOCKET, "SCRATCHD_URL": ""})
    assert result.returncode == 3
    assert MISSING_SOCKET in result.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["--socket", MISSING_SOCKET, "--url", "http://127.0.0.1:9", "ls"],
        ["ls", "--url", "http://127.0.0.1:9", "--socket", MISSING_SOCKET],
        ["--socket", MISSING_SOCKET, "run", "--url", "http://127.0.0.1:9", "--", "true"],
    ],
)
def test_a_socket_and_a_url_given_together_are_a_usage_error_naming_both(argv: list[str]) -> None:
    result = scratchd(*argv, env={"SCRATCHD_SOCKET": "", "SCRATCHD_URL": ""})
    assert result.returncode == 2, result.stderr
    assert MISSING_SOCKET in result.stderr and "http://127.0.0.1:9" in result.stderr


def test_a_socket_and_a_url_in_the_environment_are_a_usage_error_naming_both() -> None:
    result = scratchd("ls", env={"SCRATCHD_SOCKET": MISSING_SOCKET, "SCRATCHD_URL": "http://127.0.0.1:9"})
    assert result.returncode == 2, result.stderr
    assert (
        f"SCRATCHD_SOCKET={MISSING_SOCKET}" in result.stderr
        and "SCRATCHD_URL=http://127.0.0.1:9" in result.stderr
    )


@pytest.mark.parametrize(("flag", "value"), [("--url", "http://127.0.0.1:9"), ("--socket", MISSING_SOCKET)])
def test_a_flag_wins_over_the_environment(flag: str, value: str) -> None:
    other = {"SCRATCHD_SOCKET": "/elsewhere.sock", "SCRATCHD_URL": "http://127.0.0.1:8"}
    result = scratchd(flag, value, "ls", env=other)
    assert result.returncode == 3, result.stderr
    assert value in result.stderr


def test_url_when_no_socket_is_given() -> None:
    # Port 9 (discard) on loopback: nothing listens, the connection is refused.
    result = scratchd("ls", env={"SCRATCHD_SOCKET": "", "SCRATCHD_URL": "http://127.0.0.1:9"})
    assert result.returncode == 3
    assert "http://127.0.0.1:9" in result.stderr


def test_version_is_the_installed_distributions() -> None:
    from importlib.metadata import version

    result = scratchd("--version")
    assert (result.returncode, result.stdout, result.stderr) == (0, f"scratchd {version('scratchd')}\n", "")


@pytest.mark.parametrize(
    ("option", "value", "forms"),
    [
        ("--ttl", "-5m", "90s"),
        ("--idle", "-1h", "15m"),
        ("--max-size", "-1G", "512M"),
        ("--ttl", "3x", "2h"),
        ("--expect", "lots", "10G"),
    ],
)
def test_an_unreadable_duration_or_size_names_the_value_and_the_accepted_forms(
    option: str, value: str, forms: str
) -> None:
    result = scratchd("--socket", MISSING_SOCKET, "lease", option, value)
    assert result.returncode == 2
    assert f"argument {option}:" in result.stderr and repr(value) in result.stderr and forms in result.stderr


def test_a_negative_looking_value_after_the_command_in_run_is_the_commands() -> None:
    args = parse("run", "--ttl", "1h", "sort", "-5m", "--ttl", "-5m")
    assert args.ttl == 3600 and args.cmd == ["sort", "-5m", "--ttl", "-5m"]


@pytest.mark.parametrize(
    ("limit", "written", "said"),
    [
        (604800, "30d", "7d"),
        (604800, "200h", "168h"),
        (604800, "999999", "604800s"),
        (100000, "2d", "1.15d"),
        (90, "1.5m ", "1.5m"),
        (604800, "5w", "1w"),
    ],
)
def test_a_limit_is_said_in_the_unit_the_user_wrote(limit: int, written: str, said: str) -> None:
    assert cli._in_unit(limit, written) == said


def test_events_and_ls_options() -> None:
    assert (
        parse("events").n is None
        and parse("events", "-n", "7").n == 7
        and parse("events", "--since", "0").since == 0
    )
    assert parse("ls", "--label", "a=b", "--label", "c=d=e").label == [("a", "b"), ("c", "d=e")]
    for bad in (
        ["events", "-n", "-1"],
        ["events", "-n", "x"],
        ["events", "--since", "-1"],
        ["ls", "--label", "k"],
    ):
        with pytest.raises(SystemExit):
            parse(*bad)


class FakeEvents:
    """``Client.events`` over seqs 1..count, as the daemon pages them."""

    def __init__(self, count: int) -> None:
        self.seqs = list(range(1, count + 1))
        self.calls = 0

    def events(self, since=None, limit=None, order=None, before=None) -> dict:
        self.calls += 1
        found = [s for s in self.seqs if s > (since or 0) and (before is None or s < before)]
        found = found[::-1] if order == "desc" else found
        return {"events": [{"seq": s} for s in found[: limit or 100]]}


@pytest.mark.parametrize("total", [0, 1, 50, 51, 2500])
@pytest.mark.parametrize("count", [0, 1, 50, 1000, 1500])
def test_the_newest_events_page_back_across_the_apis_limit(total: int, count: int) -> None:
    fake = FakeEvents(total)
    events, more, newest = cli._newest_events(cast(Client, fake), count)
    assert [e["seq"] for e in events] == fake.seqs[max(0, total - count) :][:count] if count else events == []
    assert more == (total > count) and newest == total
    assert fake.calls <= count // cli.EVENTS_PAGE + 2


@pytest.mark.parametrize(("since", "count"), [(0, None), (10, None), (0, 5), (2490, 50), (0, 1500)])
def test_the_events_after_since_page_forward(since: int, count: int | None) -> None:
    fake = FakeEvents(2500)
    events, more = cli._events_after(cast(Client, fake), since, count)
    wanted = fake.seqs[since:] if count is None else fake.seqs[since : since + count]
    assert [e["seq"] for e in events] == wanted
    assert more == (count is not None and since + count < 2500)


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

    bodies = [
        {},
        {
            "near": "/home/ünï/src",
            "labels": {"k": 'a"b\\c\n\u2028'},
            "ttl_seconds": 3600,
            "evictable": True,
            "max_bytes": None,
            "ratio": 0.5,
            "list": [1, [2, {}]],
        },
    ]
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


RUN_TOKENS = [
    "--ttl",
    "2h",
    "--ttl=90s",
    "--idle=5m",
    "--pool",
    "p",
    "--near",
    "/tmp",
    "--label",
    "a=b",
    "--label=c",
    "--tool",
    "uv",
    "--tool=nope",
    "--env",
    "X",
    "--env=Y=sub",
    "--evictable",
    "--evictable=1",
    "-v",
    "--verbose",
    "--placement",
    "any",
    "--placement=far",
    "--max-size",
    "1G",
    "--expect",
    "x",
    "--",
    "make",
    "-j4",
    "--socket",
    "/s",
    "--url=http://h",
    "--po",
    "--p",
    "-",
    "-vx",
    "--list-tools",
    "-h",
    "--cache-key",
    "uv-main",
    "--cache-key=bad key",
    "--cache-fallback",
    "uv-",
    "--cache-fallback=uv-",
    "--cache",
    "--keep",
    "never",
    "--keep=sometimes",
]


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
    assert (refused.status, refused.code, refused.message, refused.details) == (
        404,
        "lease_not_found",
        "No lease.",
        {"id": "x"},
    )
    gone = pickle.loads(pickle.dumps(DaemonUnreachable("/run/s.sock", "no such file")))
    assert (gone.address, gone.reason, str(gone)) == (
        "/run/s.sock",
        "no such file",
        "unreachable: cannot reach scratchd at /run/s.sock: no such file",
    )
