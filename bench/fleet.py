"""The fleet benchmark (issue 13): N real agents in K worker processes against one
``deployctl server`` on loopback, measured in one run.

    python bench/fleet.py [--agents 200] [--procs 4] [--pg [URL]] [--artifact-agents M]

Agent ``fleet-00000`` runs alone in a process of its own and is the one dispatch latency is
measured on, first while it is the only agent connected, then with all N connected.  The
other N-1 agents are spread over ``--procs`` workers (``bench/fleet_agents.py``), all enrolled
with one join token made through the API.  Printed at the end, as a table:

- seconds until all N are connected (``GET /api/clients`` polled);
- server RSS per agent ((VmRSS with N connected - VmRSS with 1) / (N-1)) and the server's
  CPU over 10 idle seconds (/proc/PID/stat utime+stime), the workers' beside it;
- dispatch p50/p99 of ``true`` (POST to terminal status through the waiting API), 1 vs N;
- ``true`` on all N as one rollout with ``max_parallel`` N (``--no-rollout`` skips it), before
  the POSTs below, so their leftovers (busy clients) cannot slow it down;
- ``true`` on all N agents from 8 POSTing threads: seconds until the last finished, by status;
- optionally a package (default 50 MB) through the artifact store to M agents;
- ``kill -9`` of the server and a restart on the same state dir and ports: seconds until all
  N are back, and what the agents logged meanwhile (refusals, "already enrolled").

Exits 1 when something did not come up or finish (the table says what), 130 on Ctrl-C.
Every process it starts is in a process group of its own and ended on the way out.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from fleet_artifacts import add_arguments as add_artifact_arguments
from fleet_artifacts import ship_packages
from fleet_harness import Fleet, PeakRss, end_on_signals, rss_kib
from fleet_ingest import GENERATORS, describe, ingest
from fleet_runs import (
    dispatch_latency,
    fan_out,
    percentiles,
    rollout_true,
    worker_totals,
)

DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
SOLO = "fleet-00000"
IDLE_SETTLE = 10.0
IDLE_WINDOW = 10.0
INGEST_SLEEP = 45
INGEST_RATE = 0.0


class Report:
    """Figures in the order measured, and what went wrong."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []
        self.problems: list[str] = []
        self.data: dict[str, Any] = {}

    def add(self, key: str, label: str, value: Any, shown: str, target: str = "") -> None:
        """One figure: ``value`` for the JSON, ``shown`` for the table."""
        self.data[key] = value
        self.rows.append((label, shown, target))
        print(f"  {label}: {shown}", flush=True)

    def problem(self, what: str) -> None:
        """Something that did not come up or finish."""
        self.problems.append(what)
        print(f"  PROBLEM: {what}", flush=True)

    def table(self) -> str:
        """The figures as an aligned table."""
        rows = [("figure", "measured", "issue 13 target"), *self.rows]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        lines.insert(1, "-+-".join("-" * w for w in widths))
        return "\n".join(lines)


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _postgres_schema(url: str) -> tuple[str, Any]:
    """A fresh schema in ``url``'s database: the server's URL, and an engine to drop it."""
    import sqlalchemy as sa

    engine = sa.create_engine(url, connect_args={"connect_timeout": 5})
    schema = f"fleet_{uuid.uuid4().hex[:12]}"
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options=-csearch_path%3D{schema}", (engine, schema)


def _drop_schema(handle: Any) -> None:
    import sqlalchemy as sa

    engine, schema = handle
    with engine.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    engine.dispose()


def measure_dispatch(fleet: Fleet, report: Report, args: argparse.Namespace, which: str) -> None:
    """p50/p99 of `true` on the solo agent, recorded under ``which`` ("1" or "N")."""
    times, failures = dispatch_latency(fleet.api, SOLO, args.samples, args.deploy_timeout)
    for failure in failures[:3]:
        report.problem(f"dispatch ({which} connected): {failure}")
    if times:
        p50, p99 = percentiles(times)
        report.data[f"dispatch_{which}"] = {"p50": p50, "p99": p99, "times": times}
        report.add(
            f"dispatch_{which}_p50_p99",
            f"dispatch `true`, {which} connected (p50 / p99, {len(times)} samples)",
            [p50, p99],
            f"{_ms(p50)} / {_ms(p99)}",
            "1-agent p50 <= 10 ms" if which == "1" else "p99 <= 2x the 1-agent p99",
        )


