"""Replicas tell each other what changed, through PostgreSQL ``LISTEN``/``NOTIFY``.

With several server replicas on one PostgreSQL database, an API call reaches one replica
while the agent it concerns may hold its QUIC connection to another, and a live feed open on
one replica must see what the others change.  Every replica listens on one channel; a
notification carries ids only, the database row stays the truth:

``dispatch``  ``[deploy_id, client_id]`` pairs: deployments recorded without being sent (their
              agent was not connected to the replica that took the call).  The replica that
              holds the agent's connection claims each with one compare-and-set
              (:meth:`RecordStore.claim_dispatch`) and sends it, so a command announced twice
              still leaves once; the agent's journal drops a repeat anyway.
``record``    deployment ids whose record changed: replicas with live subscribers (long-polls,
              ``?follow=1`` logs, ``WS /api/live``) read them and hand them on.
``rollout``   rollout ids whose summary changed, likewise.
``revoke``    client ids an operator revoked: the replica holding one cuts its connection.

A notification is a hint that may be lost (the sender dies between its commit and the
``NOTIFY``, the listening connection drops): a replica re-scans the database for unsent
deployments of the agents it holds when its listening connection is (re)established and
every :data:`RESCAN_INTERVAL` seconds, and every agent that connects gets its unacknowledged
deployments again (server/dispatch.py).  Notifications are gathered for a few milliseconds
and sent in batches, one ``pg_notify`` per 7,000 bytes of payload.

On SQLite there is one server per database file: :func:`make_bus` gives ``None`` and nothing
of this runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Engine

from deploy_core.server.db_health import OutageLog, describe_error, is_outage

log = logging.getLogger(__name__)

#: The channel every replica listens on is this plus a digest of the database and schema:
#: two Deploy Center clusters in one PostgreSQL database (one schema each) never cross.
CHANNEL_PREFIX = "deploy_center_"
#: Seconds between re-scans for unsent deployments of the agents this replica holds.
RESCAN_INTERVAL = 15.0
#: Notifications are gathered this long before they are sent.
GATHER_SECONDS = 0.005
#: Bytes of JSON in one notification (PostgreSQL refuses payloads of 8,000 bytes or more).
MAX_PAYLOAD = 7000
#: How long the listening connection may stay silent before it is checked with a query.
IDLE_CHECK_SECONDS = 20.0
#: Seconds to wait for the database when (re)connecting.
CONNECT_TIMEOUT = 5.0
#: Ids waiting to be announced before new ones are dropped (and the re-scans catch up).
MAX_PENDING = 100_000

DISPATCH, RECORD, ROLLOUT, REVOKE = "dispatch", "record", "rollout", "revoke"
KINDS = (DISPATCH, RECORD, ROLLOUT, REVOKE)
_ID_MAX = 128


@dataclass
class BusHandlers:
    """What a replica does with its peers' notifications (all coroutines; they must not
    raise for one bad id)."""

    dispatch: Callable[[list[tuple[str, str]]], Awaitable[None]]
    records: Callable[[list[str]], Awaitable[None]]
    rollouts: Callable[[list[str]], Awaitable[None]]
    revoke: Callable[[list[str]], Awaitable[None]]
    #: The listening connection is (re)established: look for what may have been missed.
    resync: Callable[[], Awaitable[None]]


@dataclass
class _Batch:
    """Ids gathered per kind, in arrival order, without repeats."""

    ids: dict[str, dict[Any, None]] = field(default_factory=lambda: {k: {} for k in KINDS})

    def add(self, kind: str, item: Any) -> None:
        self.ids[kind][item] = None

    def __len__(self) -> int:
        return sum(len(v) for v in self.ids.values())

    def take(self) -> dict[str, list[Any]]:
        out = {k: list(v) for k, v in self.ids.items() if v}
        for v in self.ids.values():
            v.clear()
        return out


def encode(origin: str, kind: str, items: list[Any]) -> list[str]:
    """The payloads announcing ``items`` of ``kind``, each under :data:`MAX_PAYLOAD` bytes."""

    def dump(chunk: list[Any]) -> str:
        return json.dumps({"o": origin, "k": kind, "ids": chunk}, separators=(",", ":"))

    payloads: list[str] = []
    chunk: list[Any] = []
    size = len(dump([]))
    for item in items:
        item_size = len(json.dumps(item, separators=(",", ":"))) + 1  # and a comma
        if chunk and size + item_size >= MAX_PAYLOAD:
            payloads.append(dump(chunk))
            chunk, size = [], len(dump([]))
        chunk.append(item)
        size += item_size
    if chunk:
        payloads.append(dump(chunk))
    return payloads


def _is_id(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= _ID_MAX


def decode(payload: str) -> tuple[str, str, list[Any]]:
    """``(origin, kind, ids)`` of one notification; :class:`ValueError` when malformed
    (anyone who may connect to the database can ``NOTIFY``: nothing is taken on trust)."""
    try:
        data = json.loads(payload)
    except ValueError:
        raise ValueError("not JSON") from None
    if not isinstance(data, dict) or set(data) != {"o", "k", "ids"}:
        raise ValueError("not a notification object")
    origin, kind, ids = data["o"], data["k"], data["ids"]
    if not _is_id(origin) or kind not in KINDS or not isinstance(ids, list):
        raise ValueError("bad origin, kind or ids")
    if kind == DISPATCH:
        if not all(
            isinstance(i, list) and len(i) == 2 and _is_id(i[0]) and _is_id(i[1]) for i in ids
        ):
            raise ValueError("dispatch ids must be [deploy_id, client_id] pairs")
        return origin, kind, [(i[0], i[1]) for i in ids]
    if not all(_is_id(i) for i in ids):
        raise ValueError("ids must be strings")
    return origin, kind, ids


class ClusterBus:
    """One replica's end of the bus: a listening connection and a sender, both with their
    own PostgreSQL connection (psycopg, autocommit), reconnecting with back-off."""

    def __init__(self, conninfo: str, server_id: str, handlers: BusHandlers) -> None:
        self.conninfo = conninfo
        self.channel = ""  # set by start()
        self.server_id = server_id
        self.handlers = handlers
        self._pending = _Batch()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.listening = asyncio.Event()
        self.sent = 0
        self.received = 0
        self.dropped = 0
        self.malformed = 0
        # A database outage is logged in a few lines, not one per notification or re-scan.
        self._handler_outage = OutageLog(log, "cluster bus", outage=unreachable)
        self._send_outage = OutageLog(log, "cluster bus notify", outage=unreachable)

    # ------------------------------------------------------------------ announcing

    def dispatch(self, deploy_id: str, client_id: str) -> None:
        """A deployment was recorded unsent: whoever holds ``client_id`` should send it."""
        self._add(DISPATCH, (deploy_id, client_id))

    def record_changed(self, deploy_id: str) -> None:
        self._add(RECORD, deploy_id)

    def rollout_changed(self, rollout_id: str) -> None:
        self._add(ROLLOUT, rollout_id)

    def revoke(self, client_id: str) -> None:
        self._add(REVOKE, client_id)

    def _add(self, kind: str, item: Any) -> None:
        if len(self._pending) >= MAX_PENDING:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 10_000 == 0:
                log.warning(
                    "cluster bus: %d notifications not sent (the database is too slow or "
                    "unreachable); the other replicas' re-scans catch up",
                    self.dropped,
                )
            return
        self._pending.add(kind, item)
        self._wake.set()

    # ------------------------------------------------------------------ life cycle

    async def start(self, *, timeout: float = 10.0) -> None:
        """Start listening and sending; returns once listening (or after ``timeout``, the
        loop going on trying: the replica still works alone, its re-scans catching up)."""
        conn = await asyncio.wait_for(self._connect(), CONNECT_TIMEOUT + 1)
        async with conn:
            cur = await conn.execute("SELECT current_database(), current_schema()")
            row = await cur.fetchone()
        self.channel = channel_name(*(str(v) for v in row or ("", "")))
        self._tasks = [
            asyncio.create_task(self._listen_loop(), name="cluster-bus-listen"),
            asyncio.create_task(self._send_loop(), name="cluster-bus-send"),
            asyncio.create_task(self._rescan_loop(), name="cluster-bus-rescan"),
        ]
        try:
            await asyncio.wait_for(self.listening.wait(), timeout)
        except TimeoutError:
            log.warning("cluster bus: not listening yet after %.0f s; still trying", timeout)

    async def close(self) -> None:
        """Send what is gathered (briefly), then stop."""
        if self._pending and self._tasks:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._flush_once(), 2.0)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def _connect(self) -> Any:
        import psycopg  # only replicas on PostgreSQL get here

        return await psycopg.AsyncConnection.connect(
            self.conninfo, autocommit=True, connect_timeout=int(CONNECT_TIMEOUT)
        )

    # ------------------------------------------------------------------ listening

    async def _listen_loop(self) -> None:
        backoff = 0.5
        while True:
            try:
                conn = await asyncio.wait_for(self._connect(), CONNECT_TIMEOUT + 1)
                async with conn:
                    await conn.execute(f"LISTEN {self.channel}")
                    self.listening.set()
                    backoff = 0.5
                    log.info("cluster bus: listening on %s", self.channel)
                    await self._run_handler("resync", self.handlers.resync())
                    while True:
                        async for note in conn.notifies(timeout=IDLE_CHECK_SECONDS):
                            await self._received(note.payload)
                        await asyncio.wait_for(conn.execute("SELECT 1"), CONNECT_TIMEOUT)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.listening.is_set():
                    log.warning(
                        "cluster bus: listening connection lost (%s); reconnecting",
                        describe_error(exc),
                    )
                else:
                    log.debug("cluster bus: cannot listen yet: %s", describe_error(exc))
            self.listening.clear()
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, 10.0)

    async def _received(self, payload: str) -> None:
        try:
            origin, kind, ids = decode(payload)
        except ValueError as exc:
            self.malformed += 1
            log.warning("cluster bus: ignored a malformed notification (%s): %.200r", exc, payload)
            return
        self.received += 1
        if kind == DISPATCH:
            # Also our own: the agent may have connected here after the check and before the
            # record was committed; the claim makes a repeat harmless.
            await self._run_handler(kind, self.handlers.dispatch(ids))
        elif origin == self.server_id:
            return  # our own subscribers had it already
        elif kind == RECORD:
            await self._run_handler(kind, self.handlers.records(ids))
        elif kind == ROLLOUT:
            await self._run_handler(kind, self.handlers.rollouts(ids))
        elif kind == REVOKE:
            await self._run_handler(kind, self.handlers.revoke(ids))

    async def _run_handler(self, what: str, call: Awaitable[None]) -> None:
        try:
            await call
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not self._handler_outage.failed(exc):
                log.exception("cluster bus: handling %s failed", what)
        else:
            self._handler_outage.ok()

    async def _rescan_loop(self) -> None:
        while True:
            await asyncio.sleep(RESCAN_INTERVAL * (0.8 + 0.4 * random.random()))
            if self.listening.is_set():
                await self._run_handler("rescan", self.handlers.resync())

    # ------------------------------------------------------------------ sending

    async def _send_loop(self) -> None:
        conn: Any = None
        backoff = 0.5
        while True:
            await self._wake.wait()
            await asyncio.sleep(GATHER_SECONDS)
            self._wake.clear()
            batch = self._pending.take()
            payloads = [p for kind, ids in batch.items() for p in encode(self.server_id, kind, ids)]
            for _attempt in range(2):
                try:
                    if conn is None or conn.closed:
                        conn = await asyncio.wait_for(self._connect(), CONNECT_TIMEOUT + 1)
                    await asyncio.wait_for(self._send(conn, payloads), CONNECT_TIMEOUT * 2)
                    self.sent += len(payloads)
                    backoff = 0.5
                    self._send_outage.ok()
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if not self._send_outage.failed(exc):
                        log.warning("cluster bus: could not notify (%s); trying again", exc)
                    if conn is not None:
                        with contextlib.suppress(Exception):
                            await conn.close()
                    conn = None
                    await asyncio.sleep(backoff * (0.5 + random.random()))
                    backoff = min(backoff * 2, 10.0)
            else:
                self.dropped += len(payloads)
                if self._send_outage.since is None:  # during an outage: counted, not logged
                    log.warning(
                        "cluster bus: %d notifications not sent; the other replicas' re-scans "
                        "catch up",
                        len(payloads),
                    )

    async def _send(self, conn: Any, payloads: list[str]) -> None:
        async with conn.cursor() as cur:
            for payload in payloads:
                await cur.execute("SELECT pg_notify(%s, %s)", (self.channel, payload))

    async def _flush_once(self) -> None:
        batch = self._pending.take()
        payloads = [p for kind, ids in batch.items() for p in encode(self.server_id, kind, ids)]
        conn = await self._connect()
        async with conn:
            await self._send(conn, payloads)
        self.sent += len(payloads)


def unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` means the database is unreachable: SQLAlchemy's outage errors (the
    handlers' queries) or the driver's own and timeouts (the bus's own connections)."""
    import psycopg  # the bus runs on PostgreSQL only

    return is_outage(exc) or isinstance(
        exc, psycopg.OperationalError | psycopg.InterfaceError | TimeoutError | OSError
    )


def channel_name(database: str, schema: str) -> str:
    """The channel of the cluster whose tables are in ``schema`` of ``database``."""
    digest = hashlib.sha256(f"{database}\0{schema}".encode()).hexdigest()[:16]
    return CHANNEL_PREFIX + digest


def make_bus(engine: Engine, server_id: str, handlers: BusHandlers) -> ClusterBus | None:
    """The bus of a replica on PostgreSQL; ``None`` on SQLite (one server per file)."""
    if engine.dialect.name != "postgresql":
        return None
    url = engine.url.set(drivername="postgresql")
    return ClusterBus(url.render_as_string(hide_password=False), server_id, handlers)
