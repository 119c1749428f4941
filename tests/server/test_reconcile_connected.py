"""A disconnect the server could not record (its database was unreachable when the agent
went) must not leave the agent listed as connected to this replica: the heartbeat loop puts
the rows right (:meth:`DeployServer.reconcile_connected`).  A real server and agent; the
lost disconnect is a row left as a crash or an outage leaves it."""

from __future__ import annotations

import time
from pathlib import Path

import sqlalchemy as sa

from deploy_core.plugins import get_plugins
from deploy_core.server.db import clients
from deploy_core.testing import in_process_center


def _ghost(engine: sa.engine.Engine, client_id: str, server_id: str, since: float) -> None:
    with engine.begin() as conn:
        conn.execute(
            clients.insert().values(
                client_id=client_id,
                public_key="x" * 43,
                enrolled_at=since,
                connected=True,
                server_id=server_id,
                connected_since=since,
                last_seen=since,
            )
        )


def _connected(engine: sa.engine.Engine) -> dict[str, bool]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(clients.c.client_id, clients.c.connected))
        return {r.client_id: bool(r.connected) for r in rows}


async def test_rows_of_gone_agents_are_put_right(tmp_path: Path) -> None:
    async with in_process_center(tmp_path, get_plugins()) as center:
        server = center.server
        me = server.config.server_id
        _ghost(server.engine, "ghost-1", me, time.time() - 60)
        _ghost(server.engine, "elsewhere", "another-replica", time.time() - 60)
        assert _connected(server.engine) == {"web-1": True, "ghost-1": True, "elsewhere": True}

        assert await server.reconcile_connected() == ["ghost-1"]
        # The live agent stays connected; another replica's row is not this one's to judge.
        assert _connected(server.engine) == {"web-1": True, "ghost-1": False, "elsewhere": True}
        assert await server.reconcile_connected() == []

        answer = (await center.http.get("/api/clients/ghost-1")).json()
        assert answer["connected"] is False and answer["disconnected_since"] is not None


async def test_an_agent_that_connected_again_meanwhile_is_left_alone(tmp_path: Path) -> None:
    async with in_process_center(tmp_path, get_plugins()) as center:
        server = center.server
        me = server.config.server_id
        checked_from = time.time()
        _ghost(server.engine, "came-back", me, checked_from + 1)  # connected after the check
        _ghost(server.engine, "stale", me, checked_from - 1)
        changed = await server.db(
            server.records.mark_gone, ["came-back", "stale"], connected_before=checked_from
        )
        assert changed == ["stale"]
        assert _connected(server.engine)["came-back"] is True
