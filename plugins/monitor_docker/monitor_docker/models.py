"""The ``docker.monitor`` event: one batch of container samples from one agent."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

EVENT = "docker.monitor"
# The label deploy-docker puts on every container it creates (a convention between the two
# distributions; neither imports the other).
MANAGED_LABEL = "deploy-center.managed"
NAME_LABEL = "deploy-center.name"


class ContainerSample(BaseModel):
    """One container at one moment."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[0-9a-f]{12,64}$")
    name: str = Field(max_length=255)
    logical_name: str | None = Field(
        None, max_length=255, description="the deployment's container_name (managed only)"
    )
    image: str = Field("", max_length=512)
    state: str = Field(
        max_length=32, description="running, exited, paused, restarting, created, dead …"
    )
    health: Literal["starting", "healthy", "unhealthy"] | None = None
    exit_code: int | None = None
    started_at: str | None = Field(None, max_length=64)
    restarts: int = Field(0, ge=0)
    cpu_percent: float | None = Field(
        None, ge=0, description="share of one CPU over the last interval, x100; none at first"
    )
    memory_usage: int | None = Field(None, ge=0, description="bytes, page cache excluded")
    memory_limit: int | None = Field(None, ge=0, description="bytes")
    managed: bool = False


class MonitorBatch(BaseModel):
    """Every monitored container of one agent at one moment (SPEC deploy-26)."""

    model_config = ConfigDict(extra="forbid")

    v: Literal[1] = 1
    ts: float = Field(gt=0, description="when the agent sampled, seconds since the epoch")
    interval: float = Field(gt=0, description="seconds between batches")
    scope: Literal["managed", "all"] = "managed"
    containers: list[ContainerSample] = Field(default_factory=list, max_length=2000)
    error: str | None = Field(None, max_length=2000, description="why nothing was sampled")
