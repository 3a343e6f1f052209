"""Logs: one JSON object a line for journald and collectors, plain lines on a terminal.

On the journal each line starts with its syslog priority (``<4>`` for a warning), which
journald takes off and keeps as the entry's priority, so ``journalctl -p warning`` works.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{k}={v}" for k, v in vars(record).items() if k not in _STANDARD)
        line = f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {record.levelname:<7} {record.getMessage()}"
        if extras:
            line += f"  {extras}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


# syslog(3) priorities: what journald reads from a "<N>" prefix (SyslogLevelPrefix=).
PRIORITIES = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


def priority(levelno: int) -> int:
    """The syslog priority of a logging level; a level between two standard ones takes the lower."""
    return next((p for level, p in sorted(PRIORITIES.items(), reverse=True) if levelno >= level), 7)


class SyslogPrefix(logging.Formatter):
    """Puts ``<N>`` before what ``formatter`` makes of a record; for one-line formats."""

    def __init__(self, formatter: logging.Formatter) -> None:
        super().__init__()
        self._formatter = formatter

    def format(self, record: logging.LogRecord) -> str:
        return f"<{priority(record.levelno)}>{self._formatter.format(record)}"


def stderr_is_journal() -> bool:
    """True when stderr is the stream systemd connected to the journal.

    systemd puts that stream's ``device:inode`` in ``JOURNAL_STREAM``; comparing it with
    stderr's own tells the journal from a stderr redirected elsewhere by a child.
    """
    expected = os.environ.get("JOURNAL_STREAM")
    if not expected:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):  # stderr closed, or not a real file
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def formatter() -> logging.Formatter:
    """Text on a terminal; JSON lines elsewhere, prefixed with their priority on the journal."""
    if sys.stderr.isatty():
        return TextFormatter()
    return SyslogPrefix(JsonFormatter()) if stderr_is_journal() else JsonFormatter()


def setup(level: int = logging.INFO) -> None:
    # Records are made on the event loop: skip the caller, thread and process lookups
    # every one would otherwise pay for.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("uvicorn.access").disabled = True
