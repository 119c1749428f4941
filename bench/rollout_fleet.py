"""``true`` on every agent of a fleet as one rollout, several times in one run: how long from
the POST to the last target finished, with the agent workers at the server's CPU priority
and with them niced (``--nice``, default 10), alternating, so that both figures come from
the same machine in the same minutes.

Why the two: on this 2-core machine the agents run beside the server (issue 13's benchmark
rule), and a rollout to every agent at once makes each of the N agents run a deployment
within the same seconds. Four worker processes and the server then share two cores as five
equal processes, so the server gets about a fifth of them exactly when a thousand reports
and callbacks arrive; its answers (and the QUIC acknowledgements that tell agents it lives)
fall behind. On a real fleet the agents' work is on their own hosts. Niced workers give the
server the CPU it asks for and the agents the rest: the machine does the same work, the
server's share is closer to what it has in production. Both figures are printed; neither is
hidden.

What runs: one ``deployctl server`` (SQLite) and N real agents in ``--procs`` worker
processes (``fleet_harness.Fleet``, as ``bench/fleet.py`` runs them). Then ``--rounds``
rounds, each one rollout of ``true`` to all N with ``max_parallel`` N in each mode. Printed
per rollout: its status and counts, seconds from the POST to the last target's
``finished_at``, the server's and the workers' CPU (% of one core), the server's ingest log
lines meanwhile (messages, transactions, p99 queued -> committed) and how many agents lost
their connection ("no frame from the server"); then the median per mode and the ratio.

    .venv/bin/python bench/rollout_fleet.py                   # 1,000 agents, 2 rounds
    .venv/bin/python bench/rollout_fleet.py --agents 300 --rounds 1
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fleet_harness import Fleet, process_tree
from fleet_runs import rollout_true

_INGEST = re.compile(
    r"ingest: (\d+) messages in (\d+) transactions .*?p99 ([\d.]+) ms", re.IGNORECASE
)


def renice(fleet: Fleet, value: int) -> None:
    """Set every worker process's and its descendants' niceness to ``value`` (as root a
    process may lower it again)."""
    for pid in fleet.worker_pids():
        for each in process_tree(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.setpriority(os.PRIO_PROCESS, each, value)


def lost_connections(fleet: Fleet) -> int:
    """How many times the workers' agents said they lost the server, so far."""
    logs = [w.log for w in fleet.workers if w.log.exists()]
    return sum(log.read_text(errors="replace").count("no frame from the server") for log in logs)


