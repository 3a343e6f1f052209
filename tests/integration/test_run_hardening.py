"""`scratchd run` and its lease live and die together, against a real daemon.

The command is a Python process that writes a heartbeat into the lease every
50 ms and notes, in a directory outside the lease, its pid, every write that
failed and every SIGTERM it got.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import needs_root, tmpfs, wait_for
from users import as_user, throwaway_user, world_traversable_dir

SCRATCHD = [sys.executable, "-m", "scratchd"]
SLACK = 3.0  # on top of the contract's 2 s, for a loaded 2-core CI machine

COMMAND = r"""
import os, signal, sys, time

notes, on_term, fill = sys.argv[1], sys.argv[2], int(sys.argv[3])
lease = os.environ["SCRATCHD_LEASE_PATH"]

def note(name, text):
    with open(os.path.join(notes, name), "a") as file:
        file.write(text + "\n")

def terminated(signum, frame):
    note("signals", f"TERM {time.monotonic()}")
    if on_term == "exit":
        sys.exit(143)

signal.signal(signal.SIGTERM, terminated)
if fill:
    with open(os.path.join(lease, "fill"), "wb") as file:
        file.write(os.urandom(fill))
with open(os.path.join(notes, "ready.tmp"), "w") as file:
    file.write(f"{os.getpid()} {os.environ['SCRATCHD_LEASE_ID']} {lease}")
os.replace(os.path.join(notes, "ready.tmp"), os.path.join(notes, "ready"))
while True:
    try:
        with open(os.path.join(lease, "heartbeat"), "w") as file:
            file.write(str(time.monotonic()))
    except OSError as error:
        note("failures", repr(error))
    time.sleep(0.05)
