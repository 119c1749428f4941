"""File streams: an authenticated agent pulls an artifact from the server by SHA-256.

Every request travels on a fresh bidirectional QUIC stream that the agent opens after WELCOME
(never on the control stream)::

    agent  -> REQUEST  4-byte big-endian length + JSON {"sha256", "offset", "chunk_size"}
    server -> QUEUED   0 or more frames 4-byte big-endian length + JSON {"queued": N}, only
                       to an agent whose AUTH capabilities hold ``"file_queue": 1``: the
                       server is serving its bound of transfers and this one waits, about
                       N-th in line; repeated every few seconds while it waits
    server -> HEADER   4-byte big-endian length + JSON {"size", "offset"}
                       or {"error", "code"} and FIN
    server -> the artifact's bytes from ``offset`` to ``size``, read from disk ``chunk_size``
              at a time, then FIN
    agent  -> CREDIT   8-byte big-endian integers: the offset the agent has written up to

A server with file workers (:mod:`.file_workers`) also answers, on the control connection,
a ticket request on a stream of its own::

    agent  -> TICKET?  4-byte big-endian length + JSON {"ticket_for": sha256}
    server -> TICKET   4-byte big-endian length + JSON {"ticket", "expires_in"} and FIN
                       or {"error", "code"} and FIN

after the same ``may_fetch`` check a transfer gets; the agent then sends its REQUEST, with
``"ticket"`` added, to a worker, whose :class:`FileStreamServer` checks the ticket instead
of an authenticated session. Everything else on the worker's connection is as above.

The server keeps at most ``window`` bytes past the agent's last credit in flight, so neither
side buffers a whole artifact, and a slow disk on the agent slows the server down instead of
filling its memory. All the connections of one server share a :class:`TransferGate`: at most
``limit`` transfers send at once, the others wait in line (first come, first served), so the
server's buffered artifact bytes stay under ``limit * window`` and each running transfer gets
a useful share of the bandwidth instead of a trickle. An agent that announced
:data:`CAPABILITY_FILE_QUEUE` hears QUEUED frames while it waits, which keep its no-data
watchdog quiet; an older agent, which would take a silent wait for a stall, is let in at once
(counted in ``active``, which it may push past ``limit``).

A transfer the server cannot finish (the file vanished, a read failed, no
credit for ``stall_timeout``) is reset with :data:`RESET_SERVER_ERROR`; an agent that gives up
sends STOP_SENDING and resets its side with :data:`RESET_CANCELLED`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import logging
import os
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Literal, Protocol

from aioquic.quic.connection import QuicConnection
from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "CAPABILITY_FILE_QUEUE",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_MAX_TRANSFERS",
    "DEFAULT_WINDOW",
    "MAX_CHUNK_SIZE",
    "MIN_CHUNK_SIZE",
    "RESET_CANCELLED",
    "RESET_SERVER_ERROR",
    "SHA256_PATTERN",
    "ArtifactSource",
    "FetchCheck",
    "FileError",
    "FileHeader",
    "FileRefused",
    "FileRequest",
    "FileStreamClient",
    "FileStreamServer",
    "IncomingFile",
    "TicketCheck",
    "TicketGrant",
    "TicketIssuer",
    "TicketRequest",
    "TransferGate",
    "TransferInterrupted",
]

logger = logging.getLogger(__name__)

MIN_CHUNK_SIZE = 64 << 10
MAX_CHUNK_SIZE = 1 << 20
DEFAULT_CHUNK_SIZE = 256 << 10
#: Bytes the server sends past the agent's last credit; stays below the QUIC stream window.
DEFAULT_WINDOW = 4 << 20
SHA256_PATTERN = r"^[0-9a-f]{64}$"
#: File transfers one server sends at once, over all connections; the rest wait in line.
DEFAULT_MAX_TRANSFERS = 8
#: The agent capability (in AUTH) saying it understands QUEUED frames.
CAPABILITY_FILE_QUEUE = "file_queue"
#: Seconds between QUEUED frames to a waiting agent (well under its 30 s no-data watchdog).
QUEUE_NOTICE_INTERVAL = 5.0

#: Application error codes in RESET_STREAM / STOP_SENDING frames.
RESET_CANCELLED = 1
RESET_SERVER_ERROR = 2

_LENGTH = struct.Struct(">I")
_CREDIT = struct.Struct(">Q")
_MAX_FRAME = 4096
# A ticket (file_workers.TicketSigner) naming one artifact is about 200 characters.
_MAX_TICKET = 2048
# Concurrent transfers one agent connection may run.
_MAX_TRANSFERS = 8
# Seconds between QUEUED frames while the server gets a file from a peer replica.
_LOCATE_NOTICE_INTERVAL = 1.0


class FileRequest(BaseModel):
    """What the agent asks for: an artifact, from an offset, in chunks of a size."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sha256: str = Field(pattern=SHA256_PATTERN)
    offset: int = Field(default=0, ge=0)
    chunk_size: int = Field(default=DEFAULT_CHUNK_SIZE, ge=MIN_CHUNK_SIZE, le=MAX_CHUNK_SIZE)
    #: Only to a file worker: the control connection's ticket naming this artifact (never
    #: sent to a server's control connection, whose older releases forbid the field).
    ticket: str | None = Field(default=None, max_length=_MAX_TICKET)


