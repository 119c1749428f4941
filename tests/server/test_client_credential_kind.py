"""Operators see what each agent signs in with (``credential``): its own key pair, or the
shared key an older server issued (issue 13), in ``GET /api/clients``, ``GET
/api/clients/{id}`` and ``deployctl clients``.

A real :class:`~deploy_core.server.app.DeployServer` (SQLite) on loopback; an agent enrolled
with a join token over real QUIC; an old-style agent made as the enrollment tests make one (a
row holding a shared key, and that key in the agent's state directory); ``deployctl`` run as
a process.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from deploy_core.server.app import DeployServer, ServerConfig
from deploy_core.server.http.responses import ClientDetail, ClientList
from deploy_core.transport import AgentConnector, Envelope, FileCredentials

pytestmark = pytest.mark.asyncio
OLD, NEW = "old-1", "new-1"


@pytest_asyncio.fixture
async def server(tmp_path: Path) -> AsyncIterator[DeployServer]:
    server = DeployServer(ServerConfig(state_dir=tmp_path / "server", api_port=0, quic_port=0))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest_asyncio.fixture
async def http(server: DeployServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=server.api_url,
        headers={"Authorization": f"Bearer {server.state.admin_token}"},
        timeout=30,
    ) as client:
        yield client


@pytest_asyncio.fixture
async def connect(server: DeployServer) -> AsyncIterator[Callable[[str, FileCredentials], None]]:
    """``connect(client_id, credentials)`` runs a real agent connector until the end."""
    running: list[tuple[AgentConnector, asyncio.Task[None]]] = []

    def start(client_id: str, credentials: FileCredentials) -> None:
        async def ignore(env: Envelope) -> None:
            return None

        connector = AgentConnector(
            host="127.0.0.1",
            port=server.transport.port,
            ca_file=server.state.certs.ca_cert,
            client_id=client_id,
            credentials=credentials,
            capabilities=dict,
            on_message=ignore,
            heartbeat_interval=0.5,
            backoff_initial=0.05,
            backoff_max=0.3,
            connect_timeout=1.0,
        )
        running.append((connector, asyncio.create_task(connector.run())))

    yield start
    for connector, task in running:
        await asyncio.wait_for(connector.stop(), 10)
        await asyncio.wait_for(task, 10)


async def credentials_shown(http: httpx.AsyncClient) -> dict[str, str]:
    answer = await http.get("/api/clients")
    assert answer.status_code == 200, answer.text
    ClientList.model_validate(answer.json())  # the documented shape, no field left out
    return {c["client_id"]: c["credential"] for c in answer.json()["clients"]}


async def eventually_shown(
    http: httpx.AsyncClient, client_id: str, credential: str, timeout: float = 30
) -> None:
    end = asyncio.get_running_loop().time() + timeout
    while (await credentials_shown(http)).get(client_id) != credential:
        assert asyncio.get_running_loop().time() < end, f"{client_id} never shown {credential}"
        await asyncio.sleep(0.05)


async def deployctl_clients(server: DeployServer, *args: str) -> str:
    """``deployctl clients ARGS`` as a process (the server keeps answering meanwhile)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEPLOY_CENTER_")}
    env["DEPLOY_CENTER_URL"] = server.api_url
    env["DEPLOY_CENTER_TOKEN"] = server.state.admin_token
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "deploy_core.cli",
        "clients",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_clients_show_shared_key_until_the_agent_upgrades_to_its_key_pair(
    tmp_path: Path, server: DeployServer, http: httpx.AsyncClient, connect: Callable[..., None]
) -> None:
    # An agent enrolled before key pairs: its row holds a shared key, and so does its state.
    shared = bytes(range(7, 39))
    await server.db(server.records.enroll, OLD, shared.hex())
    old_state = tmp_path / "old-agent"
    FileCredentials(old_state).save_key(shared)
    # An agent enrolled now, with a join token and its own key pair.
    _, token, _ = server.tokens.create_join_token(uses=1)
    (tmp_path / "join.token").write_text(token + "\n")
    connect(NEW, FileCredentials(tmp_path / "new-agent", tmp_path / "join.token"))
    await eventually_shown(http, NEW, "public_key")

    assert await credentials_shown(http) == {NEW: "public_key", OLD: "shared_key"}
    detail = await http.get(f"/api/clients/{OLD}")
    assert detail.status_code == 200, detail.text
    ClientDetail.model_validate(detail.json())
    assert detail.json()["credential"] == "shared_key"
    assert (await http.get(f"/api/clients/{NEW}")).json()["credential"] == "public_key"
    # No key of either kind is shown, only its kind.
    assert shared.hex() not in detail.text

    lines = {line.split()[0]: line for line in (await deployctl_clients(server)).splitlines()}
    assert lines[OLD].split()[-1] == "shared_key", lines
    assert lines[NEW].split()[4] == "public_key", lines  # id, "connected since" TIME, kind
    as_json = await deployctl_clients(server, "list", "--json")
    assert '"credential": "shared_key"' in as_json and '"credential": "public_key"' in as_json

    # The old agent, updated, connects with its shared key and trades it for a key pair.
    connect(OLD, FileCredentials(old_state))
    await eventually_shown(http, OLD, "public_key")
    end = asyncio.get_running_loop().time() + 30
    while (old_state / "agent.key").exists():  # it deletes the shared key once told
        assert asyncio.get_running_loop().time() < end, "the agent kept its shared key"
        await asyncio.sleep(0.05)
    assert (await http.get(f"/api/clients/{OLD}")).json()["credential"] == "public_key"
