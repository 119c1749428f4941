"""A rollout for a person: a line per batch, the counts, the failing hosts with their errors;
and the live version of it that ``deployctl rollout … --wait`` shows (docs/rollouts.md)."""

from __future__ import annotations

import os
import shutil
import sys
from collections import Counter
from itertools import groupby
from typing import Any

import click

from deploy_core.cli.terminal import terminal_safe
from deploy_core.client import ApiError, DeployClient

# Deployment statuses that count against the failure budget (docs/rollouts.md).
FAILED = ("failed", "timeout", "rolled_back", "rollback_failed")
# The order counts are shown in: finished well, waiting, then the bad ones; deployment
# statuses still going (script_running, pulling …) come between, by name.
_FIRST = ("success",)
_LAST = ("waiting", "skipped", "not_started", *FAILED)
# Failing hosts listed in full; the rest are counted.
SHOWN_FAILURES = 20
# Failing hosts the live display lists (it must fit a screen).
LIVE_FAILURES = 5
# Batches shown one per line; past this, runs of alike batches share a line.
SHOWN_BATCHES = 12


def counts_text(counts: dict[str, int]) -> str:
    """``success 3, script_running 1, waiting 7, failed 1``: successes first, then what is
    going, then what waits, then what failed."""
    going = sorted(s for s in counts if s not in _FIRST and s not in _LAST)
    order = [*_FIRST, *going, *_LAST]
    return ", ".join(f"{s} {counts[s]}" for s in order if counts.get(s)) or "no hosts"


def target_status(target: dict[str, Any]) -> str:
    """A target's deployment status once started, else its state (``waiting``,
    ``skipped``, or ``not_started`` for one that failed before starting)."""
    if target.get("status"):
        return str(target["status"])
    state = str(target.get("state") or "waiting")
    return "not_started" if state == "failed" else state


def is_failure(target: dict[str, Any]) -> bool:
    """Whether the target counts against the failure budget."""
    return target.get("state") == "failed" or target.get("status") in FAILED


def batch_lines(record: dict[str, Any], most: int = SHOWN_BATCHES) -> list[str]:
    """One line per batch: its number, a canary mark, its state and its hosts by status,
    ``>`` marking the current one.  With more than ``most`` batches, runs of neighbouring
    batches in the same state (not the canary, not the current one, none with a failure)
    share one line, so a rollout to a fleet in batches of 1 % still fits a screen."""
    batches: list[dict[str, Any]] = record.get("batches") or []
    current = record.get("current_batch")

    def is_current(batch: dict[str, Any]) -> bool:
        return batch.get("index") == current and batch.get("state") != "done"

    def fold_key(batch: dict[str, Any]) -> Any:
        targets = batch.get("targets") or []
        if len(batches) <= most or batch.get("canary") or is_current(batch):
            return ("alone", batch.get("index"))
        if any(is_failure(t) for t in targets):
            return ("alone", batch.get("index"))
        return ("run", batch.get("state"))

    lines = []
    for _, run in groupby(batches, key=fold_key):
        group = list(run)
        first, last = int(group[0]["index"]) + 1, int(group[-1]["index"]) + 1
        targets = [t for batch in group for t in batch.get("targets") or []]
        counts = Counter(target_status(t) for t in targets)
        hosts = f"{len(targets):>4} host" + ("s" if len(targets) != 1 else " ")
        state = group[0].get("state", "-")
        if len(group) == 1:
            mark = ">" if is_current(group[0]) else " "
            kind = "canary" if group[0].get("canary") else ""
            name = f"{mark}batch {first}/{len(batches)} {kind:<6}"
        else:
            name = f" batches {first}-{last}/{len(batches)}"
        lines.append(f" {name} {state:<7} {hosts}  {counts_text(counts)}")
    return [terminal_safe(line) for line in lines]


def summary_line(record: dict[str, Any]) -> str:
    """``rollout R paused (canary): 12 hosts, failures 0 of 0 allowed: success 1, …``."""
    status = str(record["status"])
    if status == "paused" and record.get("paused_for"):
        status += f" ({record['paused_for']})"
    line = f"rollout {record['rollout_id']} {status}: {record.get('total', '?')} hosts"
    if record.get("max_failures") is not None:
        line += f", failures {record.get('failures', 0)} of {record['max_failures']} allowed"
    line += ": " + counts_text(record.get("counts") or {})
    if record.get("reason"):
        line += f" - {_one_line(record['reason'])}"
    return terminal_safe(line)


def _one_line(text: object) -> str:
    """``text`` on one line (newlines and tabs as spaces): a display line must take one row."""
    return " ".join(str(text).split())


