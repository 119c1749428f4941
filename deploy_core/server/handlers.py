"""The core's own agent-event handlers, registered through the same hook as any plugin's."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from pydantic import ValidationError

from deploy_core.hookspecs import hookimpl
from deploy_core.models import (
    EVENT_CALLBACK,
    EVENT_STATUS,
    DeployCallbackPayload,
    DeployStatusReport,
)
from deploy_core.plugin import EventContext as PluginEventContext
from deploy_core.registry import EventHandler, EventHandlerFn
from deploy_core.server.events import (
    EventContext,
    EventRejected,
    Stages,
    checks_ownership,
    in_stages,
    not_yours,
)
from deploy_core.server.records import Applied
from deploy_core.server.rows import DeploymentRow

if TYPE_CHECKING:
    from deploy_core.server.deployments import Deployments

log = logging.getLogger(__name__)


def with_server(handle: Callable[[EventContext], Awaitable[None]]) -> EventHandlerFn:
    """A core handler as an :class:`EventHandler` takes it.  The core's handlers work on the
    server itself, which the router's own :class:`EventContext` carries; a plugin's handler
    is typed against the contract's protocol and sees only the server's services."""

    async def handler(ctx: PluginEventContext) -> None:
        if not isinstance(ctx, EventContext):
            raise TypeError(f"{handle.__name__} needs the server's own EventContext")
        await handle(ctx)

    handler.__name__ = handler.__qualname__ = handle.__name__
    return handler


async def handle_status_report(ctx: EventContext) -> None:
    """``deploy.status``: update the record live and keep the history (SPEC deploy-21).

    The router runs it as its two :data:`STATUS_STAGES` (no task per report); this is the
    same, in one coroutine."""
    status_stored(ctx, await (await queue_status_report(ctx)))


async def queue_status_report(ctx: EventContext) -> asyncio.Future[Applied]:
    """Validate a ``deploy.status`` and queue it for the ingest (its first stage)."""
    try:
        report = DeployStatusReport.model_validate(ctx.payload)
    except ValidationError as exc:
        raise EventRejected(f"malformed deploy.status: {exc}") from None
    records = ctx.server.records
    return await ctx.server.ingest.queue_grouped(
        records.apply_reports_in, (ctx.client_id, report), key=ctx.client_id
    )


def status_stored(ctx: EventContext, applied: Applied) -> None:
    """A ``deploy.status`` stored (or refused in its transaction): its second stage."""
    if applied.record is None:
        deploy_id = ctx.payload.get("deploy_id")
        raise EventRejected(not_yours(ctx.client_id, [deploy_id]))
    if applied.applied:
        ctx.server.deployments.record_changed(applied.record, applied.previous)


STATUS_STAGES = Stages(queue_status_report, status_stored)


async def handle_callback(ctx: EventContext) -> None:
    """``command.callback``: finish the record, free the client, wake listeners, and ask
    for a rollback the agent could not do itself (SPEC deploy-20).

    The router runs it as its two :data:`CALLBACK_STAGES`, so the callback joins the
    transaction of the status reports queued before it (an agent sends its last report and
    the callback together: one commit, not two in a row); this is the same, in one
    coroutine."""
    follow_up = _callback_stored(ctx, await (await queue_callback(ctx)))
    if follow_up is not None:
        await follow_up


async def queue_callback(ctx: EventContext) -> asyncio.Future[Applied]:
    """Validate a ``command.callback`` and queue its storing for the ingest, in the group
    of what the ingest holds already (its first stage)."""
    try:
        callback = DeployCallbackPayload.model_validate(ctx.payload)
    except ValidationError as exc:
        raise EventRejected(f"malformed command.callback: {exc}") from None
    records = ctx.server.records
    # A run of callbacks (a rollout's agents finishing together) in a few statements.
    return await ctx.server.ingest.queue_grouped(
        records.finish_many_in, (ctx.client_id, callback), key=ctx.client_id
    )


# What follows a finish, running (the router's stage is synchronous): kept from the
# garbage collector until done.
_FOLLOW_UPS: set[asyncio.Task[None]] = set()


def callback_stored(ctx: EventContext, applied: Applied) -> None:
    """A ``command.callback`` stored (or refused in its transaction): its second stage.
    The record's change is told at once; what follows a finish (the next step of a cascade,
    a rollback the agent did not do) runs on in a task of its own.  The callback is
    acknowledged without waiting for that: a callback sent again finds the record finished
    and would not start it again either."""
    _callback_stored(ctx, applied)


def _callback_stored(ctx: EventContext, applied: Applied) -> asyncio.Task[None] | None:
    """:func:`callback_stored`; the task of what follows the finish, if any."""
    if applied.record is None:
        raise EventRejected(not_yours(ctx.client_id, [ctx.payload.get("callback_id")]))
    deployments = ctx.server.deployments
    deployments.record_changed(applied.record, applied.previous)
    if not applied.applied:
        return None
    task = asyncio.get_running_loop().create_task(_follow_up(deployments, applied.record))
    _FOLLOW_UPS.add(task)
    task.add_done_callback(_FOLLOW_UPS.discard)
    return task


async def _follow_up(deployments: Deployments, record: DeploymentRow) -> None:
    try:
        await deployments.finished(record)
    except Exception:
        log.exception("what follows the finish of %s failed", record.deploy_id)


CALLBACK_STAGES = Stages(queue_callback, callback_stored)


@hookimpl
def deploy_register_event_handlers(register: Callable[[EventHandler], None]) -> None:
    """Register the core's ``deploy.status`` and ``command.callback`` handlers."""
    status = in_stages(STATUS_STAGES)(checks_ownership(with_server(handle_status_report)))
    register(EventHandler(EVENT_STATUS, status))
    callback = in_stages(CALLBACK_STAGES)(checks_ownership(with_server(handle_callback)))
    register(EventHandler(EVENT_CALLBACK, callback))
