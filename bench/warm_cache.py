"""Warm caches: what a kept cache costs to hand over, and what it saves a real job, in one run.

    .venv/bin/python bench/warm_cache.py [--dir /var/tmp] [--files 100000] [--rounds 20] [--jobs 5]

Hand-over: a lease created with the ``cache_key`` of a kept ``--files``-file tree
against an empty create (both over the Unix socket), and a release that keeps the tree
against one that deletes it; then the way CI caches restore the same tree: ``tar -x``
of it (uncompressed: their best case) and ``cp -a``, into a new directory on the same
filesystem. Creates are interleaved, each on an idle daemon (not beside the measurement of
the tree the last release kept), and their medians compared.

A job: ``uv pip install`` of a wheelhouse of about 40 wheels (downloaded once with pip
into WHEELHOUSE, then ``--no-index --find-links``) into a fresh venv, by
``scratchd run --cache-key K --tool uv``: a cold lease (a new key each time), a warm
one (the key of the previous job), and uv with its own persistent cache on the same
mount, alone and inside ``scratchd run`` (what ``run`` itself adds). Interleaved, each
round in another order; each job starts when the daemon is idle (its trash drained, the
kept cache measured): a cold lease's deletion, seconds of unlinks, otherwise ran into
whichever job came next (the warm one, always, in a fixed order). Medians.

The pool, the state, the trees and the venvs are all under ``--dir``. Stops by itself.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from delete_vs_rm import build_tree
from run_overhead import default_command, wait_healthy

from scratchd.client import Client
from scratchd.mounts import mount_of, read_mounts

UV = shutil.which("uv", path=os.path.dirname(sys.executable)) or shutil.which("uv")
SCRATCHD = [sys.executable, "-m", "scratchd"]
WHEELHOUSE = Path(tempfile.gettempdir(), "scratchd-bench-wheelhouse")
# A web service's dependencies and a test runner's: 40 wheels with their own dependencies.
REQUIREMENTS = [
    *("fastapi", "httpx", "pydantic", "rich", "typer", "sqlalchemy", "jinja2", "requests", "pyyaml"),
    *("uvicorn", "attrs", "python-dateutil", "pytz", "packaging", "pytest", "platformdirs", "filelock"),
]


@contextmanager
def daemon(root: Path) -> Iterator[tuple[str, Path, int]]:
    """A ``scratchd serve`` with one pool under ``root``; its socket, pool and pid."""
    socket, pool, log = root / "scratchd.sock", root / "pool", root / "daemon.log"
    pool.mkdir()
    config = root / "config.toml"
    config.write_text(
        f'[server]\nsocket = "{socket}"\nstate_dir = "{root}/state"\nlisten = ""\n'
        "[limits]\ncreate_rate = 1000000\n"
        f'[[pool]]\nname = "bench"\npath = "{pool}"\ncache_max = "90%"\n'
    )
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [*SCRATCHD, "serve", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
        )
    try:
        wait_healthy(str(socket), process, log)
        yield str(socket), pool, process.pid
    finally:
        process.terminate()
        process.wait(30)


def seconds(action: Callable[..., object], *args: object, **kwargs: object) -> float:
    started = time.perf_counter()
    action(*args, **kwargs)
    return time.perf_counter() - started


def ms(value: float) -> str:
    return f"{value * 1000:,.2f}" if value < 0.01 else f"{value * 1000:,.0f}"


def hand_over(client: Client, pid: int, root: Path, files: int, rounds: int) -> None:
    held = client.create_lease(cache_key="tree")
    dirs = build_tree(os.path.join(held["path"], "tree"), files, 1000)
    client.release(held["id"], keep=True)
    warm, empty, keep, delete = [], [], [], []
    for _ in range(rounds):
        # Each create on an idle daemon: not beside the last keep's measurement of the tree.
        wait_idle(client, pid)
        started = time.perf_counter()
        lease = client.create_lease(cache_key="tree")
        warm.append(time.perf_counter() - started)
        assert lease["cache"]["hit"] == "exact", lease["cache"]
        keep.append(seconds(client.release, lease["id"], keep=True))
        wait_idle(client, pid)
        started = time.perf_counter()
        lease = client.create_lease()
        empty.append(time.perf_counter() - started)
        delete.append(seconds(client.release, lease["id"]))

    source = root / "source"
    build_tree(str(source), files, 1000)
    archive = root / "tree.tar"
    subprocess.run(["tar", "-cf", str(archive), "-C", str(source), "."], check=True)
    restore_rounds = max(1, min(3, rounds))
    tar, cp = [], []
    for n in range(restore_rounds):
        target = root / f"restored-{n}"
        target.mkdir()
        tar.append(seconds(subprocess.run, ["tar", "-xf", str(archive), "-C", str(target)], check=True))
        subprocess.run(["rm", "-rf", str(target)], check=True)
        cp.append(seconds(subprocess.run, ["cp", "-a", str(source), str(target)], check=True))
        subprocess.run(["rm", "-rf", str(target)], check=True)

    warm_median, empty_median = statistics.median(warm), statistics.median(empty)
    print(
        f"a kept cache of {files:,} files in {dirs:,} directories, "
        f"{rounds} creates of each, interleaved; tar and cp: {restore_rounds} rounds\n"
    )
    print("| | median ms | max ms | ÷ empty create | restore ÷ warm create |")
    print("|---|---:|---:|---:|---:|")
    print(f"| create, empty | {ms(empty_median)} | {ms(max(empty))} | 1.00× | |")
    print(
        f"| create, warm (hit) | {ms(warm_median)} | {ms(max(warm))} | {warm_median / empty_median:.2f}× | |"
    )
    print(f"| release, deleted | {ms(statistics.median(delete))} | {ms(max(delete))} | | |")
    print(f"| release, kept | {ms(statistics.median(keep))} | {ms(max(keep))} | | |")
    for name, times in (("`tar -x` of the tree", tar), ("`cp -a` of the tree", cp)):
        median = statistics.median(times)
        print(f"| {name} | {ms(median)} | {ms(max(times))} | | {median / warm_median:,.0f}× |")
    print(
        f"\ngoals: warm create ≤ 1.2× an empty one: {warm_median / empty_median:.2f}×; "
        f"≥ 100× faster than restoring: tar {statistics.median(tar) / warm_median:,.0f}×, "
        f"cp {statistics.median(cp) / warm_median:,.0f}×"
    )


def cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` and its descendants (the daemon's deleter, scanner, rm), reaped ones
    included; 0 where ``/proc`` does not list children."""
    total, todo, tick = 0.0, [pid], os.sysconf("SC_CLK_TCK")
    while todo:
        process = todo.pop()
        try:
            with open(f"/proc/{process}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            total += sum(int(value) for value in fields[11:15]) / tick  # utime stime cutime cstime
            for task in os.listdir(f"/proc/{process}/task"):
                with open(f"/proc/{process}/task/{task}/children") as children:
                    todo += [int(child) for child in children.read().split()]
        except (OSError, ValueError, IndexError):
            continue
    return total


def wait_idle(client: Client, pid: int, limit: float = 30.0) -> None:
    """Until the daemon has nothing left to do: its trash drained, and no CPU used by it or its
    workers for 0.3 s (the kept cache's measurement, a usage scan). Untimed, before every job
    alike, so each starts on an idle daemon and none pays for the job before it."""
    deadline = time.monotonic() + limit
    while client.usage()["reclaim"]["pending"] and time.monotonic() < deadline:
        time.sleep(0.02)
    used = cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = cpu_seconds(pid)
        if now == used:
            return
        used = now


def wheelhouse() -> list[str]:
    """The wheels, downloaded once (pip, through its configured index) and reused after."""
    marker = WHEELHOUSE / "requirements.txt"
    if not marker.exists() or marker.read_text().split() != REQUIREMENTS:
        WHEELHOUSE.mkdir(exist_ok=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--only-binary",
                ":all:",
                "-d",
                str(WHEELHOUSE),
                *REQUIREMENTS,
            ],
            check=True,
            stderr=subprocess.DEVNULL,
        )
        marker.write_text("\n".join(REQUIREMENTS) + "\n")
    return sorted(path.name for path in WHEELHOUSE.glob("*.whl"))


