"""``GET /api/cluster``: the server replicas sharing this database, from their heartbeat rows,
with the duties (leases) and agents each holds (docs/cluster.md)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from deploy_core.server.http.web import services
from deploy_core.server.replicas import STALE_AFTER_INTERVALS
from deploy_core.server.rows import iso_time


class _Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ReplicaView(_Answer):
    """One server replica, as its last heartbeat row says."""

    server_id: str
    this: bool = Field(description="whether this is the replica that answered")
    live: bool = Field(
        description=f"its last heartbeat is at most {STALE_AFTER_INTERVALS} of its "
        "heartbeat intervals old; false: stale (stopped without saying so, or cut off)"
    )
    api_url: str
    quic_address: str
    started_at: str | None
    last_seen: str | None
    seconds_since_seen: float
    heartbeat_interval: float
    agents_connected: int = Field(description="QUIC sessions it had at its last heartbeat")
    agents_held: int = Field(description="clients recorded as connected to it")
    duties: list[str] = Field(description="the duties whose unexpired lease it holds")


class DutyView(_Answer):
    """An unexpired duty lease."""

    duty: str
    holder: str
    expires_at: str | None


class BusView(_Answer):
    """The answering replica's end of the cluster bus (PostgreSQL LISTEN/NOTIFY)."""

    listening: bool = Field(description="whether it listens for the other replicas now")
    sent: int = Field(description="notifications it sent")
    received: int = Field(description="well-formed notifications it received")
    malformed: int = Field(description="malformed notifications it ignored")
    dropped: int = Field(description="notifications it could not send (re-scans catch up)")


class ClusterView(_Answer):
    """``GET /api/cluster``."""

    server_id: str = Field(description="the replica that answered")
    live: int = Field(description="how many replicas are live")
    replicas: list[ReplicaView]
    duties: list[DutyView]
    bus: BusView | None = Field(
        None, description="the answering replica's cluster bus; null on SQLite (one server)"
    )


def render_cluster(listing: dict[str, Any], server_id: str) -> dict[str, Any]:
    """The answer of ``GET /api/cluster`` from :meth:`Replicas.listing`."""
    now = listing["now"]
    replicas = [
        {
            "server_id": r["server_id"],
            "this": r["server_id"] == server_id,
            "live": r["live"],
            "api_url": r["api_url"],
            "quic_address": r["quic_address"],
            "started_at": iso_time(r["started_at"]),
            "last_seen": iso_time(r["last_seen"]),
            "seconds_since_seen": round(max(0.0, now - r["last_seen"]), 3),
            "heartbeat_interval": r["heartbeat_interval"],
            "agents_connected": r["agents_connected"],
            "agents_held": r["agents_held"],
            "duties": r["duties"],
        }
        for r in listing["replicas"]
    ]
    duties = [
        {"duty": duty, "holder": lease["holder"], "expires_at": iso_time(lease["expires_at"])}
        for duty, lease in sorted(listing["duties"].items())
    ]
    return {
        "server_id": server_id,
        "live": sum(1 for r in replicas if r["live"]),
        "replicas": replicas,
        "duties": duties,
    }


async def get_cluster(request: Request) -> Response:
    """``GET /api/cluster`` — the server replicas on this database (live and stale), the
    duties each holds and how many agents each holds."""
    server = services(request)
    listing = await server.db(server.replicas.listing)
    assert server.config.server_id is not None
    answer = render_cluster(listing, server.config.server_id)
    bus = server.bus
    answer["bus"] = (
        None
        if bus is None
        else {
            "listening": bus.listening.is_set(),
            "sent": bus.sent,
            "received": bus.received,
            "malformed": bus.malformed,
            "dropped": bus.dropped,
        }
    )
    return JSONResponse(answer)


def cluster_routes() -> list[BaseRoute]:
    """The cluster's routes (under ``/api``)."""
    return [Route("/cluster", get_cluster, methods=["GET"])]
