"""Our inotify binding on real inotify: event records, flags, and a queue that overflows."""

from __future__ import annotations

import fcntl
import logging
import os
import struct
from pathlib import Path

import pytest
from conftest import QUEUED_EVENTS, needs_queue_sysctl, sysctl

from scratchd.reclaim import inotify
from scratchd.reclaim.inotify import IN_CREATE, IN_DELETE, IN_IGNORED, IN_ISDIR, IN_Q_OVERFLOW, Event, Inotify


def test_parse_reads_names_without_their_padding_and_events_without_names() -> None:
    buffer = (
        struct.pack("iIII", 1, IN_CREATE | IN_ISDIR, 0, 16)
        + b"sub\0"
        + b"\0" * 12
        + struct.pack("iIII", -1, IN_Q_OVERFLOW, 0, 0)
        + struct.pack("iIII", 2, IN_DELETE, 7, 8)
        + b"file.txt"
    )
    assert inotify.parse(buffer) == [
        Event(1, IN_CREATE | IN_ISDIR, 0, b"sub"),
        Event(-1, IN_Q_OVERFLOW, 0, b""),
        Event(2, IN_DELETE, 7, b"file.txt"),
    ]
    assert inotify.parse(b"") == []


def test_an_instance_is_nonblocking_and_close_on_exec_and_reads_real_events(tmp_path: Path) -> None:
    watch = Inotify()
    try:
        assert os.get_blocking(watch.fd) is False
        assert fcntl.fcntl(watch.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert watch.read() == []  # nothing queued: no wait
        wd = watch.add_watch(str(tmp_path), IN_CREATE | IN_DELETE)
        assert watch.add_watch(os.fsencode(tmp_path), IN_CREATE | IN_DELETE) == wd  # the same directory
        (tmp_path / "d").mkdir()
        (tmp_path / "f").write_text("x")
        (tmp_path / "f").unlink()
        assert [(e.wd, e.mask, e.name) for e in watch.read()] == [
            (wd, IN_CREATE | IN_ISDIR, b"d"),
            (wd, IN_CREATE, b"f"),
            (wd, IN_DELETE, b"f"),
        ]
        watch.rm_watch(wd)
        assert [e.mask for e in watch.read()] == [IN_IGNORED]
    finally:
        watch.close()
        watch.close()


def test_errors_name_the_path_and_a_watch_the_kernel_dropped_removes_quietly(tmp_path: Path) -> None:
    watch = Inotify()
    try:
        with pytest.raises(FileNotFoundError) as raised:
            watch.add_watch(str(tmp_path / "missing"), IN_CREATE)
        assert raised.value.filename == str(tmp_path / "missing")
        gone = tmp_path / "gone"
        gone.mkdir()
        wd = watch.add_watch(str(gone), IN_CREATE)
        gone.rmdir()
        assert IN_IGNORED in {e.mask for e in watch.read()}
        watch.rm_watch(wd)  # EINVAL from the kernel: already gone
    finally:
        watch.close()


@needs_queue_sysctl
def test_a_full_queue_drops_events_and_says_so(tmp_path: Path) -> None:
    with sysctl(QUEUED_EVENTS, 16):
        watch = Inotify()
    try:
        watch.add_watch(str(tmp_path), IN_CREATE)
        for i in range(100):
            (tmp_path / f"f{i}").write_text("")
        events = watch.read()
        assert len(events) == 17 and events[-1] == Event(-1, IN_Q_OVERFLOW, 0, b"")
    finally:
        watch.close()


def test_overflows_are_logged_once_a_burst(caplog: pytest.LogCaptureFixture, monkeypatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(inotify.time, "monotonic", lambda: clock[0])
    overflows = inotify.OverflowLog(logging.getLogger("test.inotify"), "test")
    with caplog.at_level(logging.WARNING, "test.inotify"):
        for _ in range(5):
            overflows.note("rescanning")
            clock[0] += 1.0
        clock[0] += inotify.OverflowLog.BURST_GAP_SECONDS
        overflows.note("rescanning")
    assert [r.getMessage() for r in caplog.records] == [
        "inotify queue overflowed, events lost: rescanning"
    ] * 2
