"""``deployctl cluster status``: the server replicas sharing one database, the duties (leases)
and the agents each holds (``GET /api/cluster``, docs/cluster.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from deploy_core.cli.common import echo_json, json_option, with_api
from deploy_core.cli.groups import main
from deploy_core.cli.terminal import terminal_safe
from deploy_core.client import DeployClient


@main.group()
def cluster() -> None:
    """Server replicas on one database (docs/cluster.md)."""


def render_status(view: dict[str, Any]) -> str:
    """``GET /api/cluster``'s answer as text for people."""
    replicas = view["replicas"]
    lines = [f"{view['live']} live of {len(replicas)} replicas (answered by {view['server_id']})"]
    for r in replicas:
        state = "live" if r["live"] else f"STALE (last seen {r['seconds_since_seen']:.0f}s ago)"
        mark = " *" if r["this"] else ""
        lines.append(
            f"{r['server_id']}{mark}  {state}  api {r['api_url']}  quic {r['quic_address']}\n"
            f"    agents: {r['agents_held']} held ({r['agents_connected']} connected at its "
            f"last heartbeat); duties: {', '.join(r['duties']) or '-'}"
        )
    listed = {r["server_id"] for r in replicas}
    for lease in view["duties"]:
        if lease["holder"] not in listed:
            lines.append(f"duty {lease['duty']}: held by unlisted {lease['holder']}")
    if not view["duties"]:
        lines.append("no duty is held right now (each is taken within a lease period)")
    bus = view.get("bus")
    if bus:
        state = "listening" if bus["listening"] else "NOT LISTENING (reconnecting)"
        lines.append(
            f"cluster bus of {view['server_id']}: {state}; notifications sent {bus['sent']}, "
            f"received {bus['received']}, malformed {bus['malformed']}, dropped {bus['dropped']}"
        )
    return terminal_safe("\n".join(lines))


@cluster.command("status")
@json_option
@with_api
def cluster_status(api: DeployClient, as_json: bool) -> None:
    """List the live and stale server replicas, the duties each holds (watchdog,
    retention) and how many agents each holds."""
    view = api.request("GET", "/api/cluster")
    if as_json:
        echo_json(view)
    else:
        click.echo(render_status(view))


@cluster.command("key")
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path, resolve_path=True),
    help="file to write the new key to (mode 0600); an existing file is never overwritten",
)
def cluster_key(out: Path) -> None:
    """Make a cluster key: the file every replica on one PostgreSQL database is given with
    `deployctl server --cluster-key-file` to share one CA, admin and join token and secrets
    key (sealed with it in the database).  Keep a copy off the servers: without it no new
    replica can join."""
    from deploy_core.server.cluster_identity import ClusterIdentityError, create_key_file

    try:
        ident = create_key_file(out)
    except ClusterIdentityError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote cluster key {ident} to {out} (mode 0600)")
    click.echo(
        "Start the first replica with --cluster-key-file "
        f"{out}, the others with --join-cluster --cluster-key-file {out}."
    )
