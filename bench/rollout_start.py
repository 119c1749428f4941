"""How fast the server creates the deployments of many clients: one rollout with
``max_parallel`` N against N ``POST /api/deploy/shell`` from 8 concurrent callers.

In one process: a server (SQLite, or PostgreSQL with ``--pg``) with N clients written to its
database as connected (no agents: nothing is sent, nothing runs), so this measures the
server's side alone: records, locks and histories created, per second.  Prints both rates
and their ratio, from this one run.

    python bench/rollout_start.py [-n 1000] [--pg URL]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from deploy_core.plugins import load_plugins
from deploy_core.server.app import DeployServer, ServerConfig

TIMEOUT = 600.0


async def _until(check: Any, what: str) -> None:
    end = time.monotonic() + TIMEOUT
    while not await check():
        if time.monotonic() > end:
            raise TimeoutError(f"{what} not done within {TIMEOUT:g} s")
        await asyncio.sleep(0.2)


async def run(n: int, db_url: str | None) -> tuple[float, float]:
    plugins = load_plugins(env={"DEPLOY_CORE_PLUGINS": "deploy_shell"})
    with tempfile.TemporaryDirectory(prefix="rollout-start-") as tmp:
        config = ServerConfig(state_dir=Path(tmp), api_port=0, quic_port=0, db_url=db_url)
        server = DeployServer(config, plugins=plugins)
        await server.start()
        try:
            records = server.records
            caps = {"agent_version": "bench", **plugins.capabilities()}

            def seed(prefix: str) -> list[str]:
                ids = [f"{prefix}-{i:05d}" for i in range(n)]
                for i, cid in enumerate(ids):
                    records.enroll(cid, public_key=f"{prefix}{i:060x}"[-64:])
                    records.set_connected(
                        cid, remote="127.0.0.1:1", capabilities=caps, labels={"set": prefix}
                    )
                return ids

            rolled = await asyncio.to_thread(seed, "r")
            posted = await asyncio.to_thread(seed, "p")
            headers = {"Authorization": f"Bearer {server.state.admin_token}"}
            async with httpx.AsyncClient(
                base_url=server.api_url, headers=headers, timeout=60
            ) as http:
                started = time.monotonic()
                answer = await http.post(
                    "/api/rollouts",
                    json={
                        "type": "shell",
                        "request": {"script": "true"},
                        "targets": {"selector": {"set": "r"}},
                        "strategy": {"max_parallel": n},
                    },
                )
                answer.raise_for_status()
                url = f"/api/rollouts/{answer.json()['rollout_id']}"

                async def all_created() -> bool:
                    counts = (await http.get(url)).json()["counts"]
                    return counts.get("pending", 0) + counts.get("executing", 0) >= len(rolled)

                await _until(all_created, "the rollout's deployments")
                by_rollout = time.monotonic() - started

                queue = list(posted)
                started = time.monotonic()

                async def caller() -> None:
                    while queue:
                        cid = queue.pop()
                        response = await http.post(
                            "/api/deploy/shell", json={"client_id": cid, "script": "true"}
                        )
                        response.raise_for_status()

                await asyncio.gather(*(caller() for _ in range(8)))
                by_posts = time.monotonic() - started
        finally:
            await server.stop()
    return by_rollout, by_posts


def _fresh_schema(url: str) -> tuple[str, Any]:
    """A schema of its own in ``url``'s database (dropped at the end): the server's URL, and
    what drops it."""
    import uuid

    import sqlalchemy as sa

    engine = sa.create_engine(url, connect_args={"connect_timeout": 5})
    schema = f"rollout_start_{uuid.uuid4().hex[:12]}"
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))

    def drop() -> None:
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        engine.dispose()

    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options=-csearch_path%3D{schema}", drop


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=1000, help="clients (default 1000)")
    parser.add_argument(
        "--pg", default=None, help="a PostgreSQL URL: a fresh schema in it (default: SQLite)"
    )
    args = parser.parse_args()
    if args.n < 1:
        raise SystemExit("-n must be at least 1")
    db_url, drop = _fresh_schema(args.pg) if args.pg else (None, None)
    try:
        by_rollout, by_posts = asyncio.run(run(args.n, db_url))
    finally:
        if drop is not None:
            drop()
    print(f"{args.n} deployments created, {'PostgreSQL' if args.pg else 'SQLite'}:")
    print(f"  one rollout (max_parallel {args.n}): {by_rollout:.2f} s, {args.n / by_rollout:.0f}/s")
    print(f"  {args.n} POSTs, 8 at a time:        {by_posts:.2f} s, {args.n / by_posts:.0f}/s")
    print(f"  ratio (POSTs time / rollout time): {by_posts / by_rollout:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
