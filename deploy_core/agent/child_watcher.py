"""Child processes waited for by the event loop that started them, without a thread each.

asyncio learns that a child exited through the policy's child watcher.  From Python 3.12 on
that is a ``PidfdChildWatcher`` where the kernel has pidfds (Linux 5.3+): the loop reads a
file descriptor that becomes readable when the child exits.  Python 3.11 (Debian 12's) keeps
a ``ThreadedChildWatcher``: a new thread per child, blocked in ``waitpid``, which hands the
exit to the loop through the GIL.  An agent starts a child for every script run and every
spare shell, so on 3.11 each run started a thread (``Thread.start`` waits on the event loop's
thread until the new one runs) and each exit came back through a thread waiting for the GIL.
With hundreds of agents in one process (the fleet benchmark) that was seconds per rollout.

:func:`install` gives Python 3.11 what 3.12 does: a pidfd per child, read by the running loop
(3.11's own ``PidfdChildWatcher`` is bound to one loop, which an agent in a test's or a
benchmark's thread would not be).  Nothing changes on 3.12+, without pidfds, or when a
watcher other than the default threaded one was set.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any, TypeVarTuple

log = logging.getLogger(__name__)

_Ts = TypeVarTuple("_Ts")


def install() -> bool:
    """Use :class:`PidfdWatcher` for this process's child processes where Python would use a
    thread per child; whether it was installed (now or before)."""
    if sys.version_info >= (3, 12) or not _pidfds_work():
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        policy = asyncio.get_event_loop_policy()
        current = getattr(policy, "_watcher", None)
        if isinstance(current, PidfdWatcher):
            return True
        if current is not None and not isinstance(current, asyncio.ThreadedChildWatcher):
            return False  # someone chose another watcher: theirs
        # The threaded watcher's threads still deliver the exits of children started before.
        policy.set_child_watcher(PidfdWatcher())
    return True


def _pidfds_work() -> bool:
    if not hasattr(os, "pidfd_open"):
        return False
    try:
        os.close(os.pidfd_open(os.getpid(), 0))
    except OSError:
        return False
    return True


class PidfdWatcher(asyncio.AbstractChildWatcher):
    """A child's exit read from its pidfd by the loop running when it was started (what
    Python 3.12's ``PidfdChildWatcher`` does); any number of loops, one per thread."""

    def __init__(self) -> None:
        self._waiting: dict[int, tuple[asyncio.AbstractEventLoop, int]] = {}

    def add_child_handler(
        self, pid: int, callback: Callable[[int, int, *_Ts], object], *args: *_Ts
    ) -> None:
        loop = asyncio.get_running_loop()
        pidfd = os.pidfd_open(pid)
        self._waiting[pid] = (loop, pidfd)
        loop.add_reader(pidfd, self._exited, pid, callback, args)

    def _exited(self, pid: int, callback: Callable[..., object], args: tuple[Any, ...]) -> None:
        waiting = self._waiting.pop(pid, None)
        if waiting is None:
            return
        loop, pidfd = waiting
        loop.remove_reader(pidfd)
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:  # reaped by someone else
            returncode = 255
            log.warning("child process %d exit status already read: returncode 255", pid)
        else:
            returncode = os.waitstatus_to_exitcode(status)
        finally:
            os.close(pidfd)
        callback(pid, returncode, *args)

    def remove_child_handler(self, pid: int) -> bool:
        waiting = self._waiting.pop(pid, None)
        if waiting is None:
            return False
        loop, pidfd = waiting
        loop.remove_reader(pidfd)
        os.close(pidfd)
        return True

    def attach_loop(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Nothing: each child is read by the loop that started it."""

    def is_active(self) -> bool:
        return True

    def close(self) -> None:
        for pid in list(self._waiting):
            self.remove_child_handler(pid)

    def __enter__(self) -> PidfdWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        return None
