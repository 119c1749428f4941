"""``deployctl webhook``: signed HTTP notifications of deployments and agents (docs/webhooks.md).

The event names are checked here as well as by the server, so a typo fails before anything
is sent; this module imports nothing of the server (``deployctl agent`` loads the CLI)."""

from __future__ import annotations

import secrets
from pathlib import Path

import click

from deploy_core.cli.common import echo_json, json_option, with_api
from deploy_core.cli.groups import main
from deploy_core.cli.terminal import terminal_safe
from deploy_core.client import DeployClient
from deploy_core.webhook_events import EVENTS

MAX_SECRET_FILE_BYTES = 4096


def _events(value: str) -> list[str]:
    names = [e.strip() for e in value.split(",") if e.strip()]
    if not names:
        raise click.BadParameter(f"name at least one event (of: {', '.join(EVENTS)})")
    unknown = [n for n in names if n not in EVENTS]
    if unknown:
        raise click.BadParameter(
            f"unknown event {', '.join(repr(terminal_safe(n)) for n in unknown)} "
            f"(known: {', '.join(EVENTS)})"
        )
    return names


def _read_secret(path: Path) -> str:
    try:
        data = path.read_bytes()[: MAX_SECRET_FILE_BYTES + 1]
    except OSError as exc:
        raise click.BadParameter(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_SECRET_FILE_BYTES:
        raise click.BadParameter(f"{path} is over {MAX_SECRET_FILE_BYTES} bytes: not a secret")
    try:
        secret = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise click.BadParameter(f"{path} is not UTF-8 text") from None
    if not secret:
        raise click.BadParameter(f"{path} is empty: put the webhook's secret in it")
    return secret


@main.group()
def webhook() -> None:
    """Signed HTTP POSTs to your URLs when deployments start or finish and agents come
    and go."""


@webhook.command("add")
@click.argument("target", metavar="URL")
@click.option(
    "--events",
    "events",
    required=True,
    help=f"comma-separated, of: {', '.join(EVENTS)}",
)
@click.option(
    "--secret-file",
    type=click.Path(path_type=Path, dir_okay=False, resolve_path=True),
    default=None,
    help="a file holding the signing secret (at least 16 characters); without it one is "
    "made and printed once",
)
@click.option("--description", default="", help="a note for people (up to 200 characters)")
@json_option
@with_api
def webhook_add(
    api: DeployClient,
    target: str,
    events: str,
    secret_file: Path | None,
    description: str,
    as_json: bool,
) -> None:
    """Send EVENTS to URL (https://, or http:// to a host the server allows), each signed
    with the secret: X-Deploy-Center-Signature: sha256=HMAC(secret, timestamp.body)."""
    names = _events(events)
    made_secret = secret_file is None
    secret = secrets.token_urlsafe(32) if secret_file is None else _read_secret(secret_file)
    hook = api.add_webhook(target, names, secret, description=description)
    if as_json:
        echo_json(hook)
    else:
        click.echo(
            terminal_safe(f"webhook {hook['id']}: {hook['url']} <- {', '.join(hook['events'])}")
        )
    if made_secret:
        click.echo(
            f"secret (shown once; keep it where the receiver can read it): {secret}", err=True
        )


@webhook.command("list")
@json_option
@with_api
def webhook_list(api: DeployClient, as_json: bool) -> None:
    """List webhooks and how their deliveries went."""
    hooks = api.webhooks()
    if as_json:
        echo_json(hooks)
        return
    if not hooks:
        click.echo("no webhooks")
        return
    for hook in hooks:
        counts = hook["deliveries"]
        line = (
            f"{hook['id']}  {hook['url']}\n    events: {', '.join(hook['events'])}; "
            f"deliveries: {counts['delivered']} delivered, {counts['pending']} pending, "
            f"{counts['failed']} failed"
        )
        if hook["description"]:
            line += f"\n    {hook['description']}"
        click.echo(terminal_safe(line))


@webhook.command("remove")
@click.argument("webhook_id")
@with_api
def webhook_remove(api: DeployClient, webhook_id: str) -> None:
    """Stop sending to a webhook and delete its delivery log."""
    api.remove_webhook(webhook_id)
    click.echo(terminal_safe(f"webhook {webhook_id} removed"))


@webhook.command("ping")
@click.argument("webhook_id")
@with_api
def webhook_ping(api: DeployClient, webhook_id: str) -> None:
    """Send a webhook a signed ping now, to check the receiver and its secret (see
    `deployctl webhook deliveries ID` for how it went)."""
    queued = api.ping_webhook(webhook_id)
    click.echo(terminal_safe(f"ping {queued['delivery_id']} queued for webhook {webhook_id}"))


@webhook.command("deliveries")
@click.argument("webhook_id")
@click.option("--status", type=click.Choice(["pending", "delivered", "failed"]), default=None)
@click.option("--limit", type=click.IntRange(1, 500), default=50, show_default=True)
@json_option
@with_api
def webhook_deliveries(
    api: DeployClient, webhook_id: str, status: str | None, limit: int, as_json: bool
) -> None:
    """A webhook's delivery log, newest first: status, attempts, last answer or error."""
    rows = api.webhook_deliveries(webhook_id, status=status, limit=limit)
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("no deliveries")
        return
    for row in rows:
        answer = f"HTTP {row['last_status_code']}" if row["last_status_code"] else "-"
        line = (
            f"{row['id']}  {row['event']:<20} {row['status']:<9} "
            f"attempts {row['attempts']:<3} {answer:<8} {row['created_at']}"
        )
        if row["status"] == "pending" and row["next_attempt_at"]:
            line += f"  next {row['next_attempt_at']}"
        if row["last_error"] and row["status"] != "delivered":
            line += f"\n    {row['last_error']}"
        click.echo(terminal_safe(line))
