"""How much memory a real ``deployctl agent`` process holds, by the plugins it loads (issue 12
item 6: an agent is not a server; target ≤ 45 MB VmRSS with ``deploy_shell`` + ``deploy_tar``).

One ``deployctl server`` (every plugin) on loopback; then, one at a time, an agent process
with ``DEPLOY_CORE_PLUGINS`` set to each set below.  Each is measured once connected (2 s
after the server lists it) and again after one ``deploy.shell`` of ``true``: VmRSS from
``/proc/PID/status``, PSS from ``/proc/PID/smaps_rollup``, and which of the server-side
packages it imported (read from the process's own ``PYTHONPROFILEIMPORTTIME`` report).  The
floor is a Python that imports only aioquic, pydantic and pluggy, and the same with one
pydantic model defined (pydantic's schema machinery, which any agent using models holds).

    python bench/agent_rss.py
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from deploy_core.testing import DeployCenter

SERVER_PACKAGES = ("starlette", "uvicorn", "sqlalchemy", "alembic", "httpx", "docker")
PLUGIN_SETS = {
    "deploy_shell": "deploy_shell",
    "shell + tar": "deploy_shell,deploy_tar",
    "every plugin": "",
}
FLOOR = "import aioquic.asyncio, aioquic.quic.configuration, pydantic, pluggy, sys\n"
# Pydantic builds its schema machinery on the first model: a floor for any agent using it.
ONE_MODEL = "class M(pydantic.BaseModel):\n    x: int = 0\nM(x=1)\n"
READY = "print('ready', flush=True); sys.stdin.read()\n"


def memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, PSS) of process ``pid`` in KiB."""
    rss = pss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            pss = int(line.split()[1])
    return rss, pss


def imported(log: str) -> list[str]:
    """The server-side packages named in a process's ``-X importtime`` report."""
    seen = set()
    for line in log.splitlines():
        if line.startswith("import time:") and "|" in line:
            top = line.rsplit("|", 1)[1].strip().split(".")[0]
            if top in SERVER_PACKAGES:
                seen.add(top)
    return sorted(seen)


def mb(kib: int) -> str:
    return f"{kib / 1024:6.1f}"


def floor(code: str) -> tuple[int, int]:
    """VmRSS and PSS of a Python running ``code`` (then waiting)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", code + READY],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        time.sleep(0.5)
        return memory_kib(proc.pid)
    finally:
        proc.kill()
        proc.wait(10)


def main() -> int:
    rows: list[tuple[str, str, str, str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="agent-rss-") as tmp:
        center = DeployCenter(Path(tmp) / "center")
        base_env = dict(center.env)
        base_env.pop("DEPLOY_CORE_PLUGINS", None)
        base_env.pop("DEPLOY_CORE_DISABLE_PLUGINS", None)
        center.env = base_env
        try:
            center.start_server()
            for i, (label, only) in enumerate(PLUGIN_SETS.items()):
                client_id = f"rss-{i}"
                center.env = {**base_env, "PYTHONPROFILEIMPORTTIME": "1"}
                if only:
                    center.env["DEPLOY_CORE_PLUGINS"] = only
                proc = center.start_agent(client_id, timeout=60)
                time.sleep(2)
                idle = memory_kib(proc.pid)
                record = center.wait(center.deploy("shell", client_id, script="true"), timeout=60)
                if record["status"] != "success":
                    print(f"{label}: deploy.shell ended {record['status']}", file=sys.stderr)
                time.sleep(1)
                after = memory_kib(proc.pid)
                heavy = imported(center.log(f"agent-{client_id}"))
                rows.append(
                    (
                        label,
                        mb(idle[0]),
                        mb(idle[1]),
                        mb(after[0]),
                        mb(after[1]),
                        ", ".join(heavy) or "none",
                    )
                )
                center.stop_agent(client_id, signal.SIGTERM)
        finally:
            center.close()
    fl = floor(FLOOR)
    rows.append(("floor: python+aioquic+pydantic+pluggy", mb(fl[0]), mb(fl[1]), "", "", ""))
    fl = floor(FLOOR + ONE_MODEL)
    rows.append(("floor + one pydantic model", mb(fl[0]), mb(fl[1]), "", "", ""))
    print(f"python {sys.version.split()[0]}, pid {os.getpid()}; MB = MiB")
    header = ("agent plugins", "RSS", "PSS", "RSS after deploy", "PSS after", "server packages")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
