"""Each speed trick that bends the structure, against the plain way, in one run.

A trick earns its place by a gain measured here; the figure is written beside it in
the code. Each "plain" case runs the same shipped code with that one trick switched
off from the outside (nothing in scratchd knows about this bench):

client side, ``scratchd run -- true`` in fresh interpreters, interleaved, medians:
  - ``_json``: the client's JSON through CPython's private C accelerator, against the
    ``json`` package (``_json`` hidden, so ``scratchd.client`` takes its fallback);
  - ``_quick_parse``: ``run``'s options read without argparse, against argparse
    (``_quick_parse`` answering None, as it does for anything it does not know);

server side, lease create+release cycles over the Unix socket, one client, cases
alternated in rounds:
  - ``HotPath``: the lease cycle's two requests answered in front of the stack,
    against the whole FastAPI stack (the app ``HotPath`` wraps);
  - ``HeadWithBody``: a response's head written with its body, against uvicorn's two
    writes.

    python bench/tricks.py [-n 200] [--seconds 3] [--rounds 3]

Stops by itself; everything runs on Unix sockets in a temp directory.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from run_overhead import time_interleaved, wait_healthy

from scratchd.client import Client

CLI = "import sys\n{patch}\nfrom scratchd.cli import main\nsys.exit(main())"
CLIENT_CASES = {
    "as shipped": "",
    "json package, not _json": "sys.modules['_json'] = None",
    "argparse, not _quick_parse": "import scratchd.cli as c\nc._quick_parse = lambda *a: None",
}

SERVE = "import sys\nimport scratchd.server as s\n{patch}\nsys.exit(s.serve(sys.argv[1], 'warning'))"
SERVER_CASES = {
    "as shipped": "",
    "whole stack, no HotPath": (
        "make = s.create_app\ns.create_app = lambda daemon: make(daemon).app  # the stack HotPath wraps"
    ),
    "uvicorn's two writes, no HeadWithBody": (
        "class Plain:\n"
        "    def __init__(self, transport): self._t = transport\n"
        "    def hold_next_write(self): pass\n"
        "    def flush(self): pass\n"
        "    def __getattr__(self, name): return getattr(self._t, name)\n"
        "s.HeadWithBody = Plain"
    ),
}


def client_side(socket: str, runs: int) -> None:
    env = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}
    env["SCRATCHD_SOCKET"] = socket

    def case(patch: str) -> Callable[[], None]:
        argv = [sys.executable, "-c", CLI.format(patch=patch), "run", "--", "true"]

        def run() -> None:
            subprocess.run(argv, env=env, check=True)

        return run

    medians = time_interleaved({name: case(patch) for name, patch in CLIENT_CASES.items()}, runs)
    shipped = medians["as shipped"]
    print(f"`scratchd run -- true`, median of {runs} each, interleaved\n")
    print("| case | ms | trick's gain ms |")
    print("|---|---:|---:|")
    for name, median in medians.items():
        gain = "" if name == "as shipped" else f"{(median - shipped) * 1000:.2f}"
        print(f"| {name} | {median * 1000:.2f} | {gain} |")
    print()


@contextlib.contextmanager
def daemon(root: str, name: str, patch: str) -> Iterator[str]:
    socket, pool = f"{root}/{name}.sock", f"{root}/{name}-pool"
    os.mkdir(pool)
    config = Path(root, f"{name}.toml")
    config.write_text(
        f'[server]\nsocket = "{socket}"\nstate_dir = "{root}/{name}-state"\nlisten = ""\n'
        "[limits]\ncreate_rate = 1000000\n"
        f'[[pool]]\nname = "bench"\npath = "{pool}"\n'
    )
    log = Path(root, f"{name}.log")
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", SERVE.format(patch=patch), str(config)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_healthy(socket, process, log)
        yield socket
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(15)


def cycles(socket: str, seconds: float) -> list[float]:
    latencies = []
    with Client(socket=socket, timeout=30) as client:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            started = time.perf_counter()
            client.release(client.create_lease(ttl_seconds=600)["id"])
            latencies.append(time.perf_counter() - started)
    return latencies


def server_side(seconds: float, rounds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="scratchd-bench-") as root, contextlib.ExitStack() as stack:
        sockets = {
            name: stack.enter_context(daemon(root, f"d{i}", patch))
            for i, (name, patch) in enumerate(SERVER_CASES.items())
        }
        for socket in sockets.values():
            cycles(socket, 0.5)  # warm up
        samples: dict[str, list[float]] = {name: [] for name in sockets}
        for _ in range(rounds):
            for name, socket in sockets.items():
                samples[name] += cycles(socket, seconds / rounds)
    print(f"lease create+release, 1 client, {seconds:g} s each in {rounds} alternating rounds\n")
    print("| case | cycles/s | p50 ms | trick's gain, p50 ms |")
    print("|---|---:|---:|---:|")
    shipped = statistics.median(samples["as shipped"])
    for name, latencies in samples.items():
        p50 = statistics.median(latencies)
        gain = "" if name == "as shipped" else f"{(p50 - shipped) * 1000:.3f}"
        print(f"| {name} | {len(latencies) / seconds:,.0f} | {p50 * 1000:.3f} | {gain} |")
    print()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200, help="runs of each client case (default 200)")
    parser.add_argument("--seconds", type=float, default=6.0, help="cycles per server case (default 6)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="scratchd-bench-") as root, daemon(root, "cli", "") as socket:
        client_side(socket, args.n)
    server_side(args.seconds, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