def job(root: Path, socket: str, pid: int, client: Client, rounds: int) -> None:
    uv = UV
    assert uv is not None  # main exits first without uv
    wheels = wheelhouse()
    env = {**os.environ, "SCRATCHD_SOCKET": socket, "UV_OFFLINE": "1", "UV_PYTHON_DOWNLOADS": "never"}
    # Timed as installed, as bench/run_overhead.py does: pip compiles scratchd's bytecode, and
    # the console script starts it (not runpy). With PYTHONDONTWRITEBYTECODE set and no .pyc,
    # every `scratchd run` compiled cli.py and client.py again: 61 ms a run instead of 34.
    for name in (
        "UV_CACHE_DIR",
        "UV_LINK_MODE",
        "UV_NO_CACHE",
        "TMPDIR",
        "VIRTUAL_ENV",
        "PYTHONDONTWRITEBYTECODE",
    ):
        env.pop(name, None)
    own_cache = root / "uv-cache"  # uv's own persistent cache, on the pool's mount
    jobs = root / "jobs"
    jobs.mkdir()
    counter = iter(range(1_000_000))

    def install(wrapper: list[str], extra_env: dict[str, str]) -> float:
        project = jobs / str(next(counter))
        project.mkdir()
        venv = project / ".venv"
        subprocess.run(
            [uv, "venv", "-q", "--python", sys.executable, str(venv)], check=True, env=env, cwd=project
        )
        command = [uv, "pip", "install", "-q", "--python", str(venv / "bin" / "python"), "--no-index"]
        command += ["--find-links", str(WHEELHOUSE), *REQUIREMENTS]
        wait_idle(client, pid)
        started = time.perf_counter()
        subprocess.run([*wrapper, *command], check=True, env={**env, **extra_env}, cwd=project)
        elapsed = time.perf_counter() - started
        shutil.rmtree(project)
        return elapsed

    scratchd = default_command()

    def run(*options: str) -> list[str]:
        return [*scratchd, "run", *options, "--tool", "uv", "--"]

    variants: dict[str, Callable[[int], float]] = {
        "cold lease (`--cache-key` missed)": lambda n: install(
            run("--cache-key", f"cold-{n}", "--keep", "never"), {}
        ),
        "warm lease (`--cache-key` hit)": lambda n: install(run("--cache-key", "job"), {}),
        "uv's own cache, on the same mount": lambda n: install([], {"UV_CACHE_DIR": str(own_cache)}),
        "uv's own cache, inside `scratchd run`": lambda n: install(run(), {"UV_CACHE_DIR": str(own_cache)}),
    }
    variants["warm lease (`--cache-key` hit)"](-1)  # the job before: it leaves the cache warm
    variants["uv's own cache, on the same mount"](-1)
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for n in range(rounds):
        for name in names[n % len(names) :] + names[: n % len(names)]:  # each round starts one later
            times[name].append(variants[name](n))
    medians = {name: statistics.median(values) for name, values in times.items()}
    cold, warm = medians["cold lease (`--cache-key` missed)"], medians["warm lease (`--cache-key` hit)"]
    own = medians["uv's own cache, on the same mount"]
    print(
        f"`uv pip install` of {len(wheels)} wheels ({', '.join(REQUIREMENTS)} and their dependencies) "
        f"from a local wheelhouse into a fresh venv; {rounds} jobs of each, interleaved "
        "(each round in another order), each started on an idle daemon\n"
    )
    print("| job | median ms | max ms | ÷ warm lease |")
    print("|---|---:|---:|---:|")
    for name, values in times.items():
        print(f"| {name} | {ms(medians[name])} | {ms(max(values))} | {medians[name] / warm:.2f}× |")
    print(
        f"\ngoals: warm ≤ 1.1× uv's own warm cache: {warm / own:.2f}×; ≥ 5× faster than cold: {cold / warm:.1f}×"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", help="where the pool and everything else go (default: the temp directory)")
    parser.add_argument("--files", type=int, default=100_000, help="files in the kept tree (default 100000)")
    parser.add_argument("--rounds", type=int, default=20, help="creates of each kind (default 20)")
    parser.add_argument("--jobs", type=int, default=5, help="uv jobs of each kind (default 5)")
    args = parser.parse_args()
    if UV is None:
        raise SystemExit("needs uv (pip install uv)")
    with tempfile.TemporaryDirectory(prefix="scratchd-bench-cache-", dir=args.dir) as tmp:
        root = Path(tmp)
        with daemon(root) as (socket, pool, pid), Client(socket=socket) as client:
            mount = mount_of(os.path.realpath(pool), read_mounts())
            print(f"pool on {mount.fstype} ({mount.mount_point})\n")
            print("### Hand-over\n")
            hand_over(client, pid, root, args.files, args.rounds)
            print("\n### A job\n")
            job(root, socket, pid, client, args.jobs)


if __name__ == "__main__":
    main()