class TicketRequest(BaseModel):
    """The agent asks the control connection for a ticket to fetch ``ticket_for`` from a
    file worker."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ticket_for: str = Field(pattern=SHA256_PATTERN)


class TicketGrant(BaseModel):
    """The server's ticket: what a file worker checks; good for ``expires_in`` seconds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ticket: str = Field(max_length=_MAX_TICKET)
    expires_in: float


class FileHeader(BaseModel):
    """The server's yes: the artifact's whole size and the offset the bytes start at."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int = Field(ge=0)
    offset: int = Field(ge=0)


class FileError(BaseModel):
    """The server's no, with a reason for a person and a code for the agent."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    code: Literal["bad_request", "not_found", "bad_offset", "busy", "unavailable", "forbidden"]
    error: str


class QueueNotice(BaseModel):
    """The server's "wait": the request is about ``queued``-th in line for a transfer slot."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    queued: int = Field(ge=1)


class FileRefused(Exception):
    """The server refused a request; ``code`` says which way (:class:`FileError`)."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code


class TransferInterrupted(Exception):
    """The stream or the connection broke before the whole file arrived."""


def _frame(model: BaseModel) -> bytes:
    # Without the unset optional fields (a request's ticket): older servers forbid them.
    body = model.model_dump_json(exclude_none=True).encode()
    return _LENGTH.pack(len(body)) + body


def _take_frame(buffer: bytearray) -> bytes | None:
    """Cut one length-prefixed frame off ``buffer``; ``None`` until it is complete.

    :raises ValueError: when the declared length is over the frame limit.
    """
    if len(buffer) < _LENGTH.size:
        return None
    (length,) = _LENGTH.unpack_from(buffer)
    if length > _MAX_FRAME:
        raise ValueError(f"frame declares {length} bytes, over the {_MAX_FRAME}-byte limit")
    end = _LENGTH.size + length
    if len(buffer) < end:
        return None
    body = bytes(buffer[_LENGTH.size : end])
    del buffer[:end]
    return body


# --------------------------------------------------------------------------- server end


class ArtifactSource(Protocol):
    """Where the server finds the artifacts it may serve."""

    def locate(self, sha256: str) -> Path | Awaitable[Path | None] | None:
        """The stored file of a complete artifact, or ``None`` when the store lacks it (or
        an awaitable of it: a server may fetch it first from a peer replica).

        :param sha256: 64 lowercase hex digits, already validated.
        :raises FileRefused: refused with that code and reason for the agent.
        """
        ...


#: ``async (client_id, sha256) -> bool``: whether that agent may fetch that artifact.
FetchCheck = Callable[[str, str], Awaitable[bool]]
#: In a file worker: ``(request) -> client id`` the request's ticket names, after checking
#: it allows this request; raises :class:`FileRefused` otherwise.
TicketCheck = Callable[[FileRequest], str]
#: On a control connection: ``(client_id, sha256) -> (ticket, seconds it is good for)``.
TicketIssuer = Callable[[str, str], tuple[str, float]]
# How long the server waits for an artifact to be local (from a peer) before a ticket.
_TICKET_LOCATE_WAIT = 10.0


