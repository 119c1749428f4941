"""The server's CPU per status report and per idle connected agent, in CPU seconds (the
server process's utime + stime), which a loaded machine does not distort the way it does wall
time.

What runs, for each tree measured (this checkout; with ``--base DIR`` also the tree in DIR,
e.g. ``git worktree add --detach /tmp/dc-base <commit>``, first, in the same run): one
``deployctl server`` process of that tree (SQLite) and ``--agents`` real agents of this
checkout in ``--procs`` worker processes (``bench/fleet_harness.py``,
``bench/fleet_agents.py``, as ``bench/fleet.py`` runs them).  Then:

- **idle**: the server's CPU with no agent connected (half of ``--idle-seconds``), then with
  all agents connected and nothing deployed over ``--idle-seconds``: % of a core, and the
  difference as milliseconds of CPU per connected agent per second;
- **reports**: ``sleep`` deployed on ``--flood-agents`` agents; once each runs, each sends
  ``--events`` ``deploy.status`` reports for it through its journaled outbox (each one stored
  and acknowledged by the server); the server's CPU from the first enqueued to the last
  acknowledged, less the idle rate over that time, per report.

With ``--profile DIR`` the server is sampled by ``py-spy record`` (installed in the venv;
not a dependency) during each window, and the flat profile of each is printed and written
to DIR (``<tree>-idle.txt``, ``<tree>-reports.txt``, the raw collapsed stacks beside them).
Sampled with ``--gil`` (only the thread running Python code: a thread waiting for the GIL
would otherwise count wherever it waits); py-spy's sampling pauses the server briefly, so
the figures of a profiled run are a bit higher: compare runs without it.

    .venv/bin/python bench/server_cpu.py --base /tmp/dc-base          # before and after
    .venv/bin/python bench/server_cpu.py --base /tmp/dc-base --rounds 3   # medians of 3
    .venv/bin/python bench/server_cpu.py --agents 600 --procs 3 --idle-seconds 30
    .venv/bin/python bench/server_cpu.py --profile /tmp/prof
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fleet_harness import Fleet, end_on_signals
from fleet_runs import start_sleeps

HERE = Path(__file__).resolve().parent
SETTLE = 5.0
FLOOD_TIMEOUT = 300.0

# Runs ``-m deploy_core.cli ...`` of the tree given as the first argument: its
# deploy_core and its plugins come before the editable install of this checkout.
_BOOT = (
    "import runpy, sys; from pathlib import Path; base = Path(sys.argv[1]); "
    "sys.path[:0] = [str(base)] + sorted(str(p) for p in (base / 'plugins').iterdir() "
    "if p.is_dir()); sys.argv = ['deployctl'] + sys.argv[4:]; "
    "runpy.run_module('deploy_core.cli', run_name='__main__', alter_sys=True)"
)


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


class Profiler:
    """``py-spy record`` of the server over one window, if asked for."""

    def __init__(self, out: Path | None, name: str) -> None:
        self.out, self.name = out, name
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, pid: int, seconds: float) -> None:
        if self.out is None:
            return
        spy = Path(sys.executable).with_name("py-spy")
        raw = self.out / f"{self.name}.collapsed"
        args = [str(spy), "record", "--pid", str(pid), "--format", "raw", "--rate", "200"]
        args += ["--duration", str(int(seconds) + 1), "--output", str(raw), "--gil"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc is None or self.out is None:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(60.0)
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10.0)
        raw = self.out / f"{self.name}.collapsed"
        if raw.exists():
            text = flat_profile(raw)
            (self.out / f"{self.name}.txt").write_text(text)
            print(f"    profile {self.name} (py-spy, own / total samples, top 25):")
            print("\n".join("      " + line for line in text.splitlines()[:27]))


def flat_profile(raw: Path, top: int = 60) -> str:
    """Own and inclusive samples per function from py-spy's collapsed stacks (sampled with
    ``--gil``: only the thread holding the GIL, i.e. Python code running, not a thread
    waiting for the GIL, which without it shows up as busy wherever it waits)."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = [f for f in stack.split(";") if not f.startswith("thread ")]
        if not frames:
            continue
        count = int(count_text)
        samples += count
        own[_short(frames[-1])] += count
        for frame in {_short(f) for f in frames}:
            total[frame] += count
    lines = [f"{samples} busy samples", f"{'own':>6} {'total':>6}  function"]
    for name, count in total.most_common(top):
        lines.append(f"{own[name]:>6} {count:>6}  {name}")
    lines.append("")
    lines.append("by own samples:")
    for name, count in own.most_common(top):
        lines.append(f"{count:>6}  {name}")
    return "\n".join(lines) + "\n"


