"""Lease create+release cycles over the Unix socket, beside the status quo, in one run.

Prints, for 1 and N closed-loop client processes: cycles/s and per-cycle p50/p99 for
scratchd; requests/s of a bare FastAPI hello endpoint on a Unix socket driven by the
same stdlib client (the stack's ceiling), and p50/p99 of its requests in pairs, as a
cycle makes two (the tail the stack has before scratchd does anything); and the bare
``os.mkdir`` + ``os.rmdir`` rate (what a script doing ``mktemp -d`` / ``rm -rf`` pays
at the very least).

    python bench/lease_cycle.py [--seconds 5] [--clients 1,16] [--pool-dir /dev/shm]

The pool is in the temp directory (the regular disk) unless ``--pool-dir`` says
otherwise; the state database always is, so commits pay the regular disk's price.

Stops by itself; everything runs on loopback/Unix sockets in a temp directory.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from scratchd.client import Client
from scratchd.mounts import mount_of, read_mounts

# One tenant (this user) drives every cycle; the default 1000/s per tenant would cap the measurement.
UNLIMITED_CREATE_RATE = 1_000_000

HELLO_APP = textwrap.dedent(
    """
    import sys, uvicorn
    from fastapi import FastAPI
    app = FastAPI()
    @app.get("/hello")
    async def hello():
        return {"hello": "world"}
    uvicorn.run(app, uds=sys.argv[1], loop="uvloop", http="httptools", access_log=False, log_level="warning")
    """
)


def _wait_socket(path: str, probe: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with Client(socket=path, timeout=1) as client:
                client.request("GET", probe)
            return
        except Exception:
            time.sleep(0.05)
    raise SystemExit(f"server on {path} did not come up")


def _cycle_worker(socket_path: str, seconds: float, kind: str, out: mp.Queue) -> None:
    latencies: list[float] = []
    with Client(socket=socket_path, timeout=30) as client:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            started = time.perf_counter()
            if kind == "lease":
                lease = client.create_lease(ttl_seconds=600)
                client.release(lease["id"])
            else:  # two requests, as a cycle makes: its latency is comparable with a cycle's
                client.request("GET", "/hello")
                client.request("GET", "/hello")
            latencies.append(time.perf_counter() - started)
    out.put(latencies)


def drive(socket_path: str, clients: int, seconds: float, kind: str) -> tuple[float, float, float]:
    """(requests/s for hello, cycles/s for lease; p50 ms, p99 ms of a cycle or a pair of hello
    requests) for ``clients`` closed-loop processes."""
    queue: mp.Queue = mp.Queue()
    workers = [
        mp.Process(target=_cycle_worker, args=(socket_path, seconds, kind, queue)) for _ in range(clients)
    ]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    latencies = [lat for _ in workers for lat in queue.get()]
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - started
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    per_cycle = 2 if kind == "hello" else 1
    return per_cycle * len(latencies) / elapsed, statistics.median(latencies) * 1000, p99 * 1000


def mkdir_rmdir_rate(directory: str, seconds: float) -> float:
    count = 0
    deadline = time.monotonic() + seconds
    path = os.path.join(directory, "x")
    while time.monotonic() < deadline:
        for _ in range(100):
            os.mkdir(path, 0o700)
            os.rmdir(path)
        count += 100
    return count / seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", default="1,16")
    parser.add_argument("--pool-dir", help="directory to make the pool in (default: the temp directory)")
    args = parser.parse_args()
    client_counts = [int(c) for c in args.clients.split(",")]

    with tempfile.TemporaryDirectory(prefix="scratchd-bench-") as tmp:
        pool = Path(tempfile.mkdtemp(prefix="scratchd-bench-pool-", dir=args.pool_dir or tmp))
        socket_path = str(Path(tmp, "scratchd.sock"))
        hello_socket = str(Path(tmp, "hello.sock"))
        config = Path(tmp, "config.toml")
        config.write_text(
            f'[server]\nsocket = "{socket_path}"\nstate_dir = "{tmp}/state"\nlisten = ""\n'
            '[limits]\nmax_ttl = "1h"\n'
            "# the bench measures the daemon's capacity, not the per-tenant create-rate policy\n"
            f"create_rate = {UNLIMITED_CREATE_RATE}\n"
            f'[[pool]]\nname = "bench"\npath = "{pool}"\n'
        )
        daemon = subprocess.Popen(
            [sys.executable, "-m", "scratchd", "serve", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        hello = subprocess.Popen(
            [sys.executable, "-c", HELLO_APP, hello_socket],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_socket(socket_path, "/healthz")
            _wait_socket(hello_socket, "/hello")
            bare = mkdir_rmdir_rate(str(pool), min(args.seconds, 2.0))
            fstype = mount_of(os.path.realpath(pool), read_mounts()).fstype
            print(f"pool on {fstype} ({pool.parent}); bare os.mkdir+os.rmdir there: {bare:,.0f} cycles/s")
            print(
                f"limits.create_rate = {UNLIMITED_CREATE_RATE:,}/s: the daemon's capacity, not the per-tenant policy\n"
            )
            print(
                "| clients | scratchd cycles/s | p50 ms | p99 ms | hello req/s | hello pair p50 ms | hello pair p99 ms "
                "| cycles ÷ hello | cycles ÷ mkdir+rmdir |"
            )
            print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
            for clients in client_counts:
                rate, p50, p99 = drive(socket_path, clients, args.seconds, "lease")
                hello_rate, hello_p50, hello_p99 = drive(hello_socket, clients, args.seconds, "hello")
                print(
                    f"| {clients} | {rate:,.0f} | {p50:.2f} | {p99:.2f} | {hello_rate:,.0f} | "
                    f"{hello_p50:.2f} | {hello_p99:.2f} | "
                    f"{rate / hello_rate:.2f}× | {rate / bare:.3f}× |"
                )
        finally:
            for process in (daemon, hello):
                process.terminate()
                process.wait(10)
            shutil.rmtree(pool, ignore_errors=True)


if __name__ == "__main__":
    main()
