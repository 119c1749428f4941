"""What thousands of idle processes on this host do to starting and ending a short one.

Every connected agent keeps one spare shell waiting for its next run
(``deploy_core.agent.launcher``).  A host holds one agent, so one such shell; the fleet
benchmark (``fleet.py``) holds thousands of agents on one machine, and with them thousands
of idle shells.  This measures what that alone does to a script run, with no agent, no server
and no network: ``/bin/sh`` running a script of ``true`` (as a deployment of ``true`` runs),
``--runs`` times one after another, on a host with no extra process and with ``--idle`` idle
``/bin/sh -s`` processes (each in a session of its own, like a spare), in alternating rounds.

    python bench/idle_processes.py                 # 2,000 idle shells, 3 rounds of 300 runs
    python bench/idle_processes.py --idle 500 --rounds 5

Printed per round: p50 / p99 / max of one run (fork, exec, exit, wait) in ms, then the ratio
of each figure with the idle shells to without, round by round and as the median.  The idle
shells are killed between rounds and at the end (also on Ctrl-C).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered)) - 1))]


def runs(script: Path, n: int, gap: float) -> list[float]:
    """Seconds of ``n`` runs of ``/bin/sh script``, ``gap`` seconds apart."""
    took = []
    for _ in range(n):
        start = time.perf_counter()
        subprocess.run(["/bin/sh", str(script)], check=True)
        took.append(time.perf_counter() - start)
        time.sleep(gap)
    return took


def idle_shells(n: int) -> list[subprocess.Popen[bytes]]:
    """``n`` shells waiting on their stdin, each in a session of its own."""
    return [
        subprocess.Popen(
            ["/bin/sh", "-s"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        for _ in range(n)
    ]


def end(shells: list[subprocess.Popen[bytes]]) -> None:
    for shell in shells:
        shell.kill()
    for shell in shells:
        shell.wait(timeout=30)
    shells.clear()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=int, default=2000, help="idle shells (default 2,000)")
    parser.add_argument("--runs", type=int, default=300, help="runs per round (default 300)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each (default 3)")
    parser.add_argument("--gap", type=float, default=0.01, help="seconds between runs")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds after starting them")
    args = parser.parse_args()
    if args.idle < 1 or args.runs < 10 or args.rounds < 1:
        raise SystemExit("--idle must be at least 1, --runs at least 10, --rounds at least 1")
    shells: list[subprocess.Popen[bytes]] = []
    ratios: list[tuple[float, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "true.sh"
        script.write_text("true\n")
        runs(script, 20, 0.0)  # warm-up
        try:
            for round_no in range(1, args.rounds + 1):
                figures = []
                for idle in (0, args.idle):
                    if idle:
                        shells = idle_shells(idle)
                        time.sleep(args.settle)
                    took = runs(script, args.runs, args.gap)
                    end(shells)
                    p50, p99, top = percentile(took, 50), percentile(took, 99), max(took)
                    figures.append((p50, p99, top))
                    print(
                        f"round {round_no}, {idle:5d} idle shells: p50 {p50 * 1e3:6.2f}  "
                        f"p99 {p99 * 1e3:6.2f}  max {top * 1e3:6.2f} ms",
                        flush=True,
                    )
                (b50, b99, bmax), (i50, i99, imax) = figures
                ratios.append((i50 / b50, i99 / b99, imax / bmax))
        except KeyboardInterrupt:
            end(shells)
            return 130
        finally:
            end(shells)
    for i, name in enumerate(("p50", "p99", "max")):
        each = ", ".join(f"{r[i]:.2f}" for r in ratios)
        print(
            f"{name}: with {args.idle} idle shells / without, median "
            f"{statistics.median(r[i] for r in ratios):.2f}x ({each})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