class TransferGate:
    """At most ``limit`` file transfers at once over all of a server's connections; the
    others wait first come, first served, except that one ``owner`` (an agent's connection)
    holds at most :attr:`owner_limit` slots, so one agent cannot take them all.

    Counters for tests and metrics: ``active`` (sending now) and its ``peak``, ``waiting``
    and its ``peak_waiting``, ``buffered`` (bytes sent past the agents' credits, which the
    server may still hold) and its ``peak_buffered``, ``admitted`` and ``queued`` (transfers
    that had to wait) since the start.
    """

    def __init__(
        self, limit: int = DEFAULT_MAX_TRANSFERS, notice_interval: float = QUEUE_NOTICE_INTERVAL
    ) -> None:
        if limit < 1:
            raise ValueError(f"the transfer limit must be at least 1, got {limit}")
        if notice_interval <= 0:
            raise ValueError(f"notice_interval must be positive, got {notice_interval}")
        self.limit = limit
        #: Seconds between a waiting transfer's ``notify`` calls.
        self.notice_interval = notice_interval
        self.active = 0
        self.peak = 0
        self.peak_waiting = 0
        self.buffered = 0
        self.peak_buffered = 0
        self.admitted = 0
        self.queued = 0
        self._waiters: collections.deque[tuple[int, object, asyncio.Future[None]]] = (
            collections.deque()
        )
        self._owners: collections.Counter[object] = collections.Counter()
        self._tickets = 0
        # The ticket of the last waiter let in: positions count from it.
        self._served_ticket = 0

    @property
    def owner_limit(self) -> int:
        """Slots one owner may hold at once: half the limit, at least one."""
        return max(1, self.limit // 2)

    @property
    def waiting(self) -> int:
        """Transfers waiting for a slot."""
        return len(self._waiters)

    async def acquire(
        self, notify: Callable[[int], None] | None = None, owner: object = None
    ) -> None:
        """Wait for a slot; while waiting, ``notify(position)`` every ``notice_interval``
        seconds (position 1 is next). Cancelling gives the place (or a slot just granted)
        up. ``release(owner)`` when done."""
        if not self._waiters and self._free_for(owner):
            self._take(owner)
            return
        self._tickets += 1
        ticket = self._tickets
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (ticket, owner, granted)
        self._waiters.append(entry)
        # A free slot that the waiters ahead may not take (their owners hold enough).
        self._dispatch()
        if not granted.done():
            self.queued += 1
            self.peak_waiting = max(self.peak_waiting, len(self._waiters))
        try:
            while not granted.done():
                if notify is not None:
                    notify(max(ticket - self._served_ticket, 1))
                await asyncio.wait({granted}, timeout=self.notice_interval)
        except BaseException:
            if granted.done() and not granted.cancelled():
                self.release(owner)  # the slot came with the cancellation: pass it on
            else:
                granted.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
            raise

    def admit(self, owner: object = None) -> None:
        """Take a slot now, even past the limits (for agents that cannot wait in line)."""
        self._take(owner)

    def _free_for(self, owner: object) -> bool:
        return self.active < self.limit and self._owners[owner] < self.owner_limit

    def _take(self, owner: object) -> None:
        self.active += 1
        self._owners[owner] += 1
        self.admitted += 1
        self.peak = max(self.peak, self.active)

    def release(self, owner: object = None) -> None:
        """A transfer of ``owner`` ended: let the next waiters in."""
        self.active -= 1
        self._owners[owner] -= 1
        if self._owners[owner] <= 0:
            del self._owners[owner]
        self._dispatch()

    def _dispatch(self) -> None:
        """Let waiters in, in order, while slots are free, skipping owners at their share."""
        while self.active < self.limit:
            entry = next(
                (w for w in self._waiters if not w[2].done() and self._free_for(w[1])), None
            )
            if entry is None:
                break
            self._waiters.remove(entry)
            ticket, owner_in, granted = entry
            self._served_ticket = max(self._served_ticket, ticket)
            self._take(owner_in)
            granted.set_result(None)
        # Drop the cancelled ones at the head.
        while self._waiters and self._waiters[0][2].done():
            self._waiters.popleft()

    def hold(self, delta: int) -> None:
        """Bytes the server holds past agents' credits went up (or down) by ``delta``."""
        self.buffered += delta
        self.peak_buffered = max(self.peak_buffered, self.buffered)


class _Outgoing:
    """One request being served."""

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id
        self.buffer = bytearray()
        self.request: FileRequest | None = None
        self.credited = 0
        # Bytes sent past the credit, as counted in the gate's ``buffered``.
        self.held = 0
        # The next byte the server will send.
        self.position = 0
        self.credit = asyncio.Event()
        self.task: asyncio.Task[None] | None = None


class FileStreamServer:
    """Serves the file requests of one authenticated agent connection.

    The connection feeds it stream events; it answers on the same streams through ``quic``
    and calls ``transmit`` after queueing data.
    """

    def __init__(
        self,
        quic: QuicConnection,
        transmit: Callable[[], None],
        *,
        source: ArtifactSource | None,
        client_id: str,
        may_fetch: FetchCheck | None = None,
        window: int = DEFAULT_WINDOW,
        stall_timeout: float = 60.0,
        gate: TransferGate | None = None,
        queue_notices: bool = False,
        tickets: TicketCheck | None = None,
        issue_ticket: TicketIssuer | None = None,
    ) -> None:
        """:param gate: the server's bound on transfers at once, shared by its connections;
        ``None``: this connection's own gate of :data:`DEFAULT_MAX_TRANSFERS`.
        :param queue_notices: the agent understands QUEUED frames (it announced
        :data:`CAPABILITY_FILE_QUEUE`); otherwise a waiting transfer is silent.
        :param tickets: a file worker's check: every request must carry a ticket it accepts
        (the connection has no session; ``client_id`` is then only a placeholder).
        :param issue_ticket: the control connection of a server with file workers answers
        ticket requests with it (after ``may_fetch``); ``None`` refuses them."""
        if window < MAX_CHUNK_SIZE:
            raise ValueError(f"window must be at least {MAX_CHUNK_SIZE} bytes, got {window}")
        self._quic = quic
        self._transmit = transmit
        self._source = source
        self._client_id = client_id
        self._may_fetch = may_fetch
        self._window = window
        self._stall_timeout = stall_timeout
        self._gate = gate if gate is not None else TransferGate()
        self._queue_notices = queue_notices
        self._tickets = tickets
        self._issue_ticket = issue_ticket
        self._ticket_client: str | None = None
        self._streams: dict[int, _Outgoing] = {}
        # Streams answered whose agent side is still open: late credits and the agent's FIN
        # arrive there, and must not read as new requests.
        self._answered: set[int] = set()
        self._closed = False
        #: Artifact bytes queued for this agent over the connection's life.
        self.bytes_sent = 0

    def data_received(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        """Bytes the agent sent on a stream other than the control stream."""
        if self._closed:
            return
        out = self._streams.get(stream_id)
        if out is None:
            if stream_id in self._answered:
                if end_stream:
                    self._answered.discard(stream_id)
                return
            if stream_id % 4 != 0:
                # Only agent-initiated bidirectional streams carry requests.
                with contextlib.suppress(ValueError):
                    self._quic.stop_stream(stream_id, RESET_CANCELLED)
                self._transmit()
                return
            out = self._streams[stream_id] = _Outgoing(stream_id)
        out.buffer += data
        if out.request is None:
            self._read_request(out)
        if out.request is not None:
            self._read_credits(out)
        if end_stream and out.request is None and stream_id in self._streams:
            self._refuse(out, "bad_request", "stream ended before a complete request")

    def stream_reset(self, stream_id: int) -> None:
        """The agent reset its side or asked the server to stop sending: give the stream up."""
        self._answered.discard(stream_id)
        out = self._streams.pop(stream_id, None)
        if out is not None and out.task is not None:
            out.task.cancel()

    def close(self) -> None:
        """The connection is gone: stop every transfer."""
        self._closed = True
        for out in self._streams.values():
            if out.task is not None:
                out.task.cancel()
        self._streams.clear()
        self._answered.clear()

    @property
    def active(self) -> int:
        """Transfers in progress."""
        return sum(1 for out in self._streams.values() if out.task is not None)

    def _read_request(self, out: _Outgoing) -> None:
        try:
            body = _take_frame(out.buffer)
        except ValueError as exc:
            self._refuse(out, "bad_request", str(exc))
            return
        if body is None:
            return
        try:
            if b'"ticket_for"' in body:
                wanted = TicketRequest.model_validate_json(body)
                if self.active >= _MAX_TRANSFERS:
                    self._refuse(
                        out,
                        "busy",
                        f"{_MAX_TRANSFERS} transfers already running on this connection",
                    )
                    return
                out.request = FileRequest(sha256=wanted.ticket_for)
                out.task = asyncio.create_task(self._grant(out, wanted.ticket_for))
                return
            request = FileRequest.model_validate_json(body)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'request'}: {e['msg']}"
                for e in exc.errors(include_url=False)
            )
            self._refuse(out, "bad_request", f"invalid file request: {problems}")
            return
        if self.active >= _MAX_TRANSFERS:
            self._refuse(
                out, "busy", f"{_MAX_TRANSFERS} transfers already running on this connection"
            )
            return
        out.request = request
        out.credited = request.offset
        out.task = asyncio.create_task(self._serve(out, request))

    def _read_credits(self, out: _Outgoing) -> None:
        count = len(out.buffer) // _CREDIT.size
        if not count:
            return
        for (value,) in _CREDIT.iter_unpack(bytes(out.buffer[: count * _CREDIT.size])):
            out.credited = max(out.credited, value)
        del out.buffer[: count * _CREDIT.size]
        self._hold(out, out.position - out.credited)
        out.credit.set()

    def _hold(self, out: _Outgoing, held: int) -> None:
        held = max(held, 0)
        self._gate.hold(held - out.held)
        out.held = held

    def _queued(self, out: _Outgoing, position: int) -> None:
        """Tell a waiting agent its place in line (only one that understands it)."""
        if not self._queue_notices or self._closed:
            return
        with contextlib.suppress(RuntimeError, ValueError):
            self._quic.send_stream_data(out.stream_id, _frame(QueueNotice(queued=position)))
        self._transmit()

    def _refuse(self, out: _Outgoing, code: str, reason: str) -> None:
        logger.warning("file request from %s refused: %s", self._client_id, reason)
        self._forget(out)
        error = FileError.model_validate({"code": code, "error": reason})
        with contextlib.suppress(RuntimeError, ValueError):
            self._quic.send_stream_data(out.stream_id, _frame(error), end_stream=True)
        self._transmit()

    async def _may_serve(self, out: _Outgoing, sha: str) -> bool:
        """Whether this connection's client may fetch ``sha``; if not, the request is
        refused with the same code as a missing artifact (the agent learns nothing of what
        other clients deploy)."""
        if self._may_fetch is None or await self._may_fetch(self._client_id, sha):
            return True
        self._refuse(
            out,
            "not_found",
            f"artifact {sha} is not part of any deployment sent to client "
            f"{self._client_id}; an agent may fetch only its own deployments' artifacts",
        )
        return False

    async def _grant(self, out: _Outgoing, sha: str) -> None:
        """Answer a ticket request: the same checks as a transfer, then a signed ticket."""
        try:
            if self._issue_ticket is None or self._tickets is not None:
                self._refuse(out, "unavailable", "this server has no file workers")
                return
            if not await self._may_serve(out, sha):
                return
            # The workers read only the local store: have the file there first (a peer
            # replica's copy is fetched here); one that takes long is served on this
            # connection instead, where the agent hears QUEUED frames meanwhile.
            located = self._source.locate(sha) if self._source is not None else None
            if located is not None and not isinstance(located, Path):
                getting = asyncio.ensure_future(located)
                try:
                    done, _ = await asyncio.wait({getting}, timeout=_TICKET_LOCATE_WAIT)
                    located = getting.result() if done else None
                finally:
                    getting.cancel()
            if located is None:
                self._refuse(out, "unavailable", f"artifact {sha} is not in the local store yet")
                return
            ticket, lifetime = self._issue_ticket(self._client_id, sha)
            with contextlib.suppress(RuntimeError, ValueError):
                self._quic.send_stream_data(
                    out.stream_id,
                    _frame(TicketGrant(ticket=ticket, expires_in=lifetime)),
                    end_stream=True,
                )
            self._transmit()
        except FileRefused as exc:
            self._refuse(out, exc.code, str(exc))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.warning("a ticket for %s to %s failed: %s", sha, self._client_id, exc)
            self._refuse(out, "unavailable", f"no ticket: {exc}")
        finally:
            self._forget(out)

    async def _serve(self, out: _Outgoing, request: FileRequest) -> None:
        sha = request.sha256
        try:
            if self._tickets is not None:
                try:
                    client_id = self._tickets(request)
                except FileRefused as exc:
                    self._refuse(out, exc.code, str(exc))
                    return
                if self._ticket_client is None:
                    # A worker's connection belongs to the client its first ticket names.
                    self._ticket_client = self._client_id = client_id
                elif client_id != self._ticket_client:
                    self._refuse(
                        out,
                        "forbidden",
                        "this connection carries another client's transfers; open one of your own",
                    )
                    return
            if not await self._may_serve(out, sha):
                return
            try:
                located = self._source.locate(sha) if self._source is not None else None
                path = (
                    located
                    if located is None or isinstance(located, Path)
                    else await self._await_located(out, located)
                )
            except FileRefused as exc:
                self._refuse(out, exc.code, str(exc))
                return
            if path is None:
                reason = (
                    f"artifact {sha} is not in the server's store; upload it first "
                    "(POST /api/artifacts or 'deployctl artifact push')"
                    if self._source is not None
                    else "this server does not serve artifacts"
                )
                self._refuse(out, "not_found" if self._source else "unavailable", reason)
                return
            if self._queue_notices:
                await self._gate.acquire(functools.partial(self._queued, out), owner=self)
            else:
                # An older agent would take a silent wait for a stall and give up: it
                # starts at once, as it did before there was a line (counted, not bounded).
                self._gate.admit(owner=self)
            try:
                try:
                    # Not in a thread: a cancelled thread would leak the descriptor it opens.
                    fd = os.open(path, os.O_RDONLY)
                except FileNotFoundError:
                    self._refuse(out, "not_found", f"artifact {sha} is no longer in the store")
                    return
                try:
                    await self._send_file(out, request, fd)
                finally:
                    os.close(fd)
            finally:
                self._hold(out, 0)
                self._gate.release(owner=self)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.warning("sending artifact %s to %s failed: %s", sha, self._client_id, exc)
            with contextlib.suppress(RuntimeError, ValueError):
                self._quic.reset_stream(out.stream_id, RESET_SERVER_ERROR)
            self._transmit()
        finally:
            self._forget(out)

    async def _await_located(self, out: _Outgoing, located: Awaitable[Path | None]) -> Path | None:
        """Wait for a file the source is still getting (from a peer replica), telling an
        agent that understands QUEUED frames it is first in line every few seconds, so its
        no-data watchdog does not give up meanwhile."""
        getting = asyncio.ensure_future(located)
        try:
            while True:
                done, _ = await asyncio.wait({getting}, timeout=_LOCATE_NOTICE_INTERVAL)
                if done:
                    return getting.result()
                self._queued(out, 1)
        finally:
            getting.cancel()  # this request gave up (the source shields what others share)

    def _forget(self, out: _Outgoing) -> None:
        if self._streams.get(out.stream_id) is out:
            del self._streams[out.stream_id]
            if not self._closed:
                self._answered.add(out.stream_id)

    async def _send_file(self, out: _Outgoing, request: FileRequest, fd: int) -> None:
        size = os.fstat(fd).st_size
        if request.offset > size:
            self._refuse(
                out,
                "bad_offset",
                f"offset {request.offset} is past the end of artifact {request.sha256} "
                f"({size} bytes); discard the partial file and start from 0",
            )
            return
        header = FileHeader(size=size, offset=request.offset)
        self._quic.send_stream_data(
            out.stream_id, _frame(header), end_stream=request.offset == size
        )
        self._transmit()
        logger.info(
            "sending artifact %s to %s: bytes %d-%d",
            request.sha256[:12],
            self._client_id,
            request.offset,
            size,
        )
        position = out.position = request.offset
        while position < size:
            length = min(request.chunk_size, size - position)
            # At most ``window`` bytes past the agent's credit, this chunk included.
            await self._await_credit(out, position + length - self._window)
            data = await asyncio.to_thread(os.pread, fd, length, position)
            if len(data) != length:
                raise OSError(f"artifact file shrank to {position + len(data)} bytes")
            position = out.position = position + length
            self._quic.send_stream_data(out.stream_id, data, end_stream=position == size)
            self._hold(out, position - out.credited)
            self.bytes_sent += length
            self._transmit()
        # Keep the slot until the agent has it all: the server holds these bytes until then,
        # and the gate's bound on buffered bytes stays true.
        with contextlib.suppress(TimeoutError):
            await self._await_credit(out, size)

    async def _await_credit(self, out: _Outgoing, offset: int) -> None:
        """Wait until the agent credits ``offset``.

        :raises TimeoutError: no credit for ``stall_timeout``."""
        while out.credited < offset:
            out.credit.clear()
            try:
                await asyncio.wait_for(out.credit.wait(), self._stall_timeout)
            except TimeoutError:
                raise TimeoutError(
                    f"no credit from the agent for {self._stall_timeout:g} s"
                ) from None


