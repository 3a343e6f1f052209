"""Usage accounting at scale: many active leases, and the scan against ``du -s``.

    .venv/bin/python bench/usage.py [--leases 10000] [--files 100000]

First runs bench/scan_vs_du.py on the regular disk (scan_tree vs du -s, one run), then
creates the leases over the Unix socket from 16 client processes, then measures
``GET /v1/usage`` latency (p50/p99 over 300 requests), the daemon's RSS, how long a
restart takes to answer ``/readyz`` again, and the inotify watches the daemon holds.
Stops by itself.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from scratchd.client import Client, ScratchdError


def _create(socket_path: str, count: int) -> None:
    with Client(socket=socket_path) as client:
        i = 0
        while i < count:
            try:
                client.create_lease(
                    ttl_seconds=86400,
                    labels={"bench": "scale", "n": str(i % 50)},
                    idle_timeout_seconds=86400 if i % 10 == 0 else None,
                )
            except ScratchdError as exc:  # the per-tenant create rate: wait as told, then go on
                details = exc.details if isinstance(exc.details, dict) else {}
                if details.get("limit") != "create_rate":
                    raise
                time.sleep(float(details.get("retry_after_seconds", 0.1)))
                continue
            i += 1


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _inotify_watches(pid: int) -> int:
    watches = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:inotify":
                watches += Path(f"/proc/{pid}/fdinfo/{fd}").read_text().count("inotify wd:")
        except OSError:
            continue
    return watches


def _start(config: Path, socket_path: str) -> tuple[subprocess.Popen, float]:
    started = time.perf_counter()
    daemon = subprocess.Popen(
        [sys.executable, "-m", "scratchd", "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with Client(socket=socket_path, timeout=2) as client:
                client.request("GET", "/readyz")
            return daemon, time.perf_counter() - started
        except Exception:
            time.sleep(0.01)
    raise SystemExit("daemon did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--leases", type=int, default=10_000)
    parser.add_argument("--files", type=int, default=100_000, help="files in the tree scanned against du")
    args = parser.parse_args()
    subprocess.run(
        [
            sys.executable,
            str(Path(__file__).with_name("scan_vs_du.py")),
            "--files",
            str(args.files),
            "--dir",
            "/var/tmp",
        ],
        check=True,
    )
    print()
    with tempfile.TemporaryDirectory(prefix="scratchd-scale-") as tmp:
        pool = Path(tmp, "pool")
        pool.mkdir()
        socket_path = str(Path(tmp, "scratchd.sock"))
        config = Path(tmp, "config.toml")
        config.write_text(
            f'[server]\nsocket = "{socket_path}"\nstate_dir = "{tmp}/state"\nlisten = ""\n'
            "[limits]\n# the bench measures the daemon's capacity, not the per-tenant create-rate policy\n"
            "create_rate = 1000000\n"
            f'[[tenant]]\nname = "{_me()}"\nmax_leases = {args.leases + 10}\n'
            f'[[pool]]\nname = "bench"\npath = "{pool}"\n'
        )
        daemon, _ = _start(config, socket_path)
        try:
            clients = 16
            workers = [
                mp.Process(target=_create, args=(socket_path, args.leases // clients)) for _ in range(clients)
            ]
            started = time.perf_counter()
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
            create_seconds = time.perf_counter() - started
            with Client(socket=socket_path) as client:
                created = len(client.list_leases()["leases"])
            latencies = []
            with Client(socket=socket_path) as client:
                for _ in range(300):
                    t = time.perf_counter()
                    client.usage()
                    latencies.append(time.perf_counter() - t)
            latencies.sort()
            rss = _rss_mb(daemon.pid)
            watches = _inotify_watches(daemon.pid)
            daemon.terminate()
            daemon.wait(30)
            daemon, ready_seconds = _start(config, socket_path)
        finally:
            daemon.terminate()
            daemon.wait(30)
    print(
        f"active leases:            {created:,} (created at {created / create_seconds:,.0f}/s by {clients} clients)"
    )
    print(
        f"GET /v1/usage:            p50 {statistics.median(latencies) * 1000:.1f} ms, "
        f"p99 {latencies[int(len(latencies) * 0.99)] * 1000:.1f} ms"
    )
    print(f"daemon RSS:               {rss:.0f} MB")
    print(f"restart to ready:         {ready_seconds:.2f} s")
    print(
        f"inotify watches held:     {watches} (1 per pool + activity watches for every lease, within the budget)"
    )


def _me() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


if __name__ == "__main__":
    main()
