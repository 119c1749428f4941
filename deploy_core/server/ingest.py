"""Group commit of what agents send (issue 13 §3): status reports, callbacks and command
acknowledgements from many agents share transactions.

Each agent's connection hands its messages to the server one at a time and waits for each
to be stored before it acknowledges it (server/events.py), so an event is acknowledged only
once it is durable.  Here the work of many connections meets: :meth:`Ingest.submit` queues one
piece of work (a function of a database connection, e.g.
:meth:`~deploy_core.server.records.RecordStore.apply_report_in`) and waits; one writer takes
whatever is queued, up to :attr:`Ingest.max_batch` pieces, runs them in one transaction on its
own thread, and hands each its result once that transaction has committed.
:meth:`Ingest.submit_grouped` queues work that is cheaper done for many at once (status
reports: one read, one ``UPDATE`` and one ``INSERT`` for a run of them,
:meth:`~deploy_core.server.records.RecordStore.apply_reports_in`).

- **Latency.**  An idle writer commits what it finds at once: a lone agent's event waits for
  no timer.  While one transaction runs, the next batch gathers in the queue; only when
  pieces of more than one sender (``key``; work queued without one counts as a sender of its
  own) were queued during the last transaction and still waited as it ended (the writer is
  behind: many agents are busy) does the writer linger :attr:`Ingest.linger` seconds for
  more before it begins.  One agent's report and callback, queued together or one during
  the other's commit, are committed at once.
- **Failures.**  When a batch's transaction fails (one piece raised, or the commit did), it is
  rolled back whole and every piece runs again in a transaction of its own: a bad piece
  fails alone, and no piece is told it was stored unless its own transaction committed.
  Pieces must therefore be plain database work that can run again after a rollback.
- **Order.**  Pieces run in the order they were queued, with one exception: grouped pieces
  queued with a ``key`` (the agent that sent them) may be moved past other keys' grouped
  pieces, never past their own key's nor past an ungrouped piece, so that a transaction
  makes one call per kind of work instead of one per run.  A thousand agents finishing a
  rollout send report, callback, report, callback … interleaved; in queued order those are
  hundreds of calls of one or two each (4-5 ms apiece while the event loop is busy, most of
  it statements compiled and run once per call), regrouped a handful.  One agent's messages
  are applied in the order it sent them either way.
- **Bounds.**  At most :attr:`Ingest.max_queued` pieces wait; past that :meth:`submit` waits
  for room (the agents' messages wait in their connections, which have limits of their own).
- **Shutdown.**  :meth:`close` refuses new work, commits what is queued, and stops.

:class:`IngestStats` counts transactions, pieces, fallbacks and recent commit latencies
(queued → committed), which the server logs every :data:`STATS_EVERY` seconds in which it
committed something (``ingest: N messages in M transactions …``; bench/fleet.py reads them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sqlalchemy.engine import Connection, Engine

from deploy_core.server.db_health import OutageLog

log = logging.getLogger(__name__)

T = TypeVar("T")
A = TypeVar("A")

#: Pieces in one transaction at most.
MAX_BATCH = 512
#: Pieces waiting at most before :meth:`Ingest.submit` waits for room.
MAX_QUEUED = 20_000
#: How long a busy writer waits for more pieces before it begins a transaction.
LINGER = 0.002
#: How often a busy ingest logs its figures (seconds).
STATS_EVERY = 10.0
#: Commit latencies kept for the percentiles.
LATENCY_SAMPLES = 20_000


class IngestClosed(RuntimeError):
    """The ingest is shutting down and takes no more work."""


@dataclass
class IngestStats:
    """What the writer did since it started."""

    #: Transactions that committed a whole batch (of one piece or more).
    batches: int = 0
    #: Pieces committed (in a batch or on their own after a fallback).
    committed: int = 0
    #: Pieces whose own transaction failed too (not stored; their callers got the error).
    failed: int = 0
    #: Batches rolled back and run again piece by piece.
    fallbacks: int = 0
    #: The most pieces one transaction committed.
    largest_batch: int = 0
    #: Seconds from queued to committed, the most recent :data:`LATENCY_SAMPLES`.
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))

    def percentile(self, pct: float) -> float | None:
        """The ``pct`` percentile of the recent commit latencies (seconds), if any."""
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered)) - 1))]


@dataclass
class _Piece(Generic[T]):
    work: Callable[[Connection], T] | None
    future: asyncio.Future[T]
    queued: float
    #: For :meth:`Ingest.submit_grouped`: the function applying many, and this one's part.
    many: Callable[[Connection, list[Any]], list[T]] | None = None
    arg: Any = None
    #: Whose order the piece keeps (grouped pieces only); ``None``: everyone's.
    key: Hashable | None = None


class Ingest:
    """One writer committing queued database work in batches (see the module's text)."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_batch: int = MAX_BATCH,
        max_queued: int = MAX_QUEUED,
        linger: float = LINGER,
        stats_every: float | None = STATS_EVERY,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        """:param on_batch: told each batch's size and the seconds its commit took (the
        server's metrics, ServerMetrics.ingest_batch)."""
        if max_batch < 1 or max_queued < 1 or linger < 0:
            raise ValueError("max_batch and max_queued must be positive, linger not negative")
        self.engine = engine
        self.max_batch = max_batch
        self.linger = linger
        self.stats = IngestStats()
        # A database outage fails every batch: logged once, then at most every few seconds.
        self.outage = OutageLog(log, "ingest", failures="batches failed")
        self._stats_every = stats_every
        self._on_batch = on_batch
        self._queue: asyncio.Queue[_Piece[Any] | None] = asyncio.Queue(max_queued)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="ingest")
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reporter: asyncio.Task[None] | None = None
        self._window: list[float] = []  # latencies since the figures were last logged
        self._closed = False
        self._stopped = False
        # Pieces of several senders were waiting when the last transaction ended: busy, so
        # linger for more.  The senders of what was queued since the transaction began:
        self._behind = False
        self._senders: set[Hashable] = set()

    def start(self) -> None:
        """Start the writer (in the running event loop)."""
        if self._task is None:
            self._loop = asyncio.get_running_loop()
            self._task = asyncio.create_task(self._run(), name="ingest")
            if self._stats_every is not None:
                self._reporter = asyncio.create_task(self._report(), name="ingest-figures")

    @property
    def queued(self) -> int:
        """Pieces waiting for the writer."""
        return self._queue.qsize()

    async def submit(self, work: Callable[[Connection], T]) -> T:
        """Queue ``work`` and return its result once its transaction has committed.

        :raises IngestClosed: the ingest is shutting down; nothing was stored.
        :raises Exception: whatever ``work`` (or the commit of its own transaction) raised;
            nothing of it was stored.
        """
        return await self._submit(_Piece(work, self._future(), time.monotonic()))

    async def submit_grouped(
        self, many: Callable[[Connection, list[A]], list[T]], arg: A, *, key: Hashable = None
    ) -> T:
        """Like :meth:`submit`, for work that is cheaper done for many at once: pieces
        queued one after another with the same ``many`` run as one call
        ``many(conn, [arg, ...])``, which returns their results in order (e.g.
        :meth:`~deploy_core.server.records.RecordStore.apply_reports_in`).  ``many`` must give
        what calling it for each ``arg`` alone, in order, would.

        :param key: whose order this piece must keep (e.g. the agent's id): the writer may
            run it before grouped pieces of other keys queued earlier, to make longer runs
            (see the module's text on order); work of different keys must then not depend
            on each other's order.  ``None`` keeps the queued order."""
        return await (await self.queue_grouped(many, arg, key=key))

    async def queue_grouped(
        self, many: Callable[[Connection, list[A]], list[T]], arg: A, *, key: Hashable = None
    ) -> asyncio.Future[T]:
        """:meth:`submit_grouped` without waiting for the commit: queue the piece (waiting
        only while the queue is full) and return the future its result or error will be set
        on once its transaction has committed or failed.  For a caller that acts on the
        outcome in a done-callback instead of a task of its own per piece (the router's
        status reports, server/events.py)."""
        piece: _Piece[T] = _Piece(None, self._future(), time.monotonic(), many, arg, key)
        await self._enqueue(piece)
        return piece.future

    async def submit_or_run(self, work: Callable[[Connection], T]) -> T:
        """:meth:`submit`, or, once the ingest is closed, ``work`` in a transaction of its
        own (an agent's connect and disconnect bookkeeping, which also happens while the
        server shuts down)."""
        try:
            return await self.submit(work)
        except IngestClosed:
            return await asyncio.to_thread(self._alone, work)

    def _alone(self, work: Callable[[Connection], T]) -> T:
        with self.engine.begin() as conn:
            return work(conn)

    def _future(self) -> asyncio.Future[Any]:
        if self._closed or self._loop is None:  # closing, or not started
            raise IngestClosed("the server is shutting down")
        return self._loop.create_future()

    async def _submit(self, piece: _Piece[T]) -> T:
        await self._enqueue(piece)
        return await piece.future

    async def _enqueue(self, piece: _Piece[Any]) -> None:
        if len(self._senders) < 2:
            self._senders.add(piece.key if piece.key is not None else id(piece))
        try:
            self._queue.put_nowait(piece)
        except asyncio.QueueFull:
            await self._queue.put(piece)  # waits while the queue is full
        if self._stopped:  # queued after the writer left: nobody will take it
            self._fail_queued()

    def _fail_queued(self) -> None:
        while not self._queue.empty():
            piece = self._queue.get_nowait()
            if piece is not None and not piece.future.done():
                piece.future.set_exception(IngestClosed("the server is shutting down"))

    async def close(self) -> None:
        """Take no more work, commit what is queued, stop the writer."""
        if self._closed:
            return
        self._closed = True
        if self._reporter is not None:
            self._reporter.cancel()
        if self._task is not None:
            await self._queue.put(None)
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._stopped = True
        self._fail_queued()  # those that waited for room while the writer finished
        self._executor.shutdown(wait=True)

    # ------------------------------------------------------------------ the writer

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is None:
                break
            batch: list[_Piece[Any]] = [first]
            # One turn of the loop first: the other messages of the datagram that brought
            # this one (an agent's command ACK, its reports and its callback travel together)
            # are queued in it, and go in this transaction too.
            await asyncio.sleep(0)
            stopping = self._take(batch)
            if not stopping and self.linger and self._behind:
                await asyncio.sleep(self.linger)  # busy: let the next batch fill up
                stopping = self._take(batch)
            began = time.monotonic()
            self._senders.clear()
            outcomes = await loop.run_in_executor(self._executor, self._commit, batch)
            now = time.monotonic()
            self._behind = len(self._senders) > 1 and not self._queue.empty()
            if self._on_batch is not None:
                self._on_batch(len(batch), now - began)
            for piece, (ok, value) in zip(batch, outcomes, strict=True):
                if ok:
                    self.stats.latencies.append(now - piece.queued)
                    self._window.append(now - piece.queued)
                if piece.future.done():  # its caller went away (cancelled)
                    continue
                if ok:
                    piece.future.set_result(value)
                else:
                    piece.future.set_exception(value)

    def _take(self, batch: list[_Piece[Any]]) -> bool:
        """Add what is queued to ``batch`` (up to the limit); whether close() was asked."""
        while len(batch) < self.max_batch:
            try:
                piece = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                return False
            if piece is None:
                return True
            batch.append(piece)
        return False

    def _commit(self, batch: list[_Piece[Any]]) -> list[tuple[bool, Any]]:
        """Run ``batch`` in one transaction; on failure, each piece in its own (unless the
        database is unreachable: then the whole batch fails at once, logged once)."""
        try:
            with self.engine.begin() as conn:
                results = _apply(conn, batch)
        except Exception as exc:
            if self.outage.failed(exc):
                self.stats.failed += len(batch)
                return [(False, exc)] * len(batch)
            if len(batch) == 1:
                self.stats.failed += 1
                log.warning("ingest: a stored message failed: %s", exc, exc_info=exc)
                return [(False, exc)]
            self.stats.fallbacks += 1
            log.warning(
                "ingest: a batch of %d failed (%s: %s); storing each on its own",
                len(batch),
                type(exc).__name__,
                exc,
            )
            return [self._commit([piece])[0] for piece in batch]
        self.outage.ok()
        self.stats.batches += 1
        self.stats.committed += len(batch)
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        return [(True, result) for result in results]

    async def _report(self) -> None:
        """Log the figures every ``stats_every`` seconds in which something was committed."""
        assert self._stats_every is not None
        before = (0, 0)
        while True:
            await asyncio.sleep(self._stats_every)
            before = self._log_figures(self._stats_every, before)

    def _log_figures(self, seconds: float, before: tuple[int, int]) -> tuple[int, int]:
        stats = self.stats
        pieces, batches = stats.committed - before[0], stats.batches - before[1]
        window, self._window = sorted(self._window), []
        if pieces and window:
            p50, p99 = (window[min(len(window) - 1, round(p * len(window)))] for p in (0.5, 0.99))
            log.info(
                "ingest: %d messages in %d transactions over %.0f s (%.0f/s); "
                "queued to committed p50 %.1f ms, p99 %.1f ms; %d fallbacks, %d failed",
                pieces,
                batches,
                seconds,
                pieces / seconds,
                p50 * 1000,
                p99 * 1000,
                stats.fallbacks,
                stats.failed,
            )
        return stats.committed, stats.batches


