"""One worker process of ``bench/fleet.py``: many real :class:`Agent` objects in one event loop.

Each agent has its own state directory, journal and QUIC connection, exactly as a lone
``deployctl agent`` would; they only share the process, the plugins and the event loop.
Every second the worker writes a JSON snapshot to ``--stats`` (atomically): how many of its
agents are connected, and what its agents logged — refusals by the server (``already
enrolled`` among them), failed attempts — counted by a logging handler, with the
ids of the agents that were refused.  When the ``--control`` file appears, the agents it names
flood the server with ``deploy.status`` reports (see :func:`flood`); the snapshot then gets
the flood's times.  SIGTERM or SIGINT stops the agents and ends the worker.

    python bench/fleet_agents.py --server 127.0.0.1:PORT --ca CA --join-token-file F \\
        --root DIR --stats FILE.json --log FILE.log --control FILE.json ID [ID ...]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import re
import resource
import signal
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from deploy_core.agent import runtime
from deploy_core.agent.reporter import OutboxReporter
from deploy_core.agent.runtime import Agent, AgentConfig
from deploy_core.models import EVENT_STATUS, DeployStatus, DeployStatusReport
from deploy_core.plugins import get_plugins
from deploy_core.transport import Envelope, Kind
from deploy_core.transport.envelope import CAPABILITY_ACK_REFS

# One agent per host scans /proc for orphans once a second.  A worker holds hundreds of
# agents, whose scans (~8 ms each on this machine) would cost the worker whole cores that
# no real host spends; `true` leaves no orphans, so the workers scan once a minute instead.
# Each agent's scan also collects the finished children of the *other* agents in the worker
# (one process: their scripts are its children too), whose scripts then end with code 255
# ("Unknown child process"): bench/replicas.py sets DEPLOY_CENTER_FLEET_REAP_INTERVAL past
# its run so that no agent scans while it measures.
FLEET_REAP_INTERVAL = float(os.environ.get("DEPLOY_CENTER_FLEET_REAP_INTERVAL", "60"))
# When the workers' agents make their spare shell (deploy_core.agent.launcher): "start", as
# an agent does, or "first-run".  Thousands of idle shells on this machine's two cores slow
# every process start and exit on it, the solo agent's scripts included (bench/README.md,
# "the spare shells of 2,000 agents on one host"); one host holds one.
FLEET_SPARES = os.environ.get("DEPLOY_CENTER_FLEET_SPARES", "start")
STATS_EVERY = 1.0
STOP_TIMEOUT = 30.0
# Flood reports carry sequence numbers above any the executor gives, so the server applies
# (and stores) each of them as a new report.
FLOOD_SEQ = 1_000_000
FLOOD_DRAIN_TIMEOUT = 300.0

_CLIENT_ID = re.compile(r"\bfleet-\d+\b")
_VOLATILE = [
    (re.compile(r"\b[0-9a-f]{8,}\b"), "<hex>"),
    (re.compile(r"\d+(\.\d+)?"), "<n>"),
]


def normalise(message: str) -> str:
    """A log message with its ids and numbers replaced, so alike messages count together."""
    text = _CLIENT_ID.sub("<id>", message.splitlines()[0] if message else "")
    for pattern, placeholder in _VOLATILE:
        text = pattern.sub(placeholder, text)
    return text[:160]


class OutcomeCounter(logging.Handler):
    """Counts what the agents log: refusals (and which agents), ``already enrolled``, and
    every transport message and warning by its normalised text."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.refusals = 0
        self.already_enrolled = 0
        self.refused_ids: set[str] = set()
        #: Busy refusals (the server at its handshake limit; not counted as refusals).
        self.busy = 0
        self.categories: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record must not stop the counting
            message = str(record.msg)
        lowered = message.lower()
        from_transport = record.name.startswith("deploy_core.transport")
        if from_transport and " is busy; " in lowered:
            self.busy += 1
        elif from_transport and "refused" in lowered:
            self.refusals += 1
            self.refused_ids.update(_CLIENT_ID.findall(message))
        if "already enrolled" in lowered:
            self.already_enrolled += 1
        if from_transport or record.levelno >= logging.WARNING:
            self.categories[f"{record.levelname} {record.name}: {normalise(message)}"] += 1


