"""Whether a started container really runs: not exited, not restarting, up for a while, and
healthy by Docker's own health check when its image defines one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from deploy_docker.engine import Engine

POLL = 0.25
LOG_LINES = 20


class StartFailed(Exception):
    """The container did not come up; the message says how, with its last output."""

    def __init__(self, message: str, *, logs: list[str] | None = None) -> None:
        super().__init__(message)
        self.logs = logs or []


def describe_state(attrs: dict[str, Any]) -> str:
    """``running``, ``running, health: starting``, ``exited (code 3)`` …"""
    state = attrs.get("State") or {}
    text = str(state.get("Status", "unknown"))
    if text in ("exited", "dead"):
        text += f" (code {state.get('ExitCode')})"
    health = (state.get("Health") or {}).get("Status")
    if health:
        text += f", health: {health}"
    return text


def _last_health_output(attrs: dict[str, Any]) -> str:
    log = ((attrs.get("State") or {}).get("Health") or {}).get("Log") or []
    if not log:
        return ""
    last = log[-1]
    output = str(last.get("Output", "")).strip().replace("\n", " ")
    return f"last probe exit code {last.get('ExitCode')}" + (f": {output[:300]}" if output else "")


async def wait_started(
    engine: Engine,
    container_id: str,
    *,
    timeout: float,
    min_uptime: float,
    on_change: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Wait until the container has run for ``min_uptime`` seconds without a restart and,
    when its image has a HEALTHCHECK, Docker calls it healthy.  Its inspect data.

    :raises StartFailed: it exited, keeps restarting, turned unhealthy, or did none of this
        within ``timeout``.
    """
    end = time.monotonic() + timeout
    first_restarts: int | None = None
    running_since: float | None = None
    last_state = ""
    while True:
        attrs = await engine.container(container_id)
        if attrs is None:
            raise StartFailed(f"container {container_id[:12]} disappeared while starting")
        state = attrs.get("State") or {}
        status = state.get("Status")
        restarts = int(attrs.get("RestartCount") or 0)
        first_restarts = restarts if first_restarts is None else first_restarts
        described = describe_state(attrs)
        if described != last_state:
            last_state = described
            if on_change is not None:
                on_change(described)
        name = str(attrs.get("Name", "")).lstrip("/") or container_id[:12]
        if status in ("exited", "dead"):
            logs = await _logs(engine, container_id)
            raise StartFailed(
                f"container {name} {described} right after starting{_tail(logs)}", logs=logs
            )
        if status == "restarting" or restarts > first_restarts:
            logs = await _logs(engine, container_id)
            raise StartFailed(
                f"container {name} keeps restarting (restarts: {restarts}, last exit code "
                f"{state.get('ExitCode')}){_tail(logs)}",
                logs=logs,
            )
        health = (state.get("Health") or {}).get("Status")
        if status == "running":
            running_since = running_since or time.monotonic()
            if health == "unhealthy":
                raise StartFailed(
                    f"container {name} is unhealthy by its Docker health check "
                    f"({_last_health_output(attrs)})"
                )
            up_long_enough = time.monotonic() - running_since >= min_uptime
            if up_long_enough and health in (None, "healthy"):
                return attrs
        if time.monotonic() >= end:
            waiting_for = (
                "its Docker health check to pass" if health == "starting" else "it to keep running"
            )
            detail = _last_health_output(attrs) if health else ""
            raise StartFailed(
                f"container {name} is {described} after {timeout:g}s; gave up waiting for "
                f"{waiting_for}" + (f" ({detail})" if detail else "")
            )
        await asyncio.sleep(min(POLL, max(0.0, end - time.monotonic())))


async def _logs(engine: Engine, container_id: str) -> list[str]:
    try:
        return await engine.logs_tail(container_id, LOG_LINES)
    except Exception as exc:  # the logs only explain the failure; never replace it
        return [f"(could not read its logs: {exc})"]


def _tail(logs: list[str]) -> str:
    lines = [line for line in logs if line.strip()][-3:]
    return f"; its last output: {' | '.join(lines)[-500:]}" if lines else ""
