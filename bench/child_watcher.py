"""Child processes started and waited for by one event loop: asyncio's threaded child watcher
(Python 3.11's default: a thread per child, blocked in ``waitpid``) against the pidfd watcher
the agent installs on 3.11 (``deploy_core/agent/child_watcher.py``; 3.12+ does the same by
itself).  Each round runs ``--children`` ``/bin/true`` with at most 1, then 64, at once (an
agent's runs; the hundreds of agents of a benchmark worker), in a fresh process per watcher,
the watchers alternating; printed: children/s, p50/p99 start-to-exit, CPU per child, and the
ratios from the same round.

    python bench/child_watcher.py [--children 600] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONCURRENCY = (1, 64)


async def spawn_all(children: int, at_once: int) -> dict[str, float]:
    gate = asyncio.Semaphore(at_once)
    took: list[float] = []

    async def one() -> None:
        async with gate:
            started = time.perf_counter()
            proc = await asyncio.create_subprocess_exec("/bin/true")
            await proc.wait()
            took.append(time.perf_counter() - started)

    cpu, began = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one() for _ in range(children)))
    wall = time.perf_counter() - began
    took.sort()
    return {
        "rate": children / wall,
        "p50": took[len(took) // 2],
        "p99": took[int(len(took) * 0.99)],
        "cpu": (time.process_time() - cpu) / children,
    }


def one_process(watcher: str, children: int) -> None:
    """Run in a process of its own (``--as``): print the figures as JSON."""
    if watcher == "pidfd":
        from deploy_core.agent import child_watcher

        if not child_watcher.install():
            raise SystemExit("no pidfd watcher here (Python 3.12+ uses one already, or no pidfds)")
    print(json.dumps({str(n): asyncio.run(spawn_all(children, n)) for n in CONCURRENCY}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--children", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--as", dest="as_watcher", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.as_watcher:
        one_process(args.as_watcher, args.children)
        return 0
    if sys.version_info >= (3, 12):
        print(f"Python {sys.version.split()[0]} waits for children with pidfds by itself")
        return 0
    root = Path(__file__).resolve().parents[1]
    ratios: dict[int, list[float]] = {n: [] for n in CONCURRENCY}
    for round_no in range(1, args.rounds + 1):
        got = {}
        for watcher in ("threaded", "pidfd"):
            out = subprocess.run(
                [sys.executable, __file__, "--as", watcher, "--children", str(args.children)],
                capture_output=True, text=True, check=True, cwd=root, timeout=600,
            )  # fmt: skip
            got[watcher] = json.loads(out.stdout.splitlines()[-1])
            for n in CONCURRENCY:
                f = got[watcher][str(n)]
                print(
                    f"round {round_no} {watcher:8} {n:3} at once: {f['rate']:6.0f} children/s, "
                    f"p50 {f['p50'] * 1e3:6.2f} ms, p99 {f['p99'] * 1e3:6.2f} ms, "
                    f"CPU {f['cpu'] * 1e3:.3f} ms/child"
                )
        for n in CONCURRENCY:
            ratios[n].append(got["pidfd"][str(n)]["rate"] / got["threaded"][str(n)]["rate"])
    for n in CONCURRENCY:
        r = ratios[n]
        print(f"pidfd / threaded children/s, {n} at once: median {statistics.median(r):.2f} "
              f"({', '.join(f'{x:.2f}' for x in r)})")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
