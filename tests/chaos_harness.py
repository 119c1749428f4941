"""Chaos on loopback: deploy through real agents while killing them, cutting their QUIC
traffic and restarting the server, then check the outcome against a history kept by the test
(issue 6, DESIGN §3 and §5).

- :class:`~udp_relay.UdpRelay` (``tests/udp_relay.py``) stands between one agent and the
  server on 127.0.0.1, to cut its traffic or make it come from a new port.
- With ``replicas=2`` (issue 15) two ``deployctl server`` replicas share one PostgreSQL
  database: every agent is given both (through a relay each), deployments are POSTed and
  followed through either replica at random, and instead of restarting the one server the
  chaos thread ``kill -9``s one replica and restarts it (at most ``replica_kills`` times).
- :class:`ChaosRun` runs the whole thing; :func:`find_violations` is the verdict, a pure
  function of the :class:`Evidence` gathered after the run, so it can be tested on its own.

Used by ``tests/e2e/test_chaos.py`` (the CI size) and ``bench/chaos.py`` (the long run); it
lives under ``tests/``, not in the installed package, which plugin authors get.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import random
import re
import shutil
import signal
import sqlite3
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from udp_relay import UdpRelay

from deploy_core.client import ApiError, DeployClient
from deploy_core.testing import DeployCenter

# --------------------------------------------------------------------------- the run

FAULTS = ("agent_kill", "drop_short", "drop_long", "relay_reset", "server_restart")
# With two replicas the server restart becomes a kill -9 of one replica, then its restart.
REPLICA_FAULTS = (*FAULTS[:-1], "replica_kill")
_WEIGHTS = (4, 3, 1, 1, 2)
# What a replica keeps for itself: the copy of the first's state directory leaves them out.
OWN_FILES = {"server.id", "server.json"}
# What the agent logs when its heartbeats go unanswered (transport/client.py).
HEARTBEAT_LOSS = "no frame from the server for"
# What it logs when a restarted server resets its old connection (transport/stateless_reset).
RESET_LOSS = "connection closed: stateless reset"
NEVER_STARTED = "never started"
TERMINAL_GRACE = 60.0  # DESIGN §3 / issue 6: terminal within deadline + 60 s


@dataclass(frozen=True)
class ChaosConfig:
    """How big and how rough a chaos run is."""

    deployments: int = 200
    agents: int = 4
    seed: int = field(default_factory=lambda: random.SystemRandom().randrange(1 << 31))
    deadline: float = 15.0  # per request: the server gives up on the deployment after this
    script_timeout: float = 10.0
    max_sleep: float = 0.3  # each script sleeps 0 … max_sleep seconds
    failure_rate: float = 0.2  # share of scripts that exit non-zero
    fault_interval: tuple[float, float] = (1.0, 4.0)
    min_faults: int = 20  # keep deploying until this many faults were done
    short_drop: tuple[float, float] = (1.0, 4.0)
    # Past the agent's loss detection (3 heartbeats of 5 s, checked every 5 s), so it must
    # notice and reconnect.
    long_drop: tuple[float, float] = (21.0, 25.0)
    time_limit: float | None = None  # for submitting; default 120 s + 0.6 s per deployment
    # 1: one server (SQLite), restarted; 2: two replicas on PostgreSQL, one killed at a time.
    replicas: int = 1
    replica_kills: int = 4  # at most this many kill -9s of a replica in a run (replicas=2)
    replica_down: tuple[float, float] = (0.0, 5.0)  # seconds a killed replica stays down

    def __post_init__(self) -> None:
        if self.deployments < 1 or self.agents < 1:
            raise ValueError("a chaos run needs at least one deployment and one agent")
        if self.replicas not in (1, 2):
            raise ValueError(f"replicas must be 1 or 2, got {self.replicas}")
        if self.replica_kills < 1:
            raise ValueError(f"replica_kills must be at least 1, got {self.replica_kills}")
        if not 0 <= self.failure_rate <= 1:
            raise ValueError(f"failure_rate must be within 0..1, got {self.failure_rate}")
        if not 0 <= self.max_sleep < self.script_timeout:
            raise ValueError(
                f"max_sleep must be within 0..script_timeout, got {self.max_sleep} "
                f"(script_timeout {self.script_timeout})"
            )

    @property
    def kinds(self) -> tuple[str, ...]:
        """The faults of this run."""
        return FAULTS if self.replicas == 1 else REPLICA_FAULTS

    @property
    def run_limit(self) -> float:
        """Seconds the run may spend submitting and following deployments."""
        return self.time_limit or 120.0 + 0.6 * self.deployments


@dataclass
class Deployment:
    """One deployment as the run saw it."""

    deploy_id: str
    client_id: str
    exit_code: int | None  # what the script was told to exit with; None when unknown
    submitted_at: float
    adopted: bool = False  # its submission's answer was lost; found holding the lock
    gave_up: bool = False  # not finished when the run stopped following it


@dataclass(frozen=True)
class JournalRow:
    """One row of an agent's ``deployments`` journal table."""

    deploy_id: str
    state: str
    final_status: str | None
    report_seq: int
    started: bool


