"""Dispatch latency: POST /api/deploy/shell of `true` until the record says success.

Runs a real server and agent on loopback (SQLite), sends N deployments one after another
(one client allows one at a time), and prints p50/p99 beside the time to run `true` as a
local subprocess, as ratios from this one run; then where the time went, from each
deployment's history (the agent's report times and the server's; one clock, one host):

- ``POST``: until the API answered 202 (the record and the lock stored);
- ``to the agent's first report``: command sent, journaled, acknowledged, started;
- ``the script``: the first report (``executing``) to the last (``script finished``): the
  gate shell started in its cgroup, ``true``, the output read;
- ``last report -> terminal recorded``: the agent's callback journaled, sent and stored
  (issue 13 §3 measured ~13 ms here);
- ``terminal recorded -> client saw it``: the waiting ``GET ?wait=`` woken and answered.

    python bench/dispatch.py [-n 200]
    DEPLOY_CENTER_PROCESS_TRACKING=off python bench/dispatch.py   # scripts not in a cgroup

Before and after a change, in one run: ``--against TREE`` (another checkout, e.g. ``git
worktree add --detach /tmp/base <commit>``) runs this measurement in rounds alternating
between this tree's ``deploy_core`` and TREE's (each in a process of its own with
``PYTHONPATH`` set to its tree, so its server and agent are that tree's too), then prints
each phase's p50 / p99 over all rounds of each tree and the ratio of the whole dispatch's
p50 round by round (a busy machine moves both alike within a round):

    python bench/dispatch.py -n 60 --rounds 6 --against /tmp/base
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from deploy_core.testing import DeployCenter

PHASES = (
    "POST",
    "to the agent's first report",
    "the script",
    "last report -> terminal recorded",
    "terminal recorded -> client saw it",
)


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered)) - 1))
    return ordered[index]


def epoch(value: str | float) -> float:
    """A time of the API (ISO 8601, UTC) as epoch seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def phases(
    posted: float, answered: float, seen: float, record: dict[str, Any], history: list[Any]
) -> list[float]:
    """The seconds of each of :data:`PHASES` for one deployment."""
    agent = [
        epoch(h["timestamp"]) for h in history if h["source"] == "agent" and h["seq"] is not None
    ]
    finished = epoch(record["finished_at"])
    first, last = (agent[0], agent[-1]) if agent else (finished, finished)
    return [answered - posted, first - answered, last - first, finished - last, seen - finished]


def udp_datagrams_sent() -> int:
    """The host's count of UDP datagrams sent (``/proc/net/snmp``), -1 where there is none."""
    try:
        lines = [ln.split() for ln in Path("/proc/net/snmp").read_text().splitlines()]
    except OSError:
        return -1
    names, values = (ln for ln in lines if ln[0] == "Udp:")
    return int(values[names.index("OutDatagrams")])