# --------------------------------------------------------------------------- agent end


class IncomingFile:
    """One requested file as it arrives: its header, then its bytes in chunks.

    Use :meth:`header` once, then :meth:`read` until it returns ``b""``; :meth:`credit`
    after writing, so the server sends more; :meth:`close` when done or giving up.
    """

    def __init__(self, client: FileStreamClient, stream_id: int, chunk_size: int) -> None:
        self._client = client
        self.stream_id = stream_id
        self._chunk_size = chunk_size
        self._prefix = bytearray()
        self._header: FileHeader | None = None
        self._grant: TicketGrant | None = None
        self._refusal: FileError | None = None
        self._pieces: list[bytes] = []
        self._buffered = 0
        self._eof = False
        self._failure: str | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._activity = time.monotonic()
        #: While the server has this request waiting in line: about how many transfers are
        #: ahead of it plus one (from its QUEUED frames); ``None`` otherwise.
        self.queue_position: int | None = None
        #: Called from :meth:`header` with the new position when it changes.
        self.on_queued: Callable[[int | None], None] | None = None

    # -- fed by the connection (synchronous)

    def _data(self, data: bytes, end_stream: bool) -> None:
        # Any bytes, a QUEUED frame included, show the server is alive and minding this
        # transfer: the no-data watchdog counts from here.
        self._activity = time.monotonic()
        if self._header is None and self._refusal is None and self._grant is None:
            self._prefix += data
            while self._header is None and self._refusal is None and self._grant is None:
                try:
                    body = _take_frame(self._prefix)
                except ValueError as exc:
                    self._fail(f"server sent a bad header: {exc}")
                    return
                if body is None:
                    if end_stream:
                        self._fail("server ended the stream before its header")
                    return
                try:
                    fields = json.loads(body)
                    if isinstance(fields, dict) and "error" in fields:
                        self._refusal = FileError.model_validate(fields)
                    elif isinstance(fields, dict) and "queued" in fields:
                        self.queue_position = QueueNotice.model_validate(fields).queued
                        self._wake()
                    elif isinstance(fields, dict) and "ticket" in fields:
                        self._grant = TicketGrant.model_validate(fields)
                        self._wake()
                    else:
                        self._header = FileHeader.model_validate(fields)
                        self.queue_position = None
                except (ValueError, ValidationError) as exc:
                    self._fail(f"server sent a bad header: {exc}")
                    return
            data = bytes(self._prefix)
            self._prefix.clear()
        if data:
            self._pieces.append(data)
            self._buffered += len(data)
        if end_stream:
            self._eof = True
        if self._refusal is not None or self._eof or self._buffered >= self._chunk_size:
            self._wake()

    def _fail(self, reason: str) -> None:
        if self._failure is None and not self._eof:
            self._failure = reason
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self, timeout: float) -> None:
        """Wait for news; :class:`TransferInterrupted` after ``timeout`` s without a byte."""
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            while True:
                left = self._activity + timeout - time.monotonic()
                if left <= 0:
                    raise TransferInterrupted(f"no data from the server for {timeout:g} s")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._waiter), left)
                    return
        finally:
            if not self._waiter.done():
                self._waiter.cancel()
            self._waiter = None

    # -- used by the fetcher

    async def header(self, *, timeout: float) -> FileHeader:
        """Wait for the server's answer.

        :raises FileRefused: the server refused the request.
        :raises TransferInterrupted: the stream broke or stayed silent for ``timeout``.
        """
        while self._header is None:
            if self._refusal is not None:
                raise FileRefused(self._refusal.code, self._refusal.error)
            if self._failure is not None:
                raise TransferInterrupted(self._failure)
            position = self.queue_position
            await self._wait(timeout)
            if self.queue_position != position and self.on_queued is not None:
                self.on_queued(self.queue_position)
        return self._header

    async def ticket(self, *, timeout: float) -> TicketGrant:
        """Wait for the answer to a ticket request (:meth:`FileStreamClient.ticket`).

        :raises FileRefused: the server refused it (an older server: ``bad_request``).
        :raises TransferInterrupted: the stream broke or stayed silent for ``timeout``.
        """
        while self._grant is None:
            if self._refusal is not None:
                raise FileRefused(self._refusal.code, self._refusal.error)
            if self._header is not None:
                raise TransferInterrupted("the server answered a ticket request with a file")
            if self._failure is not None:
                raise TransferInterrupted(self._failure)
            await self._wait(timeout)
        return self._grant

    async def read(self, *, timeout: float) -> bytes:
        """The next bytes: at least a chunk, except at the end; ``b""`` once all arrived.

        After a break it first returns what did arrive, then raises.

        :raises TransferInterrupted: the stream broke or stayed silent for ``timeout``.
        """
        while True:
            if self._buffered >= self._chunk_size or (self._buffered and self._eof):
                return self._drain()
            if self._eof:
                return b""
            if self._failure is not None:
                if self._buffered:
                    return self._drain()
                raise TransferInterrupted(self._failure)
            await self._wait(timeout)

    def _drain(self) -> bytes:
        data = self._pieces[0] if len(self._pieces) == 1 else b"".join(self._pieces)
        self._pieces.clear()
        self._buffered = 0
        return data

    def credit(self, offset: int) -> None:
        """Tell the server the file is written up to ``offset``."""
        if not self._closed and self._failure is None:
            self._client._send(self.stream_id, _CREDIT.pack(offset))

    def close(self) -> None:
        """Finish the stream: FIN when the whole file arrived, otherwise cancel it."""
        if self._closed:
            return
        self._closed = True
        self._client._finish(self, complete=self._eof and self._failure is None)


