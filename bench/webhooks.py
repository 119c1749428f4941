"""Webhooks: what they cost a deployment, and how soon a receiver hears of a finish.

Runs a real server and agent on loopback (SQLite) and sends N deployments of `true` one
after another in three phases, taking turns in blocks of ten: with no webhook, with a
webhook (deployment.started and .finished) to a receiver that answers at once, and with one
to a receiver that never answers (every attempt runs into the timeout and is retried).
Each receiver is the tests' own, in a process of its own. Prints each phase's p50/p99
POST-to-recorded-success time and its ratio to the first phase, and the p50/p99 time from
a deployment's recorded finish to the receiver getting the signed delivery.

    python bench/webhooks.py [-n 100]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from deploy_core.testing import DeployCenter, free_port

SECRET = "bench-secret-0123456789abcdef"
BLOCK = 10
CONFIG = """
[webhooks]
allow_http_hosts = ["127.0.0.1"]
timeout = 5
retry_initial = 1
"""


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered)) - 1))
    return ordered[index]


def run(center: DeployCenter, n: int) -> tuple[list[float], dict[str, float]]:
    """N deployments one after another: their POST-to-success times, and each one's
    recorded finish (epoch seconds) by id."""
    times, finished = [], {}
    for _ in range(n):
        start = time.perf_counter()
        deploy_id = center.api.deploy("shell", {"client_id": "bench", "script": "true"})[
            "deploy_id"
        ]
        record = center.api.wait(deploy_id, timeout=60)
        times.append(time.perf_counter() - start)
        if record["status"] != "success":
            raise SystemExit(f"deployment {deploy_id} ended {record['status']}")
        finished[deploy_id] = dt.datetime.fromisoformat(record["finished_at"]).timestamp()
    return times, finished


RECEIVER = """
import json, sys, time
sys.path.insert(0, {tests!r})
from webhook_receiver import Receiver
receiver = Receiver({secret!r}, port={port}, mode={mode!r}).start()
print("ready", flush=True)
sys.stdin.readline()  # until the bench says stop
receiver.stop()
for d in receiver.got:
    if d.verified:
        print(json.dumps([d.payload["event"], d.payload["data"].get("deploy_id"), d.received_at]))
"""


class ChildReceiver:
    """A receiver in a process of its own, so that it takes no time from this one."""

    def __init__(self, mode: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        tests = str(Path(__file__).resolve().parents[1] / "tests")
        code = RECEIVER.format(tests=tests, secret=SECRET, port=self.port, mode=mode)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"

    def stop(self) -> list[tuple[str, str | None, float]]:
        """Stop it; what it got: (event, deploy_id, received at)."""
        out, _ = self.proc.communicate("stop\n", timeout=60)
        return [tuple(json.loads(line)) for line in out.splitlines() if line.startswith("[")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=100, help="deployments per phase (default 100)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "server.toml"
        config.write_text(CONFIG)
        center = DeployCenter(Path(tmp) / "center")
        center.server_args = ["--config", str(config)]
        events = ["deployment.started", "deployment.finished"]
        try:
            center.start_server()
            center.start_agent("bench")
            run(center, 5)  # warm-up
            # Interleaved blocks of BLOCK deployments, so that the load of other processes
            # on the machine falls on every phase alike.
            fast, dead = ChildReceiver("ok"), ChildReceiver("hold")
            bare: list[float] = []
            with_hook: list[float] = []
            with_dead: list[float] = []
            finished: dict[str, float] = {}
            for _ in range(max(1, args.n // BLOCK)):
                bare += run(center, BLOCK)[0]

                hook = center.api.add_webhook(fast.url, events, SECRET)
                times, done = run(center, BLOCK)
                with_hook += times
                finished |= done
                end = time.monotonic() + 120
                while time.monotonic() < end:  # all sent before the webhook goes
                    rows = center.api.webhook_deliveries(hook["id"], limit=500)
                    if sum(r["status"] == "delivered" for r in rows) >= 2 * BLOCK:
                        break
                    time.sleep(0.1)
                center.api.remove_webhook(hook["id"])

                hook = center.api.add_webhook(dead.url, events, SECRET)
                with_dead += run(center, BLOCK)[0]
                center.api.remove_webhook(hook["id"])  # and its retries with it
            got = fast.stop()
            dead.proc.kill()
            # When each finish arrived (the child's clock is this machine's).
            arrivals = {d: t for event, d, t in got if event == "deployment.finished" and d}
        finally:
            center.close()
    lag = [arrivals[i] - finished[i] for i in finished if i in arrivals]
    print(f"deployments per phase: {len(bare)}, in blocks of {BLOCK} taking turns")
    b50 = percentile(bare, 50)
    for name, times in [
        ("no webhook", bare),
        ("webhook, receiver answers", with_hook),
        ("webhook, receiver never answers", with_dead),
    ]:
        p50, p99 = percentile(times, 50), percentile(times, 99)
        print(
            f"{name:<33} p50 {p50 * 1000:7.1f} ms  p99 {p99 * 1000:7.1f} ms"
            f"  p50 ratio to no webhook {p50 / b50:.2f}x"
        )
    print(
        f"recorded finish -> receiver got it: p50 {percentile(lag, 50) * 1000:.1f} ms"
        f"  p99 {percentile(lag, 99) * 1000:.1f} ms  ({len(lag)} of {len(finished)})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
