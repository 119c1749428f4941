"""Deployments per second of ``true`` over N real agents on two server replicas against all
on one replica, on PostgreSQL, measured in one run (issue 15, "Outgrow one server").

    python bench/replicas.py [--agents 200] [--rounds 5] [--threads 16] [--pg URL] [--keep DIR]

The agents are real :class:`Agent` objects in two worker processes (``bench/fleet_agents.py``
through ``bench/fleet_harness.py``), each given one server.  Three setups, in this order, on
one fresh schema of the PostgreSQL database at ``--pg``:

- ``one``: replica A alone (B not running); both workers (N/2 agents each) on A; every
  deployment POSTed to A;
- ``two``: A and B; one worker's N/2 agents on A, the other's on B; each deployment POSTed to
  the replica holding its agent, so both APIs take half the load;
- ``crossed``: the same agents; each deployment POSTed to the *other* replica, which routes
  it to the one holding the agent (the cluster bus): every command crosses replicas.

In each setup ``--threads`` threads own a slice of the agents each and, ``--rounds`` times,
POST one ``POST /api/deploy/shell`` of ``true`` per agent of their slice, then wait for each
(the waiting API, on the replica they POSTed to).  Printed per setup: final statuses,
deployments/s (successes over the span from the first record's ``created_at`` to the last
``finished_at``), p50/p99 submit-to-success (``finished_at - created_at`` of each record, the
replicas' own clocks on one machine), and the servers' CPU; then the ratios to ``one``.

B shares A's identity by a copy of A's state directory (docs/cluster.md).  The agents of a
worker share one process, so their orphan scans are turned off for the run: one agent's scan
would collect another's finished script (bench/fleet_agents.py).  Exits 1 when a setup
did not come up or not every deployment succeeded; every process it starts is in a process
group of its own and ended on the way out.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet import _drop_schema, _postgres_schema
from fleet_harness import Fleet, Worker, _end, cpu_seconds
from fleet_runs import percentiles

from deploy_core.client import DeployClient

TEST_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
OWN_FILES = {"server.id", "server.json"}  # what each replica keeps for itself
SETUPS = ("one", "two", "crossed")


@dataclass
class Outcome:
    """What one setup measured."""

    name: str
    statuses: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    span: float = 0.0  # first created_at to last finished_at, seconds
    wall: float = 0.0  # the bench's own clock: first POST to the last wait's return
    cpu: str = ""
    errors: list[str] = field(default_factory=list)

    @property
    def succeeded(self) -> int:
        return self.statuses.get("success", 0)

    @property
    def rate(self) -> float:
        return self.succeeded / self.span if self.span > 0 else 0.0

    def line(self) -> str:
        statuses = ", ".join(f"{k} {v}" for k, v in self.statuses.most_common())
        text = f"{self.name:8} {self.rate:7.1f} deployments/s ({statuses}; span {self.span:.1f} s"
        text += f", wall {self.wall:.1f} s)"
        if self.latencies:
            p50, p99 = percentiles(self.latencies)
            text += f"; submit-to-success p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms"
        return text + f"; {self.cpu}"


def _ts(iso: str | None) -> float | None:
    import datetime as dt

    return dt.datetime.fromisoformat(iso).timestamp() if iso else None


def run_setup(
    name: str,
    plan: dict[str, Fleet],
    servers: list[Fleet],
    args: argparse.Namespace,
) -> Outcome:
    """``args.rounds`` deployments of ``true`` on every agent of ``plan`` (client id -> the
    replica to POST it to), from ``args.threads`` threads owning a slice of agents each."""
    outcome = Outcome(name)
    ids = sorted(plan)
    lock = threading.Lock()
    records: list[dict[str, Any]] = []
    deadline = time.monotonic() + args.deploy_timeout

    def slice_of(k: int) -> None:
        clients = {id(f): DeployClient(f.url, f.token, timeout=60) for f in servers}
        try:
            mine = ids[k :: args.threads]
            for _ in range(args.rounds):
                posted: list[tuple[DeployClient, str]] = []
                for client_id in mine:
                    api = clients[id(plan[client_id])]
                    try:
                        body = {"client_id": client_id, "script": "true"}
                        posted.append((api, api.deploy("shell", body)["deploy_id"]))
                    except Exception as exc:
                        with lock:
                            outcome.statuses["refused at POST"] += 1
                            outcome.errors.append(f"POST {client_id}: {exc}")
                for api, deploy_id in posted:
                    left = deadline - time.monotonic()
                    try:
                        if left <= 0:
                            raise TimeoutError("past --deploy-timeout")
                        record = api.wait(deploy_id, timeout=left)
                    except Exception as exc:
                        with lock:
                            outcome.statuses[f"unfinished ({type(exc).__name__})"] += 1
                            outcome.errors.append(f"{deploy_id}: {exc}")
                        continue
                    with lock:
                        records.append(record)
        finally:
            for client in clients.values():
                client.close()

    pids = [f.server.pid for f in servers if f.server is not None]
    workers = [w.proc.pid for f in servers for w in f.workers if w.proc.poll() is None]
    cpu_before, started = cpu_seconds(pids), time.monotonic()
    workers_before = cpu_seconds(workers)
    with ThreadPoolExecutor(max_workers=args.threads, thread_name_prefix=name) as pool:
        list(pool.map(slice_of, range(args.threads)))
    outcome.wall = time.monotonic() - started
    cpu = (cpu_seconds(pids) - cpu_before) / max(outcome.wall, 1e-9) * 100
    agents_cpu = (cpu_seconds(workers) - workers_before) / max(outcome.wall, 1e-9) * 100
    outcome.cpu = (
        f"CPU % of a core: {len(pids)} server(s) {cpu:.0f}, "
        f"{len(workers)} agent workers {agents_cpu:.0f}"
    )
    created, finished = [], []
    for record in records:
        outcome.statuses[record["status"]] += 1
        if record["status"] != "success":
            outcome.errors.append(
                f"{record['deploy_id']} on {record['client_id']}: {record['status']}: "
                f"{record['error']}"
            )
        start, end = _ts(record["created_at"]), _ts(record["finished_at"])
        if start is not None and end is not None:
            created.append(start)
            finished.append(end)
            if record["status"] == "success":
                outcome.latencies.append(end - start)
    if created:
        outcome.span = max(finished) - min(created)
    return outcome


def start_workers(
    fleet: Fleet, name: str, ids: list[str], join_token: Path, timeout: float
) -> Worker:
    """A worker process with ``ids`` on ``fleet``'s replica; all connected there, or raise."""
    worker = fleet.start_worker(name, ids, join_token)
    if fleet.wait_connected(set(ids), timeout, time.monotonic()) is None:
        missing = len(set(ids) - fleet.connected())
        raise RuntimeError(f"{missing} of {name}'s agents did not connect; see {worker.log}")
    return worker


