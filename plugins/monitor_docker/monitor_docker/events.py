"""Server side: the ``docker.monitor`` event handler (SPEC deploy-27)."""

from __future__ import annotations

import time

from pydantic import ValidationError

from deploy_core.plugin import EventContext, EventRejected
from monitor_docker.models import MonitorBatch
from monitor_docker.store import store_for


async def handle_monitor(ctx: EventContext) -> None:
    """Validate one batch and store it; a malformed batch is refused for good (the agent
    drops it), a database error leaves it unacknowledged (the agent sends it again)."""
    try:
        batch = MonitorBatch.model_validate(ctx.payload)
    except ValidationError as exc:
        raise EventRejected(f"malformed docker.monitor batch: {exc}") from None
    store = store_for(ctx.services)
    await ctx.services.db(store.store, ctx.client_id, batch, now=time.time())
