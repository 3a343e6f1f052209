"""Reclaim through the daemon vs ``rm -rf``, and what deletion costs the API meanwhile.

    .venv/bin/python bench/reclaim.py [--files 100000] [--dir /var/tmp] [--rounds 3]

One run of ``--rounds`` rounds, each on two fresh identical trees on the same
filesystem, one inside a lease: time ``rm -rf`` on the one, then release the lease
and time until its tree has left the daemon's trash (nothing else running); the
order alternates between rounds. Then, once more, release a lease holding such a
tree while one client does create+release cycles, recording their latency. Prints
each round, files/s for ``rm -rf`` and the daemon (medians of the rounds: one round
moves 10-30% with whatever else the host does), their ratio, and lease-cycle p50/p99
with the daemon idle and during the deletion. Stops by itself; talks to the daemon
over its socket only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from delete_vs_rm import build_tree

from scratchd.client import Client


def cycle_latencies(socket_path: str, stop: threading.Event) -> list[float]:
    latencies: list[float] = []
    with Client(socket=socket_path) as client:
        while not stop.is_set():
            started = time.perf_counter()
            client.release(client.create_lease(ttl_seconds=600)["id"])
            latencies.append(time.perf_counter() - started)
    return latencies


def percentiles(latencies: list[float]) -> str:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"p50 {statistics.median(ordered) * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms ({len(ordered)} cycles)"


def time_rm(tree: str) -> float:
    started = time.perf_counter()
    subprocess.run(["rm", "-rf", tree], check=True)
    return time.perf_counter() - started


def time_release(client: Client, lease_id: str, trash: Path) -> float:
    """From the release request until the tree's entry has left the trash (it goes when deleted)."""
    started = time.perf_counter()
    client.release(lease_id)
    while any(name.startswith(lease_id) for name in os.listdir(trash)):
        time.sleep(0.005)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="filesystem to test on")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    files = args.files

    with tempfile.TemporaryDirectory(prefix="scratchd-reclaim-", dir=args.dir) as tmp:
        pool = Path(tmp, "pool")
        pool.mkdir()
        trash = pool / ".trash"
        socket_path = str(Path(tmp, "scratchd.sock"))
        config = Path(tmp, "config.toml")
        # One tenant (this user) drives the cycles: the default per-tenant create rate would cap them.
        config.write_text(
            f'[server]\nsocket = "{socket_path}"\nstate_dir = "{tmp}/state"\nlisten = ""\n'
            f"[limits]\ncreate_rate = 1000000\n"
            f'[[pool]]\nname = "bench"\npath = "{pool}"\n'
        )
        daemon = subprocess.Popen(
            [sys.executable, "-m", "scratchd", "serve", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        rounds: list[tuple[float, float]] = []  # (rm -rf seconds, reclaim seconds)
        try:
            deadline = time.monotonic() + 20
            while not os.path.exists(socket_path) and time.monotonic() < deadline:
                time.sleep(0.05)
            with Client(socket=socket_path) as client:
                for number in range(args.rounds):
                    lease = client.create_lease(ttl_seconds=3600)
                    plain = os.path.join(tmp, "tree")
                    for root in (plain, os.path.join(lease["path"], "tree")):
                        build_tree(root, files, 100)
                    os.sync()
                    if number % 2 == 0:
                        rm_seconds = time_rm(plain)
                        reclaim_seconds = time_release(client, lease["id"], trash)
                    else:
                        reclaim_seconds = time_release(client, lease["id"], trash)
                        rm_seconds = time_rm(plain)
                    rounds.append((rm_seconds, reclaim_seconds))
                    print(
                        f"round {number + 1}: rm -rf {files / rm_seconds:,.0f} files/s, scratchd reclaim "
                        f"{files / reclaim_seconds:,.0f} files/s = {rm_seconds / reclaim_seconds:.2f}×"
                    )

                lease = client.create_lease(ttl_seconds=3600)
                build_tree(os.path.join(lease["path"], "tree"), files, 100)
                os.sync()
                stop = threading.Event()
                quiet: list[float] = []
                worker = threading.Thread(target=lambda: quiet.extend(cycle_latencies(socket_path, stop)))
                worker.start()
                time.sleep(2)  # a baseline of lease cycles with no deletion running
                stop.set()
                worker.join()

                stop.clear()
                busy: list[float] = []
                worker = threading.Thread(target=lambda: busy.extend(cycle_latencies(socket_path, stop)))
                worker.start()
                busy_seconds = time_release(client, lease["id"], trash)
                stop.set()
                worker.join()
        finally:
            daemon.terminate()
            daemon.wait(10)

    rm_seconds = statistics.median(rm for rm, _ in rounds)
    reclaim_seconds = statistics.median(reclaim for _, reclaim in rounds)
    print(f"tree: {files:,} files on {args.dir}; medians of {len(rounds)} rounds")
    print(f"rm -rf:            {files / rm_seconds:>10,.0f} files/s ({rm_seconds:.2f} s)")
    print(
        f"scratchd reclaim:  {files / reclaim_seconds:>10,.0f} files/s ({reclaim_seconds:.2f} s)"
        f"  = {rm_seconds / reclaim_seconds:.2f}× rm -rf"
    )
    print(f"lease cycle, idle daemon:     {percentiles(quiet)}")
    print(
        f"lease cycle, during reclaim:  {percentiles(busy)}  (reclaim meanwhile: "
        f"{files / busy_seconds:,.0f} files/s)"
    )


if __name__ == "__main__":
    main()
