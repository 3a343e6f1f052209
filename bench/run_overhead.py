"""How much ``scratchd run -- true`` costs over a bare ``true``, and over ``mktemp -d`` + ``rm -rf``.

``scratchd run`` wraps every CI job, so its start-up is paid on every job. This
starts a throwaway daemon (temp config, socket, state and pool) unless
``--socket`` names a running one, then times the cases, interleaved, and prints
medians, the overhead and the ratios.

A fourth case is the floor no Python CLI installed by pip gets under: the same
interpreter and site-packages running what pip's console-script launcher runs
before it imports the package (``import re, sys``, and its ``re.sub`` of argv[0]).
What ``scratchd run`` adds above that is scratchd's own share: its imports, two
requests, the spawn and the wait.

    python bench/run_overhead.py [-n 200] [--socket PATH] [--scratchd CMD]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from scratchd.client import Client, DaemonUnreachable


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200, help="runs of each (default 200)")
    parser.add_argument("--socket", help="use the daemon on this socket instead of starting one")
    parser.add_argument(
        "--scratchd", help="the command to time (default: the scratchd script next to this Python)"
    )
    args = parser.parse_args()
    scratchd = shlex.split(args.scratchd) if args.scratchd else default_command()

    with contextlib.ExitStack() as stack:
        socket = args.socket or stack.enter_context(throwaway_daemon())
        # Timed as installed: pip compiles the bytecode, so let the warm-up runs cache it.
        env = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}
        env["SCRATCHD_SOCKET"] = socket
        check = subprocess.run([*scratchd, "run", "--", "true"], env=env, capture_output=True, text=True)
        if check.returncode != 0:
            print(
                f"scratchd run -- true failed ({check.returncode}): {check.stderr.strip()}", file=sys.stderr
            )
            return 1

        def bare() -> None:
            subprocess.run(["true"], check=True)

        def scratchd_run() -> None:
            subprocess.run([*scratchd, "run", "--", "true"], env=env, check=True)

        def launcher_floor() -> None:
            subprocess.run([sys.executable, "-c", LAUNCHER], env=env, check=True)

        def mktemp_rm() -> None:
            path = subprocess.run(["mktemp", "-d"], check=True, capture_output=True, text=True).stdout.strip()
            subprocess.run(["rm", "-rf", path], check=True)

        cases: dict[str, Callable[[], None]] = {
            "true": bare,
            "mktemp -d + rm -rf": mktemp_rm,
            "pip launcher, no scratchd": launcher_floor,
            "scratchd run -- true": scratchd_run,
        }
        medians = time_interleaved(cases, args.n)

    for name, median in medians.items():
        print(f"{name:<25} {median * 1000:8.2f} ms  (median of {args.n})")
    run, true, mktemp = medians["scratchd run -- true"], medians["true"], medians["mktemp -d + rm -rf"]
    print(f"overhead of scratchd run over true: {(run - true) * 1000:.2f} ms")
    print(f"scratchd run / true:               {run / true:.1f}x")
    print(f"scratchd run / (mktemp -d + rm):   {run / mktemp:.1f}x")
    floor = medians["pip launcher, no scratchd"]
    print(
        f"the launcher floor over true:      {(floor - true) * 1000:.2f} ms (interpreter start, site, `import re`)"
    )
    print(f"scratchd's own share (run - floor): {(run - floor) * 1000:.2f} ms")
    return 0


# What pip's console-script launcher (pip 23-26) runs before `from scratchd.cli import main`.
LAUNCHER = "import re\nimport sys\nsys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])"


def time_interleaved(cases: dict[str, Callable[[], None]], runs: int) -> dict[str, float]:
    """Median seconds of each case; rounds alternate the cases so drift hits them alike."""
    for case in cases.values():  # warm the page cache and the daemon
        for _ in range(3):
            case()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(runs):
        for name, case in cases.items():
            start = time.perf_counter()
            case()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in samples.items()}


def default_command() -> list[str]:
    script = Path(sys.executable).with_name("scratchd")
    return [str(script)] if script.exists() else [sys.executable, "-m", "scratchd"]


@contextlib.contextmanager
def throwaway_daemon() -> Iterator[str]:
    """A ``scratchd serve`` on a temp config with one pool; yields its socket."""
    with tempfile.TemporaryDirectory(prefix="scratchd-bench-") as root:
        socket, state, pool = f"{root}/scratchd.sock", f"{root}/state", f"{root}/pool"
        os.mkdir(pool)
        config = Path(root, "config.toml")
        config.write_text(
            f'[server]\nsocket = "{socket}"\nstate_dir = "{state}"\nlisten = ""\n\n'
            f'[[pool]]\nname = "bench"\npath = "{pool}"\n'
        )
        with open(f"{root}/daemon.log", "wb") as log:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "scratchd", "serve", "--config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_healthy(socket, daemon, Path(root, "daemon.log"))
            yield socket
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()


def wait_healthy(socket: str, daemon: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if daemon.poll() is not None:
            raise SystemExit(f"the daemon exited ({daemon.returncode}):\n{log.read_text(errors='replace')}")
        try:
            with Client(socket=socket, timeout=2) as client:
                client.health()
            return
        except DaemonUnreachable as exc:
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"the daemon did not answer within {timeout}s:\n{log.read_text(errors='replace')}"
                ) from exc
            time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main())
