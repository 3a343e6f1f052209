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
    ended = wait_for(lambda: lease_state(daemon, job.lease_id)["end_reason"], timeout=2 + SLACK, what="the lease end")
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
def test_a_lease_ended_under_run_ends_the_command_with_exit_4(daemon, jobs, tmp_path, reason, options) -> None:
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