def rollout_everywhere(fleet: Fleet, ids: list[str], timeout: float) -> tuple[Any, ...]:
    """``true`` on every agent through one rollout (``fleet_runs.rollout_true``): seconds
    from the POST until the rollout ended, and until the last target finished."""
    got = rollout_true(fleet.api, ids, timeout)
    counts = ", ".join(f"{n} {status}" for status, n in sorted(got["counts"].items()))
    return (
        "rollout_true_all",
        f"`true` on all {len(ids)} as one rollout (max_parallel {len(ids)})",
        got,
        f"{got['status']} ({counts}); last target finished {got['last_finished_s']:.1f} s after "
        f"the POST, rollout ended (seen by polling) {got['ended_s']:.1f} s",
        "",
    )


def ingest_phase(
    fleet: Fleet, report: Report, args: argparse.Namespace, ids: list[str]
) -> dict[str, str]:
    """The status-event flood (fleet_ingest.ingest); the deployments it leaves running."""
    if not (args.ingest_agents and args.ingest_events):
        return {}
    flood = ingest(
        fleet,
        ids[: args.ingest_agents],
        args.ingest_events,
        INGEST_SLEEP,
        args.ingest_timeout,
        rate=args.ingest_rate,
        generator=args.ingest_generator,
    )
    in_flight: dict[str, str] = flood.pop("deploys")
    offered = f"offered at {args.ingest_rate:g}/s" if args.ingest_rate else "offered all at once"
    report.data["ingest_detail"] = flood
    report.add(
        "ingest_rate",
        f"status-event ingest into {'PostgreSQL' if args.pg else 'SQLite'}",
        flood["rate"],
        f"{flood['rate']:.0f} events/s ({flood['events']} from {flood['agents']} agents, "
        f"{offered}; {describe(args.ingest_generator)}"
        f"{'; one ACK per event (--plain-acks)' if args.plain_acks else ''}; "
        f"offered in {flood['enqueue_s']:.1f} s, all acked in {flood['drain_s']:.1f} s; "
        f"{flood['cpu']}; CPU per event: server {flood['server_cpu_ms']:.3f} ms, agents "
        f"{flood['agents_cpu_ms']:.3f} ms; {flood['datagrams_per_event']:.1f} UDP datagrams "
        f"per event, machine-wide); server: {commit_text(flood)}",
        ">= 5,000/s into SQLite, p99 commit <= 250 ms",
    )
    if args.ingest_rate:
        report.add(*cpu_budget(flood, args.ingest_rate))
    if flood["unacknowledged"]:
        report.problem(f"{flood['unacknowledged']} flood events never acknowledged")
    if any(size < args.ingest_events for size in flood["history_sizes"]):
        report.problem(f"histories hold fewer reports than sent: {flood['history_sizes']}")
    return in_flight


def cpu_budget(flood: dict[str, Any], rate: float) -> tuple[str, str, float, str, str]:
    """The cores the offered ``rate`` needs at the CPU per event this flood measured (the
    server's, the agents'), against this machine's.  Those costs are this run's: they fall
    when reports share packets or the server keeps up, so a need above the cores says what
    this run could not have sustained, not a bound."""
    cores = os.cpu_count()
    server = flood["server_cpu_ms"] * rate / 1000
    agents = flood["agents_cpu_ms"] * rate / 1000
    return (
        "ingest_cpu_needed",
        f"cores {rate:g} events/s need at these costs",
        server + agents,
        f"server {server:.2f} + agent workers {agents:.2f} = {server + agents:.2f} cores "
        f"(this machine: {cores}; the server alone, at its measured cost, would take "
        f"{1000 / max(flood['server_cpu_ms'], 1e-9):.0f} events/s on one core)",
        "",
    )