class FileStreamClient:
    """Opens file requests on one authenticated connection (the agent's end)."""

    def __init__(self, quic: QuicConnection, transmit: Callable[[], None]) -> None:
        self._quic = quic
        self._transmit = transmit
        self._incoming: dict[int, IncomingFile] = {}
        self._lost: str | None = None

    def request(self, request: FileRequest) -> IncomingFile:
        """Send ``request`` on a new stream; its answer arrives in the returned object."""
        return self._open(request, request.chunk_size)

    async def ticket(self, sha256: str, *, timeout: float) -> TicketGrant:
        """Ask this (control) connection for a ticket to fetch ``sha256`` from a file worker.

        :raises FileRefused: refused (``not_found``: not this agent's to fetch;
            ``unavailable``: no workers, or not ready; ``bad_request``: an older server).
        :raises TransferInterrupted: the connection broke or stayed silent for ``timeout``.
        """
        incoming = self._open(TicketRequest(ticket_for=sha256), DEFAULT_CHUNK_SIZE)
        try:
            return await incoming.ticket(timeout=timeout)
        finally:
            incoming._eof = incoming._grant is not None or incoming._refusal is not None
            incoming.close()

    @property
    def lost(self) -> str | None:
        """Why the connection is gone; ``None`` while it carries file streams."""
        return self._lost

    def _open(self, request: BaseModel, chunk_size: int) -> IncomingFile:
        stream_id = self._quic.get_next_available_stream_id()
        incoming = IncomingFile(self, stream_id, chunk_size)
        if self._lost is not None:
            incoming._fail(self._lost)
            return incoming
        self._incoming[stream_id] = incoming
        self._send(stream_id, _frame(request))
        return incoming

    def data_received(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        """Bytes the server sent on a file stream."""
        incoming = self._incoming.get(stream_id)
        if incoming is not None:
            incoming._data(data, end_stream)

    def stream_reset(self, stream_id: int, error_code: int) -> None:
        """The server reset a file stream."""
        incoming = self._incoming.get(stream_id)
        if incoming is not None:
            why = "the server could not read it" if error_code == RESET_SERVER_ERROR else "reset"
            incoming._fail(f"the server stopped the transfer ({why}); see the server log")

    def connection_lost(self, reason: str) -> None:
        """The connection is gone: every transfer on it is interrupted."""
        self._lost = reason
        for incoming in self._incoming.values():
            incoming._fail(reason)
        self._incoming.clear()

    def _send(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        if self._lost is not None:
            return
        with contextlib.suppress(RuntimeError, ValueError):
            self._quic.send_stream_data(stream_id, data, end_stream=end_stream)
        self._transmit()

    def _finish(self, incoming: IncomingFile, *, complete: bool) -> None:
        self._incoming.pop(incoming.stream_id, None)
        if self._lost is not None:
            return
        if complete:
            self._send(incoming.stream_id, b"", end_stream=True)
            return
        with contextlib.suppress(RuntimeError, ValueError):
            self._quic.stop_stream(incoming.stream_id, RESET_CANCELLED)
        with contextlib.suppress(RuntimeError, ValueError):
            self._quic.reset_stream(incoming.stream_id, RESET_CANCELLED)
        self._transmit()
