"""Output flood: a shell deployment that prints N bytes, against a real server and agent.

Runs `yes "line of output 0123456789" | head -c N` locally first (its own duration), then as
a shell deployment through a real server and agent, each its own process on loopback
(SQLite), and prints: the final status, the deployment's time beside the script's own,
each process's RSS growth (peak VmHWM minus the RSS before the deployment), the agent
journal's peak size (database + WAL, sampled) beside the server's log budget, and how much
log the server kept.  Targets (issue 10): success within the script's duration + 2 s, RSS
growth <= 50 MB each, journal <= 2 x the log budget.

    python bench/output_flood.py [--bytes 200M] [--gigabyte] [--max-log-bytes 10M]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from deploy_core.testing import DeployCenter

LINE = "line of output 0123456789"
MB = 1_000_000
TARGET_EXTRA_SECONDS = 2.0
TARGET_RSS_GROWTH = 50 * 1024 * 1024


def size(text: str) -> int:
    """``200M``, ``1G``, ``10MiB`` or a plain number of bytes."""
    units = {"K": 1000, "M": MB, "G": 1000 * MB, "KIB": 1024, "MIB": 1 << 20, "GIB": 1 << 30}
    text = text.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * units[unit])
    return int(text)


def script(n: int) -> str:
    return f'yes "{LINE}" | head -c {n}'


def proc_status(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` field in bytes (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise LookupError(f"{field} not in /proc/{pid}/status")


class Sampler(threading.Thread):
    """Samples the journal's size on disk every 20 ms until stopped."""

    def __init__(self, journal: Path) -> None:
        super().__init__(daemon=True)
        self.files = [journal, journal.with_name(journal.name + "-wal")]
        self.peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            total = 0
            for path in self.files:
                with contextlib.suppress(FileNotFoundError):
                    total += path.stat().st_size
            self.peak = max(self.peak, total)
            time.sleep(0.02)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def local_duration(n: int) -> float:
    start = time.perf_counter()
    subprocess.run(["/bin/sh", "-c", script(n)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bytes", type=size, default=200 * MB, help="output size (200M)")
    parser.add_argument("--gigabyte", action="store_true", help="print 1 GB instead")
    parser.add_argument("--max-log-bytes", type=size, default=10 << 20, help="server budget")
    args = parser.parse_args()
    n = 1000 * MB if args.gigabyte else args.bytes
    local = local_duration(n)
    with tempfile.TemporaryDirectory() as tmp:
        center = DeployCenter(Path(tmp))
        center.server_args = ["--max-log-bytes", str(args.max_log_bytes)]
        try:
            center.start_server()
            agent = center.start_agent("flood")
            center.wait(center.deploy("shell", "flood", script="echo warm-up"))
            time.sleep(1.0)
            server_pid, agent_pid = center.server_proc.pid, agent.pid
            server_before = proc_status(server_pid, "VmRSS")
            agent_before = proc_status(agent_pid, "VmRSS")
            server_cpu, agent_cpu = cpu_seconds(server_pid), cpu_seconds(agent_pid)
            sampler = Sampler(Path(tmp) / "agent-flood" / "journal.db")
            sampler.start()
            start = time.perf_counter()
            deploy_id = center.deploy("shell", "flood", script=script(n), timeout=3600)
            record = center.wait(deploy_id, timeout=3600)
            took = time.perf_counter() - start
            time.sleep(0.5)
            sampler.done.set()
            sampler.join()
            server_cpu = cpu_seconds(server_pid) - server_cpu
            agent_cpu = cpu_seconds(agent_pid) - agent_cpu
            server_growth = proc_status(server_pid, "VmHWM") - server_before
            agent_growth = proc_status(agent_pid, "VmHWM") - agent_before
            entries: list[dict[str, str]] = []
            after = 0
            while page := center.api.logs(deploy_id, after=after)["lines"]:
                entries.extend(page)
                after = page[-1]["id"]
            kept = sum(len(entry["line"].encode()) for entry in entries)
            marker = next(
                (e["line"] for e in entries if e["stream"] in ("agent", "server")), "(no marker)"
            )
            drops = center.log("server").count(" disconnected")
        finally:
            center.close()
    print(f"output: {n / MB:.0f} MB, server log budget {args.max_log_bytes / MB:.1f} MB")
    print(f"status: {record['status']}; agent disconnections seen by the server: {drops}")
    print(
        f"time: deployment {took:.2f} s, script alone {local:.2f} s "
        f"(target <= {local + TARGET_EXTRA_SECONDS:.2f} s)"
    )
    print(f"CPU: agent {agent_cpu:.2f} s, server {server_cpu:.2f} s")
    print(f"agent RSS growth: {agent_growth / MB:.1f} MB (target <= 52.4 MB)")
    print(f"server RSS growth: {server_growth / MB:.1f} MB (target <= 52.4 MB)")
    print(
        f"journal peak: {sampler.peak / MB:.2f} MB = {sampler.peak / args.max_log_bytes:.2f} x "
        "budget (target <= 2)"
    )
    print(f"server kept {kept / MB:.2f} MB of log in {len(entries)} lines; marker: {marker}")
    ok = (
        record["status"] == "success"
        and drops == 0
        and took <= local + TARGET_EXTRA_SECONDS
        and max(agent_growth, server_growth) <= TARGET_RSS_GROWTH
        and sampler.peak <= 2 * args.max_log_bytes
    )
    print("targets met" if ok else "targets NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
