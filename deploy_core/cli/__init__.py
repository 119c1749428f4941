"""``deployctl``: run the server or an agent, deploy, and look at what happened.

The commands live in the modules of this package by theme; importing it registers ``agent``
on :data:`main`, and the others the first time a command not yet registered is asked for or
the commands are listed (``groups.LAZY_COMMAND_MODULES``): ``deployctl agent`` loads none of
them (issue 12 item 6).  Plugins' commands use the helpers re-exported here (see
``docs/plugins.md``).
"""

from deploy_core.cli import processes
from deploy_core.cli.common import (
    echo_json,
    follow,
    human_size,
    no_rollback_option,
    parse_duration,
    parse_env,
    parse_health,
    parse_size,
    print_outcome,
    rollback_field,
    submit_and_follow,
    upload_with_progress,
    with_api,
)
from deploy_core.cli.groups import deploy, main
from deploy_core.cli.processes import load_agent_settings
from deploy_core.cli.serving import load_server_settings
from deploy_core.cli.terminal import terminal_safe

__all__ = [
    "admin",
    "artifacts",
    "cluster",
    "deploy",
    "deploys",
    "echo_json",
    "follow",
    "human_size",
    "load_agent_settings",
    "load_server_settings",
    "main",
    "no_rollback_option",
    "parse_duration",
    "parse_env",
    "parse_health",
    "parse_size",
    "print_outcome",
    "processes",
    "rollback_field",
    "rollouts",
    "submit_and_follow",
    "terminal_safe",
    "upload_with_progress",
    "webhooks",
    "with_api",
]
