"""The ``tcp`` check: healthy when a TCP connection to the port is accepted."""

from __future__ import annotations

from typing import Literal

from deploy_core.plugin import DeployContext, HealthCheckParams
from health_checks.connect import ProbeFailed, close, open_connection
from health_checks.fields import Host, Port


class TcpCheckParams(HealthCheckParams):
    """``{"type": "tcp", "port": 5432}``"""

    type: Literal["tcp"] = "tcp"
    host: Host = "127.0.0.1"
    port: Port


async def probe_tcp(params: TcpCheckParams, ctx: DeployContext) -> str | None:
    """Connect and close at once; ``None`` when the connection was accepted."""
    try:
        _, writer = await open_connection(params.host, params.port)
    except ProbeFailed as exc:
        return str(exc)
    await close(writer)
    return None
