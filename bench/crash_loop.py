"""Crash loop: kill -9 the daemon at a random moment under churn, restart, check, repeat.

    .venv/bin/python bench/crash_loop.py [--cycles 100] [--clients 3] [--seed 1]

Each cycle: a few client processes churn leases (create + write a marker and files,
renew, release, 1-2 s TTLs, leases bound to a child process they kill); once they are
under way, after a random delay, the daemon gets SIGKILL; the clients stop (killing
their children), the daemon restarts and reconciles, and the invariants are checked:

- right after the restart, every active lease's directory exists (guarantee 2) and still
  holds the marker its client wrote; every lease a client got a 201 for is known
  (guarantee 1: durable before the answer); every release a client got an answer for is
  ended as ``released``; no ended lease's path exists (guarantee 3);
- within ``gc.orphan_grace`` (1 s here, so leaks show) + a few GC cycles, the pool
  holds exactly the active leases (guarantee 4: directories made just before a kill are
  orphans, reclaimed) and the active leases' directories and markers are still
  there: orphan review took nothing live;
- the trash drains, on disk and in ``/v1/usage``.

In a share of the cycles (``--double-kill``, default 0.2) the restarted daemon is
killed once more at a random moment within 0.3 s of being ready -- while it resumes
the trash and runs its first orphan reviews -- and restarted again before the checks.

At the end the whole event log is checked across all restarts: gap-free ``seq``, one
``lease_created`` per lease, one ``lease_ended`` per ended lease with the record's
reason, which is one the client's knowledge allows (a kill between the rename into
the trash and its commit ends a lease as ``directory_removed`` at the next start).

Prints a line per cycle and a summary; exits 1 on any violation. Stops by itself
(``--cycles``, and ``--max-minutes`` as a backstop). Everything happens in a temp
directory, over the daemon's own Unix socket.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import soak
from soak import Client, LocalDaemon, ScratchdError, wait_until

GC_INTERVAL = 0.1
ORPHAN_GRACE = 1.0
HELD_TTL = 20  # leases carried across cycles expire after a few of them
CRASH_MIX = {"create": 3, "write": 2, "renew": 1, "release": 3, "short_ttl": 2, "pid_bound": 1}
MAX_DELAY = 1.0  # the random moment of the kill, after the churn is under way


def check_after_restart(client: Client, books: soak.Books, everything: soak.Books) -> list[str]:
    """Guarantees 1-3 as the restarted daemon sees them, before any GC cycle could hide a loss."""
    problems = []
    for lease in client.list_leases()["leases"]:
        # A short lease may expire between the listing and the look: then it has ended.
        if not os.path.isdir(lease["path"]) and client.get_lease(lease["id"])["state"] != "ended":
            problems.append(f"active lease {lease['id']} has no directory after restart (guarantee 2)")
        facts = everything.leases.get(lease["id"])
        if (
            facts
            and facts.marked
            and not soak._marker_ok(lease["path"], lease["id"])
            and client.get_lease(lease["id"])["state"] == "active"
        ):
            problems.append(f"active lease {lease['id']} lost its marker after restart (guarantee 2)")
    for lease_id, facts in books.leases.items():
        try:
            record = client.get_lease(lease_id)
        except ScratchdError as exc:
            problems.append(
                f"lease {lease_id} ({facts.kind}) was answered 201 but is unknown after restart: "
                f"{exc.code} (guarantee 1)"
            )
            continue
        if facts.released is not None and (record["state"], record["end_reason"]) != ("ended", "released"):
            problems.append(
                f"lease {lease_id}: release answered, after restart {record['state']}/{record['end_reason']}"
            )
        if record["state"] == "ended" and os.path.lexists(facts.path):
            problems.append(
                f"lease {lease_id} ended ({record['end_reason']}) but its path exists (guarantee 3)"
            )
    return problems


def check_settled(
    client: Client, pool_path: str, everything: soak.Books, canary: str, timeout: float
) -> list[str]:
    """No leaks once orphan grace has passed, nothing live taken, the trash drained.

    ``canary`` is a stray directory made right after the restart: once it is reclaimed,
    an orphan review past grace has run on this daemon's watch, so a live lease it
    wrongly took would be missing now.
    """
    problems = []
    if not wait_until(lambda: not os.path.lexists(os.path.join(pool_path, canary)), timeout, interval=0.05):
        problems.append(f"canary orphan {canary} not reclaimed within {timeout:.1f}s (guarantee 4)")
    if not wait_until(lambda: not soak.leak_report(client, pool_path), timeout, interval=0.05):
        problems += soak.leak_report(client, pool_path)
    for lease in client.list_leases()["leases"]:
        facts = everything.leases.get(lease["id"])
        if (
            facts
            and facts.marked
            and not soak._marker_ok(lease["path"], lease["id"])
            and client.get_lease(lease["id"])["state"] == "active"
        ):
            problems.append(
                f"active lease {lease['id']} lost its directory or marker after orphan review (guarantee 2)"
            )
    if not wait_until(lambda: not soak.trash_report(client, pool_path), 30, interval=0.05):
        problems += soak.trash_report(client, pool_path)
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cycles", type=int, default=100)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--double-kill",
        type=float,
        default=0.2,
        help="share of cycles where the restarted daemon is killed again while it recovers",
    )
    parser.add_argument(
        "--max-minutes", type=float, default=15.0, help="stop after this long whatever --cycles says"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp directory (daemon log, journals)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    tmp = tempfile.mkdtemp(prefix="scratchd-crash-")
    journal_dir = Path(tmp, "journals")
    journal_dir.mkdir()
    daemon = LocalDaemon(Path(tmp), gc={"interval": f"{GC_INTERVAL}s", "orphan_grace": f"{ORPHAN_GRACE}s"})
    print(
        f"crash loop: {args.cycles} cycles, {args.clients} clients, gc.interval {GC_INTERVAL}s, "
        f"orphan_grace {ORPHAN_GRACE}s; daemon in {tmp}"
    )
    started = time.monotonic()
    violations: list[tuple[int, str]] = []
    restarts: list[float] = []
    settles: list[float] = []
    residue: Counter[str] = Counter()
    all_journals: list[Path] = []
    cycles_run = 0
    last_seq = 0
    everything = soak.Books()
    stats: dict[str, Any] = {}
    try:
        daemon.start()
        with Client(socket=daemon.socket, timeout=30) as client:
            for cycle in range(1, args.cycles + 1):
                if time.monotonic() - started > args.max_minutes * 60:
                    print(f"stopping: --max-minutes {args.max_minutes:g} reached")
                    break
                cycles_run = cycle
                before = len(soak.pool_entries(daemon.pool_path))
                processes, stop, journals = soak.start_clients(
                    daemon.socket,
                    journal_dir,
                    args.clients,
                    60,
                    args.seed * 100_000 + cycle,
                    CRASH_MIX,
                    crash_mode=True,
                    think=0.005,
                    tag=f"-c{cycle}",
                    held_ttl=HELD_TTL,
                )
                all_journals += journals
                problems: list[str] = []

                def churned(before: int = before) -> bool:
                    return len(soak.pool_entries(daemon.pool_path)) > before + 3

                if not wait_until(churned, 15):
                    problems.append("no churn within 15 s")
                delay = rng.uniform(0, MAX_DELAY)
                time.sleep(delay)  # the random moment, on purpose
                client.close()  # its connection dies with the daemon anyway
                daemon.kill()
                stop.set()
                problems += soak.join_clients(processes, timeout=30)
                restart = daemon.start()
                restarts.append(restart)
                double = rng.random() < args.double_kill
                if double:  # once more while it recovers: trash resumed, first orphan reviews, usage scans
                    time.sleep(rng.uniform(0, 0.3))  # a random moment, on purpose
                    daemon.kill()
                    restarts.append(daemon.start())
                canary = f"canary-{cycle}"
                os.mkdir(os.path.join(daemon.pool_path, canary))
                books = soak.tally(soak.read_journals(journals))
                everything = soak.tally(soak.read_journals(all_journals))
                problems += books.violations
                problems += check_after_restart(client, books, everything)
                settle_started = time.monotonic()
                problems += check_settled(
                    client, daemon.pool_path, everything, canary, timeout=ORPHAN_GRACE + 20 * GC_INTERVAL + 5
                )
                settles.append(time.monotonic() - settle_started)
                events = _events_since(client, last_seq)
                last_seq = events[-1]["seq"] if events else last_seq
                kinds = Counter(
                    e["kind"] if e["kind"] != "lease_ended" else f"ended:{e['reason']}" for e in events
                )
                kinds["orphan_reclaimed"] -= 1  # the canary
                residue["orphan_reclaimed"] += kinds["orphan_reclaimed"]
                residue["directory_removed"] += kinds["ended:directory_removed"]
                residue["reclaim_failed"] += kinds["reclaim_failed"]
                if kinds["reclaim_failed"]:
                    problems.append(f"{kinds['reclaim_failed']} reclaim_failed events")
                active = len(client.list_leases()["leases"])
                violations += [(cycle, p) for p in problems]
                print(
                    f"cycle {cycle:3d}/{args.cycles}  kill {delay:4.2f}s in  +{len(books.leases):3d} leases  "
                    f"restart {restart:4.2f}s{'+kill' if double else '     '}  orphans {kinds['orphan_reclaimed']:2d}  "
                    f"dir_removed {kinds['ended:directory_removed']:2d}  "
                    f"process_exited {kinds['ended:process_exited']:3d}  settled {settles[-1]:4.2f}s  "
                    f"active {active:3d}  {'ok' if not problems else 'VIOLATIONS: ' + '; '.join(problems)}",
                    flush=True,
                )
            everything = soak.tally(soak.read_journals(all_journals))
            # The last cycle's 1-2 s leases and killed children's leases end before the books close.
            violations += [(0, p) for p in soak.settle(client, daemon.pool_path, everything, timeout=30)]
            event_problems, stats = soak.check_events(
                client, everything, exact=False, gc_interval=GC_INTERVAL, seed=args.seed
            )
            violations += [(0, p) for p in event_problems]
            if daemon.process is not None and daemon.process.poll() is not None:
                violations.append((0, f"daemon exited {daemon.process.returncode}"))
    finally:
        daemon.stop()
    elapsed = time.monotonic() - started
    restarts.sort()
    settles.sort()
    print()
    print(
        f"{cycles_run} cycles in {elapsed:.0f}s; {len(everything.leases)} leases answered to clients, "
        f"{stats.get('unjournaled_leases', '?')} more created without their answer reaching a client; "
        f"{stats.get('events', '?')} events checked across {len(restarts)} restarts"
    )
    print(
        f"restart to ready: p50 {restarts[len(restarts) // 2]:.2f}s, max {restarts[-1]:.2f}s; "
        f"settled (orphans reclaimed, trash drained): p50 {settles[len(settles) // 2]:.2f}s, max {settles[-1]:.2f}s"
    )
    print(
        f"crash residue reclaimed: {residue['orphan_reclaimed']} orphan directories, "
        f"{residue['directory_removed']} leases ended directory_removed, {residue['reclaim_failed']} reclaim_failed"
    )
    print(f"client API errors: {dict(everything.api_errors) or 'none'}")
    if violations:
        print(f"VIOLATIONS ({len(violations)}), daemon log and journals kept in {tmp}:")
        for cycle, what in violations:
            print(f"  cycle {cycle or 'end'}: {what}")
    else:
        print("violations: none")
        if not args.keep:
            subprocess.run(["rm", "-rf", "--one-file-system", tmp], check=False)
    sys.exit(1 if violations else 0)


def _events_since(client: Client, since: int) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    for _ in range(10_000):
        page = client.events(since=since, limit=1000)["events"]
        if not page:
            break
        events += page
        since = page[-1]["seq"]
    return events


if __name__ == "__main__":
    main()
