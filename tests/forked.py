"""Running a function as another Unix user, in a forked child of the test.

A fork, not a new interpreter: the other user could not read this test's interpreter or
virtualenv, and what the tests check needs only the acting process to hold the user's
real kernel credentials (SO_PEERCRED for the daemon, permission checks for the disk).
The child takes the groups, then the gid, then the uid (after ``setuid`` it could not
change the others), and sends back what the function returned, pickled.
"""

from __future__ import annotations

import os
import pickle
import traceback
from collections.abc import Callable
from typing import TypeVar, cast

T = TypeVar("T")


class FailedAs(AssertionError):
    """The function raised something other than an OSError in the child."""


def run_as(uid: int, gid: int, function: Callable[[], T], user: str | None = None) -> T:
    """``function()`` in a child with ``uid`` and ``gid`` (and ``user``'s supplementary groups,
    else none). Its result comes back; an OSError it raises is raised here, anything else fails
    with the child's traceback."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        outcome: tuple[str, object]
        try:
            os.close(read_end)
            if user is None:
                os.setgroups([])
            else:
                os.initgroups(user, gid)
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            outcome = ("returned", function())
        except OSError as exc:
            outcome = ("raised", OSError(exc.errno, exc.strerror, exc.filename))
        except BaseException:
            outcome = ("failed", traceback.format_exc())
        try:
            with os.fdopen(write_end, "wb") as pipe:
                pickle.dump(outcome, pipe)
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    if not data:
        raise FailedAs(f"as uid {uid}: the child died without an answer")
    kind, value = pickle.loads(data)
    if kind == "raised":
        raise value  # PermissionError for EACCES: OSError() picks the subclass from the errno
    if kind == "failed":
        raise FailedAs(f"as uid {uid}:\n{value}")
    return cast(T, value)
