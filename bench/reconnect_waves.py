"""The server's memory across waves of agents reconnecting, with and without its collector
policy (``deploy_core.server.gc_policy``: the survivors of each full collection frozen,
thawed every 10 minutes or after 200 connections ended).

A frozen object is freed by reference counting like any other, but a reference cycle among
frozen objects waits for the next thaw; a closed connection's objects hold cycles.  This
checks that the thaw after ended connections keeps a server whose agents all reconnect from
holding their old connections' memory: ``--agents`` real agents in ``--procs`` worker
processes connect to one ``deployctl server`` (SQLite); then, ``--waves`` times, every worker
is stopped (SIGTERM: its agents close their connections) and started again with the same
agents, which reconnect with their credentials.  The server's RSS is read after the first
connect and after each wave (``--settle`` seconds after all are back).  Each mode gets a
fresh fleet; the modes run in turn:

    python bench/reconnect_waves.py                       # 1,000 agents, 4 waves, both modes
    python bench/reconnect_waves.py --agents 400 --waves 6

Printed: per mode and wave the server's RSS (MiB) and the seconds until all were back; then
each mode's growth from the first connect to the last wave, and the frozen mode's growth
over the other's.  Every wait has a timeout; every process is stopped on the way out.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from fleet_harness import Fleet, _end, end_on_signals, rss_kib

MODES = (("frozen", "1"), ("CPython's", "0"))


def one_mode(root: Path, args: argparse.Namespace, freeze: str) -> list[float]:
    """RSS (MiB) of the server after the first connect and after each wave."""
    os.environ["DEPLOY_CENTER_GC_FREEZE"] = freeze
    fleet = Fleet(root)
    try:
        fleet.start_server(60.0)
        ids = [f"wave-{n:05d}" for n in range(args.agents)]
        token = fleet.make_join_token(uses=args.agents)
        share = -(-len(ids) // args.procs)
        groups = [ids[i : i + share] for i in range(0, len(ids), share)]

        def start_all() -> float:
            fleet.workers.clear()
            started = time.monotonic()
            for k, group in enumerate(groups):
                fleet.start_worker(f"worker-{k}", group, token)
            took = fleet.wait_connected(set(ids), args.timeout, started)
            if took is None:
                raise SystemExit(f"not all {len(ids)} agents connected in {args.timeout:g} s")
            time.sleep(args.settle)
            return took

        took = start_all()
        sizes = [rss_kib(fleet.server_pids()) / 1024]
        print(f"  connected in {took:.1f} s: server RSS {sizes[-1]:.1f} MiB", flush=True)
        for wave in range(1, args.waves + 1):
            for worker in fleet.workers:
                _end(worker.proc, signal.SIGTERM, 40.0)
            took = start_all()
            sizes.append(rss_kib(fleet.server_pids()) / 1024)
            print(
                f"  wave {wave}: all back in {took:.1f} s, server RSS {sizes[-1]:.1f} MiB",
                flush=True,
            )
        return sizes
    finally:
        fleet.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=1000, help="agents (default 1,000)")
    parser.add_argument("--procs", type=int, default=4, help="worker processes (default 4)")
    parser.add_argument("--waves", type=int, default=4, help="reconnect waves (default 4)")
    parser.add_argument("--settle", type=float, default=10.0, help="seconds after all are back")
    parser.add_argument("--timeout", type=float, default=240.0, help="per connect, seconds")
    args = parser.parse_args()
    if args.agents < 1 or args.procs < 1 or args.waves < 1:
        raise SystemExit("--agents, --procs and --waves must be at least 1")
    end_on_signals()
    # The workers' agents scan /proc for orphans only past the run (see fleet_agents.py).
    os.environ.setdefault("DEPLOY_CENTER_FLEET_REAP_INTERVAL", "86400")
    os.environ.setdefault("DEPLOY_CENTER_FLEET_SPARES", "first-run")
    print(f"reconnect waves: {args.agents} agents in {args.procs} processes, {args.waves} waves")
    results: dict[str, list[float]] = {}
    try:
        for name, freeze in MODES:
            print(f"{name} collector policy (DEPLOY_CENTER_GC_FREEZE={freeze}):", flush=True)
            with tempfile.TemporaryDirectory(prefix="waves-") as tmp:
                results[name] = one_mode(Path(tmp), args, freeze)
    except KeyboardInterrupt:
        return 130
    growth = {name: sizes[-1] - sizes[0] for name, sizes in results.items()}
    for name, sizes in results.items():
        print(
            f"{name}: {sizes[0]:.1f} -> {sizes[-1]:.1f} MiB after {args.waves} waves "
            f"({growth[name]:+.1f} MiB)"
        )
    first, second = (name for name, _ in MODES)
    print(f"growth, {first} - {second}: {growth[first] - growth[second]:+.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
