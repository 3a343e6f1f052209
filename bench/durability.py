"""The durability cost of a lease cycle: SQLite synchronous=FULL vs NORMAL, with and without group commit.

    .venv/bin/python bench/durability.py [--seconds 3] [--rounds 3] [--tasks 1,16] [--dir /var/tmp]

Drives create+release cycles through the real ``LeaseManager`` in this process: a
real ``Store`` (WAL) in a fresh state directory under ``--dir``, a real pool
directory there (``PoolSet``, ``MountTable``), the real mkdir, chmod and rename into
the trash -- everything a request does but HTTP. N asyncio tasks run closed loops
(create, yield to the loop as an answer would, release, yield) for ``--seconds``
after a short warm-up, for each of four variants:

- ``NORMAL`` / ``FULL``: ``Store(synchronous=...)``;
- ``group``: the store as shipped: changes asked for in the same loop turn share one
  transaction (``Store.write_grouped``);
- ``per-request``: ``write_grouped`` replaced, in this script only, by an async
  function that commits the request's statements in their own transaction at once
  (``Store._write``), as the store did before group commit.

Variants alternate within each round (their order rotates between rounds) and the
table shows medians over the rounds, with the range of cycles/s: the figures are
noisy on a shared machine. ``commits/cycle`` counts transactions (BEGIN ... COMMIT)
and ``commit ms/cycle`` is the wall time spent inside them per cycle: the store's
share of a cycle, apart from the mkdir and the rename, which on a busy ext4 can cost
more than the commits. ``fsyncs/cycle`` counts this process's fsync + fdatasync
calls with ``perf stat`` tracepoint counters (counted in the kernel, so nearly free)
when perf is usable, else shows "-". In WAL mode SQLite fsyncs the WAL on every
commit under FULL, and under NORMAL only at checkpoints (the WAL, then the database).

The leases stay empty, so a release rmdirs its directory as the daemon does (no
trash); anything that did go to the trash is rmdir'ed after each run.
``--dir`` should be the regular disk the state lives on (/var/tmp), not a tmpfs,
where fsync costs nothing. Stops by itself, after about
rounds x len(tasks) x 4 x (seconds + 1) seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import select
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from scratchd.config import parse_config
from scratchd.manager import LeaseManager, LeaseSpec
from scratchd.mounts import MountTable, mount_of
from scratchd.pool_dirs import PoolSet, prepare_pool_dir
from scratchd.store import NewEvent, Statement, Store
from scratchd.tenant import Tenant

VARIANTS = [("NORMAL", True), ("FULL", True), ("NORMAL", False), ("FULL", False)]
SPEC = LeaseSpec(ttl_seconds=600)


def variant_name(synchronous: str, grouped: bool) -> str:
    return f"{synchronous}, {'group commit' if grouped else 'one commit per request'}"


class FsyncCounter:
    """fsync + fdatasync calls made by this process, counted by ``perf stat`` tracepoints.

    perf starts with its counters disabled and is enabled through its control pipe,
    whose acknowledgement says the counters are live: nothing before or after the
    measured window is counted. ``usable`` is False when perf is missing or may not
    trace (then every count is None).
    """

    EVENTS = "syscalls:sys_enter_fsync,syscalls:sys_enter_fdatasync"

    def __init__(self) -> None:
        self.usable = True  # for the probe
        self.usable = shutil.which("perf") is not None and self._probe()

    def _probe(self) -> bool:
        try:
            with self.counting() as result:
                fd = os.open(os.devnull, os.O_WRONLY)
                with contextlib.suppress(OSError):
                    os.fsync(fd)
                os.close(fd)
        except (OSError, RuntimeError, subprocess.SubprocessError):
            return False
        return result.get("count") == 1

    @contextlib.contextmanager
    def counting(self) -> Iterator[dict[str, int | None]]:
        result: dict[str, int | None] = {"count": None}
        if not self.usable:
            yield result
            return
        ctl_r, ctl_w = os.pipe()
        ack_r, ack_w = os.pipe()
        perf = subprocess.Popen(
            [
                "perf",
                "stat",
                "-x",
                ",",
                "--no-big-num",
                "-e",
                self.EVENTS,
                "--delay=-1",
                "--control",
                f"fd:{ctl_r},{ack_w}",
                "-p",
                str(os.getpid()),
            ],
            pass_fds=(ctl_r, ack_w),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        os.close(ctl_r)
        os.close(ack_w)
        try:
            self._command(perf, ctl_w, ack_r, "enable")
            yield result
            self._command(perf, ctl_w, ack_r, "disable")
        finally:
            os.close(ctl_w)
            os.close(ack_r)
            if perf.poll() is None:
                perf.send_signal(signal.SIGINT)
            _, err = perf.communicate(timeout=10)
        counts = [
            int(line.split(",")[0])
            for line in err.splitlines()
            if "sys_enter_f" in line and line.split(",")[0].isdigit()
        ]
        result["count"] = sum(counts) if len(counts) == 2 else None

    @staticmethod
    def _command(perf: subprocess.Popen[str], ctl_w: int, ack_r: int, command: str) -> None:
        os.write(ctl_w, f"{command}\n".encode())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if select.select([ack_r], [], [], 0.1)[0]:
                if os.read(ack_r, 16).startswith(b"ack"):
                    return
                break
            if perf.poll() is not None:
                break
        raise RuntimeError(f"perf stat did not acknowledge {command!r}")


@dataclass
class Run:
    rate: float
    p50_ms: float
    p99_ms: float
    commits_per_cycle: float
    commit_ms_per_cycle: float
    fsyncs_per_cycle: float | None


def build(
    root: Path, synchronous: str, grouped: bool, trashed: list[str]
) -> tuple[LeaseManager, Store, MountTable]:
    pool = root / "pool"
    pool.mkdir(parents=True)
    config = parse_config(
        {
            "server": {"state_dir": str(root / "state"), "listen": "", "socket": str(root / "sock")},
            "limits": {"max_ttl": "1h"},
            "pool": [{"name": "bench", "path": str(pool)}],
        }
    )
    store = Store(config.server.state_dir, synchronous=synchronous)
    if not grouped:

        async def one_commit_per_request(
            statements: list[Statement], events: list[NewEvent], now: float
        ) -> None:
            store._write(statements, events, now)

        store.write_grouped = one_commit_per_request  # type: ignore[method-assign]
    mounts = MountTable()
    pools = PoolSet(config.pool)
    pools.refresh(mounts.current())
    prepare_pool_dir(str(pool))
    manager = LeaseManager(
        config, store, pools, mounts, lambda item: trashed.append(item.path), lambda lease: None
    )  # an empty lease's directory is rmdir'ed on release
    return manager, store, mounts


def count_commits(store: Store) -> list[float]:
    """Wrap the store's one way into a transaction; returns the live [transactions, seconds inside them]."""
    counter = [0.0, 0.0]
    transaction = store._transaction

    @contextlib.contextmanager
    def counted() -> Iterator[sqlite3.Connection]:
        started = time.perf_counter()
        try:
            with transaction() as db:
                yield db
        finally:
            counter[0] += 1
            counter[1] += time.perf_counter() - started

    store._transaction = counted  # type: ignore[method-assign]
    return counter


