"""Log lines on the journal carry their syslog priority, so ``journalctl -p warning`` finds them.

journald reads a ``<N>`` at the start of a line as its priority (SyslogLevelPrefix=, on
by default) when the line arrives on the stream systemd connected, which it names in
``JOURNAL_STREAM``. The daemon is run with that variable pointing at its real stderr;
journald itself is not needed (nor, in a container, there).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys

import pytest
from conftest import wait_for

from scratchd import logs

PREFIX = re.compile(r"^<([0-7])>(.*)$")


def prefixed(line: str) -> tuple[int, str]:
    """A prefixed line's priority and message, the line having the prefix."""
    match = PREFIX.match(line)
    assert match, line
    return int(match.group(1)), json.loads(match.group(2))["msg"]


@pytest.mark.parametrize(
    "level, expected",
    [
        (logging.DEBUG, 7),
        (logging.INFO, 6),
        (logging.WARNING, 4),
        (logging.ERROR, 3),
        (logging.CRITICAL, 2),
        (25, 6),
        (5, 7),
        (60, 2),
    ],
)
def test_priority_of_each_level(level: int, expected: int) -> None:
    assert logs.priority(level) == expected


def test_a_prefixed_record_is_one_line_even_with_a_traceback() -> None:
    try:
        raise ValueError("two\nlines")
    except ValueError:
        record = logging.LogRecord(
            "scratchd", logging.ERROR, __file__, 1, "gc cycle failed", None, sys.exc_info()
        )
    line = logs.SyslogPrefix(logs.JsonFormatter()).format(record)
    assert "\n" not in line
    match = PREFIX.match(line)
    assert match and match.group(1) == "3"
    entry = json.loads(match.group(2))
    assert entry["level"] == "error" and "ValueError" in entry["exception"]


def run_setup(stderr_path: str, journal_stream: str | None) -> list[str]:
    """``logs.setup()`` in a fresh interpreter whose stderr is ``stderr_path``; the lines it wrote."""
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    if journal_stream is not None:
        env["JOURNAL_STREAM"] = journal_stream
    code = (
        "import logging; from scratchd import logs; logs.setup(logging.DEBUG); log = logging.getLogger('t');"
        "log.debug('d'); log.info('i'); log.warning('w'); log.error('e'); log.critical('c')"
    )
    with open(stderr_path, "wb") as stderr:
        subprocess.run([sys.executable, "-c", code], stderr=stderr, env=env, check=True, timeout=30)
    with open(stderr_path) as file:
        return file.read().splitlines()


def journal_stream_of(path: str) -> str:
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}"


def test_prefixes_only_when_stderr_is_the_named_stream(tmp_path) -> None:
    path = str(tmp_path / "stderr")
    open(path, "w").close()
    lines = run_setup(path, journal_stream_of(path))
    assert [prefixed(line) for line in lines] == [(7, "d"), (6, "i"), (4, "w"), (3, "e"), (2, "c")]
    # Not the journal: the variable is absent, or names another stream (stderr redirected by a child).
    for stream in (None, journal_stream_of(str(tmp_path))):
        assert all(line.startswith("{") for line in run_setup(path, stream)), stream


def test_the_daemon_writes_priorities_to_the_journal_stream(make_daemon, monkeypatch) -> None:
    daemon = make_daemon(start=False)
    daemon.log_path.touch()
    monkeypatch.setenv("JOURNAL_STREAM", journal_stream_of(str(daemon.log_path)))
    daemon.start()
    daemon.config_path.write_text(daemon.config_path.read_text() + "\n[surprise]\n")
    daemon.process.send_signal(signal.SIGHUP)  # a bad config: refused, logged as an error
    wait_for(lambda: "reload refused" in daemon.log(), what="the refusal in the log")
    daemon.stop()
    lines = daemon.log().splitlines()
    assert lines and all(PREFIX.match(line) for line in lines), lines
    by_msg = {msg: priority for priority, msg in map(prefixed, lines)}
    assert by_msg["reload refused: bad config; keeping the running one"] == 3
    assert 6 in by_msg.values()
