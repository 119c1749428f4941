"""``deployctl deploy submit``, ``rollback``, ``status``, ``list`` and ``logs``.

Each deploy type's own ``deployctl deploy KIND`` command comes from its plugin
(``deploy_register_cli_commands``): ``shell`` from ``deploy_shell``, ``tar`` from
``deploy_tar`` …
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from deploy_core.cli.common import (
    check_wait_timeout,
    echo_json,
    echo_json_line,
    follow,
    json_option,
    page_options,
    print_outcome,
    progress_bar,
    submit_and_follow,
    with_api,
)
from deploy_core.cli.groups import deploy, main
from deploy_core.cli.terminal import terminal_safe
from deploy_core.client import ApiError, DeployClient


@deploy.command("submit")
@click.argument("kind")
@click.argument("body_file", type=click.File("r"))
@click.option("--wait", is_flag=True, help="follow the deployment until it ends")
@click.option("--wait-timeout", type=float, default=3600, show_default=True)
@with_api
def deploy_submit(
    api: DeployClient, kind: str, body_file: Any, wait: bool, wait_timeout: float
) -> None:
    """Send a deploy request of any type: KIND (e.g. shell) and a JSON body file ('-' = stdin)."""
    try:
        body = json.load(body_file)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="BODY_FILE") from None
    submit_and_follow(api, kind, body, wait, wait_timeout)


@main.command()
@click.argument("deploy_id")
@click.option(
    "--cascade",
    is_flag=True,
    help="when newer deployments of the same target are still in place, roll them back "
    "first, newest first, then this one (each its own rollback)",
)
@click.option(
    "--wait", is_flag=True, help="follow the rollback (every one of a cascade) to the end"
)
@click.option("--wait-timeout", type=float, default=3600, show_default=True)
@with_api
def rollback(
    api: DeployClient, deploy_id: str, cascade: bool, wait: bool, wait_timeout: float
) -> None:
    """Roll back a finished deployment with its own strategy and health checks.  A
    deployment that newer ones on its target superseded is refused unless --cascade."""
    if wait:
        check_wait_timeout(wait_timeout)
    try:
        accepted = api.rollback(deploy_id, cascade=cascade)
    except ApiError as exc:
        detail = exc.body.get("detail") if isinstance(exc.body, dict) else None
        if exc.status == 409 and isinstance(detail, dict) and detail.get("newer"):
            raise click.ClickException(
                terminal_safe(superseded_message(api, deploy_id, detail))
            ) from None
        raise
    if not wait:
        echo_json(accepted)
        return
    order: list[str] = accepted.get("cascade") or [deploy_id]
    if len(order) > 1:
        click.echo(f"cascade: rolling back {', then '.join(order)}", err=True)
    end = time.monotonic() + wait_timeout
    rollback_id: str | None = accepted["deploy_id"]
    final: dict[str, Any] = {}
    for step, undone in enumerate(order):
        if rollback_id is None:
            rollback_id = _next_in_cascade(api, undone, final, end)
        click.echo(f"rollback {rollback_id} of {undone} accepted", err=True)
        final = follow(api, rollback_id, max(1.0, end - time.monotonic()))
        if final["status"] != "rolled_back":
            if order[step + 1 :]:  # the server goes no further either
                click.echo(
                    f"cascade stopped: rollback {rollback_id} ended {final['status']}; "
                    f"not rolled back: {', '.join(order[step + 1 :])}",
                    err=True,
                )
            break
        rollback_id = None
    sys.exit(0 if final["status"] == "rolled_back" else 1)


def superseded_message(api: DeployClient, deploy_id: str, detail: dict[str, Any]) -> str:
    """What a ``409`` with ``detail.newer`` means, for a person: which deployments
    superseded ``deploy_id``, when they were made, and the two ways on."""
    newer: list[str] = [str(n) for n in detail["newer"]]
    described = []
    for newer_id in newer[:5]:  # the newest few are enough to recognise them
        try:
            record = api.get(newer_id)
            described.append(f"{newer_id} (deployed {record['created_at']}, {record['status']})")
        except ApiError:
            described.append(newer_id)
    if len(newer) > 5:
        described.append(f"{len(newer) - 5} more")
    target = detail.get("target") or "its target"
    return (
        f"deployment {deploy_id} was superseded on target {target} by {', '.join(described)}; "
        f"roll back {newer[0]} first, or use --cascade to roll "
        f"{'it' if len(newer) == 1 else 'them'} back (newest first) and then {deploy_id}"
    )


def _next_in_cascade(
    api: DeployClient, deploy_id: str, previous: dict[str, Any], end: float
) -> str:
    """The rollback the server asked for ``deploy_id`` once ``previous`` (the rollback
    before it in the cascade) ended; an error when the cascade stopped (its reason is in
    ``previous``'s history) or nothing came before ``end``."""
    while True:
        rolled_back_by: str | None = api.get(deploy_id)["rolled_back_by"]
        if rolled_back_by:
            return rolled_back_by
        stopped = [
            row["message"]
            for row in api.history(previous["deploy_id"])
            if row["message"].startswith("cascade stopped")
        ]
        if stopped:
            raise click.ClickException(
                terminal_safe(f"rollback {previous['deploy_id']}: {stopped[-1]}")
            )
        if time.monotonic() > end:
            raise click.ClickException(
                f"no rollback of {deploy_id} was started after {previous['deploy_id']} ended; "
                f"look at deployctl status {previous['deploy_id']} --history"
            )
        time.sleep(0.2)


@main.command()
@click.argument("deploy_id")
@click.option("--history", is_flag=True, help="also show the status history")
@json_option
@with_api
def status(api: DeployClient, deploy_id: str, history: bool, as_json: bool) -> None:
    """Show a deployment's status and result."""
    record = api.get(deploy_id)
    rows = api.history(deploy_id) if history else []
    if as_json:
        echo_json({**record, "history": rows} if history else record)
        return
    click.echo(
        terminal_safe(
            f"{record['deploy_id']}  {record['command_type']}  client {record['client_id']}"
        )
    )
    click.echo(
        terminal_safe(
            f"  {progress_bar(record['progress'])} {record['progress']}% {record['status']}"
            f"  (created {record['created_at']}, finished {record['finished_at'] or '-'})"
        )
    )
    plan = (record.get("request") or {}).get("rollback_plan")
    if plan:  # what the server decided, when it accepted it, to do on failure
        click.echo(terminal_safe(f"  on failure: {plan['note']}"))
    if record["finished"]:
        print_outcome(record)
    for row in rows:
        line = f"  {row['timestamp']}  {row['status']:<15} {row['progress']:3d}%  {row['message']}"
        click.echo(terminal_safe(line))


@main.command("list")
@click.option("--client", "client_id", default=None, help="only this client's deployments")
@click.option("--status", default=None, help="only deployments in this status")
@click.option("--running", is_flag=True, help="only unfinished deployments")
@page_options
@json_option
@with_api
def list_cmd(
    api: DeployClient,
    client_id: str | None,
    status: str | None,
    running: bool,
    limit: int,
    offset: int,
    as_json: bool,
) -> None:
    """List deployments, newest first (all clients, or one with --client)."""
    if client_id and not status and not running:
        page = api.list(client_id, limit=limit, offset=offset)
    else:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if client_id:
            params["client_id"] = client_id
        if status:
            params["status"] = status
        if running:
            params["unfinished"] = 1
        page = api.request("GET", "/api/deployments", params=params)
    if as_json:
        echo_json(page)
        return
    for rec in page["items"]:
        click.echo(
            terminal_safe(
                f"{rec['deploy_id']}  {rec['created_at']}  {rec['client_id']:<16} "
                f"{rec['command_type']:<15} {rec['status']:<15} {rec['progress']:3d}%"
            )
        )
    click.echo(f"({len(page['items'])} of {page['total']})", err=True)


@main.command()
@click.argument("deploy_id")
@click.option("-f", "--follow", "follow_", is_flag=True, help="keep printing until it ends")
@json_option
@with_api
def logs(api: DeployClient, deploy_id: str, follow_: bool, as_json: bool) -> None:
    """Print a deployment's output lines (with -f, as they come until it ends).  With
    --json, JSON Lines: each line as GET /api/deploy/{id}/logs gives it."""

    def show(line: dict[str, Any]) -> None:
        if as_json:
            echo_json_line(line)
        else:
            click.echo(terminal_safe(f"{line['timestamp']} [{line['stream']}] {line['line']}"))

    after = 0
    if follow_:
        while True:
            for item in api.follow_logs(deploy_id, after=after):
                if "end" not in item:
                    show(item)
                    after = item.get("id", after)
                    continue
                if item["end"]:
                    click.echo(terminal_safe(f"-- deployment ended: {item['status']}"), err=True)
                    return
                # The server streams for an hour at most: read on from where it stopped.
                after = int(item.get("next_after", after))
                break
            else:
                raise click.ClickException(
                    terminal_safe(
                        f"the server closed the log stream of {deploy_id} before the "
                        f"deployment ended (after line {after})"
                    )
                )
    while True:
        page = api.logs(deploy_id, after=after)
        for line in page["lines"]:
            show(line)
        if not page["lines"]:
            break
        after = page["next_after"]
