"""Bounded blocking work: a step and time budget with a cancel flag, and a way to run such
work in a thread that stops when the deployment gives up on it.

A thread cannot be killed.  Long loops of a plugin (an archive pre-scan resolving symlinks,
a tree copy, a recursive removal) call :meth:`WorkBudget.step` once per unit of work; the
call is cheap, and raises :class:`WorkStopped` once the budget is spent, the time is up or
the work was cancelled.  :func:`run_bounded` cancels the budget when the awaiting task is
cancelled (a deployment timeout, the agent stopping on SIGTERM) and waits for the thread
to notice, so nothing keeps burning CPU, or writing, after the deployment has moved on.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import TypeVar

__all__ = ["WorkBudget", "WorkStopped", "run_bounded", "step"]

T = TypeVar("T")
_CHECK_EVERY = 1024  # steps between looks at the clock and the cancel flag


class WorkStopped(Exception):
    """Bounded work stopped before it finished: its budget is spent or it was cancelled.

    :param reason: ``steps``, ``time`` or ``cancelled``.
    """

    def __init__(self, what: str, reason: str, detail: str) -> None:
        super().__init__(f"{what} stopped: {detail}")
        self.what = what
        self.reason = reason


class WorkBudget:
    """At most ``steps`` units of work and ``seconds`` of wall time for ``what``.

    Thread-safe to cancel from another thread; :meth:`step` is called by the one thread
    doing the work.
    """

    def __init__(self, what: str, *, steps: int, seconds: float) -> None:
        if steps <= 0 or seconds <= 0:
            raise ValueError(
                f"a work budget needs positive steps and seconds, not {steps}, {seconds}"
            )
        self.what = what
        self.max_steps = steps
        self.seconds = seconds
        self.used = 0
        self._started = time.monotonic()
        self._next_check = 0
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Make the next :meth:`step` (from any thread) raise ``WorkStopped('cancelled')``."""
        self._cancelled.set()
        self._next_check = 0

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self._cancelled.is_set()

    def step(self, n: int = 1) -> None:
        """Count ``n`` units of work; raise :class:`WorkStopped` when over budget or
        cancelled (the clock and the flag are looked at every thousand steps or so)."""
        self.used += n
        if self.used < self._next_check:
            return
        self._next_check = self.used + _CHECK_EVERY
        if self._cancelled.is_set():
            raise WorkStopped(self.what, "cancelled", "the deployment gave up on it")
        if self.used > self.max_steps:
            raise WorkStopped(
                self.what, "steps", f"more than {self.max_steps} steps of work; refusing"
            )
        took = time.monotonic() - self._started
        if took > self.seconds:
            raise WorkStopped(
                self.what, "time", f"still not done after {took:.1f} s (budget {self.seconds:g} s)"
            )


_current: ContextVar[WorkBudget | None] = ContextVar("deploy_work_budget", default=None)


def step(n: int = 1) -> None:
    """Step the budget of the bounded work this code runs under (:func:`run_bounded` sets
    it for its thread); nothing when there is none.  For loops deep inside a library that
    cannot be handed a budget: an archive pre-scan resolving symlinks, a decompressor."""
    budget = _current.get()
    if budget is not None:
        budget.step(n)


async def run_bounded(fn: Callable[[], T], budget: WorkBudget | None = None) -> T:
    """Run ``fn`` in a thread; if the caller is cancelled, cancel ``budget`` and wait for
    the thread to stop before the cancellation goes on, so nothing of it runs afterwards.

    ``fn`` must step ``budget`` often, itself or through :func:`step` (which finds
    ``budget`` in the thread's context); without a budget the thread is only waited for.
    """
    token = _current.set(budget)
    try:  # the task, and the thread it starts, run in a copy of this context
        task = asyncio.ensure_future(asyncio.to_thread(fn))
    finally:
        _current.reset(token)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        if budget is not None:
            budget.cancel()
        await asyncio.wait([task])
        if not task.cancelled():
            task.exception()  # retrieved: the cancellation is what the caller hears about
        raise