def failing_hosts(
    record: dict[str, Any], api: DeployClient | None = None, most: int = SHOWN_FAILURES
) -> list[str]:
    """A line per failed target: host, status, deployment and its error (looked up with
    ``api`` when the rollout does not carry it); at most ``most``, the rest counted."""
    targets = [t for b in record.get("batches") or [] for t in b.get("targets") or []]
    failed = [t for t in targets if is_failure(t)]
    lines = []
    for target in failed[:most]:
        error, deploy_id = target.get("error"), target.get("deploy_id")
        if not error and deploy_id and api is not None:
            try:
                error = api.get(deploy_id).get("error")
            except ApiError:
                error = None
        line = f"  {target['client_id']}  {target_status(target)}"
        if deploy_id:
            line += f" (deployment {deploy_id})"
        line += f": {_one_line(error or 'no error recorded')}"
        lines.append(terminal_safe(line))
    if len(failed) > most:
        lines.append(f"  … and {len(failed) - most} more (deployctl rollout status --json)")
    return lines


def rollback_lines(record: dict[str, Any]) -> list[str]:
    """A line per target the rollout rolled back (``on_failure: rollback``) and how it went,
    or why it could not (``rollback_error``, e.g. no rollback strategy)."""
    targets = [t for b in record.get("batches") or [] for t in b.get("targets") or []]
    lines = []
    for target in targets:
        error = target.get("rollback_error")
        if target.get("rollback_id"):
            line = f"  {target['client_id']}  rollback {target['rollback_id']}: "
            line += str(target.get("rollback_status") or "-")
            line += f" - {_one_line(error)}" if error else ""
        elif error:
            line = f"  {target['client_id']}  not rolled back: {_one_line(error)}"
        else:
            continue
        lines.append(terminal_safe(line))
    return lines


def render(record: dict[str, Any]) -> list[str]:
    """What ``deployctl rollout status`` prints and ``--wait`` keeps up to date."""
    lines = [summary_line(record), *batch_lines(record)]
    rollout_id = record["rollout_id"]
    if record.get("status") == "paused":
        how = "promote" if record.get("paused_for") == "canary" else "resume"
        lines.append(
            terminal_safe(
                f"  paused: deployctl rollout {how} {rollout_id} to go on, "
                f"deployctl rollout abort {rollout_id} to stop"
            )
        )
    return lines


def _terminal_width() -> int:
    """Columns of the terminal stderr is (the display's), else what shutil finds."""
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError):
        return shutil.get_terminal_size().columns


def follow_rollout(
    api: DeployClient, rollout_id: str, timeout: float, *, outcome: bool = True
) -> dict[str, Any]:
    """Show the rollout live on stderr until it ends (redrawn in place on a terminal, the
    lines that changed otherwise), then (unless not ``outcome``: stdout is for --json) its
    summary and failing hosts on stdout; the final record.  ``timeout`` bounds the wait:
    past it, a :class:`click.ClickException` says the rollout goes on on the server."""
    tty = sys.stderr.isatty()
    record: dict[str, Any] = {}
    shown: list[str] = []
    outage: list[str] = []  # what the server's silence was when last said

    def unreachable(exc: ApiError) -> None:
        nonlocal shown
        if not outage:  # once per outage: the rollout itself lives in the database
            click.echo(terminal_safe(f"{exc}\n(still watching until the wait timeout)"), err=True)
            shown = []  # the next display starts below the message
        outage[:] = [str(exc)]

    try:
        for record in api.watch_rollout(rollout_id, timeout=timeout, on_unreachable=unreachable):
            outage.clear()
            lines = render(record)
            failures = failing_hosts(record, most=LIVE_FAILURES)
            if failures:
                lines += ["failing hosts:", *failures]
            if tty:  # one screen row per line, so that moving up len(shown) rows is right
                width = _terminal_width() - 1
                lines = [line if len(line) <= width else line[: width - 1] + "…" for line in lines]
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
    except KeyboardInterrupt:
        raise click.ClickException(
            f"stopped watching; rollout {rollout_id} goes on on the server: "
            f"deployctl rollout status {rollout_id} --wait to watch it again, "
            f"deployctl rollout abort {rollout_id} to stop it"
        ) from None
    if outcome:
        print_rollout_outcome(api, record)
    return record


def print_rollout_outcome(api: DeployClient, record: dict[str, Any]) -> None:
    """The end of a rollout: its summary, its batches, and the failing hosts with errors."""
    for line in render(record):
        click.echo(line)
    for title, lines in (
        ("failing hosts:", failing_hosts(record, api)),
        ("rolled back:", rollback_lines(record)),
    ):
        if lines:
            click.echo(title)
            for line in lines:
                click.echo(line)
