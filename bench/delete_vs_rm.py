"""Files per second of ``delete_tree`` against ``rm -rf`` on identical trees, in one run.

    .venv/bin/python bench/delete_vs_rm.py --dir /dev/shm            # tmpfs
    .venv/bin/python bench/delete_vs_rm.py --dir /var/tmp --files 100000

Each round builds one tree per contender, syncs, then times them in a rotating
order so none always runs first. Printed: each one's best round, the ratio of
best rounds (above 1: faster than rm), and the median of the rounds' ratios;
on a busy machine the best rounds are the ones least disturbed.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable

from scratchd.mounts import mount_of, read_mounts
from scratchd.reclaim.deleter import delete_tree


def build_tree(root: str, files: int, per_dir: int) -> int:
    """``files`` files, ``per_dir`` to a directory, 100 directories to a parent; returns the directory count."""
    os.mkdir(root)
    dirs = 1
    directory = root
    for i in range(files):
        if i % per_dir == 0:
            group = os.path.join(root, f"g{i // per_dir // 100}")
            if not os.path.isdir(group):
                os.mkdir(group)
                dirs += 1
            directory = os.path.join(group, f"d{i // per_dir}")
            os.mkdir(directory)
            dirs += 1
        fd = os.open(os.path.join(directory, f"f{i}"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        # Mostly small files, every tenth one spanning a few blocks.
        os.write(fd, b"x" * (9000 if i % 10 == 0 else i % 200))
        os.close(fd)
    return dirs


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def rm_rf(path: str) -> None:
    subprocess.run(["rm", "-rf", "--", path], check=True)


def delete(path: str, count_bytes: bool) -> None:
    result = delete_tree(path, count_bytes=count_bytes)
    if not result.complete or result.errors:
        raise SystemExit(f"delete_tree failed: {result}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dir", default=tempfile.gettempdir(), help="where to build the trees (default: %(default)s)"
    )
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--per-dir", type=int, default=100, help="files per directory (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="scratchd-bench-", dir=args.dir)
    fstype = mount_of(os.path.realpath(work), read_mounts()).fstype
    contenders: dict[str, Callable[[str], None]] = {
        "rm -rf": rm_rf,
        "delete_tree": lambda path: delete(path, True),
        "delete_tree(count_bytes=False)": lambda path: delete(path, False),
    }
    times: dict[str, list[float]] = {name: [] for name in contenders}
    try:
        for round_ in range(args.rounds):
            names = list(contenders)
            names = names[round_ % len(names) :] + names[: round_ % len(names)]
            trees = {name: os.path.join(work, f"tree{index}") for index, name in enumerate(names)}
            for tree in trees.values():
                dirs = build_tree(tree, args.files, args.per_dir)
            os.sync()
            for name in names:
                times[name].append(timed(functools.partial(contenders[name], trees[name])))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"{args.files} files in {dirs} directories under {args.dir} ({fstype}), best of {args.rounds} rounds"
    )
    baseline = times["rm -rf"]
    for name, runs in times.items():
        best = min(runs)
        median_ratio = statistics.median(b / t for b, t in zip(baseline, runs, strict=True))
        print(
            f"  {name:32} {best:7.3f} s {args.files / best:11,.0f} files/s"
            f"  {min(baseline) / best:5.2f}x rm (median of the rounds' ratios {median_ratio:.2f}x)"
        )


if __name__ == "__main__":
    main()