def _apply(conn: Connection, batch: list[_Piece[Any]]) -> list[Any]:
    """The results of ``batch``'s pieces, in queued order; a run of grouped pieces with the
    same function in one call, after :func:`regrouped`."""
    order = regrouped(batch)
    results: list[Any] = [None] * len(batch)
    start = 0
    while start < len(order):
        piece = batch[order[start]]
        if piece.many is None:
            assert piece.work is not None
            results[order[start]] = piece.work(conn)
            start += 1
            continue
        stop = start + 1
        while stop < len(order) and batch[order[stop]].many == piece.many:
            stop += 1
        out = piece.many(conn, [batch[i].arg for i in order[start:stop]])
        if len(out) != stop - start:
            raise RuntimeError(f"{piece.many!r} gave {len(out)} results for {stop - start}")
        for index, result in zip(order[start:stop], out, strict=True):
            results[index] = result
        start = stop
    return results


def regrouped(batch: list[_Piece[Any]]) -> list[int]:
    """The order to run ``batch`` in (indices): as queued, except that between two pieces
    that keep everyone's order (ungrouped, or grouped without a key) the keyed grouped
    pieces are gathered by function, each key's pieces still in their queued order.

    Each round takes, from every key whose next piece has the function most keys' next
    pieces have, that piece and those after it with the same function."""
    order: list[int] = []
    waiting: dict[Hashable, deque[int]] = {}

    def drain() -> None:
        while waiting:
            heads = Counter(batch[queue[0]].many for queue in waiting.values())
            many = heads.most_common(1)[0][0]
            for key in list(waiting):
                queue = waiting[key]
                while queue and batch[queue[0]].many == many:
                    order.append(queue.popleft())
                if not queue:
                    del waiting[key]

    for index, piece in enumerate(batch):
        if piece.many is None or piece.key is None:
            drain()
            order.append(index)
        else:
            waiting.setdefault(piece.key, deque()).append(index)
    drain()
    return order