def raise_fd_limit() -> None:
    """Each agent holds a UDP socket and a journal; allow as many descriptors as permitted."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def write_stats(
    path: Path,
    agents: list[Agent],
    counter: OutcomeCounter,
    crashed: list[str],
    extra: dict[str, Any],
) -> None:
    """The worker's snapshot, replaced atomically so the parent never reads half of it."""
    snapshot: dict[str, Any] = {
        "pid": os.getpid(),
        "time": time.time(),
        "agents": len(agents),
        "connected": sum(1 for a in agents if a.connector.connected),
        "refusals": counter.refusals,
        "already_enrolled": counter.already_enrolled,
        "refused_ids": sorted(counter.refused_ids),
        "busy": counter.busy,
        "categories": dict(counter.categories.most_common(40)),
        "crashed": crashed,
        **extra,
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(snapshot))
    os.replace(tmp, path)


#: How often a worker's ticker offers the reports due (one event-loop step: one journal
#: transaction per agent for what is due, as a running deployment's step would write).
FLOOD_TICK = 0.02
#: Reports one agent has sent and not yet had acknowledged, at most, with the ``wire``
#: generator (the server stores at most 256 of one connection at once: events.MAX_IN_FLIGHT).
WIRE_WINDOW = 256


async def flood(agents: list[Agent], plan: dict[str, Any]) -> dict[str, Any]:
    """Send ``plan["events"]`` ``deploy.status`` reports from each agent named in
    ``plan["deploys"]`` (client id → a deployment running on it) and wait until the server
    has acknowledged them all.

    ``plan["generator"]``: ``reporter`` (default) writes them through an
    :class:`OutboxReporter` of the agent's journal, as a running deployment does (journaled
    durably, sent by the agent's outbox pump, dropped on the server's ACK); ``wire`` sends the
    same envelopes on the agent's connection without the journal.  ``plan["rate"]``: events/s
    offered by all ``plan["flooders"]`` agents of all workers together, from
    ``plan["start_at"]`` (wall clock) on; 0: all at once."""
    events = int(plan["events"])
    generator = plan.get("generator", "reporter")
    rate = float(plan.get("rate") or 0.0)
    by_id = {agent.config.client_id: agent for agent in agents}
    flooders = [
        (by_id[cid], deploy_id) for cid, deploy_id in plan["deploys"].items() if cid in by_id
    ]
    # Seconds between two reports of one agent (all agents of all workers share the rate).
    every = int(plan.get("flooders") or len(flooders)) / rate if rate else 0.0
    if (wait := float(plan.get("start_at") or 0.0) - time.time()) > 0:
        await asyncio.sleep(wait)
    started = time.time()
    if generator == "wire":
        waits = [_wire(agent, deploy_id, events, every, started) for agent, deploy_id in flooders]
        await asyncio.gather(*waits)
        enqueued = max(_WIRE_OFFERED.values(), default=started)
        unacknowledged = 0
    else:
        reporters = [
            OutboxReporter(
                agent.journal,
                deploy_id=deploy_id,
                command_type="deploy.shell",
                wake=agent.executor.wake,
            )
            for agent, deploy_id in flooders
        ]
        sent = 0
        while sent < events:
            # Reports due by now, for every agent (n * every after the start, n < events).
            due = events if not every else min(events, int((time.time() - started) / every) + 1)
            for n in range(sent, due):
                for reporter in reporters:
                    reporter.report(
                        DeployStatus.SCRIPT_RUNNING, 50, "script_running", f"flood report {n}"
                    )
            sent = due
            if sent < events:
                await asyncio.sleep(FLOOD_TICK)
        enqueued = time.time()
        await asyncio.wrap_future(_barrier([agent for agent, _ in flooders]))
        while time.time() - enqueued < FLOOD_DRAIN_TIMEOUT:
            if not any(agent.journal.outbox_size() for agent, _ in flooders):
                break
            await asyncio.sleep(0.02)
        unacknowledged = sum(agent.journal.outbox_size() for agent, _ in flooders)
    return {
        "agents": len(flooders),
        "events": events * len(flooders),
        "generator": generator,
        "started": started,
        "enqueued": enqueued,
        "drained": time.time(),
        "unacknowledged": unacknowledged,
    }