def stop_workers(fleet: Fleet) -> None:
    for worker in fleet.workers:
        _end(worker.proc, signal.SIGTERM, 40.0)  # the agents stop and say so
    fleet.workers.clear()


def run(args: argparse.Namespace, root: Path) -> list[Outcome]:
    db_url, schema = _postgres_schema(args.pg)
    a = Fleet(root / "a", db_url=db_url)
    b = Fleet(root / "b", db_url=db_url)
    ids = [f"fleet-{i:05d}" for i in range(args.agents)]
    half = len(ids) // 2
    on_a, on_b = ids[:half], ids[half:]
    outcomes: list[Outcome] = []
    try:
        a.start_server(60.0)
        _end(a.server, signal.SIGTERM, 15.0)  # a clean stop, then B gets a copy of A's identity
        shutil.copytree(a.server_dir, b.server_dir, ignore=lambda _d, names: OWN_FILES & set(names))
        (b.root / "agents").symlink_to(a.root / "agents", target_is_directory=True)
        (a.root / "agents").mkdir(parents=True, exist_ok=True)
        a.start_server(60.0)
        join_token = a.make_join_token(uses=args.agents)

        print(f"one: {len(ids)} agents on replica A", flush=True)
        start_workers(a, "one-0", on_a, join_token, args.connect_timeout)
        start_workers(a, "one-1", on_b, join_token, args.connect_timeout)
        outcomes.append(run_setup("one", dict.fromkeys(ids, a), [a], args))
        print(outcomes[-1].line(), flush=True)
        stop_workers(a)

        b.start_server(60.0)
        print(f"two: {len(on_a)} agents on replica A, {len(on_b)} on B", flush=True)
        start_workers(a, "two-a", on_a, join_token, args.connect_timeout)
        start_workers(b, "two-b", on_b, join_token, args.connect_timeout)
        local = {**dict.fromkeys(on_a, a), **dict.fromkeys(on_b, b)}
        outcomes.append(run_setup("two", local, [a, b], args))
        print(outcomes[-1].line(), flush=True)
        crossed = {**dict.fromkeys(on_a, b), **dict.fromkeys(on_b, a)}
        outcomes.append(run_setup("crossed", crossed, [a, b], args))
        print(outcomes[-1].line(), flush=True)
    finally:
        for fleet in (a, b):
            stop_workers(fleet)
            fleet.close()
        _drop_schema(schema)
    return outcomes


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])

    def at_least(low: int) -> Any:
        def parse(text: str) -> int:
            value = int(text)
            if value < low:
                raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
            return value

        return parse

    parser.add_argument("--agents", type=at_least(2), default=200, help="split half and half")
    parser.add_argument("--rounds", type=at_least(1), default=5, help="deployments per agent")
    parser.add_argument("--threads", type=at_least(1), default=16, help="POSTing threads")
    parser.add_argument(
        "--pg",
        default=os.environ.get("DEPLOY_CENTER_TEST_PG", TEST_PG),
        help="PostgreSQL URL (a fresh schema in it, dropped at the end)",
    )
    parser.add_argument("--connect-timeout", type=float, default=180.0)
    parser.add_argument(
        "--deploy-timeout", type=float, default=300.0, help="per setup, for every wait"
    )
    parser.add_argument("--keep", type=Path, default=None, help="run in DIR and keep it")
    return parser