def start_py_spy(fleet: Fleet, seconds: float, out: Path) -> list[subprocess.Popen[bytes]]:
    """py-spy recording the server and the first worker for ``seconds`` into ``out`` and
    ``out`` with ``-worker`` (collapsed stacks, a thread's name first), without stopping
    them at each sample."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    assert fleet.server is not None
    pids = {out: fleet.server.pid, out.with_stem(out.stem + "-worker"): fleet.worker_pids()[0]}
    return [
        subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(int(seconds)),
                "--rate",
                "100",
                "--threads",
                "--nonblocking",
                "--format",
                "raw",
                "-o",
                str(path),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for path, pid in pids.items()
    ]


def wait_all_connected(fleet: Fleet, ids: set[str], timeout: float) -> None:
    if fleet.wait_connected(ids, timeout, time.monotonic()) is None:
        raise RuntimeError(f"only {len(fleet.connected() & ids)}/{len(ids)} connected")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--nice", type=int, default=10, help="the workers' niceness when niced")
    parser.add_argument("--timeout", type=float, default=300.0, help="per rollout")
    parser.add_argument("--keep", type=Path, help="run in DIR and keep it")
    parser.add_argument(
        "--modes", default="same,niced", help="which modes each round runs (default both)"
    )
    parser.add_argument(
        "--profile", type=float, metavar="S",
        help="record the server and the first worker with py-spy (on PATH or in the venv) for "
        "the first S seconds of each rollout, into profile-<round>-<mode>[-worker].txt "
        "(collapsed stacks, per thread)",
    )  # fmt: skip
    args = parser.parse_args()
    modes = set(args.modes.split(","))
    if not modes or not modes <= {"same", "niced"}:
        parser.error(f"--modes takes same, niced or same,niced; got {args.modes!r}")
    # No agent scans /proc for orphans while it measures: in a worker each agent's scan
    # collects the other agents' finished scripts, which then end with code 255 (see
    # fleet_agents.py); `true` leaves no orphans.
    os.environ.setdefault("DEPLOY_CENTER_FLEET_REAP_INTERVAL", "86400")
    root = args.keep or Path(tempfile.mkdtemp(prefix="rollout-fleet-"))
    root.mkdir(parents=True, exist_ok=True)
    fleet = Fleet(root)
    ids = [f"fleet-{i:05d}" for i in range(args.agents)]
    results: dict[str, list[float]] = {"same priority": [], f"workers at nice {args.nice}": []}
    try:
        print(f"rollout_fleet: {args.agents} agents in {args.procs} workers, SQLite, "
              f"load {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
        fleet.start_server(60.0)
        token = fleet.make_join_token(uses=args.agents)
        for k in range(args.procs):
            fleet.start_worker(f"worker-{k}", ids[k :: args.procs], token)
        wait_all_connected(fleet, set(ids), 60 + 0.15 * args.agents)
        time.sleep(5.0)
        for round_ in range(args.rounds):
            for mode, nice in zip(results, (0, args.nice), strict=True):
                if ("niced" if nice else "same") not in modes:
                    continue
                renice(fleet, nice)
                wait_all_connected(fleet, set(ids), 120.0)
                server_log = root / "server.log"
                offset = len(server_log.read_text(errors="replace"))
                lost_before = lost_connections(fleet)
                sample = fleet.cpu_sample()
                spy = None
                if args.profile:
                    out = root / f"profile-{round_ + 1}-{'niced' if nice else 'same'}.txt"
                    spy = start_py_spy(fleet, args.profile, out)
                got = rollout_true(fleet.api, ids, args.timeout)
                if spy is not None:
                    for each in spy:
                        each.wait(timeout=args.profile + 30)
                server_cpu, workers_cpu = fleet.cpu_since(sample)
                lines = server_log.read_text(errors="replace")[offset:]
                ingest = [m.groups() for m in _INGEST.finditer(lines)]
                worst = max((float(p99) for _, _, p99 in ingest), default=float("nan"))
                messages = sum(int(m) for m, _, _ in ingest)
                transactions = sum(int(t) for _, t, _ in ingest)
                print(
                    f"  round {round_ + 1}, {mode}: {got['status']} {got['counts']}; last target "
                    f"finished {got['last_finished_s']:.1f} s after the POST (10/50/90 %: "
                    f"{'/'.join(f'{s:.1f}' for s in got['finished_s'])} s); CPU server "
                    f"{server_cpu:.0f} %, workers {workers_cpu:.0f} %; ingest {messages} messages "
                    f"in {transactions} transactions, worst p99 {worst:.0f} ms; "
                    f"{lost_connections(fleet) - lost_before} agents lost the server",
                    flush=True,
                )
                if got["status"] == "succeeded":
                    results[mode].append(got["last_finished_s"])
                time.sleep(5.0)
        renice(fleet, 0)
        medians = {mode: statistics.median(v) for mode, v in results.items() if v}
        for mode, value in medians.items():
            print(f"  median, {mode}: {value:.1f} s")
        if len(medians) == 2:
            same, niced = medians.values()
            print(f"  ratio (same priority / niced): {same / niced:.2f}")
        wanted = [v for v, name in zip(results.values(), ("same", "niced"), strict=True)
                  if name in modes]  # fmt: skip
        return 0 if all(len(v) == args.rounds for v in wanted) else 1
    finally:
        fleet.close()
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
