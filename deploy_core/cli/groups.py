"""The ``deployctl`` command groups, which also carry the commands plugins register."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import click

from deploy_core import __version__
from deploy_core.logs import FORMATS, setup

F = TypeVar("F", bound=Callable[..., Any])


def _setup_logging(level: str, fmt: str = "text") -> None:
    setup(level, fmt)
    if level != "debug":
        # Their INFO lines are per request / per connection noise for an operator.
        for name in ("httpx", "alembic", "quic"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _log_format_given(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None:
        _setup_logging(ctx.find_root().params.get("log_level") or "info", value)


def log_format_option(fn: F) -> F:
    """``--log-format text|json`` on a long-running command (``server``, ``agent``, ``up``):
    the same as ``deployctl --log-format``, given after the command's name."""
    option = click.option(
        "--log-format",
        type=click.Choice(FORMATS),
        default=None,
        expose_value=False,
        is_eager=True,
        callback=_log_format_given,
        help="log lines as text, or as one JSON object per line (for log shippers; see "
        "docs/operating.md)  [default: deployctl --log-format, text]",
    )
    return option(fn)  # type: ignore[no-any-return]


# The modules of the core's commands other than ``agent`` (and ``server``, a lazy command),
# imported when a command not yet known is asked for or the commands are listed, so that
# ``deployctl agent`` does not hold them (issue 12 item 6).
LAZY_COMMAND_MODULES = (
    "deploy_core.cli.admin",
    "deploy_core.cli.artifacts",
    "deploy_core.cli.cluster",
    "deploy_core.cli.deploys",
    "deploy_core.cli.rollouts",
    "deploy_core.cli.webhooks",
)


def _load_command_modules() -> None:
    import importlib

    for module in LAZY_COMMAND_MODULES:
        importlib.import_module(module)


class _PluginAwareGroup(click.Group):
    """Adds plugins' commands on first use, so ``deployctl --help`` lists them too.

    ``plugin_group`` names the group plugins address (``None`` for the top level).
    """

    _loaded = False
    plugin_group: str | None = None
    # Core commands whose module is imported only when the command is run or listed, as
    # ``"module:attribute"``: ``deployctl agent`` must not import the server (issue 12).
    lazy_commands: dict[str, str] = {}

    def _load_lazy_commands(self) -> None:
        import importlib

        for name, target in self.lazy_commands.items():
            if name not in self.commands:
                module, _, attribute = target.partition(":")
                self.add_command(getattr(importlib.import_module(module), attribute), name)

    def _load_plugin_commands(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        _load_command_modules()
        self._load_lazy_commands()
        from deploy_core.plugins import PluginError, get_plugins

        try:
            registered = get_plugins().cli_commands
        except PluginError as exc:
            logging.getLogger(__name__).warning("plugin commands not loaded: %s", exc)
            return
        for key, command in registered.entries.items():
            group, _, name = key.rpartition(" ")
            if (group or None) != self.plugin_group:
                continue
            if name in self.commands:
                logging.getLogger(__name__).warning(
                    "plugin %s's command %r clashes with a core command; ignored",
                    registered.owners[key],
                    name,
                )
                continue
            self.add_command(command, name)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy_commands:
            self._load_lazy_commands()
        if cmd_name not in self.commands:
            _load_command_modules()
        if cmd_name not in self.commands:
            self._load_plugin_commands()
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load_plugin_commands()
        return super().list_commands(ctx)


class _MainGroup(_PluginAwareGroup):
    lazy_commands = {"server": "deploy_core.cli.server_command:server"}


@click.group(cls=_MainGroup)
@click.version_option(__version__, prog_name="deployctl")
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
@click.option(
    "--log-format",
    envvar="DEPLOY_CENTER_LOG_FORMAT",
    default="text",
    show_default=True,
    type=click.Choice(FORMATS),
    help="text, or one JSON object per line (time, level, logger, message, deploy_id, client_id)",
)
def main(log_level: str, log_format: str) -> None:
    """Deploy Center: deploy scripts, packages and images to hosts over QUIC."""
    _setup_logging(log_level, log_format)


class _PluginAwareDeployGroup(_PluginAwareGroup):
    plugin_group = "deploy"


@main.group(cls=_PluginAwareDeployGroup)
def deploy() -> None:
    """Start a deployment (answers at once with its id; add --wait to follow it)."""
