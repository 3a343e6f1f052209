"""Reclaim through the daemon vs ``rm -rf``, and what deletion costs the API meanwhile.

    .venv/bin/python bench/reclaim.py [--files 100000] [--dir /var/tmp]

One run: build three identical trees on the same filesystem, two inside leases;
time ``rm -rf`` on one; release the first lease and time until its tree has left
the daemon's trash (nothing else running); then release the second while one
client does create+release cycles, recording their latency. Prints files/s for
``rm -rf`` and the daemon, the ratio, and lease-cycle p50/p99 with the daemon idle
and during the deletion. Stops by itself; talks to the daemon over its socket only.
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
from delete_vs_rm import build_tree  # noqa: E402

from scratchd.client import Client  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="filesystem to test on")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="scratchd-reclaim-", dir=args.dir) as tmp:
        pool = Path(tmp, "pool")
        pool.mkdir()
        socket_path = str(Path(tmp, "scratchd.sock"))
        config = Path(tmp, "config.toml")
        config.write_text(f'[server]\nsocket = "{socket_path}"\nstate_dir = "{tmp}/state"\nlisten = ""\n'
                          f'[[pool]]\nname = "bench"\npath = "{pool}"\n')
        daemon = subprocess.Popen([sys.executable, "-m", "scratchd", "serve", "--config", str(config)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 20
            while not os.path.exists(socket_path) and time.monotonic() < deadline:
                time.sleep(0.05)
            trash = pool / ".trash"
            with Client(socket=socket_path) as client:
                alone, lease = (client.create_lease(ttl_seconds=3600) for _ in range(2))
                for tree in (alone["path"], lease["path"], tmp):
                    build_tree(os.path.join(tree, "tree"), args.files, 100)
                os.sync()

                started = time.perf_counter()
                subprocess.run(["rm", "-rf", os.path.join(tmp, "tree")], check=True)
                rm_seconds = time.perf_counter() - started

                started = time.perf_counter()
                client.release(alone["id"])
                while any(name.startswith(alone["id"]) for name in os.listdir(trash)):
                    time.sleep(0.005)  # polling the trash: the tree's entry goes when it is deleted
                reclaim_seconds = time.perf_counter() - started

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
                started = time.perf_counter()
                client.release(lease["id"])
                worker.start()
                while any(name.startswith(lease["id"]) for name in os.listdir(trash)):
                    time.sleep(0.005)
                busy_seconds = time.perf_counter() - started
                stop.set()
                worker.join()
        finally:
            daemon.terminate()
            daemon.wait(10)

    files = args.files
    print(f"tree: {files:,} files on {args.dir}")
    print(f"rm -rf:            {files / rm_seconds:>10,.0f} files/s ({rm_seconds:.2f} s)")
    print(f"scratchd reclaim:  {files / reclaim_seconds:>10,.0f} files/s ({reclaim_seconds:.2f} s)"
          f"  = {rm_seconds / reclaim_seconds:.2f}× rm -rf")
    print(f"lease cycle, idle daemon:     {percentiles(quiet)}")
    print(f"lease cycle, during reclaim:  {percentiles(busy)}  (reclaim meanwhile: "
          f"{files / busy_seconds:,.0f} files/s)")


if __name__ == "__main__":
    main()