def _barrier(agents: list[Agent]) -> concurrent.futures.Future[None]:
    """Done once every agent's journal has committed what was written before."""
    done: concurrent.futures.Future[None] = concurrent.futures.Future()
    left = [len(agents)]

    def one(_future: object) -> None:
        left[0] -= 1
        if left[0] == 0:
            done.set_result(None)

    if not agents:
        done.set_result(None)
    for agent in agents:
        agent.journal.barrier().add_done_callback(one)
    return done


# When each wire flooder offered its last report (wall clock), by client id.
_WIRE_OFFERED: dict[str, float] = {}


async def _wire(agent: Agent, deploy_id: str, events: int, every: float, started: float) -> None:
    """The ``wire`` generator for one agent: its reports straight onto its connection (at
    most :data:`WIRE_WINDOW` unacknowledged), the server's ACKs taken before the agent sees
    them (they name nothing in its journal)."""
    connector = agent.connector
    unacked: set[str] = set()
    room = asyncio.Event()
    finished = asyncio.Event()
    acked = [0]
    passed_on = connector._on_message  # the agent's handler (a bench may reach in)

    async def on_message(env: Envelope) -> None:
        refs = env.payload.get("refs") if env.kind is Kind.ACK else None
        refs = refs if isinstance(refs, list) else [env.ref]
        if env.kind in (Kind.ACK, Kind.ERROR) and refs[0] in unacked:
            unacked.difference_update(refs)
            acked[0] += len(refs)
            room.set()
            if acked[0] >= events:
                finished.set()
            return
        await passed_on(env)

    connector._on_message = on_message
    cid = agent.config.client_id
    try:
        for n in range(events):
            if every and (wait := started + n * every - time.time()) > 0:
                await asyncio.sleep(wait)
            while len(unacked) >= WIRE_WINDOW or not connector.connected:
                room.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(room.wait(), 1.0)
            report = DeployStatusReport(
                deploy_id=deploy_id,
                command_type="deploy.shell",
                status=DeployStatus.SCRIPT_RUNNING,
                progress=50,
                stage="script_running",
                message=f"flood report {n}",
                seq=FLOOD_SEQ + n,
            )
            env = Envelope(
                id=f"fl-{uuid.uuid4().hex}",
                kind=Kind.EVENT,
                name=EVENT_STATUS,
                callback_id=deploy_id,
                payload=report.model_dump(mode="json"),
            )
            unacked.add(env.id)
            connector.send(env)
        _WIRE_OFFERED[cid] = time.time()
        await asyncio.wait_for(finished.wait(), FLOOD_DRAIN_TIMEOUT)
    finally:
        connector._on_message = passed_on


def spare_at_first_run(agent: Agent) -> None:
    """The agent makes its first spare shell at its first run, not when it starts."""
    tracker = agent.processes

    def prime(*, now: bool = True) -> None:
        type(tracker).prime(tracker, now=False)

    tracker.prime = prime  # type: ignore[method-assign]


async def run_agents(args: argparse.Namespace, counter: OutcomeCounter) -> None:
    """Start every agent, report until told to stop, then stop them all."""
    host, _, port = args.server.rpartition(":")
    plugins = get_plugins()
    agents = [
        Agent(
            AgentConfig(
                server_host=host,
                server_port=int(port),
                client_id=client_id,
                state_dir=args.root / client_id,
                ca_file=args.ca,
                join_token_file=args.join_token_file,
            ),
            plugins=plugins,
        )
        for client_id in args.ids
    ]
    if args.ack_refs:
        for agent in agents:
            take_ack_refs(agent)
    if args.plain_acks:
        for agent in agents:
            plain_acks(agent)
    if FLEET_SPARES == "first-run":
        for agent in agents:
            spare_at_first_run(agent)
    crashed: list[str] = []

    async def run_one(agent: Agent) -> None:
        try:
            await agent.run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            crashed.append(f"{agent.config.client_id}: {type(exc).__name__}: {exc}")
            logging.getLogger("fleet").exception("agent %s crashed", agent.config.client_id)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.create_task(run_one(agent)) for agent in agents]
    flooding: asyncio.Task[dict[str, Any]] | None = None
    extra: dict[str, Any] = {}
    while not stop.is_set():
        if flooding is None and args.control.exists():
            flooding = asyncio.create_task(flood(agents, json.loads(args.control.read_text())))
        if flooding is not None and flooding.done() and "flood" not in extra:
            try:
                extra["flood"] = flooding.result()
            except Exception as exc:
                extra["flood"] = {"error": f"{type(exc).__name__}: {exc}"}
        write_stats(args.stats, agents, counter, crashed, extra)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), STATS_EVERY)
    log = logging.getLogger("fleet")
    log.info("stopping %d agents", len(agents))
    await asyncio.gather(*(agent.stop() for agent in agents))
    _, pending = await asyncio.wait(tasks, timeout=STOP_TIMEOUT)
    if pending:
        log_unfinished(log)
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=5.0)
    log.info(
        "agents stopped (%d did not within %g s and were cancelled)", len(pending), STOP_TIMEOUT
    )
    write_stats(args.stats, agents, counter, crashed, extra)