def timeline_text(timeline: list[tuple[float, int]], every: float) -> str:
    """``(seconds, count)`` polls as ``"5 s: 0, 10 s: 120, …"``, one per ``every`` seconds
    (the first poll at or past each mark), and the last poll."""
    shown: list[str] = []
    mark = every
    for seconds, count in timeline:
        if seconds >= mark:
            shown.append(f"{seconds:.0f} s: {count}")
            while mark <= seconds:
                mark += every
    if timeline and (not shown or not shown[-1].startswith(f"{timeline[-1][0]:.0f} s")):
        shown.append(f"{timeline[-1][0]:.0f} s: {timeline[-1][1]}")
    return ", ".join(shown)


def restart_phase(
    fleet: Fleet,
    report: Report,
    args: argparse.Namespace,
    ids: list[str],
    in_flight: dict[str, str],
) -> None:
    """``kill -9`` the server, start it again on the same state, and measure the return:
    seconds until all ``ids`` are back (with a timeline), refusals, and how the deployments
    in ``in_flight`` (client id -> deployment id) ended."""
    before = worker_totals(fleet)
    killed = time.monotonic()
    fleet.kill_server()
    fleet.start_server(60.0)
    api_up = time.monotonic() - killed
    cpu = fleet.cpu_sample()  # the new server's, from when its API answers
    timeline: list[tuple[float, int]] = []
    back = fleet.wait_connected(set(ids), args.connect_timeout, killed, timeline)
    cpu_back = fleet.cpu_text(cpu)
    report.add(
        "restart_timeline",
        "connected after the kill (every 5 s)",
        timeline,
        timeline_text(timeline, 5.0),
    )
    time.sleep(2.0)  # refusals logged around the last connections
    after = worker_totals(fleet)
    refusals = after["refusals"] - before["refusals"]
    enrolled_again = after["already_enrolled"] - before["already_enrolled"]
    refused_agents = sorted(set(after["refused_ids"]) - set(before["refused_ids"]))
    if back is None:
        count = len(fleet.connected() & set(ids))
        report.problem(
            f"after the restart only {count}/{len(ids)} came back in {args.connect_timeout:g} s"
        )
    else:
        report.add(
            "restart_back_s",
            f"kill -9 + restart: all {len(ids)} back",
            back,
            f"{back:.1f} s after the kill (the API answered after {api_up:.1f} s; "
            f"meanwhile {cpu_back})",
            "all within 60 s",
        )
    report.add(
        "restart_refusals",
        "refusals agents logged during the restart",
        refusals,
        f"{refusals} ({enrolled_again} 'already enrolled'; {len(refused_agents)} agents)",
        "0 refused",
    )
    busy = after["busy"] - before["busy"]
    report.add(
        "restart_busy",
        "busy refusals during the restart (retry-after hints)",
        busy,
        f"{busy} (the server at its handshake limit; each agent waited its hint)" if busy else "0",
        "",
    )
    if in_flight:
        finals: Counter[str] = Counter()
        for deploy_id in in_flight.values():
            try:
                finals[fleet.api.wait(deploy_id, timeout=INGEST_SLEEP + 120)["status"]] += 1
            except TimeoutError:
                finals["unfinished"] += 1
        report.add(
            "over_the_kill",
            f"`sleep {INGEST_SLEEP}` deployments running across the kill",
            dict(finals),
            ", ".join(f"{n} {status}" for status, n in finals.most_common()),
            "0 lost",
        )
        if finals.get("success", 0) != len(in_flight):
            report.problem(f"deployments running across the kill ended {dict(finals)}")
    report.data["initial_refusals"] = before["refusals"]
    report.data["refused_agents"] = refused_agents
    report.data["worker_log_categories"] = after["categories"]


