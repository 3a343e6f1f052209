"""Every benchmark in one run, as the markdown the README's "Performance and limits" shows.

    .venv/bin/python bench/run_all.py [--quick] > bench/results.md

Each script measures scratchd against the status quo in the same run and prints its
own ratios; this runs them one after another (never concurrently: they would measure
each other) and stitches their output under headings. --quick shrinks trees and
durations for a smoke run. Stops by itself.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def benches(quick: bool) -> list[tuple[str, list[str]]]:
    files = "20000" if quick else "100000"
    return [
        ("Lease create+release cycles (Unix socket), pool on the regular disk",
         ["lease_cycle.py", "--seconds", "2" if quick else "5"]),
        ("Lease create+release cycles (Unix socket), pool on tmpfs",
         ["lease_cycle.py", "--seconds", "2" if quick else "5", "--pool-dir", "/dev/shm"]),
        ("Durability: SQLite synchronous NORMAL vs FULL, group commit vs one commit per request",
         ["durability.py", "--seconds", "1" if quick else "3", "--rounds", "1" if quick else "3",
          "--dir", "/var/tmp"]),
        ("`scratchd run -- true` start-up", ["run_overhead.py", "-n", "30" if quick else "100"]),
        ("Reclaim vs `rm -rf`, tmpfs", ["reclaim.py", "--files", files, "--dir", "/dev/shm"]),
        ("Reclaim vs `rm -rf`, the regular disk", ["reclaim.py", "--files", files, "--dir", "/var/tmp"]),
        ("Usage scan vs `du -s`, tmpfs", ["scan_vs_du.py", "--files", files, "--dir", "/dev/shm"]),
        ("Usage at scale: scan vs `du -s` on the regular disk, then many active leases",
         ["usage.py", "--files", files, "--leases", "2000" if quick else "10000"]),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPUs, Linux {platform.release()}, "
          f"Python {platform.python_version()}, with `python bench/run_all.py"
          f"{' --quick' if args.quick else ''}`.\n")
    for title, command in benches(args.quick):
        print(f"#### {title}\n\n`python bench/{' '.join(command)}`\n\n```")
        result = subprocess.run([sys.executable, str(HERE / command[0]), *command[1:]], capture_output=True,
                                text=True, timeout=1800)
        print((result.stdout or result.stderr).strip())
        print("```\n", flush=True)


if __name__ == "__main__":
    main()