def main() -> int:
    args = _parser().parse_args()
    # Agents sharing a worker process would reap one another's finished `true` (exit 255):
    # no orphan scan during the run (bench/fleet_agents.py).
    os.environ.setdefault("DEPLOY_CENTER_FLEET_REAP_INTERVAL", "86400")
    if not args.pg.startswith("postgresql"):
        _parser().error(f"--pg must be a postgresql:// URL, got {args.pg!r}")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"replicas bench: {args.agents} agents, {args.rounds} rounds, {args.threads} threads; "
        f"load {load}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="replicas-") as tmp:
        root = args.keep or Path(tmp)
        try:
            outcomes = run(args, root)
        except RuntimeError as exc:
            print(f"broke off: {exc}", file=sys.stderr)
            return 1
    by_name = {o.name: o for o in outcomes}
    one = by_name["one"]
    print()
    for outcome in outcomes:
        print(outcome.line())
    for name in SETUPS[1:]:
        if one.rate and name in by_name:
            print(f"{name} / one: {by_name[name].rate / one.rate:.2f}x deployments/s")
    print(f"load at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    expected = args.agents * args.rounds
    bad = [o for o in outcomes if o.succeeded != expected]
    for outcome in bad:
        print(f"{outcome.name}: {outcome.succeeded}/{expected} succeeded", file=sys.stderr)
        for error in outcome.errors[:3]:
            print(f"  {error}", file=sys.stderr)
    return 1 if bad or len(outcomes) != len(SETUPS) else 0


if __name__ == "__main__":
    raise SystemExit(main())
