"""A rollout for a person: a line per batch, the counts, the failing hosts with their errors;
and the live version of it that ``deployctl rollout … --wait`` shows (docs/rollouts.md)."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterable
from typing import Any

import click

from deploy_core.cli.terminal import terminal_safe
from deploy_core.client import ApiError, DeployClient

# Per-deployment statuses that count against the failure budget (docs/rollouts.md).
FAILED = ("failed", "timeout", "rolled_back", "rollback_failed")
# The order counts are shown in: finished well, going, waiting, then the bad ones.
_ORDER = ("success", "running", "pending", "skipped", *FAILED)
# Failing hosts listed in full; the rest are counted.
SHOWN_FAILURES = 20


def counts_text(counts: dict[str, int]) -> str:
    """``success 3, running 1, failed 1`` in a fixed order (unknown statuses last)."""
    known = [status for status in _ORDER if counts.get(status)]
    other = sorted(status for status in counts if status not in _ORDER and counts[status])
    return ", ".join(f"{status} {counts[status]}" for status in known + other) or "no hosts"


def _counts(targets: Iterable[dict[str, Any]]) -> dict[str, int]:
    return dict(Counter(str(t.get("status") or "pending") for t in targets))


def batch_lines(record: dict[str, Any]) -> list[str]:
    """One line per batch: its number, a canary mark, its state and its hosts by status."""
    batches: list[dict[str, Any]] = record.get("batches") or []
    lines = []
    for batch in batches:
        counts = batch.get("counts") or _counts(batch.get("targets") or [])
        mark = " canary" if batch.get("canary") else ""
        size = sum(counts.values())
        lines.append(
            f"  batch {int(batch['index']) + 1}/{len(batches)}{mark}  "
            f"{batch.get('status', '-'):<9} {size} host{'s' if size != 1 else ''}: "
            f"{counts_text(counts)}"
        )
    return [terminal_safe(line) for line in lines]


def summary_line(record: dict[str, Any]) -> str:
    """``rollout R running: 12 hosts: success 4, running 3, pending 5``."""
    counts: dict[str, int] = record.get("counts") or _counts(record.get("targets") or [])
    total = sum(counts.values())
    line = f"rollout {record['rollout_id']} {record['status']}: {total} hosts: "
    line += counts_text(counts)
    if record.get("reason"):
        line += f" ({record['reason']})"
    return terminal_safe(line)


def failing_hosts(record: dict[str, Any], api: DeployClient | None = None) -> list[str]:
    """A line per target whose deployment failed: host, status, deployment and its error.
    A target the record gives no error for is looked up (``api``), at most
    :data:`SHOWN_FAILURES` of them."""
    failed = [t for t in record.get("targets") or [] if t.get("status") in FAILED]
    lines = []
    for target in failed[:SHOWN_FAILURES]:
        error = target.get("error")
        deploy_id = target.get("deploy_id")
        if not error and deploy_id and api is not None:
            try:
                error = api.get(deploy_id).get("error")
            except ApiError:
                error = None
        line = f"  {target['client_id']}  {target['status']}"
        if deploy_id:
            line += f"  deployment {deploy_id}"
        if error:
            line += f": {error}"
        lines.append(terminal_safe(line))
    if len(failed) > SHOWN_FAILURES:
        lines.append(
            f"  … and {len(failed) - SHOWN_FAILURES} more (deployctl rollout status --json)"
        )
    return lines


def render(record: dict[str, Any]) -> list[str]:
    """What ``deployctl rollout status`` prints and ``--wait`` keeps up to date."""
    lines = [summary_line(record), *batch_lines(record)]
    if record.get("status") == "paused":
        lines.append(
            terminal_safe(
                f"  paused: deployctl rollout promote {record['rollout_id']} (past a canary) "
                f"or resume {record['rollout_id']} to go on, abort to stop"
            )
        )
    return lines


def follow_rollout(api: DeployClient, rollout_id: str, timeout: float) -> dict[str, Any]:
    """Show the rollout live on stderr until it ends (redrawn in place on a terminal, the
    lines that changed otherwise), then its summary and failing hosts on stdout; the final
    record.  ``timeout`` bounds the wait: past it, a :class:`click.ClickException` says the
    rollout goes on on the server."""
    tty = sys.stderr.isatty()
    record: dict[str, Any] = {}
    shown: list[str] = []
    try:
        for record in api.watch_rollout(rollout_id, timeout=timeout):
            lines = render(record)
            if tty:
                up = f"\033[{len(shown)}A" if shown else ""
                click.echo(up + "\r\033[J" + "\n".join(lines), err=True)
            else:
                for line in lines:
                    if line not in shown:
                        click.echo(line, err=True)
            shown = lines
    except TimeoutError as exc:
        raise click.ClickException(
            f"{exc}; it goes on on the server: deployctl rollout status {rollout_id} --wait"
        ) from None
    print_rollout_outcome(api, record)
    return record


def print_rollout_outcome(api: DeployClient, record: dict[str, Any]) -> None:
    """The end of a rollout: its summary, its batches, and the failing hosts with errors."""
    for line in render(record):
        click.echo(line)
    failures = failing_hosts(record, api)
    if failures:
        click.echo("failing hosts:")
        for line in failures:
            click.echo(line)
