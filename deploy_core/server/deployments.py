"""Deployments as the server runs them: submitted (recorded, the client locked, sent when its
agent is here), their changes told to listeners and plugins, and what follows a finish (the
next step of a rollback cascade, or a rollback the agent did not do itself)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from deploy_core.plugins import DeployPlugins
from deploy_core.server.callbacks import Listeners
from deploy_core.server.dispatch import Dispatcher
from deploy_core.server.locks import ClientBusy
from deploy_core.server.records import Applied, RecordStore
from deploy_core.server.rollbacks import (
    RollbackRefused,
    agent_left_it_unrolled,
    continue_cascade,
    request_rollback,
)
from deploy_core.server.rows import DeploymentRow
from deploy_core.server.targets import deployment_scope

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")


class Deployments:
    """Submits deployments and carries each change of one to whoever listens."""

    def __init__(
        self,
        records: RecordStore,
        plugins: DeployPlugins,
        listeners: Listeners,
        dispatcher: Dispatcher,
    ) -> None:
        self.records = records
        self.plugins = plugins
        self.listeners = listeners
        self.dispatcher = dispatcher

    async def db(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Run a blocking records call in a worker thread."""
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def submit(
        self,
        *,
        client_id: str,
        command_type: str,
        request: dict[str, Any],
        deadline: float,
        rollback_of: str | None = None,
        secret_env: dict[str, str] | None = None,
        deploy_id: str | None = None,
        before: Callable[[], object] | None = None,
    ) -> DeploymentRow:
        """Record a new deployment (taking the client's lock, in one transaction) and send it
        if the agent is connected.  ``deploy_id`` is one the caller chose and recorded
        beforehand (a rollout's target), so that trying again never makes a second
        deployment: the id is unique.  ``before``: blocking work run first, on the same
        worker thread (the API's read and checks of the client: one hand-over to a thread
        per request, not two); what it raises, ``submit`` raises, and nothing is recorded.
        :raises ClientBusy: the client is busy."""
        deploy_id = deploy_id or uuid.uuid4().hex
        target, artifacts = deployment_scope(self.plugins, command_type, request)
        # Sent at once when its agent is here: marked dispatched in the same transaction.
        connected = self.dispatcher.session_for(client_id) is not None

        def create() -> DeploymentRow:
            if before is not None:
                before()
            return self.records.create_deployment(
                deploy_id=deploy_id,
                client_id=client_id,
                command_type=command_type,
                request=request,
                deadline=deadline,
                rollback_of=rollback_of,
                secret_env=secret_env,
                target=target,
                artifacts=artifacts,
                dispatched=connected,
            )

        record = await self.db(create)
        self.record_changed(record, None)
        await self.dispatcher.dispatch(record, marked=connected)
        return record

    def record_changed(self, record: DeploymentRow, previous: str | None) -> None:
        """Tell listeners and plugins a record changed."""
        view = record.to_api()
        self.listeners.publish(view)
        if previous != record.status:
            self.plugins.notify("deploy_status_changed", record=dict(view), previous=previous)

    async def finished(self, record: DeploymentRow) -> None:
        """A deployment reached its terminal status (its lock is already released)."""
        self.plugins.notify("deploy_finished", record=record.to_api())
        await continue_cascade(self, record)
        if agent_left_it_unrolled(record):
            try:
                rollback = await request_rollback(self, record)
            except (RollbackRefused, ClientBusy) as exc:
                log.warning("cannot roll back %s: %s", record.deploy_id, exc)
            else:
                log.info(
                    "deployment %s failed without a rollback by its agent; rollback %s asked for",
                    record.deploy_id,
                    rollback.deploy_id,
                )

    async def expired(self, applied: Applied) -> None:
        """The watchdog finished a deployment: a change, then a finish."""
        assert applied.record is not None
        self.record_changed(applied.record, applied.previous)
        await self.finished(applied.record)