def run(args: argparse.Namespace, root: Path, report: Report) -> None:
    """Every phase, in order; a phase that cannot go on raises and the rest is skipped."""
    db_url, schema = (None, None)
    if args.pg:
        db_url, schema = _postgres_schema(args.pg)
    fleet = Fleet(
        root,
        db_url=db_url,
        keep_monitor=args.keep_monitor,
        worker_args=["--plain-acks"] if args.plain_acks else [],
        worker_nice=args.worker_nice,
    )
    ids = [f"fleet-{i:05d}" for i in range(args.agents)]
    try:
        report.add("load_start", "load average at start (1/5/15 min)", _load(), _load())
        fleet.start_server(60.0)
        join_token = fleet.make_join_token(uses=args.agents)

        # ---- one agent
        # The measured agent makes its spare at start, as every agent does.
        fleet.start_worker("solo", [SOLO], join_token, {"DEPLOY_CENTER_FLEET_SPARES": "start"})
        if fleet.wait_connected({SOLO}, 60.0, time.monotonic()) is None:
            raise RuntimeError(f"{SOLO} did not connect in 60 s; see {root}/solo.log")
        if not args.ingest_only:
            measure_dispatch(fleet, report, args, "1")
        rss_one = rss_kib(fleet.server_pids())

        # ---- N agents
        rest = ids[1:]
        started = time.monotonic()
        for k in range(args.procs):
            share = rest[k :: args.procs]
            if share:
                fleet.start_worker(f"worker-{k}", share, join_token)
        took = fleet.wait_connected(set(ids), args.connect_timeout, started)
        busy_at_start = worker_totals(fleet)["busy"]
        if took is None:
            count = len(fleet.connected() & set(ids))
            report.problem(f"only {count}/{len(ids)} connected after {args.connect_timeout:g} s")
        else:
            report.add(
                "connect_s",
                f"all {len(ids)} connected",
                took,
                f"{took:.1f} s ({busy_at_start} busy refusals on the way)",
                "2,000 within 60 s",
            )
        time.sleep(2.0)  # let the last handshakes' bookkeeping settle
        rss_all = rss_kib(fleet.server_pids())
        per_agent = (rss_all - rss_one) / max(1, len(fleet.connected() & set(ids)) - 1)
        report.add(
            "rss_per_agent_kib",
            "server RSS per agent",
            per_agent,
            f"{per_agent:.0f} KiB ({rss_one / 1024:.0f} -> {rss_all / 1024:.0f} MiB)",
            "<= 150 KiB",
        )
        # What follows the last handshakes (their bookkeeping, the agents' first messages)
        # is not idle: measured once the fleet has been connected for IDLE_SETTLE seconds.
        time.sleep(IDLE_SETTLE)
        cpu = fleet.cpu_sample()
        time.sleep(IDLE_WINDOW)
        idle, idle_workers = fleet.cpu_since(cpu)
        report.add(
            "idle_cpu_pct",
            f"idle server CPU ({IDLE_WINDOW:g} s, {IDLE_SETTLE + 2:g} s after all connected)",
            idle,
            f"{idle:.1f} % of a core (agent workers: {idle_workers:.0f} %)",
            "<= 10 %",
        )
        report.data["idle_workers_cpu_pct"] = idle_workers

        if args.ingest_only:
            ingest_phase(fleet, report, args, ids)
            return
        if args.restart_only:
            restart_phase(fleet, report, args, ids, {})
            return
        measure_dispatch(fleet, report, args, "N")
        one, many = report.data.get("dispatch_1"), report.data.get("dispatch_N")
        if one and many:
            ratio = many["p99"] / one["p99"]
            report.add(
                "dispatch_p99_ratio",
                f"dispatch p99, {len(ids)} vs 1 connected",
                ratio,
                f"{ratio:.2f}x",
                "<= 2x",
            )

        # ---- `true` everywhere
        if args.rollout:
            connected = sorted(fleet.connected() & set(ids))  # enrolled and here
            report.add(*rollout_everywhere(fleet, connected, args.deploy_timeout * 4))
        cpu = fleet.cpu_sample()
        with PeakRss(fleet.server_pids) as peak:
            everywhere = fan_out(
                fleet,
                ids,
                "shell",
                lambda cid: {"client_id": cid, "script": "true"},
                threads=args.threads,
                timeout=args.deploy_timeout * 4,
            )
        report.add(
            "true_all",
            f"`true` on all {len(ids)} ({args.threads} threads)",
            everywhere,
            f"{everywhere['summary']}; {fleet.cpu_text(cpu)}; "
            f"server RSS peak {peak.kib / 1024:.0f} MiB",
            "1,000 success within 10 s",
        )
        if everywhere["statuses"].get("success", 0) != len(ids):
            report.problem(f"`true` everywhere ended {everywhere['statuses']}")

        # ---- a package to M agents: the server's store, then a URL source (issue 13 §4)
        if args.artifact_agents:
            ship_packages(fleet, report, args, ids)

        # ---- status-event ingest (its `sleep` deployments still run at the kill below)
        in_flight = ingest_phase(fleet, report, args, ids)

        # ---- kill -9 and restart
        restart_phase(fleet, report, args, ids, in_flight)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)  # a second Ctrl-C must not stop the clean-up
        report.add("load_end", "load average at the end (1/5/15 min)", _load(), _load())
        dead = fleet.dead_workers()
        if dead:
            report.problem(f"workers exited early: {', '.join(dead)}")
        crashed = worker_totals(fleet)["crashed"]
        if crashed:
            report.problem(f"{len(crashed)} agents crashed, e.g. {crashed[0]}")
        fleet.close()
        if schema is not None:
            _drop_schema(schema)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agents", type=int, default=200, help="N, at least 2 (default 200)")
    parser.add_argument("--procs", type=int, default=4, help="worker processes (default 4)")
    parser.add_argument(
        "--pg",
        nargs="?",
        const=DEFAULT_PG,
        default=None,
        help=f"use PostgreSQL (a fresh schema, dropped at the end); default URL {DEFAULT_PG}",
    )
    parser.add_argument("--samples", type=int, default=40, help="dispatch samples per case")
    parser.add_argument("--threads", type=int, default=8, help="POSTing threads")
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=None,
        help="seconds to wait for all agents (default 60 + 0.15 s per agent)",
    )
    parser.add_argument("--deploy-timeout", type=float, default=60.0, help="per deployment")
    parser.add_argument(
        "--artifact-agents", type=int, default=0, help="M: send a package to M agents (off)"
    )
    parser.add_argument("--artifact-mb", type=int, default=50, help="the package's size")
    parser.add_argument("--artifact-timeout", type=float, default=900.0)
    add_artifact_arguments(parser)
    parser.add_argument(
        "--ingest-agents", type=int, default=50, help="agents flooding status events (0: off)"
    )
    parser.add_argument("--ingest-events", type=int, default=100, help="reports per agent")
    parser.add_argument("--ingest-timeout", type=float, default=300.0)
    parser.add_argument(
        "--ingest-rate",
        type=float,
        default=INGEST_RATE,
        help="events/s offered by the flooding agents together, paced (0: all at once)",
    )
    parser.add_argument(
        "--ingest-generator",
        choices=GENERATORS,
        default="reporter",
        help="reporter: through each agent's journaled outbox; wire: on the agents' "
        "connections without their journals (bench/fleet_ingest.py)",
    )
    parser.add_argument(
        "--plain-acks",
        action="store_true",
        help="agents do not announce ack_refs: the server answers each event with an ACK of "
        "its own, as it does for agents older than ack_refs (default: one ACK for the events "
        "stored together)",
    )
    parser.add_argument(
        "--ingest-only",
        action="store_true",
        help="connect the agents, flood, and stop (no dispatch, fan-out or restart)",
    )
    parser.add_argument(
        "--restart-only",
        action="store_true",
        help="connect the agents, measure idle, then kill -9 and restart (nothing between)",
    )
    parser.add_argument(
        "--keep-monitor",
        action="store_true",
        help="keep the docker monitor agent service on (off: N samplers on one docker daemon)",
    )
    parser.add_argument(
        "--no-rollout",
        dest="rollout",
        action="store_false",
        help="skip `true` on all N as one rollout (issue 14)",
    )
    parser.add_argument(
        "--worker-spares",
        choices=("first-run", "start"),
        default="first-run",
        help="when the workers' agents make their spare shell: at their first run (default; "
        "one host holds one, thousands of idle shells slow every process start and exit on "
        "this machine) or at start, as an agent does (the solo agent always does)",
    )
    parser.add_argument(
        "--worker-nice",
        type=int,
        default=0,
        choices=range(0, 20),
        metavar="N",
        help="a diagnosis, not the targets' conditions: run the agent workers at nice N "
        "(their processes and their autogroups), so that the server gets the CPU it would "
        "have on a machine of its own (default 0)",
    )
    parser.add_argument("--keep", type=Path, default=None, help="run in DIR and keep it")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return parser