@dataclass
class Evidence:
    """Everything gathered after a run, for :func:`find_violations`."""

    history: dict[str, Deployment]
    records: dict[str, dict[str, Any]]  # the API's final record of each deployment
    histories: dict[str, list[dict[str, Any]]]  # the API's status history of each
    ran: dict[str, Counter[str]]  # per client: deploy_id -> lines its scripts appended
    journals: dict[str, list[JournalRow]]
    outboxes: dict[str, int]  # per client: events its agent still waits to have acknowledged
    busy: dict[str, str | None]  # per client: busy_with as GET /api/clients/{id} shows it
    locks: list[tuple[str, str]]  # rows left in client_locks: (client_id, deploy_id)


def _ts(iso: str | None) -> float | None:
    return dt.datetime.fromisoformat(iso).timestamp() if iso else None


def time_to_terminal(record: dict[str, Any]) -> float | None:
    """Seconds from the record's creation to its end, by the server's clock."""
    created, finished = _ts(record["created_at"]), _ts(record["finished_at"])
    return None if created is None or finished is None else finished - created


def find_violations(ev: Evidence) -> list[str]:
    """What went wrong, one sentence each; empty when nothing did."""
    out: list[str] = []
    for dep in ev.history.values():
        rec = ev.records.get(dep.deploy_id)
        if rec is None:
            out.append(f"{dep.deploy_id} ({dep.client_id}): the server has no record of it")
            continue
        took = time_to_terminal(rec)
        limit = rec["request"]["deadline_seconds"] + TERMINAL_GRACE
        if took is None:
            out.append(f"{dep.deploy_id}: never reached a terminal state (still {rec['status']})")
        elif took > limit:
            out.append(f"{dep.deploy_id}: terminal after {took:.1f} s, past deadline + 60 s")
        ran = ev.ran.get(dep.client_id, Counter())[dep.deploy_id]
        if ran and rec["status"] == "timeout" and NEVER_STARTED in (rec["error"] or ""):
            out.append(f"{dep.deploy_id}: its script ran, yet the server says {rec['error']!r}")
        if rec["status"] == "success" and not ran:
            out.append(f"{dep.deploy_id}: success, but its script never ran")
        if rec["status"] == "success" and dep.exit_code not in (0, None):
            out.append(f"{dep.deploy_id}: success, but its script exits {dep.exit_code}")
        code = (rec["result"] or {}).get("exit_code")
        if code is not None and dep.exit_code is not None and code != dep.exit_code:
            out.append(
                f"{dep.deploy_id}: exit code {code} recorded, the script exits {dep.exit_code}"
            )
    for client_id, lines in ev.ran.items():
        for deploy_id, count in lines.items():
            owner = ev.history.get(deploy_id)
            if count > 1:
                out.append(f"{deploy_id}: its script ran {count} times on {client_id}")
            if owner is None or owner.client_id != client_id:
                out.append(f"{deploy_id}: a script ran on {client_id} for no deployment of it")
    for client_id, rows in ev.journals.items():
        out += _journal_violations(ev, client_id, rows)
    for client_id, holder in ev.busy.items():
        if holder is not None:
            out.append(f"{client_id}: still busy with {holder} after every deployment ended")
    out += [f"client_locks still holds {c} for {d}" for c, d in ev.locks]
    return out


