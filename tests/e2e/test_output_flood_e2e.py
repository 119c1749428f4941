"""A deployment that prints 50 MB (issue 10 §4, "Bounded memory under any output volume").

It ends ``success``; the server keeps the head and the tail of the output within its
per-deployment budget, with the agent's marker between them; the agent's journal never
grows past twice that budget; and the agent's connection holds throughout.  (Speed and
memory are measured by bench/output_flood.py, not here.)
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

from deploy_core.testing import DeployCenter

BUDGET = 2_000_000
OUTPUT = 50_000_000
LINE = "line of output 0123456789"


def test_fifty_megabytes_of_output_end_in_success_within_the_log_budget(tmp_path: Path) -> None:
    center = DeployCenter(tmp_path / "center")
    center.server_args = ["--max-log-bytes", str(BUDGET)]
    journal = center.root / "agent-flood" / "journal.db"
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            size = 0
            for path in (journal, journal.with_name("journal.db-wal")):
                with contextlib.suppress(FileNotFoundError):
                    size += path.stat().st_size
            peak = max(peak, size)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        center.start_server()
        center.start_agent("flood")
        sampler.start()
        script = f'yes "{LINE}" | head -c {OUTPUT}; echo; echo "exit status of the flood: $?"'
        deploy_id = center.deploy("shell", "flood", script=script, timeout=600)
        record = center.wait(deploy_id, timeout=600)
        stop.set()
        sampler.join(5)
        assert record["status"] == "success", record["error"]
        assert record["result"]["stdout_tail"].endswith("exit status of the flood: 0\n")
        entries, after = [], 0
        while page := center.api.logs(deploy_id, after=after)["lines"]:
            entries.extend(page)
            after = page[-1]["id"]
        stored = sum(len(entry["line"].encode()) for entry in entries)
        assert BUDGET * 0.9 < stored <= BUDGET
        (marker,) = [entry for entry in entries if entry["stream"] == "agent"]
        at = entries.index(marker)
        assert {entry["line"] for entry in entries[: at - 1]} == {LINE}
        assert entries[-1]["line"] == "exit status of the flood: 0"
        assert entries[at + 5]["line"] == LINE  # the tail is the same output, in order
        dropped = int(marker["line"].split()[2])
        assert dropped > OUTPUT - 2 * BUDGET
        assert not any(entry["stream"] == "server" for entry in entries)  # never cut there
        assert 0 < peak <= 2 * BUDGET, f"journal peaked at {peak} bytes"
        agent_log = center.log("agent-flood")
        assert "connection to" not in agent_log or " lost" not in agent_log, agent_log[-3000:]
    finally:
        stop.set()
        center.close()
