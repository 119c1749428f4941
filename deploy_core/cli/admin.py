"""``deployctl clients``, ``token``, ``plugins`` and ``db``: administration."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from deploy_core.cli.common import (
    api_option_set,
    database_url,
    echo_json,
    json_option,
    parse_duration,
    state_dir_option,
    with_api,
)
from deploy_core.cli.groups import main
from deploy_core.cli.terminal import terminal_safe
from deploy_core.client import ApiError, ConfigError, DeployClient, _segment
from deploy_core.durations import human_duration


def _client_filters(fn: Any) -> Any:
    """The options of ``deployctl clients [list]``: what to show, and how much."""
    for option in reversed(
        [
            json_option,
            click.option(
                "--label",
                "labels",
                multiple=True,
                metavar="KEY=VALUE",
                help="only clients with this label (repeat: every one of them)",
            ),
            click.option(
                "--state",
                type=click.Choice(["connected", "disconnected", "revoked"]),
                help="only clients in this state",
            ),
            click.option("--search", help="only clients whose id or address contains this"),
            click.option(
                "--limit",
                type=click.IntRange(1, 1000),
                help="show at most this many (default: every matching client)",
            ),
        ]
    ):
        fn = option(fn)
    return fn


@main.group(invoke_without_command=True)
@_client_filters
@api_option_set
@click.pass_context
def clients(ctx: click.Context, /, **options: Any) -> None:
    """List enrolled clients and whether they are connected (or revoke / forget one)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(clients_list, **options)


@clients.command("list")
@_client_filters
@with_api
def clients_list(
    api: DeployClient,
    as_json: bool,
    labels: tuple[str, ...],
    state: str | None,
    search: str | None,
    limit: int | None,
) -> None:
    """List enrolled clients: state, labels, credential, deploy types.  With --json, the
    clients as GET /api/clients shows them (all matching, or --limit of them)."""
    filters: dict[str, Any] = {"labels": labels, "state": state, "search": search}
    page = api.clients_page(**filters, limit=limit or 1)
    if "total" not in page and (labels or state or search or limit):
        # A server from before pages and filters answers every client, unfiltered.
        raise click.ClickException(
            "this server lists clients without filters or pages (it is older than this "
            "deployctl): drop --label, --state, --search and --limit"
        )
    if limit is None:
        rows = api.clients(**filters) if page.get("next_cursor") else page["clients"]
        total = len(rows)
    else:
        rows, total = page["clients"], page["total"]
    if as_json:
        echo_json(rows)
        return
    for c in rows:
        state_text = (
            ("connected since " + (c["connected_since"] or "?"))
            if c["connected"]
            else ("disconnected since " + (c["disconnected_since"] or "?"))
        )
        if c.get("revoked_at"):
            state_text = "REVOKED " + c["revoked_at"]
        types = ", ".join(c["capabilities"].get("deploy_types", []))
        # A shared_key agent has not upgraded to its own key pair (an older server: "?").
        credential = c.get("credential") or "?"
        labels_text = ",".join(f"{k}={v}" for k, v in sorted((c.get("labels") or {}).items()))
        click.echo(
            terminal_safe(
                f"{c['client_id']:<20} {state_text:<45} {credential:<10} {types}"
                + (f"  [{labels_text}]" if labels_text else "")
            )
        )
    if len(rows) < total:
        click.echo(f"({len(rows)} of {total} shown: raise --limit or narrow the filters)")
    elif not rows:
        click.echo("no client matches" if (labels or state or search) else "no client enrolled")


@clients.command("revoke")
@click.argument("client_id")
@with_api
def clients_revoke(api: DeployClient, client_id: str) -> None:
    """Cut a client off now and refuse its agent from then on."""
    api.request("POST", f"/api/clients/{_segment(client_id)}/revoke")
    click.echo(f"client {client_id} revoked")


