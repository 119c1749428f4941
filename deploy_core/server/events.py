"""Routing agent messages: acknowledgements, errors, and events to their handlers (SPEC
deploy-20, deploy-21).

Handlers are registered through ``deploy_register_event_handlers``; the core's own
``deploy.status`` and ``command.callback`` handlers come in the same way
(:mod:`deploy_core.server.handlers`).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from deploy_core.plugin.errors import EventRejected as EventRejected  # defined by the contract
from deploy_core.server.db_health import OutageLog
from deploy_core.server.ingest import IngestClosed
from deploy_core.server.ownership import named_deployments
from deploy_core.server.services import PluginServices
from deploy_core.transport import AgentSession, Envelope, Kind, ack_for, error_for
from deploy_core.transport.envelope import CAPABILITY_ACK_REFS, acks_for

if TYPE_CHECKING:
    from deploy_core.server.app import DeployServer

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

# Handlers that check the deployments an event names in the transaction that stores it
# (the core's deploy.status and command.callback, server/handlers.py): the router does not
# look them up first.
_CHECKS_OWNERSHIP: weakref.WeakSet[Callable[..., Any]] = weakref.WeakSet()


def checks_ownership(handler: F) -> F:
    """Mark a handler that refuses, with :func:`not_yours`'s words, an event naming a
    deployment of another client, in the same transaction that stores the event."""
    _CHECKS_OWNERSHIP.add(handler)
    return handler


@dataclass(frozen=True)
class Stages:
    """A core handler in two synchronous-ended halves, which the router runs without a task
    of its own per event (the hot path of issue 13 §3: an agent's status reports):

    - ``queue(ctx)`` validates the event and queues its storing; returns the future its
      stored result is set on (``Ingest.queue_grouped``).  Raises :class:`EventRejected`
      for a malformed event (answered with an ERROR, nothing stored).
    - ``done(ctx, result)`` acts on the stored result; raises :class:`EventRejected` when
      the event was refused (e.g. a deployment of another client).

    The event is acknowledged after ``done`` returns, i.e. once its transaction committed;
    an exception of the storing or of ``done`` leaves it unacknowledged, as an exception of
    the handler does."""

    queue: Callable[[EventContext], Awaitable[asyncio.Future[Any]]]
    done: Callable[[EventContext, Any], None]


_STAGES: weakref.WeakKeyDictionary[Callable[..., Any], Stages] = weakref.WeakKeyDictionary()


def in_stages(stages: Stages) -> Callable[[F], F]:
    """Mark a handler (also marked :func:`checks_ownership`) that the router may run as
    ``stages`` instead; it must do what the handler does."""

    def mark(handler: F) -> F:
        _STAGES[handler] = stages
        return handler

    return mark


@dataclass(frozen=True)
class EventContext:
    """One agent event as a handler sees it."""

    server: DeployServer
    client_id: str
    envelope: Envelope

    @property
    def name(self) -> str:
        """The event's name, e.g. ``deploy.status``."""
        return self.envelope.name

    @property
    def event_id(self) -> str:
        """The envelope's id, the same on every resend."""
        return self.envelope.id

    @property
    def payload(self) -> dict[str, Any]:
        """The event's payload, not yet validated: handlers validate it."""
        return self.envelope.payload

    @property
    def services(self) -> PluginServices:
        """What a plugin's handler may use of the server (the core's own use ``server``)."""
        return PluginServices(self.server)


#: Messages of one connection being stored at once, at most (then its next message waits).
MAX_IN_FLIGHT = 256
#: How long a stopping server waits for the messages being stored.
DRAIN_WAIT = 10.0
#: Events one ACK names at most (to an agent taking ACKs for many: CAPABILITY_ACK_REFS).
MAX_ACK_REFS = 256


def _takes_ack_refs(session: AgentSession) -> bool:
    capabilities = getattr(session, "capabilities", None)
    return isinstance(capabilities, dict) and capabilities.get(CAPABILITY_ACK_REFS) is True


class _Answers(Protocol):
    """Where :meth:`EventRouter._route` sends its answer: the session, or a :class:`_Slot`."""

    @property
    def client_id(self) -> str: ...

    def send(self, env: Envelope) -> None: ...


class _Slot:
    """The answers to one pipelined message, held until those of the messages before it
    on its connection have gone (answers go in arrival order)."""

    __slots__ = ("answers", "client_id", "ready")

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        self.answers: list[Envelope] = []
        self.ready = False

    def send(self, env: Envelope) -> None:
        self.answers.append(env)


class _Flight:
    """One connection's messages being stored through the ingest: a task each, or for a
    handler in :class:`Stages` the ingest's future; and their answers, in arrival order.

    To an agent that announced :data:`CAPABILITY_ACK_REFS`, the answers that become ready in
    one turn of the event loop (a committed batch holds many of its events) go at the turn's
    end, a run of plain ACKs among them as one ACK naming them all (at most
    :data:`MAX_ACK_REFS`): one envelope for the agent to read instead of one per event."""

    def __init__(self, session: AgentSession) -> None:
        self.session = session
        self.tasks: set[asyncio.Future[Any]] = set()
        self._order: collections.deque[_Slot] = collections.deque()
        self._acks_many = _takes_ack_refs(session)
        # Answers ready this turn, for an agent that takes ACKs for many events.
        self._outgoing: list[Envelope] = []
        # Set when there is room again (asyncio.Semaphore.locked() scans its waiters on
        # every acquire: a connection at its limit paid for 256 waiters per message).
        self._room: asyncio.Future[None] | None = None

    async def wait_room(self) -> None:
        """Return once fewer than :data:`MAX_IN_FLIGHT` are being stored."""
        while len(self.tasks) >= MAX_IN_FLIGHT:
            if self._room is None or self._room.done():
                self._room = asyncio.get_running_loop().create_future()
            await self._room

    def slot(self) -> _Slot:
        """A place for the answers of the next message, in arrival order."""
        slot = _Slot(self.session.client_id)
        self._order.append(slot)
        return slot

    def answered(self, slot: _Slot) -> None:
        """``slot`` holds all its answers: send those now first in line."""
        slot.ready = True
        order, session = self._order, self.session
        if not self._acks_many:
            while order and order[0].ready:
                for env in order.popleft().answers:
                    session.send(env)
            return
        outgoing = self._outgoing
        scheduled = bool(outgoing)
        while order and order[0].ready:
            outgoing += order.popleft().answers
        if outgoing and not scheduled:
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Send the answers held for the end of the turn: runs of plain ACKs as one each."""
        outgoing, self._outgoing = self._outgoing, []
        run: list[Envelope] = []
        for env in outgoing:
            if env.kind is Kind.ACK and not env.payload and env.ref is not None:
                run.append(env)
                if len(run) < MAX_ACK_REFS:
                    continue
            if run:
                self.session.send(acks_for(run))
                run = []
            if env.kind is not Kind.ACK or env.payload or env.ref is None:
                self.session.send(env)
        if run:
            self.session.send(acks_for(run))

    def add(self, task: asyncio.Future[Any]) -> None:
        self.tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Future[Any]) -> None:
        self.tasks.discard(task)
        room = self._room
        if room is not None and not room.done() and len(self.tasks) < MAX_IN_FLIGHT:
            room.set_result(None)


class EventRouter:
    """Handles each message an authenticated agent sends: acknowledgements mark commands
    received, events go to the handler registered for their name, and anything naming a
    deployment is checked against that agent's deployments first.

    One connection's acknowledgements, status reports and callbacks are pipelined: each is
    queued for the ingest in arrival order and the connection's next message is taken at
    once, so one agent's many reports share transactions too; each is answered (ACK or
    ERROR) after its own transaction, in order.  Any other message waits until those before
    it are stored, so a plugin's handler sees what the agent said before."""

    def __init__(self, server: DeployServer) -> None:
        self.server = server
        #: Agents' messages not stored because the database is unreachable: logged once,
        #: then at most every few seconds (not a traceback each); the agents keep them,
        #: unacknowledged, and send them again.
        self.outage = OutageLog(
            log, "agent messages", failures="messages not stored (the agents send them again)"
        )
        self._flights: weakref.WeakKeyDictionary[AgentSession, _Flight] = (
            weakref.WeakKeyDictionary()
        )

    async def route(self, session: AgentSession, env: Envelope) -> None:
        """One message of an authenticated agent (see the class's text for the order)."""
        flight = self._flights.get(session)
        if flight is None:
            flight = self._flights[session] = _Flight(session)
        pipelined = self._pipelined(env)
        if pipelined is not None:
            await flight.wait_room()
            slot = flight.slot()
            if isinstance(pipelined, Stages):
                await self._queue_stages(slot, env, pipelined, flight)
            else:
                task = asyncio.create_task(self._stored(slot, env))
                task.add_done_callback(lambda _t: flight.answered(slot))
                flight.add(task)
            return
        if flight.tasks:  # what came before is stored first
            await asyncio.wait(list(flight.tasks))
        flight.flush()  # and answered first
        await self._handle(session, env)

    async def drain(self, timeout: float = DRAIN_WAIT) -> None:
        """Wait for the messages being stored (before the ingest closes), at most
        ``timeout`` seconds; those still waiting then are cancelled, unanswered (their agents
        send them again)."""
        tasks = [t for flight in list(self._flights.values()) for t in flight.tasks]
        if not tasks:
            return
        _done, late = await asyncio.wait(tasks, timeout=timeout)
        for task in late:
            task.cancel()
        if late:
            log.warning("shutting down: %d agent messages not stored in %g s", len(late), timeout)
            await asyncio.wait(late)

    def _pipelined(self, env: Envelope) -> Stages | bool | None:
        """How ``env`` is pipelined: in a handler's :class:`Stages`, in a task of its own
        (True), or not (None: it waits for what came before)."""
        if env.kind is Kind.ACK:
            return True
        if env.kind is not Kind.EVENT:
            return None
        handler = self.server.plugins.event_handlers.get(env.name)
        if handler is None or handler.handler not in _CHECKS_OWNERSHIP:
            return None
        return _STAGES.get(handler.handler, True)

    async def _queue_stages(
        self, slot: _Slot, env: Envelope, stages: Stages, flight: _Flight
    ) -> None:
        ctx = EventContext(self.server, slot.client_id, env)
        try:
            future = await stages.queue(ctx)
        except Exception as exc:
            self._answer_stage(ctx, slot, exc)
            flight.answered(slot)
            return
        except BaseException:  # cancelled: nothing to answer, the next ones are not held
            flight.answered(slot)
            raise
        future.add_done_callback(functools.partial(self._stored_stage, ctx, slot, stages, flight))
        flight.add(future)

    @classmethod
    def _stored_stage(
        cls,
        ctx: EventContext,
        slot: _Slot,
        stages: Stages,
        flight: _Flight,
        future: asyncio.Future[Any],
    ) -> None:
        """The end of an event run in stages: answer it as :meth:`_route` answers one."""
        try:
            if not future.cancelled():
                stages.done(ctx, future.result())
                slot.send(ack_for(ctx.envelope))
                ctx.server.events.outage.ok()
        except Exception as exc:
            cls._answer_stage(ctx, slot, exc)
        flight.answered(slot)

    @staticmethod
    def _answer_stage(ctx: EventContext, slot: _Slot, exc: Exception) -> None:
        env = ctx.envelope
        if isinstance(exc, IngestClosed):
            # Not stored, not acknowledged: the agent sends it again to the next server.
            log.info("shutting down: %s from %s not stored", env.kind.value, ctx.client_id)
        elif isinstance(exc, EventRejected):
            log.warning("event %s from %s refused: %s", env.name, ctx.client_id, exc)
            slot.send(error_for(env, str(exc)))
        elif not ctx.server.events.outage.failed(exc):
            # Not acknowledged: the agent keeps the event and sends it again later.
            log.error(
                "handler for %s failed on an event from %s",
                env.name,
                ctx.client_id,
                exc_info=exc,
            )

    async def _stored(self, session: _Answers, env: Envelope) -> None:
        try:
            await self._handle(session, env)
        except Exception as exc:
            if not self.outage.failed(exc):
                log.exception("%s from %s failed", env.kind.value, session.client_id)

    async def _handle(self, session: _Answers, env: Envelope) -> None:
        """One message.  Whatever names a deployment is checked against the deployments of
        that agent: a foreign one gets an ERROR and changes nothing, whichever handler it was
        meant for (first, here; or, for the core's handlers marked :func:`checks_ownership`,
        in the transaction that would store it).

        Acknowledgements, status reports and callbacks are stored through the server's
        :class:`~deploy_core.server.ingest.Ingest` (many agents' messages in one
        transaction); an event is acknowledged only once its transaction has committed."""
        try:
            await self._route(session, env)
        except IngestClosed:
            # Not stored, not acknowledged: the agent sends it again to the next server.
            log.info("shutting down: %s from %s not stored", env.kind.value, session.client_id)

    async def _route(self, session: _Answers, env: Envelope) -> None:
        if env.kind is Kind.ACK:
            deploy_id = env.payload.get("deploy_id")
            if deploy_id is None:
                return
            # Grouped: a rollout's agents acknowledge their commands within the same moments.
            owned = isinstance(deploy_id, str) and await self.server.ingest.submit_grouped(
                self.server.records.mark_acked_many_in,
                (session.client_id, deploy_id),
                key=session.client_id,
            )
            if not owned:
                session.send(error_for(env, not_yours(session.client_id, [deploy_id])))
                return
            self.server.dispatcher.acknowledged(deploy_id)
            return
        if env.kind is Kind.ERROR:
            log.warning("agent %s reports an error: %s", session.client_id, env.payload)
            return
        if env.kind is not Kind.EVENT:
            session.send(error_for(env, f"unexpected message kind {env.kind.value!r}"))
            return
        handler = self.server.plugins.event_handlers.get(env.name)
        if handler is None:
            session.send(error_for(env, f"no handler for event {env.name!r} on this server"))
            return
        named = [] if handler.handler in _CHECKS_OWNERSHIP else named_deployments(env.payload)
        foreign = named and await asyncio.to_thread(
            self.server.records.not_owned, session.client_id, named
        )
        if foreign:
            log.warning(
                "event %s from %s names deployments not sent to it: %s",
                env.name,
                session.client_id,
                ", ".join(map(str, foreign)),
            )
            session.send(error_for(env, not_yours(session.client_id, foreign)))
            return
        try:
            await handler.handler(EventContext(self.server, session.client_id, env))
        except IngestClosed:
            raise
        except EventRejected as exc:
            log.warning("event %s from %s refused: %s", env.name, session.client_id, exc)
            session.send(error_for(env, str(exc)))
            return
        except Exception as exc:
            # Not acknowledged: the agent keeps the event and sends it again later.
            if not self.outage.failed(exc):
                log.exception(
                    "handler for %s failed on an event from %s", env.name, session.client_id
                )
            return
        session.send(ack_for(env))
        self.outage.ok()


def not_yours(client_id: str, deploy_ids: list[Any]) -> str:
    """The refusal of a message naming ``deploy_ids``, not deployments of ``client_id``."""
    # The same words for a deployment of another client and for one that does not
    # exist: an agent learns nothing about other clients' deployments.
    names = ", ".join(f"{d:.80}" if isinstance(d, str) else f"{d!r:.80}" for d in deploy_ids)
    return (
        f"no deployment {names} for client {client_id}; an agent may name only the "
        "deployments sent to it"
    )
