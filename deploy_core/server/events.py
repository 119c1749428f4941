"""Routing agent messages: acknowledgements, errors, and events to their handlers (SPEC
deploy-20, deploy-21).

Handlers are registered through ``deploy_register_event_handlers``; the core's own
``deploy.status`` and ``command.callback`` handlers come in the same way
(:mod:`deploy_core.server.handlers`).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from deploy_core.plugin.errors import EventRejected as EventRejected  # defined by the contract
from deploy_core.server.ingest import IngestClosed
from deploy_core.server.ownership import named_deployments
from deploy_core.server.services import PluginServices
from deploy_core.transport import AgentSession, Envelope, Kind, ack_for, error_for

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


class _Flight:
    """One connection's messages being stored through the ingest."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[None]] = set()
        self.room = asyncio.Semaphore(MAX_IN_FLIGHT)


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
        self._flights: weakref.WeakKeyDictionary[AgentSession, _Flight] = (
            weakref.WeakKeyDictionary()
        )

    async def route(self, session: AgentSession, env: Envelope) -> None:
        """One message of an authenticated agent (see the class's text for the order)."""
        flight = self._flights.get(session)
        if flight is None:
            flight = self._flights[session] = _Flight()
        if self._pipelined(env):
            await flight.room.acquire()
            task = asyncio.create_task(self._stored(session, env))
            flight.tasks.add(task)

            def finished(task: asyncio.Task[None], flight: _Flight = flight) -> None:
                flight.tasks.discard(task)
                flight.room.release()

            task.add_done_callback(finished)
            return
        if flight.tasks:  # what came before is stored first
            await asyncio.wait(list(flight.tasks))
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

    def _pipelined(self, env: Envelope) -> bool:
        if env.kind is Kind.ACK:
            return True
        if env.kind is not Kind.EVENT:
            return False
        handler = self.server.plugins.event_handlers.get(env.name)
        return handler is not None and handler.handler in _CHECKS_OWNERSHIP

    async def _stored(self, session: AgentSession, env: Envelope) -> None:
        try:
            await self._handle(session, env)
        except Exception:
            log.exception("%s from %s failed", env.kind.value, session.client_id)

    async def _handle(self, session: AgentSession, env: Envelope) -> None:
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

    async def _route(self, session: AgentSession, env: Envelope) -> None:
        if env.kind is Kind.ACK:
            deploy_id = env.payload.get("deploy_id")
            if deploy_id is None:
                return
            records, client_id = self.server.records, session.client_id
            owned = isinstance(deploy_id, str) and await self.server.ingest.submit(
                lambda conn: records.mark_acked_in(conn, client_id, deploy_id)
            )
            if not owned:
                session.send(error_for(env, not_yours(session.client_id, [deploy_id])))
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
        except Exception:
            # Not acknowledged: the agent keeps the event and sends it again later.
            log.exception("handler for %s failed on an event from %s", env.name, session.client_id)
            return
        session.send(ack_for(env))


def not_yours(client_id: str, deploy_ids: list[Any]) -> str:
    """The refusal of a message naming ``deploy_ids``, not deployments of ``client_id``."""
    # The same words for a deployment of another client and for one that does not
    # exist: an agent learns nothing about other clients' deployments.
    names = ", ".join(f"{d:.80}" if isinstance(d, str) else f"{d!r:.80}" for d in deploy_ids)
    return (
        f"no deployment {names} for client {client_id}; an agent may name only the "
        "deployments sent to it"
    )
