"""The server process's garbage collector with thousands of agents connected.

A server holding 2,000 QUIC connections keeps ~400,000 long-lived objects (connections,
streams, crypto state, sessions).  CPython's full collection walks every one of them, and
with the churn of packets and records a full collection came every ~15 s, each 150-530 ms
long (`bench/fleet.py` with 2,000 agents, measured with a ``gc.callbacks`` hook), finding
next to nothing to free (0-150 objects) while the event loop, and with it every agent's
heartbeat answer, handshake and report, waited.

:class:`FrozenSurvivors` moves what survived a full collection into the collector's
permanent generation (:func:`gc.freeze`), so the next full collections walk only what came
since.  What is frozen and later dropped is still freed by reference counting; only a cycle
among frozen objects waits, until the next thaw: the survivors go back (:func:`gc.unfreeze`)
and the next full collection looks at everything once, every :data:`THAW_EVERY` seconds, and
sooner when many connections have ended since the last thaw (a closed connection's objects
hold cycles: agents that all reconnect would otherwise leave their old connections' memory
frozen until the period's end).  Installed by ``deployctl server`` for its process (not by an
embedded server: the collector is the process's, not the server's).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

#: Seconds between thaws: the longest a cycle among frozen objects waits to be collected.
THAW_EVERY = 600.0
#: Connections ended since the last thaw that bring the next one forward: this many, or this
#: share of the connections open, whichever is more.
THAW_AFTER_ENDED = 200
THAW_AFTER_SHARE = 0.1


class FrozenSurvivors:
    """Freezes the survivors of each full collection, thawing them every ``thaw_every``
    seconds (see the module); :meth:`close` ends it and thaws everything."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        thaw_every: float = THAW_EVERY,
        *,
        ended: Callable[[], int] = lambda: 0,
        open_now: Callable[[], int] = lambda: 0,
    ) -> None:
        """:param ended: connections ended so far (a count that only grows);
        :param open_now: connections open now (see :data:`THAW_AFTER_ENDED`)."""
        self._loop = loop
        self.thaw_every = thaw_every
        self._ended = ended
        self._open_now = open_now
        self._thawed_at = time.monotonic()
        self._ended_at_thaw = ended()
        #: Full collections seen, freezes and thaws done (for tests and the log).
        self.full_collections = 0
        self.freezes = 0
        self.thaws = 0
        self._installed = False

    def install(self) -> FrozenSurvivors:
        """Start watching the collector (once)."""
        if not self._installed:
            gc.callbacks.append(self._collected)
            self._installed = True
        return self

    def close(self) -> None:
        """Stop, and give the collector back everything frozen."""
        if self._installed:
            with contextlib.suppress(ValueError):
                gc.callbacks.remove(self._collected)
            self._installed = False
        gc.unfreeze()

    def _collected(self, phase: str, info: dict[str, Any]) -> None:
        # Called by the collector, on whichever thread collected: only hand over to the
        # event loop (freezing from inside a collection's callback is not done).
        if phase != "stop" or info.get("generation") != 2:
            return
        self.full_collections += 1
        with contextlib.suppress(RuntimeError):  # the loop has closed
            self._loop.call_soon_threadsafe(self._after_full_collection)

    def _after_full_collection(self) -> None:
        if not self._installed:
            return
        now, ended = time.monotonic(), self._ended()
        churn = max(THAW_AFTER_ENDED, int(THAW_AFTER_SHARE * self._open_now()))
        if now - self._thawed_at >= self.thaw_every or ended - self._ended_at_thaw >= churn:
            # The next full collection walks everything once, cycles among the frozen too.
            gc.unfreeze()
            self._thawed_at, self._ended_at_thaw = now, ended
            self.thaws += 1
            log.debug("gc: survivors thawed; the next full collection sees every object")
            return
        gc.freeze()
        self.freezes += 1
