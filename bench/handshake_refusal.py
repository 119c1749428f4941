"""How long a refused key handshake takes, for an unknown client id and for a wrong key.

The refusal must not tell a stranger which client ids exist, by its words or by its timing
(docs/security.md, "The handshake says no more than needed"). This measures, against a real
server on loopback, the time from sending AUTH to receiving the ERROR, alternating the two
cases so a busy machine slows them alike, and prints the medians and their ratio.

    python bench/handshake_refusal.py [--rounds 40]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "security"))

from security_harness import mac_for, raw_peer

from deploy_core.server.app import DeployServer, ServerConfig
from deploy_core.transport import Envelope, Kind


async def refusal_time(server: DeployServer, client_id: str) -> float:
    async with raw_peer(server.transport.port, server.state.certs.ca_cert) as peer:
        nonce = await peer.hello(client_id)
        mac = mac_for(secrets.token_bytes(32), nonce, client_id)
        started = time.perf_counter()
        peer.send_env(Envelope(kind=Kind.AUTH, payload={"method": "key", "mac": mac}))
        answer = await peer.recv(10)
        took = time.perf_counter() - started
        assert answer.kind is Kind.ERROR, answer
        return took


async def main(rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = DeployServer(ServerConfig(state_dir=Path(tmp), api_port=0, quic_port=0))
        await server.start()
        try:
            await server.db(server.records.enroll, "known", secrets.token_bytes(32).hex())
            unknown: list[float] = []
            wrong: list[float] = []
            for i in range(rounds):
                unknown.append(await refusal_time(server, f"stranger-{i}"))
                wrong.append(await refusal_time(server, "known"))
        finally:
            await server.stop()
    mu, mw = statistics.median(unknown), statistics.median(wrong)
    print(f"rounds: {rounds}")
    print(f"unknown client id: median {mu * 1000:.2f} ms")
    print(f"wrong key:         median {mw * 1000:.2f} ms")
    print(f"ratio unknown/wrong: {mu / mw:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    asyncio.run(main(parser.parse_args().rounds))
