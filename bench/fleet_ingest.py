"""The status-event ingest phase of ``bench/fleet.py`` (issue 13: ``>= 5,000`` events/s into
the database, p99 commit ``<= 250 ms``).

Every flooding agent gets a ``sleep`` deployment; once all run, each worker process has its
agents send ``deploy.status`` reports for them (``fleet_agents.flood``), by one of two
generators, which the output names:

- ``reporter`` (the default): through the agent's own
  :class:`~deploy_core.agent.reporter.OutboxReporter`, as a running deployment reports: each
  report is journaled durably in the agent's SQLite journal (group commit per event-loop
  step), sent by the agent's outbox pump once on disk, and dropped when the server's ACK
  comes.  The agents' cost (the journal's fsyncs, a journal write per ACK) is on this
  machine's two cores too.
- ``wire``: the agents' own authenticated QUIC connections send the same envelopes
  without the journal: only the agents' envelope and QUIC costs remain on this machine.
  The server's path (QUIC, routing, group commit, ACK after commit) is the same.

With ``rate`` (events/s in all) the reports are offered at that pace, open loop (an agent
does not slow down when the server does); without, all at once.  The rate printed is all
events over the time from the first offered to the last acknowledged; the server's own
queued-to-committed p99 comes from its ``ingest:`` log lines (server/ingest.py).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fleet_harness import Fleet
from fleet_runs import ingest_figures, start_sleeps

GENERATORS = ("reporter", "wire")
INGEST_FIGURES_WAIT = 25.0
START_WAIT = 60.0


def udp_datagrams() -> int:
    """UDP datagrams this machine has received so far (/proc/net/snmp: every process's, so
    others' traffic counts too; on loopback each datagram sent is also received)."""
    try:
        lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines()]
    except OSError:
        return 0
    header, values = [line for line in lines if line and line[0] == "Udp:"][:2]
    return int(values[header.index("InDatagrams")])


def describe(generator: str) -> str:
    """What the generator does, for the output."""
    if generator == "wire":
        return "wire generator: agents' QUIC connections send the reports, no agent journal"
    return "reporter generator: each report journaled durably by its agent, then sent"


def ingest(
    fleet: Fleet,
    ids: list[str],
    events: int,
    script_seconds: int,
    timeout: float,
    *,
    rate: float = 0.0,
    generator: str = "reporter",
) -> dict[str, Any]:
    """Start ``sleep`` on each agent of ``ids``; once all run, have each send ``events``
    reports for it (see the module's text).  ``deploys`` (client id → deployment) are still
    running when this returns, usually."""
    if generator not in GENERATORS:
        raise ValueError(f"generator must be one of {GENERATORS}, not {generator!r}")
    api = fleet.api
    server_log = fleet.root / "server.log"
    deploys = start_sleeps(api, ids, script_seconds, START_WAIT)
    commanded = []
    log_from = server_log.stat().st_size if server_log.exists() else 0
    cpu = fleet.cpu_sample()
    datagrams = udp_datagrams()
    # Every worker starts at the same wall-clock moment, so the pace is the total's.
    start_at = time.time() + 0.5
    for worker in fleet.workers:
        mine = {cid: deploys[cid] for cid in worker.ids if cid in deploys}
        if mine:
            worker.command_flood(
                {
                    "events": events,
                    "deploys": mine,
                    "rate": rate,
                    "flooders": len(deploys),
                    "generator": generator,
                    "start_at": start_at,
                }
            )
            commanded.append(worker)
    results: list[dict[str, Any]] = []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        results = [w.stats().get("flood", {}) for w in commanded]
        if all(results):
            break
        time.sleep(0.25)
    errors = [r["error"] for r in results if "error" in r]
    if not all(results) or errors:
        raise RuntimeError(f"the flood did not finish in {timeout:g} s: {errors or results}")
    busy = fleet.cpu_text(cpu)
    datagrams = udp_datagrams() - datagrams
    # CPU seconds per event (a loaded machine distorts wall time much more than these); the
    # idle agents' heartbeats over the same time are in them too (a few % of a core).
    _now, server_cpu, worker_cpu = fleet.cpu_sample()
    server_cpu -= cpu[1]
    worker_cpu -= cpu[2]
    total = sum(r["events"] for r in results)
    started = min(r["started"] for r in results)
    enqueued = max(r["enqueued"] for r in results) - started
    drained = max(r["drained"] for r in results) - started
    stored = [len(api.history(deploy_id)) for deploy_id in list(deploys.values())[:5]]
    # The server logs its ingest figures every 10 s that committed something: wait for the
    # window holding the flood's end.
    end, commits = time.monotonic() + INGEST_FIGURES_WAIT, []
    while time.monotonic() < end:
        commits = ingest_figures(server_log, log_from)
        if sum(c["messages"] for c in commits) >= total:
            break
        time.sleep(1.0)
    # Windows of the flood proper (a window with a few stray messages says little).
    busy_windows = [c for c in commits if c["messages"] >= 100] or commits
    return {
        "server_cpu_ms": server_cpu * 1000 / max(total, 1),
        "agents_cpu_ms": worker_cpu * 1000 / max(total, 1),
        "datagrams_per_event": datagrams / max(total, 1),
        "events": total,
        "agents": len(deploys),
        "generator": generator,
        "offered_rate": rate,
        "rate": total / max(drained, 1e-9),
        "enqueue_s": enqueued,
        "drain_s": drained,
        "unacknowledged": sum(r["unacknowledged"] for r in results),
        "history_sizes": stored,
        "cpu": busy,
        "deploys": deploys,
        # The server's own count: messages (the flood's reports, and the other agents'
        # messages meanwhile) per transaction, and the worst p99 queued -> committed of the
        # 10 s windows.
        "server_messages": sum(c["messages"] for c in commits),
        "server_transactions": sum(c["transactions"] for c in commits),
        "commit_p99_ms": max((c["p99_ms"] for c in busy_windows), default=None),
        "commit_p50_ms": max((c["p50_ms"] for c in busy_windows), default=None),
    }
