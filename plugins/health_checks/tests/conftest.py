"""Fixtures: the plugin loaded into the core, a way to run a check through the core's health
loop, and real TCP ports on 127.0.0.1 (one listening, one closed)."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

import health_checks.plugin
from deploy_core.agent.health import run_health_checks
from deploy_core.models import HealthCheckResult
from deploy_core.plugins import DeployPlugins, load_plugins
from deploy_core.testing import RecordingReporter

RunCheck = Callable[[dict[str, Any]], Awaitable[HealthCheckResult]]


@pytest.fixture
def plugins() -> DeployPlugins:
    """The core's plugins with this one registered directly (no entry-point discovery)."""
    return load_plugins(entry_points=False, extra=[("health_checks", health_checks.plugin)])


@pytest.fixture
def reporter_and_run(
    plugins: DeployPlugins, deploy_context: Callable[..., Any]
) -> tuple[RecordingReporter, RunCheck]:
    """One context (and its recording reporter) and a runner that uses it."""
    ctx, reporter = deploy_context()

    async def run(spec: dict[str, Any]) -> HealthCheckResult:
        [result] = await run_health_checks(ctx, plugins, [spec])
        return result

    return reporter, run


@pytest.fixture
def run_check(reporter_and_run: tuple[RecordingReporter, RunCheck]) -> RunCheck:
    """``result = await run_check({"type": "http", ...})``: one check, as a deployment runs it."""
    return reporter_and_run[1]


@pytest.fixture
def reporter(reporter_and_run: tuple[RecordingReporter, RunCheck]) -> RecordingReporter:
    """What the context used by :func:`run_check` logged."""
    return reporter_and_run[0]


# --------------------------------------------------------------------------- TCP


@pytest.fixture
def listening_port() -> Iterator[int]:
    """A port with a real listening socket on 127.0.0.1 (the kernel completes connects)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound once, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
