"""Soak: client processes churn leases for a long time; the daemon's memory, fds and books are checked.

    .venv/bin/python bench/soak.py [--minutes 60] [--clients 4] [--sample-every 10]

Each client process does, at random: create a lease and write files into it (and
keep it renewed), renew, release, create a lease with a 1-2 s TTL and let it
expire, create a lease bound to a child process and then kill the child. Every
answer it gets is journaled, one JSON line per fact appended with ``O_APPEND``,
so the checks afterwards know exactly what the daemon promised. Meanwhile the
daemon's RSS (``VmRSS``), open fds, active leases and pending trash are sampled
every few seconds and printed as a curve.

After the run, and a condition-waited grace for reclaim, it checks (the guarantees in README):

- no leaked directories: the pool's entries are exactly the active leases' ids;
- no records without directories: every active lease's path is a directory;
- no lost events: ``seq`` strictly increasing and gap-free; every lease the clients
  created has one ``lease_created``, one ``lease_renewed`` per renewal answered, and,
  if it ended, one ``lease_ended`` with the reason the client expects (``released``,
  ``expired``, ``process_exited``); nobody else's leases appear;
- the trash is empty, on disk and in ``/v1/usage``;
- RSS and fds flat: fds after the run at most warm-up + 10, RSS growth since warm-up
  within a bound (see ``RSS_GROWTH_MB``).

Prints a summary and exits 1 on any violation. Stops by itself; talks only to its
own daemon's Unix socket, in a temp directory. ``tests/integration/test_soak.py``
runs the same code for ~30 s against the test fixture's daemon; ``bench/crash_loop.py``
reuses the churn and the checks under kill -9.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import multiprocessing as mp
import multiprocessing.connection
import os
import random
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from scratchd.client import Client, DaemonUnreachable, ScratchdError

# Bounds for "flat". fds: after the run every client connection and every pidfd of a
# bound lease is closed, so the daemon holds no more fds than at warm-up (when the
# clients' connections and some pidfds were open); +10 absorbs a worker pipe or two
# and the WAL's files. One fd leaked per request, per pid-bound lease or per
# connection would exceed it by far (hundreds of each in the shortest run).
FD_SLACK = 10
# RSS: measured from the warm-up sample (imports, first requests, SQLite's page cache
# and the allocator's arenas are in place by then) to after the run. What is left is
# noise: pymalloc keeping freed arenas, one SQLite cache of at most ~2 MiB, the
# largest /v1/leases answer built, and the usage monitor's schedule, which holds every
# lease for 60 s and so fills during the first minute. We observed +2 to +3 MB, flat
# after the first minute (3-min run: 60.2 -> 63.0 MB); 30 MB is ten times that, and
# a leak of one Lease object (~1.5 KB with its dicts) per create, ~10,000 creates a
# minute here, crosses it within the 60-min run -- as does ~6 KB per lease in the
# short one (~5,000 leases).
RSS_GROWTH_MB = 30.0

HELD_MAX = 6  # leases a client keeps at once
HELD_TTL = 60  # renewed every third of it, like scratchd.client.Renewer
KEPT_TTL = 3600  # what the leases left active at the end are renewed to
PID_LEASE_TTL = 600  # only the process's exit may end these
PID_END_DEADLINE = 10.0  # guarantee 5 says 2 s; we wait longer to measure lateness
SHORT_TTLS = (1, 2)
SOAK_MIX = {"create": 3, "write": 3, "renew": 2, "release": 3, "short_ttl": 1, "pid_bound": 1}


# -- small helpers ----------------------------------------------------------------------------


def wait_until(condition: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """Poll ``condition`` until truthy or ``timeout`` seconds passed; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def epoch(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


class Journal:
    """One JSON line per fact, appended in one write(2): survives the writer being killed."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def __call__(self, op: str, **fields: Any) -> None:
        os.write(self.fd, (json.dumps({"op": op, "t": time.time(), **fields}) + "\n").encode())

    def close(self) -> None:
        os.close(self.fd)


def read_journals(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    records = []
    for path in paths:
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            continue
        for line in text.splitlines():
            if line.strip():
                records.append(json.loads(line))
    return records


# -- the daemon (a standalone one for the bench scripts; the test uses conftest's) ---------------


class LocalDaemon:
    """``scratchd serve`` in a directory of its own: config, state, socket, one pool."""

    def __init__(self, root: Path, gc: dict[str, str], max_ttl: str = "1d") -> None:
        self.root = root
        self.pool_path = str(root / "pool")
        self.socket = str(root / "run" / "scratchd.sock")
        self.log_path = root / "daemon.log"
        os.makedirs(self.pool_path, exist_ok=True)
        gc_lines = "".join(f'{key} = "{value}"\n' for key, value in gc.items())
        self.config_path = root / "config.toml"
        self.config_path.write_text(
            f'[server]\nsocket = "{self.socket}"\nstate_dir = "{root}/state"\nlisten = ""\n'
            f'[limits]\nmax_ttl = "{max_ttl}"\n[gc]\n{gc_lines}'
            f'[[pool]]\nname = "soak"\npath = "{self.pool_path}"\n'
        )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 30) -> float:
        """Start and wait until ``/healthz`` answers; the seconds that took."""
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "scratchd", "serve", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        if not wait_until(self._ready_or_dead, timeout) or self.process.poll() is not None:
            raise RuntimeError(f"daemon not ready (exit {self.process.poll()}); log:\n{self.log_tail()}")
        return time.monotonic() - started

    def _ready_or_dead(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            return True
        try:
            with Client(socket=self.socket, timeout=2) as client:
                client.health()
            return True
        except ScratchdError:
            return False

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


# -- the clients --------------------------------------------------------------------------------


class Churner:
    """One client process's random walk over the lease lifecycle, journaling every answer."""

    def __init__(
        self,
        socket: str,
        journal: Journal,
        seed: int,
        mix: dict[str, int],
        *,
        crash_mode: bool,
        held_ttl: int = HELD_TTL,
    ) -> None:
        self.client = Client(socket=socket, timeout=30)
        self.journal = journal
        self.rng = random.Random(seed)
        self.ops = list(mix)
        self.weights = [mix[op] for op in self.ops]
        self.crash_mode = crash_mode
        self.held_ttl = held_ttl
        self.held: dict[str, dict[str, Any]] = {}  # id -> {"path", "renewed"}
        self.children: list[tuple[subprocess.Popen[bytes], dict[str, Any], int]] = []

    # one step -------------------------------------------------------------------------------

    def step(self) -> None:
        op = self.rng.choices(self.ops, self.weights)[0]
        if op == "create" and len(self.held) >= HELD_MAX:
            op = "release"
        if op in ("write", "renew", "release") and not self.held:
            op = "create"
        getattr(self, op)()
        self.keep_renewed()
        self.tick_children()

    def violation(self, what: str) -> None:
        self.journal("violation", what=what)

    def created(self, lease: dict[str, Any], kind: str, **extra: Any) -> None:
        self.journal(
            "created", id=lease["id"], path=lease["path"], kind=kind, ttl=lease["ttl_seconds"], **extra
        )
        try:
            st = os.lstat(lease["path"])
            problems = []
            if not stat.S_ISDIR(st.st_mode):
                problems.append("not a directory")
            if stat.S_IMODE(st.st_mode) != 0o700:
                problems.append(f"mode {stat.S_IMODE(st.st_mode):o}")
            if st.st_uid != os.getuid():
                problems.append(f"owner uid {st.st_uid}")
            if os.listdir(lease["path"]):
                problems.append("not empty")
        except FileNotFoundError:
            if kind == "short":
                return  # a 1 s lease may be gone already on a loaded host
            problems = ["missing"]
        if problems:
            self.violation(f"new lease {lease['id']} ({kind}) directory: {', '.join(problems)} (guarantee 1)")

    def mark(self, lease: dict[str, Any]) -> None:
        """A marker file a surviving lease must still hold (guarantee 2)."""
        with open(os.path.join(lease["path"], "marker"), "w") as f:
            f.write(lease["id"])
        self.journal("marked", id=lease["id"])

    def files(self, path: str) -> None:
        for _ in range(self.rng.randint(1, 6)):
            where = path
            if self.rng.random() < 0.3:
                where = os.path.join(path, f"d{self.rng.randrange(4)}", f"e{self.rng.randrange(4)}")
                os.makedirs(where, exist_ok=True)
            size = self.rng.choice((0, 100, 4096, 65536))
            with open(os.path.join(where, f"f{self.rng.randrange(50)}"), "wb") as f:
                f.write(self.rng.randbytes(size))

    # operations ------------------------------------------------------------------------------

    def create(self) -> None:
        lease = self.client.create_lease(ttl_seconds=self.held_ttl, labels={"soak": "held"})
        self.created(lease, "held")
        self.held[lease["id"]] = {"path": lease["path"], "renewed": time.monotonic()}

        def mark_and_fill() -> None:
            self.mark(lease)
            self.files(lease["path"])

        self.lost_directory_guard(lease["id"], mark_and_fill)

    def write(self) -> None:
        lease_id = self.rng.choice(list(self.held))
        self.lost_directory_guard(lease_id, lambda: self.files(self.held[lease_id]["path"]))

    def lost_directory_guard(self, lease_id: str, action: Callable[[], Any]) -> None:
        try:
            action()
        except (FileNotFoundError, NotADirectoryError):
            now = self.client.get_lease(lease_id)
            self.violation(
                f"lease {lease_id}, held by its client, lost its directory; daemon says "
                f"{now['state']}/{now['end_reason']}"
            )
            self.held.pop(lease_id, None)

    def renew(self, lease_id: str | None = None) -> None:
        lease_id = lease_id or self.rng.choice(list(self.held))
        try:
            self.client.renew(lease_id, self.held_ttl)
        except ScratchdError as exc:
            if exc.code != "lease_ended":
                raise
            self.violation(f"held lease {lease_id} ended under its client: {exc.details}")
            self.held.pop(lease_id, None)
            return
        self.journal("renewed", id=lease_id)
        self.held[lease_id]["renewed"] = time.monotonic()

    def release(self, lease_id: str | None = None) -> None:
        lease_id = lease_id or self.rng.choice(list(self.held))
        path = self.held.pop(lease_id)["path"]
        self.journal("releasing", id=lease_id)
        answer = self.client.release(lease_id)
        self.journal("released", id=lease_id, reason=answer["end_reason"])
        if answer["state"] != "ended" or answer["end_reason"] != "released":
            self.violation(
                f"release of held lease {lease_id} answered {answer['state']}/{answer['end_reason']}"
            )
        if os.path.lexists(path):
            self.violation(f"released lease {lease_id}: path still exists after the answer (guarantee 3)")

    def short_ttl(self) -> None:
        lease = self.client.create_lease(ttl_seconds=self.rng.choice(SHORT_TTLS), labels={"soak": "short"})
        self.created(lease, "short")
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):  # it may have expired already
            self.files(lease["path"])

    def pid_bound(self) -> None:
        child = subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL)
        try:
            lease = self.client.create_lease(pid=child.pid, ttl_seconds=PID_LEASE_TTL, labels={"soak": "pid"})
        except BaseException:
            child.kill()
            child.wait()
            raise
        self.children.append((child, lease, self.rng.randint(0, 5)))
        self.created(lease, "pid", child=child.pid)
        self.lost_directory_guard(lease["id"], lambda: self.files(lease["path"]))

    # upkeep ----------------------------------------------------------------------------------

    def keep_renewed(self) -> None:
        now = time.monotonic()
        for lease_id, held in list(self.held.items()):
            if now - held["renewed"] > self.held_ttl / 3:
                self.renew(lease_id)

    def tick_children(self, all_now: bool = False) -> None:
        waiting = []
        for child, lease, ops_left in self.children:
            if all_now or ops_left <= 0:
                self.end_child(child, lease)
            else:
                waiting.append((child, lease, ops_left - 1))
        self.children = waiting

    def end_child(self, child: subprocess.Popen[bytes], lease: dict[str, Any]) -> None:
        child.kill()
        child.wait()
        killed = time.monotonic()
        self.journal("child_killed", id=lease["id"])
        if self.crash_mode:
            return  # the daemon may be dead: the checks after its restart look at the lease
        ended = wait_until(
            lambda: (now := self.client.get_lease(lease["id"]))["state"] == "ended" and now,
            PID_END_DEADLINE,
            interval=0.02,
        )
        latency = time.monotonic() - killed
        if not ended:
            self.violation(
                f"pid-bound lease {lease['id']} still active {PID_END_DEADLINE}s after its process died"
            )
            return
        self.journal("pid_ended", id=lease["id"], reason=ended["end_reason"], latency=latency)

    def finish(self) -> None:
        """Soak mode: release about half of what is held, keep the rest active for the checks."""
        self.tick_children(all_now=True)
        for lease_id in list(self.held):
            if self.rng.random() < 0.5:
                self.release(lease_id)
            else:  # renewed for long enough that none expires while the books are checked
                self.client.renew(lease_id, KEPT_TTL)
                self.journal("renewed", id=lease_id)
                self.journal("kept", id=lease_id)

    def cleanup(self) -> None:
        for child, lease, _ in self.children:
            child.kill()
            child.wait()
            self.journal("child_killed", id=lease["id"])
        self.children = []
        self.client.close()


