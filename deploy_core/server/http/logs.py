"""Deployment output: ``GET /api/deploy/{deploy_id}/logs``, read in pages or followed live."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from deploy_core.server.http.web import (
    flag_param,
    float_param,
    int_param,
    record_or_404,
    services,
)

if TYPE_CHECKING:
    from deploy_core.server.app import DeployServer


async def get_logs(request: Request) -> Response:
    """``GET /api/deploy/{deploy_id}/logs?after=ID&limit=N`` — output lines in order.

    With ``?follow=1`` the answer is a stream of JSON lines (``application/x-ndjson``): every
    stored line, then each new one as it arrives, then ``{"end": true, "status": …}`` when
    the deployment finishes (or ``{"end": false}`` after ``max_wait`` seconds, default 3600;
    reconnect with ``after``).  Empty lines are keep-alives.
    """
    server = services(request)
    deploy_id = request.path_params["deploy_id"]
    await record_or_404(server, deploy_id)
    after = int_param(request, "after", 0, 0, 2**62)
    limit = int_param(request, "limit", 1000, 1, 10000)
    if flag_param(request, "follow"):
        max_wait = float_param(request, "max_wait", 3600.0, 1.0, 86400.0)
        return StreamingResponse(
            _follow_logs(server, deploy_id, after, max_wait),
            media_type="application/x-ndjson",
        )
    rows = await server.db(server.records.logs, deploy_id, after=after, limit=limit)
    return JSONResponse(
        {
            "deploy_id": deploy_id,
            "lines": [r.to_api() for r in rows],
            "next_after": rows[-1].id if rows else after,
        }
    )


KEEPALIVE = 15.0


async def _follow_logs(
    server: DeployServer, deploy_id: str, after: int, max_wait: float
) -> AsyncIterator[bytes]:
    end = time.monotonic() + max_wait
    async with server.listeners.subscribe(deploy_id) as changes:
        while True:
            rows = await server.db(server.records.logs, deploy_id, after=after, limit=1000)
            for row in rows:
                yield (json.dumps(row.to_api()) + "\n").encode()
                after = row.id
            if len(rows) == 1000:
                continue
            record = await record_or_404(server, deploy_id)
            if record.finished_at is not None:
                # Lines of the last reports may land just after the callback: read on to the end.
                while rows := await server.db(server.records.logs, deploy_id, after=after):
                    for row in rows:
                        yield (json.dumps(row.to_api()) + "\n").encode()
                    after = rows[-1].id
                yield (json.dumps({"end": True, "status": record.status}) + "\n").encode()
                return
            left = end - time.monotonic()
            if left <= 0:
                yield (json.dumps({"end": False, "next_after": after}) + "\n").encode()
                return
            try:
                await asyncio.wait_for(changes.get(), min(KEEPALIVE, left))
            except TimeoutError:
                yield b"\n"