async def cycles(
    manager: LeaseManager, tenant: Tenant, tasks: int, seconds: float
) -> tuple[list[float], float]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds

    async def client() -> list[float]:
        latencies = []
        while loop.time() < deadline:
            started = time.perf_counter()
            lease = await manager.create(tenant, SPEC)
            await asyncio.sleep(0)  # the answer goes out, the next request comes in
            await manager.release(lease)
            latencies.append(time.perf_counter() - started)
            await asyncio.sleep(0)
        return latencies

    started = time.perf_counter()
    results = await asyncio.gather(*(client() for _ in range(tasks)))
    return [lat for result in results for lat in result], time.perf_counter() - started


async def measure(
    base: Path, synchronous: str, grouped: bool, tasks: int, seconds: float, fsyncs: FsyncCounter
) -> Run:
    root = Path(tempfile.mkdtemp(prefix="durability-", dir=base))
    trashed: list[str] = []
    manager, store, mounts = build(root, synchronous, grouped, trashed)
    tenant = Tenant("bench", os.getuid(), os.getgid())
    try:
        await cycles(manager, tenant, tasks, min(0.5, seconds / 4))  # warm-up: a WAL in use, caches filled
        commits = count_commits(store)
        with fsyncs.counting() as synced:
            latencies, elapsed = await cycles(manager, tenant, tasks, seconds)
        latencies.sort()
        n = len(latencies)
        count = synced["count"]
        return Run(
            n / elapsed,
            statistics.median(latencies) * 1000,
            latencies[min(n - 1, int(n * 0.99))] * 1000,
            commits[0] / n,
            commits[1] * 1000 / n,
            None if count is None else count / n,
        )
    finally:
        for path in trashed:
            with contextlib.suppress(OSError):
                os.rmdir(path)
        store.close()
        mounts.close()
        shutil.rmtree(root, ignore_errors=True)