def _short(frame: str) -> str:
    # py-spy: "function (path/to/module.py:line)"
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "deploy_core/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{name} ({path})"


def measure(tree: Path | None, name: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """One tree's figures (``tree`` None: this checkout)."""
    wrapper = [] if tree is None else ["-c", _BOOT, str(tree)]
    fleet = Fleet(
        root / name,
        server_wrapper=wrapper,
        worker_args=["--ack-refs"] if args.ack_refs else [],
    )
    ids = [f"fleet-{i:05d}" for i in range(args.agents)]
    result: dict[str, Any] = {"tree": name, "load_start": _load()}
    try:
        fleet.start_server(60.0)
        server_pid = fleet.server_pids()[0]
        join_token = fleet.make_join_token(uses=args.agents)
        time.sleep(SETTLE)
        cpu = fleet.cpu_sample()
        time.sleep(args.idle_seconds / 2)
        now, server_cpu, _ = fleet.cpu_sample()
        base_rate = (server_cpu - cpu[1]) / (now - cpu[0])  # no agent connected
        result["empty_pct"] = base_rate * 100
        started = time.monotonic()
        for k in range(args.procs):
            share = ids[k :: args.procs]
            if share:
                fleet.start_worker(f"worker-{k}", share, join_token)
        took = fleet.wait_connected(set(ids), 60.0 + 0.15 * len(ids), started)
        if took is None:
            raise RuntimeError(f"not all {len(ids)} agents connected; see {root / name}")
        result["connect_s"] = took
        time.sleep(SETTLE)  # the connects' bookkeeping, the agents' first heartbeats

        profiler = Profiler(args.profile, f"{name}-idle")
        profiler.start(server_pid, args.idle_seconds)
        cpu = fleet.cpu_sample()
        time.sleep(args.idle_seconds)
        now, server_cpu, workers_cpu = fleet.cpu_sample()
        profiler.stop()
        idle_rate = (server_cpu - cpu[1]) / (now - cpu[0])  # CPU s per s
        result["idle_pct"] = idle_rate * 100
        result["idle_ms_per_agent_s"] = (idle_rate - base_rate) * 1000 / len(ids)
        result["idle_workers_pct"] = (workers_cpu - cpu[2]) / (now - cpu[0]) * 100
        print(
            f"  {name}: {len(ids)} agents connected in {took:.1f} s; idle server "
            f"{result['idle_pct']:.2f} % of a core ({result['empty_pct']:.2f} % with none "
            f"connected): {result['idle_ms_per_agent_s']:.4f} CPU-ms per agent per s "
            f"(agent workers {result['idle_workers_pct']:.0f} %)",
            flush=True,
        )
        if args.flood_agents:
            result.update(flood(fleet, ids[: args.flood_agents], args, idle_rate, name))
    finally:
        result["load_end"] = _load()
        fleet.close()
    return result


def flood(
    fleet: Fleet, ids: list[str], args: argparse.Namespace, idle_rate: float, name: str
) -> dict[str, Any]:
    api = fleet.api
    deploys = start_sleeps(api, ids, 600, 60.0)
    time.sleep(SETTLE)  # their first reports stored
    profiler = Profiler(args.profile, f"{name}-reports")
    commanded = []
    cpu = fleet.cpu_sample()
    for worker in fleet.workers:
        mine = {cid: deploys[cid] for cid in worker.ids if cid in deploys}
        if mine:
            worker.command_flood({"events": args.events, "deploys": mine})
            commanded.append(worker)
    profiler.start(fleet.server_pids()[0], args.events * len(ids) / 400)
    results: list[dict[str, Any]] = []
    end = time.monotonic() + FLOOD_TIMEOUT
    while time.monotonic() < end:
        results = [w.stats().get("flood", {}) for w in commanded]
        if all(results):
            break
        time.sleep(0.1)
    now, server_cpu, workers_cpu = fleet.cpu_sample()
    profiler.stop()
    if not all(results) or any("error" in r for r in results):
        raise RuntimeError(f"the flood did not finish in {FLOOD_TIMEOUT:g} s: {results}")
    events = sum(r["events"] for r in results)
    unacked = sum(r["unacknowledged"] for r in results)
    first = min(r["started"] for r in results)
    drained = max(r["drained"] for r in results) - first
    took = now - cpu[0]
    busy = server_cpu - cpu[1]
    per_report = (busy - idle_rate * took) / events * 1000
    out = {
        "events": events,
        "unacknowledged": unacked,
        "rate": events / max(drained, 1e-9),
        "flood_server_cpu_s": busy,
        "flood_window_s": took,
        "cpu_ms_per_report": per_report,
        "agent_cpu_ms_per_report": (workers_cpu - cpu[2]) / events * 1000,
        "capacity_per_core": 1000 / per_report if per_report > 0 else None,
    }
    print(
        f"  {name}: {events} reports ({unacked} unacknowledged) at {out['rate']:.0f}/s; server "
        f"{busy:.2f} CPU-s in {took:.1f} s = {per_report:.3f} CPU-ms per report "
        f"(one core: ~{out['capacity_per_core'] or 0:.0f}/s); agent workers "
        f"{out['agent_cpu_ms_per_report']:.2f} CPU-ms per report",
        flush=True,
    )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=300)
    parser.add_argument("--procs", type=int, default=4, help="agent worker processes")
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    parser.add_argument("--flood-agents", type=int, default=20, help="0: no report flood")
    parser.add_argument("--events", type=int, default=300, help="reports per flooding agent")
    parser.add_argument("--base", type=Path, help="a tree to measure first (the before)")
    parser.add_argument(
        "--ack-refs",
        action="store_true",
        help="agents announce ack_refs (one ACK for many events; a server that does not know "
        "it sends one per event): with --base, the server's side of it before/after (this "
        "tree's agents announce it anyway; the flag matters for an older --base tree's)",
    )
    parser.add_argument("--profile", type=Path, help="py-spy the server; profiles go here")
    parser.add_argument("--keep", type=Path, help="keep the run's directory here")
    parser.add_argument(
        "--rounds", type=int, default=1, help="measure each tree this many times, alternating"
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    if not 1 <= args.flood_agents <= args.agents and args.flood_agents != 0:
        parser.error("--flood-agents must be between 0 and --agents")
    if args.base is not None and not (args.base / "deploy_core").is_dir():
        parser.error(f"--base {args.base} holds no deploy_core")
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    # The workers' agents scan /proc for orphans only past the run (fleet_agents.py): a
    # worker's 500 agents scanning once a minute were 84 % of its idle samples in py-spy, so
    # the idle figures measured the scans, not the agents.
    os.environ.setdefault("DEPLOY_CENTER_FLEET_REAP_INTERVAL", "86400")
    # SIGTERM and SIGHUP end the run like Ctrl-C: the fleet's workers are stopped on the way.
    end_on_signals()
    root = args.keep or Path(tempfile.mkdtemp(prefix="server-cpu-"))
    trees: list[tuple[Path | None, str]] = [(None, "after")]
    if args.base is not None:
        trees.insert(0, (args.base.resolve(), "before"))
    print(f"load {_load()}; {args.agents} agents in {args.procs} workers", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for _tree, name in trees}
    try:
        for round_ in range(args.rounds):
            for tree, name in trees:
                runs[name].append(measure(tree, name, args, root / f"round-{round_}"))
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    print(f"load {_load()}")
    # The median of the rounds (each figure on its own); every round's beside it.
    results = [
        {"tree": name, **{k: _median([r.get(k) for r in rs]) for k in rs[0]}, "all": rs}
        for name, rs in runs.items()
    ]
    keys = [
        ("empty_pct", "idle server CPU, no agent, % of a core", "{:.2f}"),
        ("idle_pct", "idle server CPU, N agents, % of a core", "{:.2f}"),
        ("idle_ms_per_agent_s", "idle CPU-ms per agent per s", "{:.4f}"),
        ("cpu_ms_per_report", "server CPU-ms per report", "{:.3f}"),
        ("capacity_per_core", "reports/s one core could take", "{:.0f}"),
        ("rate", "reports/s reached (agents' outboxes)", "{:.0f}"),
    ]
    print("| figure | " + " | ".join(r["tree"] for r in results) + " |")
    print("| --- |" + " --- |" * len(results))
    for key, label, fmt in keys:
        cells = [_cell(fmt, r, key) for r in results]
        print(f"| {label} | " + " | ".join(cells) + " |")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def _median(values: list[Any]) -> Any:
    numbers = [v for v in values if isinstance(v, int | float)]
    if not numbers or len(numbers) != len(values):
        return values[0] if values else None
    return statistics.median(numbers)


def _cell(fmt: str, result: dict[str, Any], key: str) -> str:
    if result.get(key) is None:
        return "-"
    text = fmt.format(result[key])
    every = [r.get(key) for r in result["all"]]
    if len(every) > 1 and all(v is not None for v in every):
        text += " (" + ", ".join(fmt.format(v) for v in every) + ")"
    return text


if __name__ == "__main__":
    sys.exit(main())
