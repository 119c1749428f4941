"""Dispatch latency: POST /api/deploy/shell of `true` until the record says success.

Runs a real server and agent on loopback (SQLite), sends N deployments one after another
(one client allows one at a time), and prints p50/p99 beside the time to run `true` as a
local subprocess, as ratios from this one run.

    python bench/dispatch.py [-n 200]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from deploy_core.testing import DeployCenter


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered)) - 1))
    return ordered[index]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=200, help="deployments (default 200)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        center = DeployCenter(Path(tmp))
        try:
            center.start_server()
            center.start_agent("bench")
            api = center.api
            for _ in range(5):  # warm-up
                center.wait(center.deploy("shell", "bench", script="true"))
            deploy_times = []
            for _ in range(args.n):
                start = time.perf_counter()
                deploy_id = api.deploy("shell", {"client_id": "bench", "script": "true"})[
                    "deploy_id"
                ]
                record = api.wait(deploy_id, timeout=60)
                deploy_times.append(time.perf_counter() - start)
                if record["status"] != "success":
                    print(f"deployment {deploy_id} ended {record['status']}", file=sys.stderr)
                    return 1
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
