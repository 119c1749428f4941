"""What the web page's clients cost with a fleet: every client (what the page read and the live
socket sent before issue 14 §6) against one page of 25 with its counts, per request, in time
and bytes, and the live socket's first clients message each way.

A real ``DeployServer`` on loopback (SQLite, or ``--pg`` a fresh PostgreSQL schema) whose
database holds N seeded client rows (``tests/client_seed.py``: states and labels like a
fleet's); nothing else runs.  Prints the medians and the ratios.

    .venv/bin/python bench/clients_page.py              # 2,000 clients, SQLite
    .venv/bin/python bench/clients_page.py --clients 10000 --pg
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from websockets.asyncio.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from client_seed import seed_clients

from deploy_core.server.app import DeployServer, ServerConfig

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


async def timed(http: httpx.AsyncClient, path: str, params: dict[str, Any]) -> tuple[float, int]:
    start = time.perf_counter()
    answer = await http.get(path, params=params)
    answer.raise_for_status()
    return time.perf_counter() - start, len(answer.content)


async def every_client(http: httpx.AsyncClient) -> tuple[float, int]:
    """All clients, following the cursor (1,000 a page), as before one answer held them."""
    start = time.perf_counter()
    size, cursor = 0, None
    for _ in range(1000):
        params: dict[str, Any] = {"limit": 1000, **({"cursor": cursor} if cursor else {})}
        answer = await http.get("/api/clients", params=params)
        answer.raise_for_status()
        size += len(answer.content)
        cursor = answer.json()["next_cursor"]
        if cursor is None:
            break
    return time.perf_counter() - start, size


async def first_message(url: str, token: str, mode: str) -> int:
    async with connect(url, max_size=2**26) as ws:
        await ws.send(json.dumps({"type": "auth", "token": token, "clients": mode}))
        await ws.recv()  # hello
        return len(await asyncio.wait_for(ws.recv(), 60))


async def run(count: int, rounds: int, db_url: str | None, root: Path) -> None:
    server = DeployServer(ServerConfig(state_dir=root, api_port=0, quic_port=0, db_url=db_url))
    await server.start()
    try:
        seed_clients(db_url or f"sqlite:///{server.state.database_file}", count)
        token = server.state.admin_token
        async with httpx.AsyncClient(
            base_url=server.api_url, headers={"Authorization": f"Bearer {token}"}, timeout=120
        ) as http:
            full = [await every_client(http) for _ in range(rounds)]
            page = [
                await timed(http, "/api/clients", {"limit": 25, "summary": 1})
                for _ in range(rounds)
            ]
            filtered = [
                await timed(
                    http,
                    "/api/clients",
                    {"limit": 25, "summary": 1, "label": ["role=web", "zone=eu-1"], "q": "host-1"},
                )
                for _ in range(rounds)
            ]
        live = server.api_url.replace("http://", "ws://") + "/api/live"
        list_bytes = await first_message(live, token, "list")
        summary_bytes = await first_message(live, token, "summary")
    finally:
        await server.stop()

    def show(name: str, samples: list[tuple[float, int]]) -> float:
        ms = statistics.median(s[0] for s in samples) * 1000
        print(f"{name:<44} {ms:9.1f} ms {samples[0][1]:>12,} bytes")
        return ms

    print(f"{count:,} clients, {'PostgreSQL' if db_url else 'SQLite'}, median of {rounds}")
    a = show("every client (1,000 a page)", full)
    b = show("page of 25 + counts (?limit=25&summary=1)", page)
    c = show("same, filtered by 2 labels and a search", filtered)
    for mode, size in (("list", list_bytes), ("summary", summary_bytes)):
        print(f"{'live socket, first clients message, ' + mode:<44} {'':>12} {size:>12,} bytes")
    print(f"ratio every client / page: {a / b:.1f}x time, {full[0][1] / page[0][1]:.0f}x bytes")
    print(f"ratio every client / filtered page: {a / c:.1f}x time")
    print(f"ratio live list / summary: {list_bytes / summary_bytes:.0f}x bytes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--pg", nargs="?", const=PG_URL, default=None, metavar="URL")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dc-clients-bench-") as tmp:
        if not args.pg:
            asyncio.run(run(args.clients, args.rounds, None, Path(tmp)))
            return
        admin = sa.create_engine(args.pg)
        schema = f"b_{uuid.uuid4().hex[:12]}"
        with admin.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        try:
            sep = "&" if "?" in args.pg else "?"
            url = f"{args.pg}{sep}options=-csearch_path%3D{schema}"
            asyncio.run(run(args.clients, args.rounds, url, Path(tmp)))
        finally:
            with admin.begin() as conn:
                conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
            admin.dispose()


if __name__ == "__main__":
    main()
