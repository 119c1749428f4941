"""``deployctl rollout``: one deployment to many hosts, in batches (docs/rollouts.md).

``deployctl rollout KIND`` is made from ``deployctl deploy KIND`` — the core's ``submit`` and
every command a plugin registered under ``deploy`` — rather than written a second time: it has
that command's options (the deploy body) minus its single ``--client``, plus the targets and
strategy of :mod:`deploy_core.cli.rollout_options`, and runs that command's own code. What the
code hands to :func:`~deploy_core.cli.common.submit_and_follow` (the helper every deploy
command ends with) is sent to ``POST /api/rollouts`` instead of ``POST /api/deploy/{kind}``.

The rest: ``rollout status|list|pause|resume|promote|abort``.
"""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Callable
from typing import Any

import click

from deploy_core.cli.common import SUBMITTER, echo_json, json_option, page_options, with_api
from deploy_core.cli.groups import deploy, main
from deploy_core.cli.rollout_display import follow_rollout, print_rollout_outcome, summary_line
from deploy_core.cli.rollout_options import (
    STRATEGY_OPTIONS,
    TARGET_OPTIONS,
    WAIT_OPTIONS,
    rollout_fields,
)
from deploy_core.cli.terminal import terminal_safe
from deploy_core.client import DeployClient

log = logging.getLogger(__name__)

# with_api's options, listed last as in every command.
API_OPTION_NAMES = ("url", "token", "state_dir", "ca", "insecure_http")
ROLLOUT_STATUSES = (
    "pending",
    "running",
    "paused",
    "succeeded",
    "failed",
    "aborted",
    "rolling_back",
    "rolled_back",
)


def submit_rollout(
    api: DeployClient,
    kind: str,
    body: dict[str, Any],
    targets: dict[str, Any],
    strategy: dict[str, Any],
    wait: bool,
    wait_timeout: float,
) -> None:
    """``POST /api/rollouts``; print the answer, or with ``wait`` follow it live and exit 0
    only when it succeeded."""
    if body.get("client_id") is not None:
        raise click.UsageError(
            f"the body names client_id {body['client_id']!r}: a rollout's hosts come from "
            "--client and --selector; drop client_id from the body"
        )
    body = {key: value for key, value in body.items() if key != "client_id"}
    accepted = api.create_rollout(
        {"type": kind, "request": body, "targets": targets, "strategy": strategy}
    )
    if not wait:
        echo_json(accepted)
        return
    click.echo(
        terminal_safe(
            f"rollout {accepted['rollout_id']} accepted: {accepted.get('targets')} hosts in "
            f"{accepted.get('batches')} batches"
        ),
        err=True,
    )
    final = follow_rollout(api, accepted["rollout_id"], wait_timeout)
    sys.exit(0 if final["status"] == "succeeded" else 1)


def rollout_command(deploy_command: click.Command) -> click.Command | None:
    """``deployctl rollout NAME`` made from ``deployctl deploy NAME``; ``None`` for a group
    or a command without code, and (with a warning) for one with an option named like a
    rollout option."""
    if isinstance(deploy_command, click.Group) or deploy_command.callback is None:
        return None
    own = [p for p in deploy_command.params if p.name not in ("client_id", "wait", "wait_timeout")]
    added = TARGET_OPTIONS + STRATEGY_OPTIONS + WAIT_OPTIONS
    taken = {opt for p in added for opt in p.opts} | {p.name for p in added}
    clashes = [p.name for p in own if p.name in taken or set(p.opts) & taken]
    if clashes:
        log.warning(
            "deployctl deploy %s has options named like rollout options (%s): "
            "no deployctl rollout %s",
            deploy_command.name,
            ", ".join(str(c) for c in clashes),
            deploy_command.name,
        )
        return None
    takes = {p.name for p in deploy_command.params}
    callback: Callable[..., Any] = deploy_command.callback

    def run(wait: bool, wait_timeout: float, **options: Any) -> Any:
        targets, strategy = rollout_fields(options)
        if "client_id" in takes:
            options["client_id"] = None
        # The deploy command passes --wait on to submit_and_follow; ours is used either way.
        options.update(
            {k: v for k, v in (("wait", wait), ("wait_timeout", wait_timeout)) if k in takes}
        )
        submitted: list[str] = []

        def submit(api: DeployClient, kind: str, body: dict[str, Any], *_: Any) -> None:
            submitted.append(kind)
            submit_rollout(api, kind, body, targets, strategy, wait, wait_timeout)

        ctx = click.get_current_context()
        ctx.meta[SUBMITTER] = submit
        try:
            result = ctx.invoke(callback, **options)
        finally:
            del ctx.meta[SUBMITTER]
        if not submitted:  # its code did not end with submit_and_follow
            raise click.ClickException(
                f"deployctl deploy {deploy_command.name} does not send its request through "
                "submit_and_follow, so it cannot be rolled out; use deployctl rollout submit"
            )
        return result

    summary = inspect.cleandoc(deploy_command.help or "")
    body_options = [p for p in own if p.name not in API_OPTION_NAMES]
    api_options = [p for p in own if p.name in API_OPTION_NAMES]
    return click.Command(
        deploy_command.name,
        callback=run,
        params=[*TARGET_OPTIONS, *body_options, *STRATEGY_OPTIONS, *WAIT_OPTIONS, *api_options],
        help=f"Roll out to many hosts what 'deployctl deploy {deploy_command.name}' deploys to "
        f"one (--client repeated and/or --selector), in batches.\n\n{summary}",
        short_help=f"roll out 'deploy {deploy_command.name}' to many hosts",
        epilog="Strategies and their exact meaning: docs/rollouts.md.",
    )