def plain_acks(agent: Agent) -> None:
    """Have ``agent`` not announce :data:`CAPABILITY_ACK_REFS`: the server answers each of
    its events with an ACK of its own, as it does for agents older than ``ack_refs``."""
    connector = agent.connector
    announced = connector._capabilities  # a bench may reach in
    connector._capabilities = lambda: {
        k: v for k, v in announced().items() if k != CAPABILITY_ACK_REFS
    }


def take_ack_refs(agent: Agent) -> None:
    """For an agent runtime that does not take :data:`CAPABILITY_ACK_REFS` itself (trees
    before it did, e.g. a ``server_cpu.py --base``): announce it and hand the agent's
    handler an ACK for many events as one ACK per event.  Nothing to do for one that does."""
    if agent.capabilities().get(CAPABILITY_ACK_REFS):
        return
    connector = agent.connector
    announced = connector._capabilities  # a bench may reach in
    handler = connector._on_message
    connector._capabilities = lambda: {**announced(), CAPABILITY_ACK_REFS: True}

    async def on_message(env: Envelope) -> None:
        refs = env.payload.get("refs") if env.kind is Kind.ACK else None
        if not isinstance(refs, list):
            await handler(env)
            return
        for ref in refs:
            await handler(Envelope.model_construct(**{**dict(env), "ref": ref, "payload": {}}))

    connector._on_message = on_message


def log_unfinished(log: logging.Logger, limit: int = 40) -> None:
    """Name the tasks still running (and where they wait) when agents do not stop in time."""
    current = asyncio.current_task()
    for task in [t for t in asyncio.all_tasks() if t is not current][:limit]:
        chain: list[str] = []
        coro: Any = task.get_coro()
        while coro is not None and len(chain) < 12:  # the awaits, outermost first
            frame = getattr(coro, "cr_frame", None)
            if frame is None:
                chain.append(type(coro).__name__)
                break
            chain.append(f"{frame.f_code.co_name}:{frame.f_lineno}")
            coro = getattr(coro, "cr_await", None)
        log.warning("still running at stop: %s: %s", task.get_name(), " -> ".join(chain))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--server", required=True, help="the server's QUIC 127.0.0.1:PORT")
    parser.add_argument("--ca", type=Path, required=True)
    parser.add_argument("--join-token-file", type=Path, required=True)
    parser.add_argument("--root", type=Path, required=True, help="agents' state dirs go here")
    parser.add_argument("--stats", type=Path, required=True)
    parser.add_argument("--log", type=Path, required=True, help="what the agents log")
    parser.add_argument(
        "--control",
        type=Path,
        required=True,
        help='when this file appears: flood {"events": E, "deploys": {client id: deploy id}}',
    )
    parser.add_argument(
        "--ack-refs",
        action="store_true",
        help="for an agent runtime that does not take ack_refs itself (an older tree): "
        "announce it, and hand each agent such an ACK as one ACK per event",
    )
    parser.add_argument(
        "--plain-acks",
        action="store_true",
        help="agents do not announce ack_refs: one ACK per event, as older agents get",
    )
    parser.add_argument("ids", nargs="+")
    args = parser.parse_args()
    raise_fd_limit()
    if hasattr(runtime, "REAP_INTERVAL"):
        runtime.REAP_INTERVAL = FLEET_REAP_INTERVAL
    counter = OutcomeCounter()
    file_handler = logging.FileHandler(args.log)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    root.addHandler(counter)
    root.addHandler(file_handler)
    asyncio.run(run_agents(args, counter))
    logging.getLogger("fleet").info("worker done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
