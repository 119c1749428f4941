"""Helpers for a plugin's ``deployctl`` commands (``deploy_register_cli_commands``).

Import them from here, not from :mod:`deploy_core.cli`: this is the part of the command line
the contract keeps stable.  It is a module of its own because it loads click and httpx,
which the rest of :mod:`deploy_core.plugin` (loaded by agents too) never does.
"""

from __future__ import annotations

from deploy_core.cli.common import (
    echo_json,
    echo_json_line,
    health_checks_field,
    health_options,
    json_option,
    no_rollback_option,
    parse_env,
    parse_health,
    rollback_field,
    submit_and_follow,
    upload_with_progress,
    with_api,
)
from deploy_core.cli.terminal import terminal_safe
from deploy_core.client import DeployClient

__all__ = [
    "DeployClient",
    "echo_json",
    "echo_json_line",
    "health_checks_field",
    "health_options",
    "json_option",
    "no_rollback_option",
    "parse_env",
    "parse_health",
    "rollback_field",
    "submit_and_follow",
    "terminal_safe",
    "upload_with_progress",
    "with_api",
]
