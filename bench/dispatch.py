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
"""

from __future__ import annotations

import argparse
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=200, help="deployments (default 200)")
    args = parser.parse_args()
    deploy_times: list[float] = []
    split: list[list[float]] = []
    print(f"load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        center = DeployCenter(Path(tmp))
        try:
            center.start_server()
            center.start_agent("bench")
            api = center.api
            for _ in range(5):  # warm-up
                center.wait(center.deploy("shell", "bench", script="true"))
            for _ in range(args.n):
                start, posted = time.perf_counter(), time.time()
                deploy_id = api.deploy("shell", {"client_id": "bench", "script": "true"})[
                    "deploy_id"
                ]
                answered = time.time()
                record = api.wait(deploy_id, timeout=60)
                deploy_times.append(time.perf_counter() - start)
                seen = time.time()
                if record["status"] != "success":
                    print(f"deployment {deploy_id} ended {record['status']}", file=sys.stderr)
                    return 1
                history = api.history(deploy_id)
                split.append(phases(posted, answered, seen, record, history))
        finally:
            center.close()
    local_times = []
    for _ in range(args.n):
        start = time.perf_counter()
        subprocess.run(["/bin/sh", "-c", "true"], check=True)
        local_times.append(time.perf_counter() - start)
    d50, d99 = percentile(deploy_times, 50), percentile(deploy_times, 99)
    l50, l99 = percentile(local_times, 50), percentile(local_times, 99)
    print(f"deployments: {args.n}")
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
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
