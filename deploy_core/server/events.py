"""Routing agent events to their handlers (SPEC deploy-20, deploy-21).

Handlers are registered through ``deploy_register_event_handlers``; the core's own
``deploy.status`` and ``command.callback`` handlers come in the same way
(:mod:`deploy_core.server.handlers`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deploy_core.plugin.errors import EventRejected as EventRejected  # defined by the contract
from deploy_core.server.services import PluginServices
from deploy_core.transport import Envelope

if TYPE_CHECKING:
    from deploy_core.server.app import DeployServer


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