@clients.command("forget")
@click.argument("client_id")
@with_api
def clients_forget(api: DeployClient, client_id: str) -> None:
    """Drop a client's enrolment so its id can enroll again with a join token."""
    api.request("DELETE", f"/api/clients/{_segment(client_id)}")
    click.echo(f"client {client_id} forgotten; it can enroll again with a join token")


@main.group()
def token() -> None:
    """API tokens (with scopes) and agents' join tokens."""


@token.command("create")
@click.argument("name", required=False)
@click.option(
    "--scope",
    type=click.Choice(["metrics", "read", "deploy", "admin"]),
    default=None,
    help="what an API token may do",
)
@click.option("--join", "join", is_flag=True, help="make a join token for enrolling agents")
@click.option("--ttl", default=None, help="join token lifetime, e.g. 1h")
@click.option("--uses", type=click.IntRange(1), default=None, help="join token enrolments")
@with_api
def token_create(
    api: DeployClient,
    name: str | None,
    scope: str | None,
    join: bool,
    ttl: str | None,
    uses: int | None,
) -> None:
    """Create an API token NAME with --scope, or a join token with --join."""
    if join:
        if name or scope:
            raise click.UsageError("a join token takes no NAME or --scope")
        body: dict[str, Any] = {"note": "deployctl"}
        if ttl:
            body["ttl"] = parse_duration(ttl)
        if uses:
            body["uses"] = uses
        made = api.request("POST", "/api/join-tokens", json=body)
        click.echo(made["token"])
        click.echo(
            f"join token {made['token_id']}"
            + (f", {uses} use(s)" if uses else "")
            + (f", expires in {ttl}" if ttl else ""),
            err=True,
        )
        return
    if not name or not scope:
        raise click.UsageError("an API token needs NAME and --scope (or use --join)")
    made = api.request("POST", "/api/tokens", json={"name": name, "scope": scope})
    click.echo(made["token"])
    click.echo(f"token {name} ({scope}); shown once, keep it safe", err=True)


@token.command("list")
@json_option
@with_api
def token_list(api: DeployClient, as_json: bool) -> None:
    """List API tokens and join tokens (never their values).  With --json,
    {"tokens": [...], "join_tokens": [...]}: the lists of GET /api/tokens and GET
    /api/join-tokens."""
    tokens = api.request("GET", "/api/tokens")["tokens"]
    join_tokens = api.request("GET", "/api/join-tokens")["join_tokens"]
    if as_json:
        echo_json({"tokens": tokens, "join_tokens": join_tokens})
        return
    rows = [("NAME", "SCOPE", "CREATED", "LAST USED")] + [
        (t["name"], t["scope"], t["created_at"] or "-", t["last_used"] or "never") for t in tokens
    ]
    click.echo(
        terminal_safe(_table(rows)) if tokens else "no API tokens (admin.token is not listed)"
    )
    join_rows = [("JOIN TOKEN", "CREATED", "EXPIRES", "USES LEFT", "NOTE")] + [
        (
            t["token_id"],
            t["created_at"] or "-",
            t["expires_at"] or "never",
            "unlimited" if t["uses_left"] is None else str(t["uses_left"]),
            t.get("note") or "",
        )
        for t in join_tokens
    ]
    click.echo(
        terminal_safe(_table(join_rows))
        if join_tokens
        else "no join tokens (join.token is not listed)"
    )


def _table(rows: Sequence[Sequence[str]]) -> str:
    """Rows as left-aligned columns two spaces apart (the first row is the heading)."""
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


@token.command("revoke")
@click.argument("name")
@click.option("--join", "join", is_flag=True, help="NAME is a join token id")
@with_api
def token_revoke(api: DeployClient, name: str, join: bool) -> None:
    """Revoke an API token by name, or a join token by id (--join)."""
    api.request("DELETE", f"/api/{'join-tokens' if join else 'tokens'}/{_segment(name)}")
    click.echo(f"revoked {name}")