def fdatasync_ms(directory: Path, n: int = 200) -> float:
    """Median time of a 4 KiB write + fdatasync on ``directory``: what one durable commit costs at least."""
    times = []
    fd, path = tempfile.mkstemp(dir=directory)
    try:
        for i in range(n):
            started = time.perf_counter()
            os.pwrite(fd, os.urandom(4096), (i % 16) * 4096)
            os.fdatasync(fd)
            times.append(time.perf_counter() - started)
    finally:
        os.close(fd)
        os.unlink(path)
    return statistics.median(times) * 1000


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


async def main_async(args: argparse.Namespace) -> None:
    base = Path(args.dir)
    task_counts = [int(t) for t in args.tasks.split(",")]
    with MountTable() as mounts:
        fstype = mount_of(str(base.resolve()), mounts.current()).fstype
    if fstype in ("tmpfs", "ramfs"):
        print(f"warning: {base} is on {fstype}, where fsync costs nothing", file=sys.stderr)
    fsyncs = FsyncCounter()
    print(
        f"{base} on {fstype}; SQLite {sqlite3.sqlite_version}, WAL; one 4 KiB write+fdatasync there: "
        f"{fdatasync_ms(base):.2f} ms (median); fsyncs counted by "
        f"{'perf stat' if fsyncs.usable else 'nothing (perf unusable)'}; "
        f"{args.rounds} rounds of {args.seconds:g} s per variant, medians shown.\n"
    )
    runs: dict[tuple[int, str, bool], list[Run]] = {}
    for round_ in range(args.rounds):
        order = VARIANTS[round_ % len(VARIANTS) :] + VARIANTS[: round_ % len(VARIANTS)]
        for tasks in task_counts:
            for synchronous, grouped in order:
                run = await measure(base, synchronous, grouped, tasks, args.seconds, fsyncs)
                runs.setdefault((tasks, synchronous, grouped), []).append(run)
                print(
                    f"round {round_ + 1}, {tasks} tasks, {variant_name(synchronous, grouped)}: "
                    f"{run.rate:,.0f} cycles/s",
                    file=sys.stderr,
                    flush=True,
                )

    print(
        "| tasks | variant | cycles/s | range | ÷ fastest | p50 ms | p99 ms | commits/cycle | commit ms/cycle "
        "| fsyncs/cycle |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for tasks in task_counts:
        medians = {}
        for synchronous, grouped in VARIANTS:
            rs = runs[(tasks, synchronous, grouped)]
            counted = [r.fsyncs_per_cycle for r in rs if r.fsyncs_per_cycle is not None]
            medians[(synchronous, grouped)] = (
                statistics.median(r.rate for r in rs),
                min(r.rate for r in rs),
                max(r.rate for r in rs),
                statistics.median(r.p50_ms for r in rs),
                statistics.median(r.p99_ms for r in rs),
                statistics.median(r.commits_per_cycle for r in rs),
                statistics.median(r.commit_ms_per_cycle for r in rs),
                statistics.median(counted) if counted else None,
            )
        fastest = max(m[0] for m in medians.values())
        for (synchronous, grouped), (
            rate,
            low,
            high,
            p50,
            p99,
            commits,
            commit_ms,
            synced,
        ) in medians.items():
            print(
                f"| {tasks} | {variant_name(synchronous, grouped)} | {rate:,.0f} | {low:,.0f}–{high:,.0f} | "
                f"{rate / fastest:.2f}× | {p50:.2f} | {p99:.2f} | {commits:.2f} | {commit_ms:.3f} | "
                f"{fmt(synced, '.2f')} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per variant and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", default="1,16", help="concurrent asyncio tasks, comma-separated")
    parser.add_argument("--dir", default="/var/tmp", help="where the state and pool directories go")
    args = parser.parse_args()
    if not os.path.isdir(args.dir):
        parser.error(f"--dir {args.dir} is not a directory")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
