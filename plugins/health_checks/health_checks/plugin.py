"""The plugin object Deploy Center loads through the ``deploy_core`` entry-point group."""

from __future__ import annotations

from collections.abc import Callable

from deploy_core.plugin import HealthCheckType, hookimpl
from health_checks.http import HttpCheckParams, probe_http
from health_checks.script import ScriptCheckParams, probe_script
from health_checks.shorthands import HTTP_USAGE, TCP_USAGE, http_shorthand, tcp_shorthand
from health_checks.tcp import TcpCheckParams, probe_tcp

HEALTH_CHECKS = (
    HealthCheckType(
        name="http",
        params=HttpCheckParams,
        probe=probe_http,
        description="HTTP GET; healthy on an expected status (default any 2xx) and body",
        shorthand=http_shorthand,
        shorthand_usage=HTTP_USAGE,
    ),
    HealthCheckType(
        name="tcp",
        params=TcpCheckParams,
        probe=probe_tcp,
        description="TCP connect; healthy when the port accepts a connection",
        shorthand=tcp_shorthand,
        shorthand_usage=TCP_USAGE,
    ),
    HealthCheckType(
        name="script",
        params=ScriptCheckParams,
        probe=probe_script,
        description="custom script; healthy when it exits 0",
    ),
)


@hookimpl
def deploy_register_health_checks(register: Callable[[HealthCheckType], None]) -> None:
    """Register the ``http``, ``tcp`` and ``script`` checks."""
    for check in HEALTH_CHECKS:
        register(check)