def commit_text(flood: dict[str, Any]) -> str:
    """The server's own ingest figures during the flood (its log), in words."""
    if flood.get("commit_p99_ms") is None:
        return "no ingest figures in its log"
    per = flood["server_messages"] / max(flood["server_transactions"], 1)
    # More messages than events: the agents' outboxes sent some again (an agent resends
    # everything unacknowledged every 30 s, agent/runtime.py RESEND_AFTER), or other agents'
    # messages came meanwhile.
    again = flood["server_messages"] / max(flood["events"], 1)
    return (
        f"{flood['server_messages']} messages ({again:.2f} per event sent) in "
        f"{flood['server_transactions']} transactions ({per:.1f} each), queued -> committed "
        f"p99 {flood['commit_p99_ms']:.0f} ms (the worst 10 s window)"
    )


def main() -> int:
    args = _parser().parse_args()
    if args.agents < 2 or args.procs < 1 or args.samples < 1 or args.threads < 1:
        raise SystemExit("--agents must be at least 2, --procs/--samples/--threads at least 1")
    if args.connect_timeout is None:
        args.connect_timeout = 60.0 + 0.15 * args.agents
    args.artifact_agents = min(args.artifact_agents, args.agents)
    args.ingest_agents = min(args.ingest_agents, args.agents)
    # No agent scans /proc for orphans during the run (fleet_agents.py): in a worker each
    # agent's scan collects the other agents' finished scripts, which then end with code 255.
    os.environ.setdefault("DEPLOY_CENTER_FLEET_REAP_INTERVAL", "86400")
    os.environ["DEPLOY_CENTER_FLEET_SPARES"] = args.worker_spares
    end_on_signals()
    report = Report()
    print(
        f"fleet: {args.agents} agents in {args.procs}+1 processes, "
        f"{'PostgreSQL' if args.pg else 'SQLite'}, {os.cpu_count()} CPUs; the workers' agents "
        f"make their spare shell at {args.worker_spares.replace('-', ' ')}"
        + (
            f"; the workers run at nice {args.worker_nice} (a diagnosis: the server gets "
            "the CPU it would have alone)"
            if args.worker_nice
            else ""
        ),
        flush=True,
    )
    code = 0
    with tempfile.TemporaryDirectory(prefix="fleet-") as tmp:
        root = args.keep or Path(tmp)
        print(f"  logs in {root}{'' if args.keep else ' (removed at the end; --keep DIR)'}")
        try:
            run(args, root, report)
        except KeyboardInterrupt:
            report.problem("interrupted")
            code = 130
        except Exception as exc:
            report.problem(f"{type(exc).__name__}: {exc}")
        categories: Counter[str] = Counter(report.data.get("worker_log_categories", {}))
        if categories:
            print("\nwhat the agents logged (transport messages and warnings), most first:")
            for text, count in categories.most_common(12):
                print(f"  {count:6d}  {text}")
        if report.problems and args.keep is None:
            log = root / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(none)"
            print(f"\nthe server's last lines:\n{tail}")
    print(f"\n{report.table()}")
    if args.json:
        args.json.write_text(json.dumps(report.data, indent=2, default=str))
    if report.problems:
        print("\nNOT OK:\n  " + "\n  ".join(report.problems))
        return code or 1
    return code


if __name__ == "__main__":
    sys.exit(main())