def _journal_violations(ev: Evidence, client_id: str, rows: list[JournalRow]) -> list[str]:
    out: list[str] = []
    if ev.outboxes.get(client_id):
        out.append(f"{client_id}: {ev.outboxes[client_id]} events never acknowledged (outbox)")
    journaled = {row.deploy_id: row for row in rows}
    for deploy_id in ev.ran.get(client_id, Counter()):
        row = journaled.get(deploy_id)
        if row is None or not row.started:
            out.append(f"{deploy_id}: its script ran on {client_id}, not journaled as started")
    for row in rows:
        rec = ev.records.get(row.deploy_id)
        if rec is None:
            out.append(f"{row.deploy_id}: journaled by {client_id}, unknown to the server")
            continue
        if row.state != "finished":
            out.append(f"{row.deploy_id}: left {row.state} in the journal of {client_id}")
            continue
        if row.final_status not in (rec["status"], rec["agent_status"]):
            out.append(
                f"{row.deploy_id}: the agent finished it {row.final_status}, the server shows "
                f"status {rec['status']} / agent_status {rec['agent_status']}"
            )
        history = ev.histories.get(row.deploy_id, [])
        reports = sorted(
            (h["seq"], h["progress"])
            for h in history
            if h["source"] == "agent" and h["seq"] is not None
        )
        seqs = [seq for seq, _ in reports]
        if seqs != list(range(row.report_seq + 1)):
            out.append(
                f"{row.deploy_id}: the agent sent reports 0..{row.report_seq}, the server's "
                f"history has {seqs}"
            )
        progress = [p for _, p in reports]
        if progress != sorted(progress):
            # DESIGN §5: a record only moves forward; its progress follows these reports.
            out.append(f"{row.deploy_id}: the agent's reports move progress back: {progress}")
        if not any(
            h["source"] == "agent" and h["seq"] is None and h["status"] == row.final_status
            for h in history
        ):
            out.append(
                f"{row.deploy_id}: the agent's {row.final_status} callback is not in "
                "the server's history"
            )
    return out


def read_journal(path: Path) -> tuple[list[JournalRow], int]:
    """An agent journal's deployments and the size of its outbox (read-only)."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        rows = [
            JournalRow(r[0], r[1], r[2], r[3], r[4] is not None)
            for r in db.execute(
                "SELECT deploy_id, state, final_status, report_seq, started_at FROM deployments"
            )
        ]
        (outbox,) = db.execute("SELECT count(*) FROM outbox").fetchone()
    return rows, int(outbox)


def percentile(values: list[float], pct: float) -> float:
    """The ``pct`` percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered)) - 1))]


