"""The processes of ``bench/fleet.py``: one ``deployctl server`` and the agent workers
(``bench/fleet_agents.py``), each in a process group of its own, and what ``/proc`` says
about them.

Every wait here has a timeout and :meth:`Fleet.close` ends every process group it started,
whatever happened before.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

from deploy_core.client import DeployClient

WORKER_SCRIPT = Path(__file__).with_name("fleet_agents.py")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port(kind: socket.SocketKind) -> int:
    """A port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --------------------------------------------------------------------------- /proc


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (field 3, ``state``, is index 0)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (a server may serve with helper processes)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree: list[int] = []
    todo = [pid]
    while todo and len(tree) < 10_000:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def rss_kib(pids: Iterable[int]) -> int:
    """Resident memory (VmRSS) of these processes, summed, in KiB."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU time these processes have used, in seconds."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / CLOCK_TICKS


class PeakRss:
    """The largest resident memory of a process tree while the ``with`` block runs
    (sampled every half second in a thread)."""

    def __init__(self, pids: Callable[[], list[int]]) -> None:
        self._pids = pids
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True, name="peak-rss")
        #: KiB, the largest sample so far.
        self.kib = 0

    def _sample(self) -> None:
        while True:
            self.kib = max(self.kib, rss_kib(self._pids()))
            if self._stop.wait(0.5):
                return

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5.0)


# --------------------------------------------------------------------------- processes


def _start(
    args: list[str], log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    out: IO[bytes] = log.open("ab")
    try:
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: killpg reaches all it started
        )
    finally:
        out.close()


_ENDING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    for other in _ENDING:  # a second signal (`timeout` passes one on) must not stop the clean-up
        signal.signal(other, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signum}")


def end_on_signals() -> None:
    """Make SIGINT, SIGTERM and SIGHUP end the run like Ctrl-C (a KeyboardInterrupt), so the
    run's ``finally`` blocks stop the fleet's processes on the way out; also when started
    with SIGINT ignored (``cmd &``).  The first one ends the run; later ones are ignored."""
    for signum in _ENDING:
        signal.signal(signum, _interrupt)


def set_autogroup_nice(pid: int, nice: int) -> bool:
    """Give ``pid``'s autogroup the nice value ``nice``; whether it could.

    Every process started here has a session of its own (``_start``), and with the kernel's
    autogroups (``/proc/sys/kernel/sched_autogroup_enabled``) each session is one group that
    the scheduler shares the CPUs among as one: a process's own nice value counts only inside
    its group.  So on a full machine the server gets one group's share whatever the agent
    workers' nice values are; the group's value is what lowers theirs."""
    try:
        Path(f"/proc/{pid}/autogroup").write_text(str(nice))
    except OSError:
        return False
    return True


def _killpg(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _end(proc: subprocess.Popen[bytes] | None, sig: int, grace: float) -> None:
    """Signal ``proc``'s process group, wait ``grace`` seconds, then SIGKILL the group (the
    leader and whatever it left in it)."""
    if proc is None:
        return
    if proc.poll() is None:
        _killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    _killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10.0)


@dataclass
class Worker:
    """One agent worker process and where it reports."""

    name: str
    ids: list[str]
    proc: subprocess.Popen[bytes]
    stats_file: Path
    log: Path
    control: Path

    def command_flood(self, plan: dict[str, Any]) -> None:
        """Have the worker's agents in ``plan["deploys"]`` flood the server (atomically
        written: the worker acts on the file as soon as it exists)."""
        tmp = self.control.with_suffix(".tmp")
        tmp.write_text(json.dumps(plan))
        os.replace(tmp, self.control)

    def stats(self) -> dict[str, Any]:
        """Its last snapshot (empty before the first)."""
        try:
            data: dict[str, Any] = json.loads(self.stats_file.read_text())
            return data
        except (OSError, ValueError):
            return {}


@dataclass
class Fleet:
    """A server and agent workers under ``root`` on loopback ports chosen once, so a
    restarted server comes back where its agents expect it."""

    root: Path
    db_url: str | None = None
    keep_monitor: bool = False
    api_port: int = field(default_factory=lambda: free_port(socket.SOCK_STREAM))
    quic_port: int = field(default_factory=lambda: free_port(socket.SOCK_DGRAM))
    server: subprocess.Popen[bytes] | None = None
    workers: list[Worker] = field(default_factory=list)
    # Interpreter options before the server's "-m deploy_core.cli" (e.g. "-m cProfile -o F").
    server_wrapper: list[str] = field(default_factory=list)
    # More arguments for every worker (bench/fleet_agents.py), e.g. ["--plain-acks"].
    worker_args: list[str] = field(default_factory=list)
    # The workers' nice value (0: as this process): a diagnosis, to give the server the
    # CPU it would have on a machine of its own (see set_autogroup_nice).
    worker_nice: int = 0
    _api: DeployClient | None = None

    @property
    def server_dir(self) -> Path:
        """The server's state directory."""
        return self.root / "server"

    @property
    def url(self) -> str:
        """The API's base URL."""
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def token(self) -> str:
        """The admin token the server wrote."""
        return (self.server_dir / "admin.token").read_text().strip()

    @property
    def api(self) -> DeployClient:
        """A client of the API with the admin token."""
        if self._api is None:
            self._api = DeployClient(self.url, self.token, timeout=60)
        return self._api

    def server_log_tail(self, chars: int = 3000) -> str:
        """The end of what the server wrote."""
        log = self.root / "server.log"
        return log.read_text(errors="replace")[-chars:] if log.exists() else ""

    def start_server(self, timeout: float) -> float:
        """Start (or restart) ``deployctl server``; seconds until its API answered."""
        self.root.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, *self.server_wrapper, "-m", "deploy_core.cli"]
        args += ["--log-level", "info", "server"]
        args += ["--state-dir", str(self.server_dir), "--api-port", str(self.api_port)]
        args += ["--quic-port", str(self.quic_port)]
        if self.db_url:
            args += ["--db", self.db_url]
        started = time.monotonic()
        self.server = _start(args, self.root / "server.log")
        token_file = self.server_dir / "admin.token"
        while time.monotonic() - started < timeout:
            if self.server.poll() is not None:
                raise RuntimeError(
                    f"the server exited with {self.server.returncode}:\n{self.server_log_tail()}"
                )
            if token_file.exists():
                try:
                    self.api.request("GET", "/api/info")
                    return time.monotonic() - started
                except Exception:
                    pass
            time.sleep(0.1)
        raise TimeoutError(f"the server's API did not answer in {timeout:g} s")

    def kill_server(self) -> None:
        """``kill -9`` the server (its whole process group) and wait until it is gone."""
        _end(self.server, signal.SIGKILL, 10.0)
        self.server = None

    def server_pids(self) -> list[int]:
        """The server process and its descendants."""
        return process_tree(self.server.pid) if self.server is not None else []

    def make_join_token(self, uses: int) -> Path:
        """A join token for ``uses`` enrolments made through the API, in a file."""
        made = self.api.request(
            "POST", "/api/join-tokens", json={"uses": uses, "ttl": 3600.0, "note": "fleet bench"}
        )
        path = self.root / "join.token"
        path.write_text(made["token"])
        path.chmod(0o600)
        return path

    def start_worker(
        self,
        name: str,
        ids: list[str],
        join_token_file: Path,
        env_extra: dict[str, str] | None = None,
    ) -> Worker:
        """A worker process running the agents ``ids`` (``env_extra``: more of its
        environment)."""
        env = {**os.environ, **(env_extra or {})}
        if not self.keep_monitor:
            # One docker daemon here stands for every host's: N samplers on it are not
            # what a fleet's server sees.
            env["DEPLOY_CORE_DISABLE_PLUGINS"] = "monitor_docker"
        stats, log = self.root / f"{name}.json", self.root / f"{name}.log"
        control = self.root / f"{name}.flood.json"
        args = [sys.executable, str(WORKER_SCRIPT), "--server", f"127.0.0.1:{self.quic_port}"]
        args += ["--ca", str(self.server_dir / "ca.pem"), "--join-token-file", str(join_token_file)]
        args += ["--root", str(self.root / "agents"), "--stats", str(stats), "--log", str(log)]
        args += ["--control", str(control), *self.worker_args]
        if self.worker_nice:
            args = ["nice", "-n", str(self.worker_nice), *args]
        proc = _start([*args, *ids], self.root / f"{name}.out", env)
        if self.worker_nice and not set_autogroup_nice(proc.pid, self.worker_nice):
            print(
                f"  warning: {name}'s autogroup could not be set to nice {self.worker_nice}: "
                "where autogroups apply, the server does not get the CPU first",
                file=sys.stderr,
                flush=True,
            )
        worker = Worker(name, ids, proc, stats, log, control)
        self.workers.append(worker)
        return worker

    def worker_pids(self) -> list[int]:
        """Every worker process that is still running."""
        return [w.proc.pid for w in self.workers if w.proc.poll() is None]

    def cpu_sample(self) -> tuple[float, float, float]:
        """(now, the server's CPU seconds, the workers' CPU seconds), for :meth:`cpu_since`."""
        return time.monotonic(), cpu_seconds(self.server_pids()), cpu_seconds(self.worker_pids())

    def cpu_since(self, sample: tuple[float, float, float]) -> tuple[float, float]:
        """How busy the server and the agent workers were since ``sample``, each in % of
        one core (the same server process: not across a restart)."""
        now, server, workers = self.cpu_sample()
        took = max(now - sample[0], 1e-9)
        return (server - sample[1]) / took * 100, (workers - sample[2]) / took * 100

    def cpu_text(self, sample: tuple[float, float, float]) -> str:
        """:meth:`cpu_since` in words."""
        server, workers = self.cpu_since(sample)
        return f"CPU: server {server:.0f} %, agent workers {workers:.0f} % of a core"

    def dead_workers(self) -> list[str]:
        """Workers that exited, with their exit codes."""
        return [
            f"{w.name} (exit {w.proc.returncode})"
            for w in self.workers
            if w.proc.poll() is not None
        ]

    def connected(self) -> set[str]:
        """Ids the server lists as connected to it (empty when the API does not answer)."""
        try:
            return {c["client_id"] for c in self.api.clients() if c.get("connected_here")}
        except Exception:
            return set()

    def wait_connected(
        self,
        ids: set[str],
        timeout: float,
        started: float,
        timeline: list[tuple[float, int]] | None = None,
    ) -> float | None:
        """Seconds from ``started`` (monotonic) until all ``ids`` are connected, or None.

        :param timeline: when given, gets ``(seconds since started, how many connected)``
            at every poll.
        """
        interval = 0.5 if len(ids) <= 500 else 1.0
        while time.monotonic() - started < timeout:
            here = self.connected() & ids
            if timeline is not None:
                timeline.append((time.monotonic() - started, len(here)))
            if len(here) == len(ids):
                return time.monotonic() - started
            time.sleep(interval)
        return None

    def close(self) -> None:
        """Stop the workers (SIGTERM, then SIGKILL) and the server; close the client."""
        for worker in self.workers:
            if worker.proc.poll() is None:
                _killpg(worker.proc.pid, signal.SIGTERM)  # all stop at once, then wait
        for worker in self.workers:
            _end(worker.proc, signal.SIGTERM, 40.0)
        _end(self.server, signal.SIGTERM, 15.0)
        self.server = None
        if self._api is not None:
            self._api.close()
            self._api = None
