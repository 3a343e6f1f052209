"""Time of ``scan_tree`` against ``du -s`` on one tree, in one run, and whether their bytes agree.

    .venv/bin/python bench/scan_vs_du.py --dir /dev/shm             # tmpfs
    .venv/bin/python bench/scan_vs_du.py --dir /var/tmp --cold      # regular disk, caches dropped (root)

The two alternate, after one warm-up each (and once the scan's helper process
is up: a scanner keeps it). Printed: each one's best round, the ratio of best
rounds (below 1: faster than du), and the median of the rounds' ratios; then
the CPU time each took (median of the rounds), for the scan its own process's
and its helper's together, and how much of the tree the helper walked.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
import time

from delete_vs_rm import build_tree

from scratchd.mounts import mount_of, read_mounts
from scratchd.scan import helper, scan_tree


def du_bytes(path: str) -> int:
    out = subprocess.run(["du", "-s", "-B1", path], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def du_cpu() -> float:
    """CPU seconds so far of this process's waited-for children: the du runs."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return children.ru_utime + children.ru_stime


def scan_cpu(helper_pid: int) -> float:
    """CPU seconds so far of this process, where scan_tree runs, and of the scan's helper process."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    with open(f"/proc/{helper_pid}/schedstat") as schedstat:  # nanoseconds on a CPU
        return own.ru_utime + own.ru_stime + int(schedstat.read().split()[0]) / 1e9


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as control:
        control.write("3\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dir", default=tempfile.gettempdir(), help="where to build the tree (default: %(default)s)"
    )
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--per-dir", type=int, default=100, help="files per directory (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--cold", action="store_true", help="drop the page, dentry and inode caches before each run (root)"
    )
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="scratchd-bench-", dir=args.dir)
    tree = os.path.join(work, "tree")
    try:
        dirs = build_tree(tree, args.files, args.per_dir)
        # Hard links (counted once by both) and a sparse file (allocated blocks only).
        for i in range(0, args.files, 1000):
            directory = os.path.join(tree, f"g{i // args.per_dir // 100}", f"d{i // args.per_dir}")
            os.link(os.path.join(directory, f"f{i}"), os.path.join(directory, f"link{i}"))
        with open(os.path.join(tree, "sparse"), "wb") as sparse:
            sparse.truncate(1 << 30)
            sparse.write(b"head")
        os.sync()
        fstype = mount_of(os.path.realpath(work), read_mounts()).fstype
        du_total = du_bytes(tree)
        sample = scan_tree(tree)
        while (executor := helper()) is None:  # a scanner keeps its helper: time the scan once it is up
            time.sleep(0.05)
        helper_pid = executor.submit(os.getpid).result()
        du_times: list[float] = []
        scan_times: list[float] = []
        du_cpus: list[float] = []
        scan_cpus: list[float] = []
        helped: list[int] = []

        def scan() -> None:
            helped.append(scan_tree(tree).helper_entries)

        for _ in range(args.rounds):
            for times, cpus, clock, action in (
                (du_times, du_cpus, du_cpu, lambda: du_bytes(tree)),
                (scan_times, scan_cpus, lambda: scan_cpu(helper_pid), scan),
            ):
                if args.cold:
                    drop_caches()
                cpu_start, start = clock(), time.perf_counter()
                action()
                times.append(time.perf_counter() - start)
                cpus.append(clock() - cpu_start)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    median_ratio = statistics.median(scan / du for scan, du in zip(scan_times, du_times, strict=True))
    cpu_ratio = statistics.median(scan / du for scan, du in zip(scan_cpus, du_cpus, strict=True))
    caches = "cold" if args.cold else "warm"
    print(
        f"{args.files} files in {dirs} directories under {args.dir} ({fstype}), {caches} caches, best of {args.rounds} rounds"
    )
    print(f"  du -s -B1    {min(du_times):7.3f} s  {du_total:>14,} bytes")
    print(
        f"  scan_tree    {min(scan_times):7.3f} s  {sample.bytes:>14,} bytes"
        f"  {min(scan_times) / min(du_times):5.2f}x du's time (median of the rounds' ratios {median_ratio:.2f}x)"
    )
    agree = "agree" if sample.bytes == du_total else f"differ by {sample.bytes - du_total:+,}"
    print(f"  bytes {agree}; scan_tree counted {sample.files:,} files")
    print(
        f"  CPU, median of the rounds: du {statistics.median(du_cpus):.3f} s, scan_tree {statistics.median(scan_cpus):.3f} s"
        f" with its helper ({cpu_ratio:.2f}x du's, median of the rounds' ratios);"
        f" the helper walked {statistics.median(helped) / (sample.files + dirs):.0%} of the entries"
    )


if __name__ == "__main__":
    main()