@dataclass
class ChaosReport:
    """What a run did, what it found, and its figures."""

    config: ChaosConfig
    evidence: Evidence
    faults: Counter[str]
    heartbeat_losses: int
    wall: float
    violations: list[str]
    # With two replicas: deployments created through each replica's API (by index).
    posted_to: Counter[int] = field(default_factory=Counter)
    # Lost connections the agents learnt of from a restarted server's stateless reset.
    reset_losses: int = 0

    def figures(self) -> str:
        """The run in a few lines."""
        ev = self.evidence
        records = [ev.records[d] for d in ev.history if d in ev.records]
        ends = [
            (t, r["request"]["deadline_seconds"])
            for r in records
            if (t := time_to_terminal(r)) is not None
        ]
        took = [t for t, _ in ends]
        within = sum(1 for t, deadline in ends if t <= deadline)
        in_grace = sum(1 for t, deadline in ends if t <= deadline + TERMINAL_GRACE)
        statuses = Counter(r["status"] for r in records)
        late = sum(1 for r in records if r["agent_status"] not in (None, r["status"]))
        ran = sum(len(lines) for lines in ev.ran.values())
        faults = ", ".join(f"{k} {self.faults[k]}" for k in self.config.kinds)
        lines = [
            f"seed {self.config.seed}: {len(ev.history)} deployments over "
            f"{self.config.agents} agents in {self.wall:.0f} s "
            f"({sum(d.adopted for d in ev.history.values())} found holding the lock after a "
            "lost answer)",
            f"faults: {faults}; losses detected by agents: {self.heartbeat_losses} by missed "
            f"heartbeats, {self.reset_losses} by stateless resets",
            *(
                [f"created through replica A {self.posted_to[0]}, B {self.posted_to[1]}"]
                if self.config.replicas == 2
                else []
            ),
            f"terminal: {len(took)}/{len(ev.history)}; within the deadline {within}, within "
            f"deadline + 60 s {in_grace}",
        ]
        if took:
            lines.append(
                f"time to terminal: p50 {percentile(took, 50):.2f} s, p99 "
                f"{percentile(took, 99):.2f} s, max {max(took):.2f} s, "
                f"mean {statistics.mean(took):.2f} s"
            )
        lines += [
            "final status: " + ", ".join(f"{s} {n}" for s, n in statuses.most_common()),
            f"scripts run: {ran}; late agent callbacks kept as agent_status: {late}",
            f"violations: {len(self.violations)}",
        ]
        return "\n".join(lines)

    def failure_message(self, violations: list[str] | None = None, limit: int = 40) -> str:
        """The figures and the first ``limit`` violations (by default all the run found),
        with the seed to replay."""
        violations = self.violations if violations is None else violations
        shown = "\n".join(f"  - {v}" for v in violations[:limit])
        more = len(violations) - limit
        return (
            f"chaos run with seed {self.config.seed} (replay: DEPLOY_CENTER_CHAOS_SEED="
            f"{self.config.seed}) found {len(violations)} violations:\n{shown}"
            + (f"\n  … and {more} more" if more > 0 else "")
            + f"\n{self.figures()}"
        )


