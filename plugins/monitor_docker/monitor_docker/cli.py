"""``deployctl docker ps --client ID``: the containers an agent reports, like ``docker ps``.

:data:`docker` is registered with ``deploy_register_cli_commands``; ``python -m
monitor_docker.cli ps --client ID`` runs the same command without ``deployctl``.
"""

from __future__ import annotations

import re

import click

from deploy_core.plugin import ID_PATTERN
from deploy_core.plugin.cli import DeployClient, echo_json, json_option, terminal_safe, with_api


def _size(value: int | None) -> str:
    if value is None:
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f}{unit}" if unit != "B" else f"{int(size)}B"
        size /= 1024
    return f"{size:.1f}GiB"


def render_ps(view: dict[str, object]) -> list[str]:
    """The lines ``docker ps`` prints for one client's monitor view."""
    rows = [("NAME", "STATE", "HEALTH", "CPU %", "MEM USAGE / LIMIT", "RESTARTS", "IMAGE")]
    containers = view.get("containers") or []
    assert isinstance(containers, list)
    for c in containers:
        state = c["state"] + (f" ({c['exit_code']})" if c.get("exit_code") is not None else "")
        cpu = "-" if c.get("cpu_percent") is None else f"{c['cpu_percent']:.2f}%"
        memory = f"{_size(c.get('memory_usage'))} / {_size(c.get('memory_limit'))}"
        rows.append(
            (c["name"], state, c.get("health") or "-", cpu, memory, str(c["restarts"]), c["image"])
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    reported = view.get("last_report") or "never"
    lines.append(f"client {view['client_id']}: last report {reported}")
    if view.get("error"):
        lines.append(f"engine error: {view['error']}")
    return lines


@click.group("docker")
def docker() -> None:
    """Docker containers on the agents (the docker.monitor plugin)."""


@docker.command("ps")
@click.option("--client", "client_id", required=True, help="client id")
@json_option
@with_api
def ps(api: DeployClient, client_id: str, as_json: bool) -> None:
    """Show the containers a client's agent last reported.  With --json, the answer of
    GET /api/docker/monitor/{client_id}."""
    if not re.fullmatch(ID_PATTERN, client_id):  # it goes into the URL's path
        raise click.BadParameter(
            f"not a client id: {terminal_safe(repr(client_id))}", param_hint="--client"
        )
    view = api.request("GET", f"/api/docker/monitor/{client_id}")
    if as_json:
        echo_json(view)
        return
    for line in render_ps(view):
        click.echo(terminal_safe(line))  # names, images and errors come from the agent


if __name__ == "__main__":
    docker()
