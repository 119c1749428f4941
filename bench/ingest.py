"""Status-event ingest into the database: one transaction per event (the server before issue
13 §3) beside group commit (server/ingest.py), in one run, on SQLite and/or PostgreSQL.

What runs is the server's storage path for an agent's ``deploy.status`` without the network:
``--agents`` connections (coroutines in one event loop, as the server's connections are), each
validating and storing its ``--events`` reports one after another and waiting for each to be
stored before the next, as a connection waits before it acknowledges.  Every agent has its
own deployment.

- ``per-event``: what the server did before: the ownership read and ``apply_report`` each in
  a worker thread, one transaction per event.
- ``group``: :class:`~deploy_core.server.ingest.Ingest` (ownership checked in the same
  transaction, many connections' events per transaction), each connection waiting for its
  event's commit before it takes the next;
- ``pipelined``: as the server runs it: each connection's events queued in order without
  waiting (at most ``MAX_IN_FLIGHT`` of one connection at once), each answered after its
  commit.

Printed: events/s over the whole flood, p50/p99 of the time from an event's arrival (with
``--rate``, from when it was due) to its commit (the moment it would be acknowledged),
transactions, and the ratios to ``per-event``.

    python bench/ingest.py                      # SQLite, 50 agents x 200 events
    python bench/ingest.py --pg                 # and PostgreSQL (127.0.0.1:5432, db test)
    python bench/ingest.py --agents 200 --events 100 --only group
    python bench/ingest.py --rate 5000 --events 400  # paced: p99 at a sustained 5,000/s
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from deploy_core.models import DeployStatus, DeployStatusReport
from deploy_core.server.db import make_engine, upgrade
from deploy_core.server.events import MAX_IN_FLIGHT
from deploy_core.server.ingest import Ingest
from deploy_core.server.records import RecordStore

PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
MODES = ("per-event", "group", "pipelined")


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered)) - 1))]


def payload(deploy_id: str, seq: int) -> dict[str, Any]:
    """A report as it arrives off the wire (JSON), validated by the handler."""
    return DeployStatusReport(
        deploy_id=deploy_id,
        command_type="deploy.shell",
        status=DeployStatus.SCRIPT_RUNNING,
        progress=seq % 100,
        stage="script_running",
        message=f"flood report {seq}",
        seq=seq,
    ).model_dump(mode="json")


Store = Callable[[str, dict[str, Any]], Awaitable[Any]]


def per_event(records: RecordStore) -> Store:
    async def store(client_id: str, body: dict[str, Any]) -> Any:
        foreign = await asyncio.to_thread(records.not_owned, client_id, [body["deploy_id"]])
        assert not foreign
        report = DeployStatusReport.model_validate(body)
        return await asyncio.to_thread(records.apply_report, client_id, report)

    return store


def grouped(records: RecordStore, ingest: Ingest) -> Store:
    async def store(client_id: str, body: dict[str, Any]) -> Any:
        report = DeployStatusReport.model_validate(body)
        return await ingest.submit_grouped(records.apply_reports_in, (client_id, report))

    return store


async def flood(
    records: RecordStore,
    store: Store,
    agents: int,
    events: int,
    tag: str,
    pipeline: int = 0,
    rate: float = 0.0,
) -> dict[str, Any]:
    deploys = {}
    for n in range(agents):
        client_id, deploy_id = f"{tag}-{n}", uuid.uuid4().hex
        await asyncio.to_thread(
            records.create_deployment,
            deploy_id=deploy_id,
            client_id=client_id,
            command_type="deploy.shell",
            request={"params": {"script": "true"}},
            deadline=time.time() + 3600,
        )
        deploys[client_id] = deploy_id
    latencies: list[float] = []

    # With a rate, event i of each agent is due at start + i / (rate / agents) (an open
    # loop: the agents do not slow down when the server does), and its latency counts from
    # when it was due; without, every event is due at once (a burst).
    every = agents / rate if rate else 0.0

    async def one(client_id: str, body: dict[str, Any], due: float) -> None:
        applied = await store(client_id, body)
        latencies.append(time.perf_counter() - due)
        assert applied.applied

    async def agent(client_id: str, deploy_id: str, offset: float) -> None:
        bodies = [payload(deploy_id, seq) for seq in range(events)]
        room = asyncio.Semaphore(pipeline or 1)  # as the router: in order, answered later
        tasks = []
        for seq, body in enumerate(bodies):
            due = start + offset + seq * every
            if (wait := due - time.perf_counter()) > 0:
                await asyncio.sleep(wait)
            await room.acquire()
            task = asyncio.create_task(one(client_id, body, max(due, start)))
            task.add_done_callback(lambda _t: room.release())
            tasks.append(task)
        await asyncio.gather(*tasks)

    cpu = time.process_time()
    start = time.perf_counter()
    await asyncio.gather(
        *(agent(c, d, n * every / agents) for n, (c, d) in enumerate(deploys.items()))
    )
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu
    stored = await asyncio.to_thread(records.history, next(iter(deploys.values())))
    assert len(stored) == events + 1, len(stored)  # the pending line and every report
    return {
        "events": agents * events,
        "seconds": seconds,
        "rate": agents * events / seconds,
        "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
        "mean": statistics.mean(latencies),
        "cpu": cpu / seconds,
    }


async def run_db(url: str, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    engine = make_engine(url)
    await asyncio.to_thread(upgrade, engine)
    records = RecordStore(engine, server_id="bench")
    results: dict[str, dict[str, Any]] = {}
    try:
        for mode in args.modes:
            if mode == "per-event":
                results[mode] = await flood(
                    records, per_event(records), args.agents, args.events, mode, 0, args.rate
                )
                results[mode]["transactions"] = args.agents * args.events
            else:
                ingest = Ingest(engine, stats_every=None)
                ingest.start()
                pipeline = MAX_IN_FLIGHT if mode == "pipelined" else 0
                try:
                    results[mode] = await flood(
                        records,
                        grouped(records, ingest),
                        args.agents,
                        args.events,
                        mode,
                        pipeline,
                        args.rate,
                    )
                finally:
                    await ingest.close()
                results[mode]["transactions"] = ingest.stats.batches
                results[mode]["largest"] = ingest.stats.largest_batch
    finally:
        engine.dispose()
    return results


def show(name: str, results: dict[str, dict[str, Any]]) -> None:
    print(f"== {name}")
    for mode, r in results.items():
        extra = f", largest {r['largest']}" if "largest" in r else ""
        print(
            f"  {mode:9} {r['events']} events in {r['seconds']:.2f} s = {r['rate']:7.0f} events/s;"
            f" arrival->commit p50 {r['p50'] * 1000:6.1f} ms p99 {r['p99'] * 1000:6.1f} ms;"
            f" {r['transactions']} transactions{extra}; process CPU {r['cpu'] * 100:.0f} %"
        )
    before = results.get("per-event")
    for mode, after in results.items():
        if before is None or after is before:
            continue
        print(
            f"  {mode} / per-event: rate {after['rate'] / before['rate']:.1f}x,"
            f" p99 {after['p99'] / before['p99']:.2f}x,"
            f" transactions {after['transactions'] / before['transactions']:.3f}x"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=50)
    parser.add_argument("--events", type=int, default=200, help="reports per agent")
    parser.add_argument("--only", choices=MODES, help="one mode only")
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="offer this many events/s in all, paced (default: every event at once, a burst)",
    )
    parser.add_argument(
        "--pg", nargs="?", const=PG_DEFAULT, help="also PostgreSQL (a fresh schema, dropped)"
    )
    parser.add_argument("--no-sqlite", action="store_true", help="PostgreSQL only")
    args = parser.parse_args()
    if args.agents < 1 or args.events < 1:
        parser.error("--agents and --events must be at least 1")
    args.modes = [args.only] if args.only else list(MODES)
    offered = f"offered at {args.rate:g}/s" if args.rate else "all at once"
    print(
        f"load average {os.getloadavg()[0]:.1f}; {args.agents} agents x {args.events} events,"
        f" {offered}"
    )
    if not args.no_sqlite:
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite:///{Path(tmp) / 'bench.db'}"
            show("SQLite", asyncio.run(run_db(url, args)))
    if args.pg:
        schema = f"bench_{uuid.uuid4().hex[:10]}"
        admin = sa.create_engine(make_engine(args.pg).url)
        with admin.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        try:
            sep = "&" if "?" in args.pg else "?"
            url = f"{args.pg}{sep}options=-csearch_path%3D{schema}"
            show("PostgreSQL", asyncio.run(run_db(url, args)))
        finally:
            with admin.begin() as conn:
                conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
            admin.dispose()
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