def churn(
    socket: str,
    journal_path: str,
    seconds: float,
    seed: int,
    stop: Any,
    mix: dict[str, int],
    crash_mode: bool = False,
    think: float = 0.01,
    held_ttl: int = HELD_TTL,
) -> None:
    """A client process: random steps until ``seconds`` pass or ``stop`` is set.

    In crash mode the daemon is expected to die under it: the first unreachable answer
    ends the loop, and bound children are killed on the way out (their leases end as
    ``process_exited`` when the daemon is back). Otherwise an unreachable daemon is a
    violation.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    journal = Journal(journal_path)
    churner = Churner(socket, journal, seed, mix, crash_mode=crash_mode, held_ttl=held_ttl)
    deadline = time.monotonic() + seconds
    steps = errors = 0
    try:
        while time.monotonic() < deadline and not stop.is_set():
            try:
                churner.step()
                steps += 1
            except DaemonUnreachable as exc:
                if not crash_mode:
                    churner.violation(f"daemon unreachable: {exc}")
                break
            except ScratchdError as exc:
                errors += 1
                journal("api_error", status=exc.status, code=exc.code, message=exc.message)
                if errors > 100 and not crash_mode:
                    churner.violation("more than 100 API errors; giving up")
                    break
            if think:
                stop.wait(churner.rng.uniform(0, think))  # pacing, and a stop check
        else:
            if not crash_mode:
                churner.finish()
    except DaemonUnreachable as exc:
        if not crash_mode:
            churner.violation(f"daemon unreachable while finishing: {exc}")
    except Exception as exc:
        churner.violation(f"client crashed: {exc!r}")
    finally:
        churner.cleanup()
        journal("done", steps=steps, errors=errors)
        journal.close()


def start_clients(
    socket: str,
    journal_dir: Path,
    clients: int,
    seconds: float,
    seed: int,
    mix: dict[str, int],
    *,
    crash_mode: bool = False,
    think: float = 0.01,
    tag: str = "",
    held_ttl: int = HELD_TTL,
) -> tuple[list[BaseProcess], Event, list[Path]]:
    """Start ``clients`` processes (fork: they share nothing but the journal directory)."""
    ctx = mp.get_context("fork")
    stop = ctx.Event()
    journals = [journal_dir / f"client{tag}-{i}.jsonl" for i in range(clients)]
    processes: list[BaseProcess] = [
        ctx.Process(
            target=churn,
            name=f"soak-client-{i}",
            daemon=True,
            args=(socket, str(journals[i]), seconds, seed * 1000 + i, stop, mix, crash_mode, think, held_ttl),
        )
        for i in range(clients)
    ]
    for process in processes:
        process.start()
    return processes, stop, journals


def join_clients(processes: list[BaseProcess], timeout: float) -> list[str]:
    """Join within ``timeout``; a client still running then is killed and reported."""
    deadline = time.monotonic() + timeout
    problems = []
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            problems.append(f"client {process.name} did not finish in time; killed")
            process.kill()
            process.join(5)
    return problems


# -- sampling -----------------------------------------------------------------------------------


@dataclass
class Sample:
    t: float  # seconds since the run started
    rss_mb: float
    fds: int
    workers_rss_mb: float  # the daemon's worker processes (deletion, scans)
    active: int
    trash_pending: int
    reclaimed: int

    def line(self) -> str:
        return (
            f"{self.t:8.1f}s  rss {self.rss_mb:6.1f} MB  fds {self.fds:4d}  active {self.active:4d}  "
            f"trash {self.trash_pending:4d}  reclaimed {self.reclaimed:7d}  workers rss {self.workers_rss_mb:6.1f} MB"
        )


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def children_of(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(p) for p in f.read().split()]
    except OSError:
        pass
    return found


def sample(client: Client, pid: int, t: float) -> Sample:
    usage = client.usage()
    workers = 0.0
    for child in children_of(pid):
        with contextlib.suppress(OSError):
            workers += rss_mb(child)
    return Sample(
        t=t,
        rss_mb=rss_mb(pid),
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        workers_rss_mb=workers,
        active=sum(p["active_leases"] for p in usage["pools"]),
        trash_pending=usage["reclaim"]["pending"],
        reclaimed=usage["reclaim"]["reclaimed_total"],
    )


# -- the books ----------------------------------------------------------------------------------


@dataclass
class LeaseFacts:
    """What the clients know about one lease, from their journals."""

    kind: str
    path: str
    ttl: int
    renews: int = 0
    marked: bool = False
    releasing: bool = False
    released: str | None = None
    child_killed: bool = False
    pid_end: str | None = None
    pid_latency: float | None = None
    kept: bool = False


@dataclass
class Books:
    leases: dict[str, LeaseFacts] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    api_errors: Counter[str] = field(default_factory=Counter)
    ops: Counter[str] = field(default_factory=Counter)
    steps: int = 0


def tally(records: list[dict[str, Any]]) -> Books:
    books = Books()
    for record in records:
        op = record["op"]
        books.ops[op] += 1
        facts = books.leases.get(record.get("id", ""))
        if op == "created":
            books.leases[record["id"]] = LeaseFacts(record["kind"], record["path"], record["ttl"])
        elif op == "renewed" and facts:
            facts.renews += 1
        elif op == "marked" and facts:
            facts.marked = True
        elif op == "releasing" and facts:
            facts.releasing = True
        elif op == "released" and facts:
            facts.released = record["reason"]
        elif op == "child_killed" and facts:
            facts.child_killed = True
        elif op == "pid_ended" and facts:
            facts.pid_end, facts.pid_latency = record["reason"], record["latency"]
        elif op == "kept" and facts:
            facts.kept = True
        elif op == "violation":
            books.violations.append(record["what"])
        elif op == "api_error":
            books.api_errors[f"{record['status']} {record['code']}"] += 1
        elif op == "done":
            books.steps += record["steps"]
    return books


def all_events(client: Client) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    since = 0
    for _ in range(100_000):  # bounded: 100 M events
        page = client.events(since=since, limit=1000)["events"]
        if not page:
            return events
        events += page
        since = page[-1]["seq"]
    raise RuntimeError("event log did not end")


def pool_entries(pool_path: str) -> set[str]:
    return {name for name in os.listdir(pool_path) if not name.startswith(".")}


def trash_entries(pool_path: str) -> list[str]:
    try:
        return os.listdir(os.path.join(pool_path, ".trash"))
    except FileNotFoundError:
        return []


def active_ids(client: Client) -> dict[str, dict[str, Any]]:
    return {lease["id"]: lease for lease in client.list_leases()["leases"]}


def leak_report(client: Client, pool_path: str) -> list[str]:
    """Leaked directories and records without directories, now ([] when the books balance)."""
    entries = pool_entries(pool_path)
    active = active_ids(client)
    problems = []
    if leaked := entries - set(active):
        problems.append(f"{len(leaked)} pool entries without an active lease: {sorted(leaked)[:5]}")
    if missing := [lease_id for lease_id, lease in active.items() if not os.path.isdir(lease["path"])]:
        problems.append(f"{len(missing)} active leases without a directory: {missing[:5]}")
    if not_entries := set(active) - entries:
        problems.append(
            f"{len(not_entries)} active leases not in the pool listing: {sorted(not_entries)[:5]}"
        )
    return problems


def trash_report(client: Client, pool_path: str) -> list[str]:
    problems = []
    if left := trash_entries(pool_path):
        problems.append(f"{len(left)} entries in the trash: {left[:5]}")
    if pending := client.usage()["reclaim"]["pending"]:
        problems.append(f"/v1/usage reclaim.pending = {pending}")
    return problems


def settle(client: Client, pool_path: str, books: Books, *, timeout: float) -> list[str]:
    """Wait (bounded) until every short-TTL and pid-bound lease has ended, the trash is
    empty and the books balance; the problems still there at the deadline."""
    deadline = time.monotonic() + timeout

    def left() -> float:
        return max(0.0, deadline - time.monotonic())

    transient = {
        i for i, f in books.leases.items() if f.kind == "short" or (f.kind == "pid" and f.child_killed)
    }
    problems = []
    still = wait_until(lambda: not (transient & set(active_ids(client))), left(), interval=0.1)
    if not still:
        lingering = sorted(transient & set(active_ids(client)))
        problems.append(f"{len(lingering)} expired or process-exited leases still active: {lingering[:5]}")
    if not wait_until(lambda: not trash_report(client, pool_path), left(), interval=0.1):
        problems += trash_report(client, pool_path)
    if not wait_until(lambda: not leak_report(client, pool_path), left(), interval=0.1):
        problems += leak_report(client, pool_path)
    return problems


def check_events(
    client: Client, books: Books, *, exact: bool, gc_interval: float, spot_checks: int = 200, seed: int = 0
) -> tuple[list[str], dict[str, Any]]:
    """The event log against the journals, the active leases and the records.

    ``exact`` (soak): every answer reached its client, so counts must match exactly.
    Otherwise (crash loop) a request in flight at a kill may have been committed
    without its answer: renewals may exceed what was journaled, a release may have
    happened without its answer, leases nobody journaled may exist.

    Leases may still expire while this reads (crash loop), so the active leases are
    read before and after the events: a lease with a ``lease_ended`` event must be
    gone from the second list, one without must be in the first.
    """
    problems: list[str] = []
    active_before = active_ids(client)
    events = all_events(client)
    active_after = active_ids(client)
    seqs = [e["seq"] for e in events]
    for before, after in itertools.pairwise(seqs):
        if after != before + 1:
            problems.append(
                f"event seq {'not increasing' if after <= before else 'gap'}: {before} -> {after}"
            )
            break
    created: dict[str, list[dict[str, Any]]] = defaultdict(list)
    renewed: Counter[str] = Counter()
    ended: dict[str, list[dict[str, Any]]] = defaultdict(list)
    kinds: Counter[str] = Counter()
    for event in events:
        kinds[event["kind"]] += 1
        if event["kind"] == "lease_created":
            created[event["lease_id"]].append(event)
        elif event["kind"] == "lease_renewed":
            renewed[event["lease_id"]] += 1
        elif event["kind"] == "lease_ended":
            ended[event["lease_id"]].append(event)
    bad: Counter[str] = Counter()
    examples: dict[str, str] = {}

    def fail(kind: str, example: str) -> None:
        bad[kind] += 1
        examples.setdefault(kind, example)

    def state_agrees(lease_id: str) -> str | None:
        ends = ended.get(lease_id, [])
        if len(ends) > 1:
            return f"{len(ends)} lease_ended events: {[e['reason'] for e in ends]}"
        if ends and lease_id in active_after:
            return f"lease_ended ({ends[0]['reason']}) but still active"
        if not ends and lease_id not in active_before:
            return "no lease_ended event but not active"
        return None

    lateness: list[float] = []
    for lease_id, facts in books.leases.items():
        if len(created[lease_id]) != 1:
            fail("lease_created count", f"{lease_id}: {len(created[lease_id])}")
        if (renewed[lease_id] != facts.renews) if exact else (renewed[lease_id] < facts.renews):
            fail("lease_renewed count", f"{lease_id}: {renewed[lease_id]} events, {facts.renews} answered")
        if disagreement := state_agrees(lease_id):
            fail("event vs state", f"{lease_id}: {disagreement}")
        ends = ended.get(lease_id, [])
        reason = ends[0]["reason"] if ends else None
        if reason is not None and os.path.lexists(facts.path):
            fail("ended lease's path exists (guarantee 3)", f"{lease_id} ({reason})")
        if (
            reason is None
            and facts.marked
            and not _marker_ok(facts.path, lease_id)
            and client.get_lease(lease_id)["state"] == "active"  # not just expired meanwhile
        ):
            fail("active lease lost its directory or marker (guarantee 2)", lease_id)
        allowed = _allowed_ends(facts, exact)
        if reason not in allowed:
            fail(
                f"{facts.kind} lease ended as {reason}",
                f"{lease_id}: expected one of {sorted(map(str, allowed))}",
            )
        if facts.kind == "short" and reason == "expired" and created[lease_id]:
            due = epoch(created[lease_id][0]["at"]) + facts.ttl
            lateness.append(epoch(ends[0]["at"]) - due)
    foreign = set(created) - set(books.leases)
    if exact and foreign:
        fail("lease_created nobody asked for", f"{len(foreign)}: {sorted(foreign)[:3]}")
    for lease_id in foreign:  # leases whose create answer was lost: still one history each
        if len(created[lease_id]) != 1 or (disagreement := state_agrees(lease_id)):
            fail(
                "unjournaled lease's events",
                f"{lease_id}: {len(created[lease_id])} lease_created, {state_agrees(lease_id)}",
            )
    if stray := set(ended) - set(created):
        fail("lease_ended without lease_created", f"{len(stray)}: {sorted(stray)[:3]}")
    # A sample of ended records: the record's reason is the event's (one transaction).
    rng = random.Random(seed)
    ended_ids = sorted(i for i in ended if i in created)
    for lease_id in rng.sample(ended_ids, min(spot_checks, len(ended_ids))):
        record = client.get_lease(lease_id)
        if record["state"] != "ended" or record["end_reason"] != ended[lease_id][0]["reason"]:
            fail(
                "record vs event",
                f"{lease_id}: record {record['state']}/{record['end_reason']}, "
                f"event {ended[lease_id][0]['reason']}",
            )
    for kind, count in bad.items():
        problems.append(f"{kind}: {count} leases, e.g. {examples[kind]}")
    stats = {
        "events": len(events),
        "kinds": dict(kinds),
        "unjournaled_leases": len(foreign),
        "expiry_lateness_max": max(lateness) if lateness else None,
        "gc_interval": gc_interval,
    }
    # Event times have millisecond resolution; expiry is acted on within gc.interval (guarantee 5).
    if exact and lateness and max(lateness) > gc_interval + 1.0:
        problems.append(
            f"an expired lease ended {max(lateness):.2f}s after its expiry "
            f"(gc.interval {gc_interval}s, guarantee 5)"
        )
    return problems, stats


def _marker_ok(path: str, lease_id: str) -> bool:
    try:
        return Path(path, "marker").read_text() == lease_id
    except OSError:
        return False


def _allowed_ends(facts: LeaseFacts, exact: bool) -> set[str | None]:
    if exact:
        if facts.released is not None:
            return {"released"}
        ends: dict[str, set[str | None]] = {"short": {"expired"}, "pid": {"process_exited"}, "held": {None}}
        return ends[facts.kind]
    # Crash loop: a kill between a rename into the trash and its commit ends the lease
    # as directory_removed at the next start (ARCHITECTURE.md, crash safety).
    if facts.released is not None:
        return {"released"}  # answered, so committed first
    allowed: set[str | None] = {"directory_removed"}
    if facts.releasing:
        allowed |= {"released"}
    if facts.kind == "short":
        return allowed | {"expired"}
    if facts.kind == "pid":  # its child is killed before the daemon restarts
        return allowed | {"process_exited", "expired"}
    return allowed | {None, "expired"}


# -- the soak -------------------------------------------------------------------------------


@dataclass
class SoakReport:
    samples: list[Sample]
    warm: Sample
    after: Sample
    books: Books
    violations: list[str]
    stats: dict[str, Any]
    seconds: float
    rss_bound_mb: float = RSS_GROWTH_MB

    def summary(self) -> str:
        books = self.books
        pid_latencies = sorted(f.pid_latency for f in books.leases.values() if f.pid_latency is not None)
        kinds = Counter(f.kind for f in books.leases.values())
        lines = [
            f"ran {self.seconds:.0f}s: {books.steps} client steps, {len(books.leases)} leases "
            f"({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))}), {books.ops['renewed']} renewals, "
            f"{books.ops['released']} releases, {self.stats.get('events', 0)} events",
            f"API errors: {dict(books.api_errors) or 'none'}",
        ]
        if pid_latencies:
            p50 = pid_latencies[len(pid_latencies) // 2]
            lines.append(
                f"process exit -> lease ended: p50 {p50 * 1000:.0f} ms, max {pid_latencies[-1] * 1000:.0f} ms "
                f"({sum(x > 2.0 for x in pid_latencies)} over the 2 s of guarantee 5)"
            )
        peak = max(self.samples, key=lambda s: s.rss_mb)
        lines.append(
            f"RSS: warm-up {self.warm.rss_mb:.1f} MB -> after {self.after.rss_mb:.1f} MB "
            f"(growth {self.after.rss_mb - self.warm.rss_mb:+.1f} MB, bound {self.rss_bound_mb:g}), "
            f"peak {peak.rss_mb:.1f} MB at {peak.t:.0f}s; slope over the second half "
            f"{_slope_mb_per_hour(self.samples, (self.warm.t + self.after.t) / 2):+.1f} MB/h"
        )
        if (late := self.stats.get("expiry_lateness_max")) is not None:
            lines.append(
                f"expired leases ended at most {late:.2f}s after their expiry "
                f"(gc.interval {self.stats['gc_interval']}s)"
            )
        lines.append(
            f"fds: warm-up {self.warm.fds} -> after {self.after.fds} (bound warm-up + {FD_SLACK}), "
            f"max {max(s.fds for s in self.samples)}"
        )
        lines.append(
            f"workers RSS: warm-up {self.warm.workers_rss_mb:.1f} MB -> after {self.after.workers_rss_mb:.1f} MB"
        )
        lines.append(
            "violations: none"
            if not self.violations
            else "VIOLATIONS:\n  - " + "\n  - ".join(self.violations)
        )
        return "\n".join(lines)


def _slope_mb_per_hour(samples: list[Sample], since: float) -> float:
    points = [(s.t, s.rss_mb) for s in samples if s.t >= since]
    if len(points) < 3:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_r = sum(r for _, r in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    return 0.0 if not var else sum((t - mean_t) * (r - mean_r) for t, r in points) / var * 3600


def run_soak(
    socket: str,
    pool_path: str,
    daemon_pid: int,
    *,
    seconds: float,
    clients: int,
    sample_every: float,
    warmup: float,
    gc_interval: float,
    journal_dir: Path,
    seed: int = 1,
    think: float = 0.01,
    settle_timeout: float = 60.0,
    rss_growth_mb: float = RSS_GROWTH_MB,
    log: Callable[[str], None] = print,
) -> SoakReport:
    """Churn for ``seconds``, sampling every ``sample_every``; then settle and check the books."""
    started = time.monotonic()
    processes, stop, journals = start_clients(
        socket, journal_dir, clients, seconds, seed, SOAK_MIX, think=think
    )
    samples: list[Sample] = []
    warm: Sample | None = None
    violations: list[str] = []
    with Client(socket=socket, timeout=30) as client:
        log(f"{'time':>9}  {'daemon RSS':>14}  {'fds':>8}  {'active':>11}  {'trash':>10}  {'reclaimed':>17}")
        next_sample = started
        try:
            while any(p.is_alive() for p in processes):
                now = time.monotonic()
                if now >= next_sample:
                    s = sample(client, daemon_pid, now - started)
                    samples.append(s)
                    log(s.line())
                    if warm is None and s.t >= warmup:
                        warm = s
                    next_sample += sample_every
                # Wakes when a client exits or when the next sample is due: no bare sleep.
                mp.connection.wait(
                    [p.sentinel for p in processes], timeout=max(0.0, next_sample - time.monotonic())
                )
                if time.monotonic() - started > seconds + 120:
                    break
        finally:
            stop.set()
            violations += join_clients(processes, timeout=60)
        books = tally(read_journals(journals))
        violations += books.violations
        violations += settle(client, pool_path, books, timeout=settle_timeout)
        after = sample(client, daemon_pid, time.monotonic() - started)  # before the big reads below
        samples.append(after)
        log(after.line() + "   (after the run and reclaim)")
        warm = warm or samples[0]
        event_problems, stats = check_events(client, books, exact=True, gc_interval=gc_interval, seed=seed)
        violations += event_problems
        if after.fds > warm.fds + FD_SLACK:
            violations.append(
                f"fds grew: {warm.fds} at warm-up, {after.fds} after the run (bound +{FD_SLACK})"
            )
        if after.rss_mb - warm.rss_mb > rss_growth_mb:
            violations.append(
                f"RSS grew {after.rss_mb - warm.rss_mb:.1f} MB since warm-up (bound {rss_growth_mb} MB)"
            )
        if books.steps == 0:
            violations.append("the clients did nothing")
    return SoakReport(
        samples, warm, after, books, violations, stats, time.monotonic() - started, rss_growth_mb
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--sample-every", type=float, default=10.0, help="seconds between samples")
    parser.add_argument(
        "--warmup", type=float, default=None, help="seconds (default: 10%% of the run, 10..120)"
    )
    parser.add_argument("--think-ms", type=float, default=10.0, help="max random pause between client steps")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the temp directory (daemon log, journals)")
    args = parser.parse_args()
    seconds = args.minutes * 60
    warmup = args.warmup if args.warmup is not None else min(120.0, max(10.0, seconds / 10))
    gc_interval = 0.5
    tmp = tempfile.mkdtemp(prefix="scratchd-soak-")
    daemon = LocalDaemon(Path(tmp), gc={"interval": f"{gc_interval}s", "orphan_grace": "30s"})
    print(
        f"soak: {args.minutes:g} min, {args.clients} clients, sample every {args.sample_every:g}s, "
        f"warm-up {warmup:g}s; daemon in {tmp}"
    )
    try:
        daemon.start()
        journal_dir = Path(tmp, "journals")
        journal_dir.mkdir()
        report = run_soak(
            daemon.socket,
            daemon.pool_path,
            daemon.pid,
            seconds=seconds,
            clients=args.clients,
            sample_every=args.sample_every,
            warmup=warmup,
            gc_interval=gc_interval,
            journal_dir=journal_dir,
            seed=args.seed,
            think=args.think_ms / 1000,
        )
        if daemon.process is not None and daemon.process.poll() is not None:
            report.violations.append(f"daemon exited {daemon.process.returncode}")
    finally:
        daemon.stop()
        if not args.keep and not (locals().get("report") and report.violations):
            subprocess.run(["rm", "-rf", "--one-file-system", tmp], check=False)
    print()
    print(report.summary())
    if report.violations:
        print(f"(daemon log and journals kept in {tmp})")
    sys.exit(1 if report.violations else 0)


if __name__ == "__main__":
    main()
