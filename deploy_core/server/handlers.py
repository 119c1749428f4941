"""The core's own agent-event handlers, registered through the same hook as any plugin's."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

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
    return await ctx.server.ingest.queue_grouped(records.apply_reports_in, (ctx.client_id, report))


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
    for a rollback the agent could not do itself (SPEC deploy-20)."""
    try:
        callback = DeployCallbackPayload.model_validate(ctx.payload)
    except ValidationError as exc:
        raise EventRejected(f"malformed command.callback: {exc}") from None
    records, client_id = ctx.server.records, ctx.client_id
    applied = await ctx.server.ingest.submit(
        lambda conn: records.finish_in(conn, client_id, callback)
    )
    if applied.record is None:
        raise EventRejected(not_yours(client_id, [callback.callback_id]))
    ctx.server.deployments.record_changed(applied.record, applied.previous)
    if applied.applied:
        await ctx.server.deployments.finished(applied.record)


@hookimpl
def deploy_register_event_handlers(register: Callable[[EventHandler], None]) -> None:
    """Register the core's ``deploy.status`` and ``command.callback`` handlers."""
    status = in_stages(STATUS_STAGES)(checks_ownership(with_server(handle_status_report)))
    register(EventHandler(EVENT_STATUS, status))
    register(EventHandler(EVENT_CALLBACK, checks_ownership(with_server(handle_callback))))