class FailoverApi:
    """The API of several replicas as one :class:`DeployClient`: each call goes to a replica
    picked at random and, while one does not answer (status 0: killed or restarting), to the
    next; the last replica's error is raised when none answers."""

    _count_lock = threading.Lock()  # the workers' FailoverApis share one ``answered``

    def __init__(
        self,
        clients: list[DeployClient],
        rng: random.Random,
        answered: Counter[int] | None = None,
    ) -> None:
        self.clients = clients
        self.rng = rng
        # Deployments created, by the index of the replica whose API answered the POST.
        self.answered: Counter[int] = Counter() if answered is None else answered

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        first = self.rng.randrange(len(self.clients))
        error: ApiError | None = None
        for k in range(len(self.clients)):
            client = self.clients[(first + k) % len(self.clients)]
            try:
                return getattr(client, name)(*args, **kwargs)
            except ApiError as exc:
                if exc.status != 0:
                    raise
                error = exc
        assert error is not None
        raise error

    def deploy(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        first = self.rng.randrange(len(self.clients))
        error: ApiError | None = None
        for k in range(len(self.clients)):
            index = (first + k) % len(self.clients)
            try:
                result: dict[str, Any] = self.clients[index].deploy(kind, body)
            except ApiError as exc:
                if exc.status != 0:
                    raise
                error = exc
                continue
            with self._count_lock:
                self.answered[index] += 1
            return result
        assert error is not None
        raise error

    def get(self, deploy_id: str, **kwargs: Any) -> dict[str, Any]:
        result: dict[str, Any] = self._call("get", deploy_id, **kwargs)
        return result

    def history(self, deploy_id: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("history", deploy_id)
        return result

    def list(self, client_id: str, **kwargs: Any) -> dict[str, Any]:
        result: dict[str, Any] = self._call("list", client_id, **kwargs)
        return result

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._call("request", method, path, **kwargs)

    def __enter__(self) -> FailoverApi:
        return self

    def __exit__(self, *exc: object) -> None:
        for client in self.clients:
            client.close()


@contextlib.contextmanager
def postgres_schema(url: str) -> Iterator[str]:
    """A fresh schema in the PostgreSQL database at ``url`` (dropped on exit): its URL."""
    import uuid

    import sqlalchemy as sa

    engine = sa.create_engine(url, connect_args={"connect_timeout": 5})
    schema = f"chaos_{uuid.uuid4().hex[:12]}"
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        sep = "&" if "?" in url else "?"
        yield f"{url}{sep}options=-csearch_path%3D{schema}"
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        engine.dispose()


class ChaosRun:
    """Deploy through ``config.agents`` real agents, each behind a :class:`UdpRelay` (one per
    replica), while a chaos thread hurts them; then gather the :class:`Evidence` and judge it.

    ``db_url``: the database (PostgreSQL) the replicas share; needed with ``replicas=2``.
    The first replica's :class:`DeployCenter` also runs the agents (their state directories
    and logs are under ``root``)."""

    def __init__(self, root: Path, config: ChaosConfig, db_url: str | None = None) -> None:
        if config.replicas == 2 and not (db_url or "").startswith("postgresql"):
            raise ValueError("a chaos run with two replicas needs a PostgreSQL db_url")
        self.root = root
        self.config = config
        self.center = DeployCenter(root, db_url=db_url)
        self.centers = [self.center]
        if config.replicas == 2:
            self.centers.append(DeployCenter(root.with_name(root.name + "-b"), db_url=db_url))
        self.db_url = db_url
        self.client_ids = [f"chaos-{i + 1}" for i in range(config.agents)]
        self.relays: dict[str, list[UdpRelay]] = {}
        self.posted_to: Counter[int] = Counter()  # deployments created through each replica
        self.history: dict[str, Deployment] = {}
        self.faults: Counter[str] = Counter()
        self.problems: list[str] = []  # what the run itself ran into (API errors, …)
        self._lock = threading.Lock()
        self._tickets = 0
        self._done = threading.Event()
        self._started = 0.0

    # ------------------------------------------------------------------ running

    def run(self) -> ChaosReport:
        """The whole run, start to verdict; every process is stopped on return."""
        self._started = time.monotonic()
        try:
            self._start_replicas()
            for client_id in self.client_ids:
                self.relays[client_id] = [UdpRelay(c.quic_port).start() for c in self.centers]
                self._start_agent(client_id, wait=True)
            workers = [
                threading.Thread(target=self._worker, args=(c,), name=f"deployer-{c}")
                for c in self.client_ids
            ]
            chaos = threading.Thread(target=self._chaos, name="chaos")
            for thread in (*workers, chaos):
                thread.start()
            for thread in workers:
                thread.join(self.config.run_limit + self.config.deadline + 120)
            self._done.set()
            chaos.join(120)
            evidence = self._settle_and_gather()
            texts = [self.center.log(f"agent-{c}") for c in self.client_ids]
            losses = sum(text.count(HEARTBEAT_LOSS) for text in texts)
            resets = sum(text.count(RESET_LOSS) for text in texts)
        except Exception as exc:
            raise RuntimeError(
                f"chaos run with seed {self.config.seed} broke off ({self.root}): {exc}"
            ) from exc
        finally:
            self._done.set()
            for center in self.centers:
                center.close()
            for relays in self.relays.values():
                for relay in relays:
                    relay.close()
        return ChaosReport(
            config=self.config,
            evidence=evidence,
            faults=self.faults,
            heartbeat_losses=losses,
            reset_losses=resets,
            wall=time.monotonic() - self._started,
            violations=self.problems + find_violations(evidence),
            posted_to=self.posted_to,
        )

    def _start_replicas(self) -> None:
        """The server, or both replicas with one identity: the second's state directory is a
        copy of the first's without what a replica keeps for itself."""
        if len(self.centers) == 2:
            self.center.start_server()
            self.center.stop_server()
            other = self.centers[1]
            shutil.copytree(
                self.center.server_dir,
                other.server_dir,
                ignore=lambda _dir, names: OWN_FILES & set(names),
            )
        for center in self.centers:
            center.start_server()

    def _start_agent(self, client_id: str, *, wait: bool = False) -> None:
        relays = self.relays[client_id]
        if len(relays) == 1:
            self.center.start_agent(client_id, server_port=relays[0].port, wait=wait)
            return
        # Every other agent lists the replicas the other way round, so that, wherever an
        # agent's client id makes it start in its list, the agents do not all start on one.
        index = self.client_ids.index(client_id)
        ordered = relays if index % 2 == 0 else relays[::-1]
        args = ["agent", "--client-id", client_id]
        for relay in ordered:
            args += ["--server", f"127.0.0.1:{relay.port}"]
        args += [
            "--state-dir",
            str(self.root / f"agent-{client_id}"),
            "--ca",
            str(self.center.server_dir / "ca.pem"),
            "--join-token-file",
            str(self.center.server_dir / "join.token"),
        ]
        self.center.agents[client_id] = self.center._spawn(args, f"agent-{client_id}.log")
        if wait:
            self._wait_connected(client_id, 60)

    def _running(self) -> list[DeployCenter]:
        return [c for c in self.centers if c.server_proc and c.server_proc.poll() is None]

    def _wait_connected(self, client_id: str, timeout: float) -> None:
        """Until a running replica shows the agent connected to it."""
        if len(self.centers) == 1:
            self.center.wait_connected(client_id, timeout=timeout)
            return
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for center in self._running():
                with contextlib.suppress(Exception):
                    if any(
                        c["client_id"] == client_id and c["connected_here"]
                        for c in center.api.clients()
                    ):
                        return
            time.sleep(0.2)
        raise TimeoutError(
            f"{client_id} not connected to a replica after {timeout}s: "
            f"{self.center.log('agent-' + client_id)[-3000:]}"
        )

    def _elapsed(self) -> float:
        return time.monotonic() - self._started

    def _take_ticket(self) -> bool:
        """Whether to start one more deployment: until there are enough, ``min_faults`` were
        done and every kind of fault has happened, within the time limit."""
        with self._lock:
            if self._elapsed() > self.config.run_limit:
                return False
            enough_faults = sum(self.faults.values()) >= self.config.min_faults
            if (
                self._tickets >= self.config.deployments
                and enough_faults
                and all(self.faults[k] for k in self.config.kinds)
            ):
                return False
            self._tickets += 1
            return True

    def _problem(self, text: str) -> None:
        with self._lock:
            self.problems.append(text)

    def _api(self) -> Any:
        """A :class:`DeployClient`, or with two replicas a :class:`FailoverApi` on both."""
        token = (self.center.server_dir / "admin.token").read_text().strip()
        clients = [
            DeployClient(f"http://127.0.0.1:{c.api_port}", token, timeout=10) for c in self.centers
        ]
        if len(clients) == 1:
            return clients[0]
        rng = random.Random(f"{self.config.seed}/api/{self._elapsed()}")
        return FailoverApi(clients, rng, self.posted_to)

    def _worker(self, client_id: str) -> None:
        rng = random.Random(f"{self.config.seed}/{client_id}")
        marks = self.root / f"ran-{client_id}.txt"
        with self._api() as api:
            while self._take_ticket():
                failing = rng.random() < self.config.failure_rate
                exit_code = rng.choice((1, 2, 3, 7)) if failing else 0
                script = (
                    f'echo "$DEPLOY_ID" >> {marks}; '
                    f"sleep {rng.uniform(0, self.config.max_sleep):.2f}; exit {exit_code}"
                )
                dep = self._submit(api, client_id, script, exit_code)
                if dep is None or not self._follow(api, dep):
                    return

    def _submit(self, api: Any, client_id: str, script: str, exit_code: int) -> Deployment | None:
        body = {
            "client_id": client_id,
            "script": script,
            "timeout": self.config.script_timeout,
            "deadline": self.config.deadline,
        }
        end = time.monotonic() + self.config.deadline + TERMINAL_GRACE + 60
        while time.monotonic() < end:
            try:
                deploy_id = api.deploy("shell", body)["deploy_id"]
            except ApiError as exc:
                detail = exc.body.get("detail") if isinstance(exc.body, dict) else None
                holder = detail.get("busy_with") if isinstance(detail, dict) else None
                if exc.status == 409 and holder:
                    # The answer to an earlier attempt was lost with the server: the
                    # deployment exists and holds the lock.  It is ours; follow it.
                    adopted = self._adopt(api, client_id, holder)
                    if adopted is None:
                        time.sleep(0.2)
                    elif not self._follow(api, adopted):
                        return None
                elif exc.status == 0:
                    time.sleep(0.2)  # the server is down (restarting)
                else:
                    self._problem(f"deploy to {client_id} refused: {exc}")
                    time.sleep(0.5)
                continue
            dep = Deployment(deploy_id, client_id, exit_code, time.time())
            with self._lock:
                self.history[deploy_id] = dep
            return dep
        self._problem(f"{client_id}: could not submit a deployment for {end:.0f} s")
        return None

    def _adopt(self, api: Any, client_id: str, deploy_id: str) -> Deployment | None:
        with self._lock:
            known = self.history.get(deploy_id)
        if known is not None:
            if not known.gave_up:
                self._problem(f"{deploy_id}: holds the lock of {client_id} after it finished")
            return known
        try:
            record = api.get(deploy_id)
        except ApiError:
            return None  # asked again at the next attempt
        dep = Deployment(
            deploy_id,
            client_id,
            _planned_exit(record["request"]["params"]["script"]),
            _ts(record["created_at"]) or time.time(),
            adopted=True,
        )
        with self._lock:
            self.history.setdefault(deploy_id, dep)
        return dep

    def _follow(self, api: Any, dep: Deployment) -> bool:
        """Wait for the deployment's end (bounded); whether it ended."""
        end = dep.submitted_at + self.config.deadline + TERMINAL_GRACE + 15
        while (left := end - time.time()) > 0:
            try:
                if api.get(dep.deploy_id, wait=min(5.0, max(0.1, left)))["finished"]:
                    return True
            except ApiError as exc:
                if exc.status != 0:
                    self._problem(f"{dep.deploy_id}: GET answered {exc}")
                time.sleep(0.2)
        dep.gave_up = True
        return False

    def _chaos(self) -> None:
        rng = random.Random(self.config.seed)
        kinds = self.config.kinds
        first = list(kinds)
        rng.shuffle(first)  # every kind early on, then at random
        while not self._done.wait(rng.uniform(*self.config.fault_interval)):
            kind = first.pop() if first else rng.choices(kinds, _WEIGHTS)[0]
            if kind == "replica_kill" and self.faults[kind] >= self.config.replica_kills:
                kind = "agent_kill"  # the replica kills are bounded; the rest is not
            client_id = rng.choice(self.client_ids)
            try:
                self._fault(kind, client_id, rng)
            except Exception as exc:
                self._problem(f"chaos {kind} on {client_id} failed: {type(exc).__name__}: {exc}")
                return
            with self._lock:
                self.faults[kind] += 1

    def _fault(self, kind: str, client_id: str, rng: random.Random) -> None:
        relays = self.relays[client_id]  # a drop cuts the agent off from every replica
        if kind == "agent_kill":
            self.center.stop_agent(client_id, signal.SIGKILL)
            time.sleep(rng.uniform(0, 1.5))
            self._start_agent(client_id)
        elif kind in ("drop_short", "drop_long"):
            seconds = rng.uniform(
                *(self.config.short_drop if kind == "drop_short" else self.config.long_drop)
            )
            for relay in relays:
                relay.blackhole(seconds)
        elif kind == "relay_reset":
            for relay in relays:
                relay.reset()
        elif kind == "server_restart":
            self.center.stop_server(signal.SIGKILL)
            time.sleep(rng.uniform(0, 2))
            self.center.start_server()
        elif kind == "replica_kill":
            victim = rng.choice(self.centers)
            victim.stop_server(signal.SIGKILL)
            time.sleep(rng.uniform(*self.config.replica_down))
            victim.start_server()
        else:
            raise ValueError(f"unknown fault {kind!r}")

    # ------------------------------------------------------------------ after the run

    def _settle_and_gather(self) -> Evidence:
        """Heal everything, let the agents flush their outboxes, then read what the server
        and the journals say."""
        for center in self.centers:
            if center.server_proc is None or center.server_proc.poll() is not None:
                center.start_server()
        for client_id in self.client_ids:
            for relay in self.relays[client_id]:
                relay.blackhole(0)
            proc = self.center.agents.get(client_id)
            if proc is None or proc.poll() is not None:
                self._start_agent(client_id)
        for client_id in self.client_ids:
            # A long drop may have pushed the agent's reconnect back-off up to 30 s.
            self._wait_connected(client_id, timeout=90)
        journals = {c: self.root / f"agent-{c}" / "journal.db" for c in self.client_ids}
        end = time.monotonic() + 120  # the agents resend unacknowledged events every 30 s
        while time.monotonic() < end and any(read_journal(j)[1] for j in journals.values()):
            time.sleep(0.5)
        # Graceful stops: the journals are read as the agents left them.
        for client_id in self.client_ids:
            self.center.stop_agent(client_id)
        with self._api() as api:
            for client_id in self.client_ids:
                self._adopt_the_unknown(api, client_id)
            records = {d: api.get(d) for d in self.history}
            histories = {d: api.history(d) for d in self.history}
            busy = {
                c: api.request("GET", f"/api/clients/{c}")["busy_with"] for c in self.client_ids
            }
        locks = self._locks_left()
        read = {c: read_journal(j) for c, j in journals.items()}
        return Evidence(
            history=dict(self.history),
            records=records,
            histories=histories,
            ran={c: _lines(self.root / f"ran-{c}.txt") for c in self.client_ids},
            journals={c: rows for c, (rows, _) in read.items()},
            outboxes={c: size for c, (_, size) in read.items()},
            busy=busy,
            locks=locks,
        )

    def _locks_left(self) -> list[tuple[str, str]]:
        """The rows of ``client_locks``: none should be left once every deployment ended."""
        query = "SELECT client_id, deploy_id FROM client_locks"
        if self.db_url is None:
            db_file = self.center.server_dir / "deploy-center.db"
            with contextlib.closing(sqlite3.connect(f"file:{db_file}?mode=ro", uri=True)) as db:
                return [(r[0], r[1]) for r in db.execute(query)]
        import sqlalchemy as sa

        engine = sa.create_engine(self.db_url)
        try:
            with engine.connect() as conn:
                return [(r[0], r[1]) for r in conn.execute(sa.text(query))]
        finally:
            engine.dispose()

    def _adopt_the_unknown(self, api: Any, client_id: str) -> None:
        """Deployments the server made from a request whose answer was lost and that
        finished before anyone asked again: they are part of the history too."""
        offset = 0
        while True:
            page = api.list(client_id, limit=500, offset=offset)
            for record in page["items"]:
                if record["deploy_id"] not in self.history:
                    self._adopt(api, client_id, record["deploy_id"])
            offset += len(page["items"])
            if not page["items"] or offset >= page["total"]:
                return


def _planned_exit(script: str) -> int | None:
    match = re.search(r"exit (\d+)$", script)
    return int(match.group(1)) if match else None


def _lines(path: Path) -> Counter[str]:
    return Counter(path.read_text().split()) if path.exists() else Counter()