def measure(n: int) -> tuple[list[float], list[list[float]]]:
    """``n`` deployments of ``true``: the seconds of each, and of each one's phases."""
    deploy_times: list[float] = []
    split: list[list[float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        center = DeployCenter(Path(tmp))
        try:
            center.start_server()
            center.start_agent("bench")
            api = center.api
            for _ in range(5):  # warm-up
                center.wait(center.deploy("shell", "bench", script="true"))
            sent_before = udp_datagrams_sent()
            for _ in range(n):
                start, posted = time.perf_counter(), time.time()
                deploy_id = api.deploy("shell", {"client_id": "bench", "script": "true"})[
                    "deploy_id"
                ]
                answered = time.time()
                record = api.wait(deploy_id, timeout=60)
                deploy_times.append(time.perf_counter() - start)
                seen = time.time()
                if record["status"] != "success":
                    raise SystemExit(f"deployment {deploy_id} ended {record['status']}")
                history = api.history(deploy_id)
                split.append(phases(posted, answered, seen, record, history))
            sent = udp_datagrams_sent() - sent_before
            if sent >= 0:
                print(
                    f"UDP datagrams sent on this host: {sent / n:.1f} per deployment (the QUIC "
                    "traffic between server and agent, and anything else here)"
                )
        finally:
            center.close()
    return deploy_times, split


def report(deploy_times: list[float], split: list[list[float]], local_times: list[float]) -> None:
    d50, d99 = percentile(deploy_times, 50), percentile(deploy_times, 99)
    l50, l99 = percentile(local_times, 50), percentile(local_times, 99)
    print(f"deployments: {len(deploy_times)}")
    print(
        f"deploy `true` via API+QUIC+agent: p50 {d50 * 1000:.1f} ms  p99 {d99 * 1000:.1f} ms"
        f"  mean {statistics.mean(deploy_times) * 1000:.1f} ms"
    )
    print(f"local subprocess `true`:          p50 {l50 * 1000:.2f} ms  p99 {l99 * 1000:.2f} ms")
    print(f"ratio deploy/local: p50 {d50 / l50:.1f}x  p99 {d99 / l99:.1f}x")
    print("where the time went (p50 / p99 of each phase, ms):")
    for name, values in zip(PHASES, zip(*split, strict=True), strict=True):
        ms = [v * 1000 for v in values]
        print(f"  {name:36} {percentile(ms, 50):6.1f} / {percentile(ms, 99):6.1f}")


def local_true(n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        subprocess.run(["/bin/sh", "-c", "true"], check=True)
        times.append(time.perf_counter() - start)
    return times


def compare(args: argparse.Namespace) -> int:
    """Rounds alternating between this tree and ``args.against`` (see the module's text)."""
    here = Path(__file__).resolve().parents[1]
    trees = {"this": here, "against": Path(args.against).resolve()}
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in trees}
    for round_no in range(1, args.rounds + 1):
        for label, tree in trees.items():
            env = {**os.environ, "PYTHONPATH": str(tree)}
            out = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "-n", str(args.n), "--json"],
                env=env,
                cwd=tree,
                capture_output=True,
                text=True,
                timeout=600,
            )
            if out.returncode != 0:
                print(f"{label} ({tree}) failed:\n{out.stderr[-3000:]}", file=sys.stderr)
                return 1
            run = json.loads(out.stdout.strip().splitlines()[-1])
            runs[label].append(run)
            p50 = percentile(run["times"], 50) * 1000
            print(f"round {round_no} {label:8} p50 {p50:6.1f} ms  load {run['load']:.1f}")
    print(f"\n{args.rounds} rounds of {args.n}; this = {here}, against = {trees['against']}")
    print("p50 / p99 ms over all rounds:")
    print(f"  {'':36} {'against':>15} {'this':>15}")
    for index, name in enumerate(("whole dispatch", *PHASES)):
        cells = []
        for label in ("against", "this"):
            if index == 0:
                ms = [t * 1000 for run in runs[label] for t in run["times"]]
            else:
                ms = [row[index - 1] * 1000 for run in runs[label] for row in run["split"]]
            cells.append(f"{percentile(ms, 50):6.1f} / {percentile(ms, 99):6.1f}")
        print(f"  {name:36} {cells[0]:>15} {cells[1]:>15}")
    ratios = [
        percentile(mine["times"], 50) / percentile(theirs["times"], 50)
        for mine, theirs in zip(runs["this"], runs["against"], strict=True)
    ]
    print(
        f"whole dispatch p50, this / against, round by round: median "
        f"{statistics.median(ratios):.2f} ({', '.join(f'{r:.2f}' for r in ratios)})"
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=200, help="deployments (default 200)")
    parser.add_argument(
        "--against", metavar="TREE", help="compare with the deploy_core of another checkout"
    )
    parser.add_argument("--rounds", type=int, default=4, help="with --against (default 4)")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.against:
        return compare(args)
    if args.json:  # one round of --against
        times, split = measure(args.n)
        print(json.dumps({"times": times, "split": split, "load": os.getloadavg()[0]}))
        return 0
    print(f"load average {os.getloadavg()[0]:.1f}")
    times, split = measure(args.n)
    report(times, split, local_true(args.n))
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