"""


class Job:
    """A `scratchd run` of COMMAND, and what its command noted."""

    def __init__(self, daemon, notes: Path, *options: str, on_term: str = "exit", fill: int = 0) -> None:
        notes.mkdir()
        self.notes = notes
        self.run = subprocess.Popen(
            [*SCRATCHD, "run", *options, "--", sys.executable, "-c", COMMAND, str(notes), on_term, str(fill)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "SCRATCHD_SOCKET": daemon.socket},
        )
        ready = wait_for(self._ready, timeout=30, what="the command to start")
        pid, self.lease_id, self.path = ready.split()
        self.pid = int(pid)

    def _ready(self) -> str | None:
        assert self.run.stderr is not None
        assert self.run.poll() is None, self.run.stderr.read()
        try:
            return (self.notes / "ready").read_text()
        except FileNotFoundError:
            return None

    def noted(self, name: str) -> list[str]:
        try:
            return (self.notes / name).read_text().splitlines()
        except FileNotFoundError:
            return []

    def command_alive(self) -> bool:
        """Whether the command runs (a zombie nobody reaped yet does not)."""
        try:
            stat_line = Path(f"/proc/{self.pid}/stat").read_text()
        except FileNotFoundError:
            return False
        return stat_line.rpartition(")")[2].split()[0] not in ("Z", "X")

    def finish(self) -> None:
        if self.run.poll() is None:
            self.run.kill()
        self.run.wait()
        if self.command_alive():
            os.kill(self.pid, signal.SIGKILL)


@pytest.fixture
def jobs():
    started: list[Job] = []

    def start(*args, **kwargs) -> Job:
        started.append(Job(*args, **kwargs))
        return started[-1]

    yield start
    for job in started:
        job.finish()


def lease_state(daemon, lease_id: str) -> dict:
    response = daemon.request("GET", f"/v1/leases/{lease_id}")
    assert response.status_code == 200, response.text
    return response.json()


def test_the_command_dies_with_run_even_by_sigkill(daemon, jobs, tmp_path) -> None:
    job = jobs(daemon, tmp_path / "notes")
    wait_for(lambda: os.path.exists(os.path.join(job.path, "heartbeat")), what="a heartbeat")
    job.run.kill()
    job.run.wait()
    wait_for(lambda: not job.command_alive(), timeout=2 + SLACK, what="the command to die with run")
    ended = wait_for(
        lambda: lease_state(daemon, job.lease_id)["end_reason"], timeout=2 + SLACK, what="the lease end"
    )
    assert ended == "process_exited"
    assert not os.path.exists(job.path)
    # Every heartbeat until the command died found the lease's directory there.
    assert job.noted("failures") == []


def remove_directory(path: str) -> bool:
    try:
        shutil.rmtree(path)  # the command may write a heartbeat in between: try again
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return not os.path.exists(path)


@pytest.mark.parametrize(
    "reason, options",
    [
        ("released", ()),
        ("released", ("--ttl", "2s")),  # renewed at every look: the renewal is refused as lease_ended
        ("directory_removed", ()),
        ("over_quota", ("--max-size", "1M")),
    ],
    ids=["released", "released-while-renewing", "directory_removed", "over_quota"],
)
def test_a_lease_ended_under_run_ends_the_command_with_exit_4(
    daemon, jobs, tmp_path, reason, options
) -> None:
    job = jobs(daemon, tmp_path / "notes", *options, fill=4 << 20 if reason == "over_quota" else 0)
    if reason == "released":  # by an admin (root, over the socket): not by run
        assert daemon.request("DELETE", f"/v1/leases/{job.lease_id}").status_code == 200
    elif reason == "directory_removed":
        wait_for(lambda: remove_directory(job.path), what="the lease's directory removed")
    # The daemon ends the lease within 2 s (over_quota: once it has measured), run notices within 2 s more.
    timeout = 30 if reason == "over_quota" else 4 + SLACK
    wait_for(lambda: job.run.poll() is not None, timeout=timeout, what="run to exit")
    assert job.run.returncode == 4
    assert f"scratchd: lease {job.lease_id} ended: {reason}\n" in job.run.stderr.read()
    assert lease_state(daemon, job.lease_id)["end_reason"] == reason
    assert len(job.noted("signals")) == 1
    assert not job.command_alive()


def test_a_command_that_ignores_sigterm_is_killed_10_s_later(daemon, jobs, tmp_path) -> None:
    job = jobs(daemon, tmp_path / "notes", on_term="ignore")
    assert daemon.request("DELETE", f"/v1/leases/{job.lease_id}").status_code == 200
    wait_for(lambda: job.run.poll() is not None, timeout=2 + 10 + SLACK, what="run to exit")
    exited = time.monotonic()
    assert job.run.returncode == 4
    assert f"scratchd: lease {job.lease_id} ended: released\n" in job.run.stderr.read()
    assert not job.command_alive()
    [term] = job.noted("signals")
    # Killed well after the SIGTERM it ignored (10 s; a lower bound that load can only lengthen).
    assert exited - float(term.split()[1]) > 5


# -- --fallback local ----------------------------------------------------------------

PROBE = 'stat -c %a "$SCRATCHD_LEASE_PATH"; echo "$SCRATCHD_LEASE_PATH"; echo "id=$SCRATCHD_LEASE_ID"; echo "$TMPDIR"'


def run_unreachable(
    tmp_path: Path, *argv: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environ = {name: value for name, value in os.environ.items() if name != "SCRATCHD_FALLBACK"}
    environ.update(SCRATCHD_SOCKET=str(tmp_path / "no-daemon.sock"), **(env or {}))
    return subprocess.run([*SCRATCHD, "run", *argv], capture_output=True, text=True, timeout=60, env=environ)


def test_without_fallback_an_unreachable_daemon_is_still_exit_3(tmp_path) -> None:
    result = run_unreachable(tmp_path, "--", "sh", "-c", "echo ran")
    assert result.returncode == 3
    assert "ran" not in result.stdout
    assert run_unreachable(tmp_path, "--fallback", "fail", "--", "true").returncode == 3


def test_a_bad_fallback_is_a_usage_error(tmp_path) -> None:
    result = run_unreachable(tmp_path, "--", "true", env={"SCRATCHD_FALLBACK": "maybe"})
    assert result.returncode == 2
    assert "SCRATCHD_FALLBACK" in result.stderr and "'maybe'" in result.stderr


@pytest.mark.parametrize("how", ["option", "environment"])
def test_fallback_local_runs_the_command_in_a_private_directory(tmp_path, how: str) -> None:
    project = tmp_path / "project"
    project.mkdir()
    if how == "option":
        argv, env = ["--fallback", "local"], {}
    else:
        argv, env = [], {"SCRATCHD_FALLBACK": "local"}
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("not the command's")
    script = (
        f'{PROBE}; ln -s "{outside}" "$SCRATCHD_LEASE_PATH/link"; mkdir -p "$UV_CACHE_DIR/ro"; '
        'touch "$UV_CACHE_DIR/ro/f"; chmod 500 "$UV_CACHE_DIR/ro"; exit 5'
    )
    result = run_unreachable(
        tmp_path, *argv, "--near", str(project), "--tool", "uv", "--", "sh", "-c", script, env=env
    )
    assert result.returncode == 5, result.stderr
    mode, path, lease_id, tmpdir = result.stdout.splitlines()
    assert mode == "700"
    assert lease_id == "id="
    assert tmpdir == f"{path}/tmp"  # the uv preset, as in a lease
    assert os.stat(os.path.dirname(path)).st_dev == os.stat(project).st_dev  # on near's mount
    assert not os.path.lexists(path)  # deleted, read-only directory and all
    assert (outside / "keep").read_text() == "not the command's"  # the symlink was not followed
    warnings = [line for line in result.stderr.splitlines() if line.startswith("scratchd: ")]
    assert len(warnings) == 1, result.stderr
    assert "cannot reach scratchd" in warnings[0] and path in warnings[0]


@needs_root
def test_fallback_local_on_a_mount_goes_to_its_root(tmp_path) -> None:
    with tmpfs(tmp_path / "fs") as fs:
        project = fs / "src" / "project"
        project.mkdir(parents=True)
        result = run_unreachable(
            tmp_path, "--fallback", "local", "--near", str(project), "--", "sh", "-c", PROBE
        )
        assert result.returncode == 0, result.stderr
        path = result.stdout.splitlines()[1]
        assert os.path.dirname(path) == str(fs)
        assert os.path.basename(path).startswith(".scratchd-local-")
        assert os.listdir(fs) == ["src"]


@needs_root
def test_fallback_local_uses_tmpdir_when_nears_mount_is_read_only(tmp_path) -> None:
    temp = tmp_path / "temp"
    temp.mkdir()
    with tmpfs(tmp_path / "ro", options="ro") as read_only:
        result = run_unreachable(
            tmp_path,
            "--fallback",
            "local",
            "--near",
            str(read_only),
            "--tool",
            "uv",
            "--",
            "sh",
            "-c",
            'echo "$SCRATCHD_LEASE_PATH"; echo "$UV_LINK_MODE"',
            env={"TMPDIR": str(temp)},
        )
    assert result.returncode == 0, result.stderr
    path, link_mode = result.stdout.splitlines()
    assert os.path.dirname(path) == str(temp)
    assert link_mode == "copy"  # not on near's mount
    assert os.listdir(temp) == []


@needs_root
def test_fallback_local_as_a_user_goes_to_their_writable_directory_and_cleans_up() -> None:
    """Not root: the mount's root is not theirs; what the command made read-only is deleted all the same.

    In this process, as the user (the test's Python may not be theirs to run).
    """
    from scratchd.cli import _local_directory, _remove_tree

    def command_leaves_a_read_only_directory(path: str) -> None:
        for name, mode in (("ro", 0o500), ("locked", 0o000)):
            os.makedirs(f"{path}/{name}/sub")
            open(f"{path}/{name}/sub/f", "w").close()
            os.chmod(f"{path}/{name}/sub", mode)
            os.chmod(f"{path}/{name}", mode)

    def fall_back() -> tuple[str, str | None]:
        path, link_mode = _local_directory(str(home / "project" / "venv-to-be"))
        command_leaves_a_read_only_directory(path)
        _remove_tree(path)
        return path, link_mode

    with (
        throwaway_user() as user,
        world_traversable_dir() as top,
        tmpfs(top / "fs", options="mode=755") as fs,
    ):
        home = fs / "home" / user.name
        (home / "project").mkdir(parents=True)
        for directory in (home, home / "project"):
            os.chown(directory, user.uid, user.gid)
        path, link_mode = as_user(user, fall_back)
        assert os.path.dirname(path) == str(home)
        assert link_mode == "hardlink"
        assert os.listdir(home) == ["project"]