class _RolloutGroup(click.Group):
    """Its own commands, plus one per ``deployctl deploy`` command, made on first use."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._derived: dict[str, click.Command | None] = {}

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands:
            return self.commands[cmd_name]
        if cmd_name not in self._derived:
            source = deploy.get_command(ctx, cmd_name)
            self._derived[cmd_name] = rollout_command(source) if source is not None else None
        return self._derived[cmd_name]

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = set(self.commands) | set(deploy.list_commands(ctx))
        return sorted(name for name in names if self.get_command(ctx, name) is not None)


@main.group(cls=_RolloutGroup)
def rollout() -> None:
    """Deploy to many hosts in batches, with canaries and a failure budget; follow and
    control rollouts (docs/rollouts.md)."""


@rollout.command("status", params=list(WAIT_OPTIONS))  # click extends the list
@click.argument("rollout_id")
@json_option
@with_api
def rollout_status(
    api: DeployClient, rollout_id: str, as_json: bool, wait: bool, wait_timeout: float
) -> None:
    """Show a rollout: its state, a line per batch, counts, the failing hosts.  With --wait,
    follow it to the end and exit 0 only when it succeeded."""
    if wait:
        final = follow_rollout(api, rollout_id, wait_timeout, outcome=not as_json)
        if as_json:
            echo_json(final)
        sys.exit(0 if final["status"] == "succeeded" else 1)
    record = api.rollout(rollout_id)
    if as_json:
        echo_json(record)
        return
    print_rollout_outcome(api, record)


@rollout.command("list")
@click.option(
    "--status",
    type=click.Choice(ROLLOUT_STATUSES),
    default=None,
    help="only rollouts in this status",
)
@click.option("--active", is_flag=True, help="only unfinished rollouts")
@click.option("--client", "client_id", default=None, help="only rollouts to this client")
@page_options
@json_option
@with_api
def rollout_list(
    api: DeployClient,
    status: str | None,
    active: bool,
    client_id: str | None,
    limit: int,
    offset: int,
    as_json: bool,
) -> None:
    """List rollouts, newest first: when, the deploy type, and the summary line of
    'deployctl rollout status'."""
    page = api.rollouts(
        status=status, active=active, client_id=client_id, limit=limit, offset=offset
    )
    if as_json:
        echo_json(page)
        return
    for item in page["items"]:
        click.echo(
            terminal_safe(f"{item.get('created_at', '-')}  {item.get('type', '-'):<8} ")
            + summary_line(item)
        )
    click.echo(f"({len(page['items'])} of {page['total']})", err=True)


def _control(action: str, doc: str) -> None:
    @rollout.command(action, help=doc)
    @click.argument("rollout_id")
    @with_api
    def command(api: DeployClient, rollout_id: str) -> None:
        record = getattr(api, f"{action}_rollout")(rollout_id)
        click.echo(summary_line(record))


_control(
    "pause",
    "Start no new host until 'deployctl rollout resume' (running deployments go on, and "
    "their failures still count).",
)
_control("resume", "Go on after 'deployctl rollout pause'.")
_control("promote", "Go on past a canary batch that paused for approval.")
_control(
    "abort",
    "Stop for good: hosts not started are skipped; deployments already running finish on "
    "their own (roll them back one by one if needed).",
)
