"""The API over HTTPS against plain HTTP on loopback, one in-process server each (SQLite):
``GET /api/info`` on a kept-alive ``DeployClient``, and a new client per request (what each
``deployctl`` command does: build the client, connect, TLS handshake, one request).

    .venv/bin/python bench/api_tls.py [--requests 300] [--fresh 100]

Prints milliseconds per request and the https/http ratios; interleaved rounds, best of
three, because the shared host is noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import threading
import time
from pathlib import Path

from deploy_core.client import DeployClient
from deploy_core.server.app import DeployServer, ServerConfig


def start(root: Path, tls: bool) -> tuple[DeployServer, asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    server = DeployServer(ServerConfig(state_dir=root, api_port=0, quic_port=0, api_tls=tls))
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(120)
    return server, loop


def client(server: DeployServer) -> DeployClient:
    ca = server.api_tls.ca if server.api_tls else None
    return DeployClient(server.api_url, server.state.admin_token, ca=ca)


def kept_alive(server: DeployServer, n: int) -> float:
    with client(server) as api:
        api.request("GET", "/api/info")
        began = time.perf_counter()
        for _ in range(n):
            api.request("GET", "/api/info")
        return (time.perf_counter() - began) / n


def fresh(server: DeployServer, n: int) -> float:
    began = time.perf_counter()
    for _ in range(n):
        with client(server) as api:
            api.request("GET", "/api/info")
    return (time.perf_counter() - began) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--fresh", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-api-tls-") as tmp:
        servers = {tls: start(Path(tmp) / str(tls), tls) for tls in (False, True)}
        try:
            best: dict[tuple[str, bool], float] = {}
            for _ in range(3):
                for tls, (server, _loop) in servers.items():
                    for name, measure, n in (
                        ("kept-alive", kept_alive, args.requests),
                        ("new client", fresh, args.fresh),
                    ):
                        took = measure(server, n)
                        best[name, tls] = min(best.get((name, tls), took), took)
            for name in ("kept-alive", "new client"):
                http, https = best[name, False], best[name, True]
                print(
                    f"{name:>10} GET /api/info: http {http * 1000:.2f} ms, "
                    f"https {https * 1000:.2f} ms, ratio {https / http:.2f}"
                )
        finally:
            for server, loop in servers.values():
                asyncio.run_coroutine_threadsafe(server.stop(), loop).result(60)
                loop.call_soon_threadsafe(loop.stop)


if __name__ == "__main__":
    main()
