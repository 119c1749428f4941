"""What the Prometheus metrics cost: an API request through the instrumented app against
the same app without the timing and /metrics layers, and one scrape of /metrics.

Both apps run in this process over httpx's ASGI transport (no sockets), interleaved in
rounds so the machine's load falls on both alike.  Prints the times and their ratio.

    .venv/bin/python bench/metrics_overhead.py [--requests 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from deploy_core.plugins import get_plugins
from deploy_core.server.http.auth import TokenAuth
from deploy_core.testing import in_process_center


async def _per_request(client: httpx.AsyncClient, path: str, count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        answer = await client.get(path)
        assert answer.status_code == 200, answer.text
    return (time.perf_counter() - started) / count


async def main(requests: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as root:
        async with in_process_center(Path(root), get_plugins()) as center:
            server = center.server
            starlette: Any = server.app
            while not hasattr(starlette, "routes"):
                starlette = starlette.app
            headers = {"Authorization": f"Bearer {server.state.admin_token}"}
            apps = {
                "instrumented": server.app,
                "without metrics": TokenAuth(starlette, server),
            }
            clients = {
                name: httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=app),
                    base_url="http://bench",
                    headers=headers,
                )
                for name, app in apps.items()
            }
            for _ in range(20):  # a few deployments, so the scrape has series to write
                answer = await center.http.post(
                    "/api/deploy/shell", json={"client_id": "web-1", "script": "true"}
                )
                deploy_id = answer.json()["deploy_id"]
                while not (await center.http.get(f"/api/deploy/{deploy_id}")).json()["finished"]:
                    await asyncio.sleep(0.02)
            times: dict[str, list[float]] = {name: [] for name in clients}
            for round_ in range(rounds):
                order = list(clients.items())
                for name, client in order if round_ % 2 else reversed(order):
                    times[name].append(await _per_request(client, "/api/info", requests))
            scrape = [await _per_request(clients["instrumented"], "/metrics", 50) for _ in range(3)]
            size = len((await clients["instrumented"].get("/metrics")).content)
            for client in clients.values():
                await client.aclose()
    with_m, without = (statistics.median(times[n]) for n in ("instrumented", "without metrics"))
    print(f"GET /api/info, median of {rounds} rounds of {requests}:")
    print(f"  without metrics  {without * 1e6:8.1f} us")
    print(f"  instrumented     {with_m * 1e6:8.1f} us   ratio {with_m / without:.3f}")
    print(f"GET /metrics: {statistics.median(scrape) * 1e3:.2f} ms, {size} bytes")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.requests, args.rounds))
