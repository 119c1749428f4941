"""How much memory a real ``deployctl agent`` process holds, by the plugins it loads (issue 12
item 6: an agent is not a server; target ≤ 45 MB VmRSS with ``deploy_shell`` + ``deploy_tar``).

One ``deployctl server`` (every plugin) on loopback; then, one at a time, an agent process
with ``DEPLOY_CORE_PLUGINS`` set to each set below.  Each is measured once connected (2 s
after the server lists it) and again after one ``deploy.shell`` of ``true``: VmRSS from
``/proc/PID/status``, PSS and the anonymous part of the RSS (the process's own heap and
Python objects; the rest is pages of the interpreter and shared libraries) from
``/proc/PID/smaps_rollup``, how many modules it imported and which of the server-side
packages (both read from the process's own ``PYTHONPROFILEIMPORTTIME`` report).  The
floor is a Python that imports only aioquic, pydantic and pluggy, and the same with one
pydantic model defined (pydantic's schema machinery, which any agent using models holds).

The agents run as installed: Python's bytecode cache on (``PYTHONPYCACHEPREFIX`` in a
temporary directory, filled by one unmeasured agent first), as ``pip install`` leaves it.  A
development checkout often runs with ``PYTHONDONTWRITEBYTECODE=1`` and no cache for the
editable ``deploy_core`` and plugins, so every start compiles them from source, which leaves
0.4-0.7 MiB more in the process; ``--from-source`` measures that way.

    python bench/agent_rss.py [--from-source]
"""

from __future__ import annotations

import argparse
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
# Shell + tar, idle and connected, measured on this machine (Dec 2026; MiB: VmRSS, PSS,
# anonymous) with this bench on the code before and after commit bf1a6ca (an idle agent stops
# loading the QUIC server endpoint and deploy_tar's extraction code).  The floors stayed at
# 41.7-41.8 and 46.6-46.8 throughout.
MEASURED = (
    ("before (bf1a6ca^), as installed", "58.3-58.4", "34.8-35.6", "32.3-32.4"),
    ("after (bf1a6ca), as installed", "57.7", "33.2-33.3", "31.7"),
    ("before (bf1a6ca^), from source", "58.8", "34.1-36.0", "32.9"),
    ("after (bf1a6ca), from source", "58.4", "34.0", "32.3"),
)


def memory_kib(pid: int) -> tuple[int, int, int]:
    """(VmRSS, PSS, anonymous RSS) of process ``pid`` in KiB."""
    rss = pss = anon = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            pss = int(line.split()[1])
        elif line.startswith("Anonymous:"):
            anon = int(line.split()[1])
    return rss, pss, anon


def imported(log: str) -> tuple[int, list[str]]:
    """How many modules a process's ``-X importtime`` report names, and which server-side
    packages among them."""
    modules = {
        line.rsplit("|", 1)[1].strip()
        for line in log.splitlines()
        if line.startswith("import time:") and "|" in line
    } - {"package"}  # the report's header line
    return len(modules), sorted({m.split(".")[0] for m in modules} & set(SERVER_PACKAGES))


def mb(kib: int) -> str:
    return f"{kib / 1024:6.1f}"


def floor(code: str, env: dict[str, str]) -> tuple[int, int, int]:
    """VmRSS, PSS and anonymous RSS of a Python running ``code`` (then waiting)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", code + READY],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
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
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--from-source",
        action="store_true",
        help="run the agents with the environment as it is (no bytecode cache if "
        "PYTHONDONTWRITEBYTECODE is set) instead of as installed",
    )
    args = parser.parse_args()
    rows: list[tuple[str, ...]] = []
    with tempfile.TemporaryDirectory(prefix="agent-rss-") as tmp:
        center = DeployCenter(Path(tmp) / "center")
        base_env = dict(center.env)
        base_env.pop("DEPLOY_CORE_PLUGINS", None)
        base_env.pop("DEPLOY_CORE_DISABLE_PLUGINS", None)
        server_env = dict(base_env)
        if not args.from_source:
            base_env.pop("PYTHONDONTWRITEBYTECODE", None)
            base_env["PYTHONPYCACHEPREFIX"] = str(Path(tmp) / "pycache")
        center.env = server_env
        try:
            center.start_server()
            if not args.from_source:
                # One unmeasured agent with every plugin fills the bytecode cache, as an
                # installation would have: every module the measured agents import.
                center.env = base_env
                center.start_agent("rss-warm", timeout=120)
                center.wait(center.deploy("shell", "rss-warm", script="true"), timeout=120)
                center.stop_agent("rss-warm", signal.SIGTERM)
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
                modules, heavy = imported(center.log(f"agent-{client_id}"))
                rows.append(
                    (
                        label,
                        mb(idle[0]),
                        mb(idle[1]),
                        mb(idle[2]),
                        mb(after[0]),
                        mb(after[1]),
                        str(modules),
                        ", ".join(heavy) or "none",
                    )
                )
                center.stop_agent(client_id, signal.SIGTERM)
        finally:
            center.close()
        # The floors run as the agents did (the same bytecode cache, while it still exists).
        fl = floor(FLOOR, base_env)
        rows.append(("floor: python+aioquic+pydantic+pluggy", *map(mb, fl), "", "", "", ""))
        fl = floor(FLOOR + ONE_MODEL, base_env)
        rows.append(("floor + one pydantic model", *map(mb, fl), "", "", "", ""))
    how = "from source" if args.from_source else "as installed (bytecode cached)"
    print(f"python {sys.version.split()[0]}, pid {os.getpid()}; agents {how}; MB = MiB")
    header = (
        "agent plugins",
        "RSS",
        "PSS",
        "anon",
        "RSS after deploy",
        "PSS after",
        "modules",
        "server packages",
    )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)))
    print("\nshell + tar, idle, measured before and after the memory work (RSS, PSS, anon):")
    for label, *figures in MEASURED:
        print(f"  {label:34} {'  '.join(figures)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