@main.command()
@click.option("--server", "from_server", is_flag=True, help="ask the server instead of this host")
@json_option
@api_option_set
def plugins(
    from_server: bool,
    as_json: bool,
    url: str | None,
    token: str | None,
    state_dir: Path,
    ca: Path | None,
    insecure_http: bool,
) -> None:
    """Show installed plugins: name, version, what each registered.  With --json, also the
    hooks each implements: the list GET /api/plugins answers."""
    if from_server:
        try:
            with DeployClient.from_env(
                url, token, state_dir, ca=ca, insecure_http=insecure_http
            ) as api:
                described = api.plugins()
        except (ConfigError, ApiError) as exc:
            raise click.ClickException(terminal_safe(exc)) from None
    else:
        from deploy_core.plugins import PluginError, get_plugins

        try:
            described = get_plugins().describe()
        except PluginError as exc:
            raise click.ClickException(str(exc)) from None
    if as_json:
        echo_json(described)
        return
    rows = [("PLUGIN", "VERSION", "REGISTERED")]
    for plugin in described:
        if "error" in plugin:
            rows.append((plugin["name"], "-", f"FAILED TO LOAD: {plugin['error']}"))
            continue
        what = [
            f"{key.replace('_', ' ')}: {', '.join(map(str, names))}"
            for key, names in plugin.items()
            if key not in ("name", "version", "builtin", "hooks")
            and isinstance(names, list)
            and names
        ]
        version = plugin.get("version") or "-"
        rows.append(
            (
                plugin["name"],
                version + (" (built in)" if plugin.get("builtin") else ""),
                "; ".join(what) or "-",
            )
        )
    click.echo(terminal_safe(_table(rows)))


@main.group()
def db() -> None:
    """Database maintenance."""


@db.command("prune")
@click.option(
    "--older-than", required=True, help="delete finished deployments older than this, e.g. 30d, 12h"
)
@click.option("--db", "db_url", default=None, help="database URL (default: the state dir's SQLite)")
@click.option("--dry-run", is_flag=True, help="only count what would be deleted")
@state_dir_option
def db_prune(older_than: str, db_url: str | None, dry_run: bool, state_dir: Path) -> None:
    """Delete finished deployments (with history and logs) and finished rollouts older than
    a duration."""
    import time

    import sqlalchemy as sa

    from deploy_core.server import db as dbm
    from deploy_core.server.records import RecordStore
    from deploy_core.server.rollouts import RolloutStore
    from deploy_core.server.secret_box import SecretBox

    age = parse_duration(older_than)
    cutoff = time.time() - age
    engine = dbm.make_engine(database_url(db_url, state_dir))
    try:
        if dry_run:
            with engine.connect() as conn:
                count, rollout_count = (
                    conn.execute(
                        sa.select(sa.func.count())
                        .select_from(table)
                        .where(table.c.finished_at < cutoff)
                    ).scalar_one()
                    for table in (dbm.deployments, dbm.rollouts)
                )
            click.echo(
                f"would delete {count} deployments and {rollout_count} rollouts finished more "
                f"than {human_duration(age)} ago"
            )
            return
        deleted = RecordStore(engine).prune(cutoff)
        # The secret box is never used to open anything here: pruning reads no secret.
        rollouts_deleted = RolloutStore(engine, SecretBox()).prune(cutoff)
    finally:
        engine.dispose()
    click.echo(
        f"deleted {deleted} deployments and {rollouts_deleted} rollouts finished more than "
        f"{human_duration(age)} ago"
    )


@db.command("upgrade")
@click.option("--db", "db_url", default=None, help="database URL (default: the state dir's SQLite)")
@state_dir_option
def db_upgrade(db_url: str | None, state_dir: Path) -> None:
    """Create or migrate the core's tables to the newest schema."""
    from deploy_core.server import db as dbm

    url = database_url(db_url, state_dir)
    if db_url is None:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    engine = dbm.make_engine(url)
    try:
        before = dbm.current_revision(engine)
        dbm.upgrade(engine)
        after = dbm.current_revision(engine)
    finally:
        engine.dispose()
    click.echo(f"schema {before or 'empty'} -> {after}")
