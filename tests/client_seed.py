"""Client rows written straight into a server's database, for tests of listing a fleet (the
API's paging, filters and summary; the web page with 2,000 clients) where what is under test
is the listing, not 2,000 agent connections.

Client ``host-NNNN`` (``NNNN`` from 0): every 10th is revoked, every 7th of the rest
disconnected, the others connected; labels ``role`` (web, db, cache by ``N % 3``) and ``zone``
(eu-1, us-1 by ``N % 2``); the address it connected from is ``10.0.N/256.N%256``.
"""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa

from deploy_core.server.db import clients

ROLES = ("web", "db", "cache")
ZONES = ("eu-1", "us-1")


def client_id(n: int) -> str:
    return f"host-{n:04d}"


def state_of(n: int) -> str:
    if n % 10 == 0:
        return "revoked"
    return "disconnected" if n % 7 == 0 else "connected"


def labels_of(n: int) -> dict[str, str]:
    return {"role": ROLES[n % 3], "zone": ZONES[n % 2]}


def expected(count: int, **where: str) -> list[str]:
    """The seeded ids with ``state``/``role``/``zone`` as given, sorted."""
    found = []
    for n in range(count):
        facts = {"state": state_of(n), **labels_of(n)}
        if all(facts[k] == v for k, v in where.items()):
            found.append(client_id(n))
    return found


def _row(n: int, now: float) -> dict[str, Any]:
    state = state_of(n)
    row: dict[str, Any] = {
        "client_id": client_id(n),
        "public_key": f"{n:064x}",
        "enrolled_at": now - 3600,
        "connected": state == "connected",
        "server_id": "seeded",
        "connected_since": now - 60 if state == "connected" else None,
        "disconnected_since": None if state == "connected" else now - 30,
        "last_seen": now - 1,
        "remote": f"10.0.{n // 256}.{n % 256}:4{n % 1000:03d}",
        "capabilities": {
            "agent_version": "0.1.0",
            "deploy_types": ["deploy.shell"],
            "health_checks": [],
            "rollback_strategies": ["inline"],
        },
        "revoked_at": now - 10 if state == "revoked" else None,
    }
    row["labels"] = labels_of(n)
    return row


def seed_clients(url: str, count: int) -> None:
    """Write ``count`` seeded client rows into the (migrated) database at ``url``."""
    engine = sa.create_engine(url)
    try:
        now = time.time()
        with engine.begin() as conn:
            conn.execute(clients.insert(), [_row(n, now) for n in range(count)])
    finally:
        engine.dispose()
