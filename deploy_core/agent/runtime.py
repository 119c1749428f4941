"""The agent process: connection, command intake, the outbox pump and the worker.

Commands are journaled, then acknowledged, then run one at a time.  Events leave through the
outbox: written first, sent while connected, dropped only when the server acknowledges them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from deploy_core import __version__
from deploy_core.agent import child_watcher
from deploy_core.agent.artifacts import ArtifactFetcher
from deploy_core.agent.constraints import ConstraintPolicy, Constraints
from deploy_core.agent.context import AgentServiceContext
from deploy_core.agent.executor import Executor, NotJournaled
from deploy_core.agent.journal import ACCEPTED, STARTED, Journal, log_failure
from deploy_core.agent.tracking import ENDED, ProcessTracker, RunRecord
from deploy_core.logs import bind
from deploy_core.models import CAPABILITY_LOG_BUDGET, EVENT_STATUS, DeployCommand, DeployStatus
from deploy_core.plugins import DeployPlugins, get_agent_plugins
from deploy_core.private import private_dir
from deploy_core.transport import AgentConnector, Envelope, FileCredentials, Kind, error_for
from deploy_core.transport.envelope import CAPABILITY_ACK_REFS
from deploy_core.transport.files import DEFAULT_CHUNK_SIZE

if TYPE_CHECKING:
    from deploy_core.agent.metrics import AgentMetrics

log = logging.getLogger(__name__)

# Unacknowledged events are sent again after this long, in case the server dropped them.
RESEND_AFTER = 30.0
# Seconds between collections of exited orphans (the agent is their subreaper).
REAP_INTERVAL = 1.0
# Every this many of those, the runs' left services that have exited are forgotten.
SETTLE_EVERY = 10
# Bytes of events sent and not yet acknowledged: past this the pump waits for acks, so the
# control stream never queues more than this ahead of a heartbeat or an ack, and the
# server's inbox holds no more than this of one agent's events.  The server stores each
# event in its own transaction, so the window (with 256 KiB reports) sets how much of a
# flood is in the pipeline: 512 KiB held a 1 GB flood at ~3.8 s, 2 MiB at ~3 s (busy host).
SEND_WINDOW_BYTES = 2 * 1024 * 1024
# Outbox messages read at most per round of the pump.
PUMP_BATCH = 64
# Seconds before the outbox pump tries again after a pass that failed.
PUMP_RETRY = 1.0
# The shortest wait for the resend clock (an event just past its RESEND_AFTER).
PUMP_MIN_WAIT = 0.05
#: Seconds a status report may wait, committed, for what its deployment commits next
#: (another report, its callback) to travel with it: one message and one of the server's
#: transactions for several.  A callback, or any other event, goes at once and takes the
#: waiting reports along.  (A dispatch of ``true``: the three reports and the callback in
#: one packet, not four.)
STATUS_LINGER = 0.010
#: Waiting status reports go at once when this many wait: a flood of reports (a script's
#: output) fills its messages without waiting.
LINGER_MAX_EVENTS = 16
#: How long a graceful stop waits, while connected, for the outbox to be acknowledged.
STOP_FLUSH_WAIT = 2.0
#: Event ids one ACK may name (``payload.refs``, capability ``ack_refs``); the server sends
#: at most 256.  An ACK naming more, or anything but ids, counts for its ``ref`` only.
MAX_ACK_REFS = 1024
MAX_REF_LENGTH = 128


@dataclass
class AgentConfig:
    """How an agent runs."""

    server_host: str
    server_port: int
    client_id: str
    state_dir: Path
    ca_file: Path
    join_token_file: Path | None = None
    server_name: str = "localhost"
    # Further servers (replicas on one database) the agent fails over to, besides
    # server_host:server_port (deploy_core.transport.client).
    more_servers: list[tuple[str, int]] = field(default_factory=list)
    heartbeat_interval: float = 5.0
    idle_timeout: float = 30.0
    services: dict[str, Any] = field(default_factory=dict)
    # Plugins' own agent-side settings by plugin name (the config file's [plugins.NAME]),
    # read by deploy code with DeployContext.plugin_config.
    plugin_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    # What scripts must satisfy and run under (the config file's [constraints]).
    constraints: Constraints = field(default_factory=Constraints)
    # Bytes per artifact chunk (64 KiB-1 MiB); a killed agent receives at most this again.
    chunk_size: int = DEFAULT_CHUNK_SIZE
    # Where script runs' cgroups are made: "auto", "v2", "freezer", "pids" or "off"
    # (see deploy_core.agent.tracking); the environment's DEPLOY_CENTER_PROCESS_TRACKING.
    process_tracking: str = field(
        default_factory=lambda: os.environ.get("DEPLOY_CENTER_PROCESS_TRACKING", "auto")
    )
    # The config file's [agent] labels (deploy_core.labels), sent with the capabilities.
    labels: dict[str, str] = field(default_factory=dict)
    # Where to serve the agent's Prometheus metrics (the config file's [metrics] listen);
    # None serves none (deploy_core.agent.metrics).
    metrics_listen: tuple[str, int] | None = None


class Agent:
    """One agent: run it with :meth:`run` until :meth:`stop`."""

    def __init__(self, config: AgentConfig, plugins: DeployPlugins | None = None) -> None:
        self.config = config
        self.plugins = plugins or get_agent_plugins()
        private_dir(config.state_dir)
        self.journal = Journal(config.state_dir / "journal.db")
        #: Every script run's processes, journaled before they start (cgroup, session).
        self.processes = ProcessTracker.detect(self.journal, config.process_tracking)
        self._wake = asyncio.Event()
        # Commands to run, each with its journal write when that may still be in flight
        # (see _on_command).
        self._queue: asyncio.Queue[tuple[DeployCommand, concurrent.futures.Future[bool] | None]]
        self._queue = asyncio.Queue()
        self._queued: set[str] = set()
        self._sent_upto = 0
        # ACKs of journaled commands, for the pump to send (see _on_command).
        self._acks: list[Envelope] = []
        # While status reports wait (STATUS_LINGER): when they go at the latest (loop time).
        self._linger_until: float | None = None
        # Sent and unacknowledged events: their sizes by message id.
        self._in_flight: dict[str, int] = {}
        # When each of those was sent (time.monotonic()), oldest first.
        self._sent_at: dict[str, float] = {}
        self._stopping = asyncio.Event()
        # The worker starts nothing new until interrupted deployments are dealt with.
        self._recovered = asyncio.Event()
        self.connector = AgentConnector(
            host=config.server_host,
            port=config.server_port,
            ca_file=config.ca_file,
            client_id=config.client_id,
            credentials=FileCredentials(config.state_dir, config.join_token_file),
            capabilities=self.capabilities,
            on_message=self._on_message,
            on_connected=self._on_connected,
            heartbeat_interval=config.heartbeat_interval,
            idle_timeout=config.idle_timeout,
            server_name=config.server_name,
            servers=config.more_servers,
        )
        #: Artifacts by SHA-256 into state_dir/cache, for DeployContext.fetch_artifact.
        self.artifacts = ArtifactFetcher(
            self.connector, config.state_dir / "cache", chunk_size=config.chunk_size
        )
        self.executor = Executor(
            plugins=self.plugins,
            journal=self.journal,
            data_dir=config.state_dir / "data",
            wake=self._wake.set,
            constraints=ConstraintPolicy(config.constraints),
            artifacts=self.artifacts,
            processes=self.processes,
            plugin_settings=config.plugin_settings,
        )
        #: The agent's Prometheus metrics, only when [metrics] asks for them (the library is
        #: imported only then).
        self.metrics: AgentMetrics | None = None
        if config.metrics_listen is not None:
            from deploy_core.agent.metrics import AgentMetrics

            self.metrics = AgentMetrics(
                connected=lambda: self.connector.connected, server=lambda: self.connector.server
            )

    def capabilities(self) -> dict[str, Any]:
        """What this agent tells the server it can do."""
        return {
            "agent_version": __version__,
            CAPABILITY_LOG_BUDGET: True,
            # One ACK for the events the server stored together (payload.refs).
            CAPABILITY_ACK_REFS: True,
            **self.plugins.capabilities(),
            "labels": dict(self.config.labels),
        }

    async def run(self) -> None:
        """Recover what a previous run left, then serve until :meth:`stop`."""
        bind(client_id=self.config.client_id)  # on every log line (deploy_core.logs)
        child_watcher.install()  # Python 3.11: no thread per script run (see the module)
        if self.metrics is not None and self.config.metrics_listen is not None:
            try:
                self.metrics.serve(*self.config.metrics_listen)
            except OSError as exc:  # the agent still deploys; the scrape shows it down
                host, port = self.config.metrics_listen
                log.error("agent metrics not served: cannot listen on %s:%d: %s", host, port, exc)
        self.processes.enable_subreaper()
        # A spare child waits in its cgroup for the next run, from the start: the first run
        # after a start or a long idle time does not pay a cgroup move on its path.
        self.processes.prime(now=True)
        log.info("%s", self.processes.describe())
        tasks = [
            asyncio.create_task(self._reap(), name="reaper"),
            asyncio.create_task(self.connector.run(), name="connector"),
            asyncio.create_task(self._pump(), name="outbox"),
            asyncio.create_task(self._worker(), name="worker"),
        ]
        services: list[asyncio.Task[None]] = []
        for name, service in self.plugins.agent_services.entries.items():
            ctx = AgentServiceContext(
                client_id=self.config.client_id,
                data_dir=self.config.state_dir / "data",
                send_event=self.send_event,
                config=dict(self.config.services.get(name, {})),
            )
            services.append(asyncio.create_task(self._service(name, service.run, ctx)))
        tasks += services
        try:
            try:
                await self._recover()
            finally:
                self._recovered.set()
            await self._stopping.wait()
        finally:
            # Services first, so that none queues an event while the agent leaves; then
            # what the outbox holds has a moment to reach the server (the rest is sent
            # after the next start: it is on disk either way).
            for task in services:
                task.cancel()
            await asyncio.gather(*services, return_exceptions=True)
            await self._flush_outbox(STOP_FLUSH_WAIT)
            await self.connector.stop()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.processes.close()
            self.processes.disable_subreaper()
            self.journal.close()
            if self.metrics is not None:
                self.metrics.close()

    async def _flush_outbox(self, timeout: float) -> None:
        """While connected, wait up to ``timeout`` seconds for the server to acknowledge
        what the outbox holds."""
        deadline = time.monotonic() + timeout
        self._wake.set()
        while self.connector.connected and time.monotonic() < deadline:
            self.journal.flush()  # acknowledgements' deletes do not linger now
            try:
                if not await asyncio.to_thread(self.journal.outbox_size):
                    return
            except Exception:  # a journal that cannot be read is not the stop's concern
                return
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        """Ask :meth:`run` to return."""
        self._stopping.set()

    async def send_event(self, name: str, payload: dict[str, Any]) -> None:
        """Queue an event for the server through the outbox (used by agent services)."""
        await asyncio.to_thread(self.journal.enqueue, f"ev-{uuid.uuid4().hex}", name, payload)
        self._wake.set()

    async def _service(self, name: str, run: Any, ctx: AgentServiceContext) -> None:
        try:
            await run(ctx)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("agent service %s stopped with an error", name)

    async def _reap(self) -> None:
        """Collect orphans the agent adopted as child subreaper, so none stays a zombie; now
        and then, forget the services runs left that have exited since."""
        rounds = 0
        while True:
            await asyncio.sleep(REAP_INTERVAL)
            await asyncio.to_thread(self.processes.reap_orphans)
            rounds += 1
            if rounds % SETTLE_EVERY == 0:
                await asyncio.to_thread(self.processes.settle_left)

    async def _recover(self) -> None:
        # Interrupted deployments: their processes are killed first (Executor.recover).
        for entry in self.journal.in_state(STARTED):
            bind(deploy_id=entry.deploy_id)
            log.warning("deployment %s was interrupted by a restart", entry.deploy_id)
            await self.executor.recover(
                entry.command, entry.stage, entry.rollback_state, entry.progress
            )
        for entry in self.journal.in_state(ACCEPTED):
            self._enqueue(entry.command)
        await asyncio.to_thread(self._forget_ended_runs)

    def _forget_ended_runs(self) -> None:
        """Drop the records (and empty cgroups) of services finished deployments left that
        have exited since; ones still running stay noted, and watched (:meth:`_reap`)."""
        for deploy_id in self.journal.with_runs():
            entry = self.journal.get(deploy_id)
            if entry is None or entry.state == STARTED:
                continue
            for data in self.journal.runs(deploy_id):
                record = RunRecord.from_json(data)
                if self.processes.ended(record):
                    self.processes.forget([record])
                    self.journal.record_run(deploy_id, {**data, "state": ENDED})
                else:
                    self.processes.note_left(deploy_id, record)

    def _enqueue(
        self, command: DeployCommand, accepted: concurrent.futures.Future[bool] | None = None
    ) -> None:
        """Queue a command for the worker; ``accepted``: its journal write, not yet known to
        be committed (the worker runs nothing of it before it is)."""
        if command.deploy_id not in self._queued:
            self._queued.add(command.deploy_id)
            self._queue.put_nowait((command, accepted))

    async def _worker(self) -> None:
        await self._recovered.wait()
        while True:
            command, accepted = await self._queue.get()
            bind(deploy_id=command.deploy_id)
            started = time.monotonic()
            try:
                if time.time() > command.expires_at:
                    if accepted is not None:
                        await self.executor.journaled(command, accepted)
                    status = DeployStatus.TIMEOUT
                    self.executor.refuse(
                        command,
                        status,
                        "the deadline passed before the agent could start the deployment",
                    )
                else:
                    status = await self.executor.run(command, accepted=accepted)
                if self.metrics is not None:
                    self.metrics.finished(command.command_type, status, time.monotonic() - started)
            except NotJournaled as exc:
                log.warning("deployment %s not run: %s", command.deploy_id, exc)
            except Exception:
                log.exception("deployment %s could not be run", command.deploy_id)
            finally:
                self._queued.discard(command.deploy_id)
                bind(deploy_id=None)

    # ------------------------------------------------------------------ messages

    async def _on_connected(self) -> None:
        if self.metrics is not None:
            self.metrics.connects.inc()
        self._sent_upto = 0
        self._in_flight.clear()
        self._sent_at.clear()
        self._wake.set()

    async def _on_message(self, env: Envelope) -> None:
        if env.kind is Kind.COMMAND:
            await self._on_command(env)
        elif env.kind is Kind.ACK:
            refs = _acknowledged(env)
            if refs:
                for ref in refs:
                    self._acked(ref)
                # Not waited for: a lost acknowledgement only makes the event go again.
                what = f"the acknowledgement of {refs[0]}" + (
                    f" and {len(refs) - 1} more" if len(refs) > 1 else ""
                )
                log_failure(self.journal.submit_acks(refs), what)
        elif env.kind is Kind.ERROR:
            if env.ref:
                self._acked(env.ref)
            if env.ref and self.journal.ack(env.ref):
                log.warning("server refused event %s: %s", env.ref, env.payload.get("reason"))
            else:
                log.warning("server error: %s", env.payload.get("reason"))
        else:
            self.connector.send(error_for(env, f"unexpected message kind {env.kind.value!r}"))

    async def _on_command(self, env: Envelope) -> None:
        try:
            command = DeployCommand.model_validate(env.payload)
        except ValidationError as exc:
            self.connector.send(error_for(env, f"malformed command: {exc}"))
            return
        if command.command_type != env.name or env.callback_id != command.deploy_id:
            self.connector.send(error_for(env, "command name or callback id does not match"))
            return
        deploy_id = command.deploy_id
        if deploy_id not in self._queued and not self.journal.known(deploy_id):
            # New: queued for the worker before its journal write is committed, which is
            # held until this step of the loop is over, so that the worker's started mark and
            # first report join its transaction (one fsync before the plugin's code runs,
            # not two in a row).  The worker runs nothing of it before that commit, and the
            # acknowledgement below waits for it too.
            accepted = self.journal.submit_accept(command)
            self._enqueue(command, accepted)
            new = await asyncio.wrap_future(accepted)
            # Sent by the outbox pump, in the turn that sends the deployment's first report
            # (committed with the command): one message, and one of the server's
            # transactions, for both.
            self._acks.append(_ack(env, deploy_id))
            self._wake.set()
        else:  # seen before (sent again): nothing to run, the write confirms it
            new = await asyncio.wrap_future(self.journal.submit_accept(command, at_once=True))
            if new:  # the journal lost it (it is never pruned): run it, as a new one
                self._enqueue(command)
            self.connector.send(_ack(env, deploy_id))
        if new:
            log.info("accepted deployment %s (%s)", deploy_id, command.command_type)

    def _acked(self, msg_id: str) -> None:
        self._sent_at.pop(msg_id, None)
        if self._in_flight.pop(msg_id, None) is not None:
            self._wake.set()

    async def _pump(self) -> None:
        """Send outbox events in order while connected, at most :data:`SEND_WINDOW_BYTES`
        of them unacknowledged at a time.  A pass that fails (the journal could not be read)
        is logged and the next one runs: the outbox is never left without its sender."""
        loop = asyncio.get_running_loop()
        while True:
            wait = self._resend_due()
            if self._linger_until is not None:
                wait = min(wait, max(0.0, self._linger_until - loop.time()))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):  # woken at once, in this task
                    await self._wake.wait()
            self._wake.clear()
            if not self.connector.connected or self._lingering(loop.time()):
                continue
            acks, self._acks = self._acks, []
            for ack in acks:  # before the events: the first is its command's report
                self.connector.send(ack)
            try:
                await self._pump_once()
            except Exception:
                log.exception("outbox: sending failed; trying again in %g s", PUMP_RETRY)
                await asyncio.sleep(PUMP_RETRY)
                self._wake.set()

    def _lingering(self, now: float) -> bool:
        """Whether what is committed and unsent is only status reports that may wait a
        moment longer (:data:`STATUS_LINGER` from when the first of them was seen), for what
        their deployment commits next to go with them."""
        waiting = self.journal.committed(after=self._sent_upto, limit=LINGER_MAX_EVENTS)
        if (
            not waiting  # nothing, or the feed cannot tell (a resend, a reconnection)
            or len(waiting) >= LINGER_MAX_EVENTS
            or any(m.name != EVENT_STATUS for m in waiting)
        ):
            self._linger_until = None
            return False
        if self._linger_until is None:
            self._linger_until = now + STATUS_LINGER
        if now < self._linger_until:
            return True
        self._linger_until = None
        return False

    def _resend_due(self) -> float:
        """Seconds until the oldest unacknowledged event is due to go again (at most
        :data:`RESEND_AFTER`).  Everything else that gives the pump work wakes it (a
        commit to the outbox, an acknowledgement, a connection): an idle agent's pump
        does not poll its journal.  Polling it every second cost a fleet of 500 agents in
        one process most of that process's idle CPU (bench/fleet.py's workers)."""
        oldest = next(iter(self._sent_at.values()), None)
        if oldest is None or not self.connector.connected:  # a connection wakes it
            return RESEND_AFTER
        return max(PUMP_MIN_WAIT, oldest + RESEND_AFTER - time.monotonic())

    async def _pump_once(self) -> None:
        """One pass of :meth:`_pump`: send what the window allows."""
        oldest = next(iter(self._sent_at.values()), None)
        if oldest is not None and time.monotonic() - oldest > RESEND_AFTER:
            # Unacknowledged for RESEND_AFTER: everything not acknowledged goes again
            # (not every RESEND_AFTER whatever was sent a moment ago).
            self._sent_at.clear()
            self._sent_upto = 0
            self._in_flight.clear()
        while self.connector.connected and self._window_open():
            # What was just committed comes from the journal's in-memory feed; the database
            # is read only when the feed cannot tell (after a reconnection or a resend).
            # That read is on a worker thread: on the event loop, the same few rows made the
            # dispatch of `true` slower (p50 1.14x in bench/dispatch.py --against): the
            # loop gave up the GIL for SQLite and waited to get it back.
            batch = self.journal.committed(after=self._sent_upto, limit=PUMP_BATCH)
            if batch is None:
                batch = await asyncio.to_thread(
                    self.journal.pending, after=self._sent_upto, limit=PUMP_BATCH
                )
            if not batch:
                break
            for msg in batch:
                try:
                    env = Envelope(
                        id=msg.msg_id,
                        kind=Kind.EVENT,
                        name=msg.name,
                        callback_id=msg.deploy_id,
                        payload=msg.payload,
                    )
                except ValidationError as exc:
                    # No server would take it, now or later: dropped, not left to stop
                    # every event behind it.
                    log.error("outbox: event %s (%r) cannot be sent, dropped: %s",
                              msg.msg_id, msg.name, exc)  # fmt: skip
                    await asyncio.to_thread(self.journal.ack, msg.msg_id)
                    self._sent_upto = msg.seq
                    continue
                if not self._window_open() or not self.connector.send(env):
                    break
                self._in_flight[msg.msg_id] = msg.size
                self._sent_at.setdefault(msg.msg_id, time.monotonic())
                self._sent_upto = msg.seq
            if len(batch) < PUMP_BATCH:
                # All that was committed: what commits later wakes the pump again.
                break
            await asyncio.sleep(0)

    def _window_open(self) -> bool:
        # One event always goes, however large, so nothing waits forever.
        return not self._in_flight or sum(self._in_flight.values()) < SEND_WINDOW_BYTES


def _ack(command: Envelope, deploy_id: str) -> Envelope:
    """The ACK of a command: it is journaled."""
    return Envelope(
        kind=Kind.ACK, ref=command.id, name=command.name, payload={"deploy_id": deploy_id}
    )


def _acknowledged(env: Envelope) -> list[str]:
    """The ids of the events an ACK acknowledges: its ``payload.refs`` (an ACK for many,
    capability ``ack_refs``), else its ``ref``.  ``refs`` that are not a list of ids (at most
    :data:`MAX_ACK_REFS`, each a string of at most :data:`MAX_REF_LENGTH`) are logged and
    only ``ref`` counts: nothing the server did not name leaves the outbox."""
    refs = env.payload.get("refs")
    if refs is None:
        return [env.ref] if env.ref else []
    if (
        isinstance(refs, list)
        and 0 < len(refs) <= MAX_ACK_REFS
        and all(isinstance(r, str) and 0 < len(r) <= MAX_REF_LENGTH for r in refs)
    ):
        return list(dict.fromkeys(refs))
    log.warning("an acknowledgement's refs are not a list of event ids; only its ref counts")
    return [env.ref] if env.ref else []
