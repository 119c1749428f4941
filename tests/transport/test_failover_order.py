"""An agent's connector with several servers (issue 15 item 5): the order it tries them in,
its back-off across the list, busy hints per server, a name with several addresses, and a
failover between two real QUIC servers on 127.0.0.1 checked against one CA."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest
from test_admission import SlowAuthority, TokenCredentials, _nothing, _until

from deploy_core.transport import AgentConnector, QuicServer, ServerCerts, ensure_server_certs
from deploy_core.transport import client as client_module
from deploy_core.transport.client import ServerBusy

SERVERS = [("a.example", 1), ("b.example", 2), ("c.example", 3)]


def connector(client_id: str, ca: Path, **options: Any) -> AgentConnector:
    (host, port), *more = options.pop("servers", SERVERS)
    return AgentConnector(
        host=host,
        port=port,
        servers=more,
        ca_file=ca,
        client_id=client_id,
        credentials=TokenCredentials(),
        capabilities=dict,
        on_message=_nothing,
        **options,
    )


async def attempts(conn: AgentConnector, count: int, fail: Any) -> list[tuple[str, int]]:
    """Run ``conn`` for ``count`` attempts, each failing with ``fail(host, port)``; the
    servers tried, in order."""
    tried: list[tuple[str, int]] = []

    async def connect_once() -> None:
        tried.append((conn._host, conn._port))
        if len(tried) >= count:
            asyncio.get_running_loop().call_soon(asyncio.ensure_future, conn.stop())
        raise fail(conn._host, conn._port)

    conn._connect_once = connect_once  # type: ignore[method-assign]
    async with asyncio.timeout(60):
        await conn.run()
    return tried


def test_the_start_depends_on_the_client_id_and_the_order_is_kept(tmp_path: Path) -> None:
    starts = {connector(f"web-{i}", tmp_path / "ca.pem").servers[0] for i in range(40)}
    assert starts == set(SERVERS)  # 40 agents spread over all three
    for i in range(40):
        order = connector(f"web-{i}", tmp_path / "ca.pem").servers
        first = SERVERS.index(order[0])
        assert order == SERVERS[first:] + SERVERS[:first]
        assert connector(f"web-{i}", tmp_path / "ca.pem").servers == order  # stable


def test_one_server_listed_twice_is_one_server(tmp_path: Path) -> None:
    conn = connector("web-1", tmp_path / "ca.pem", servers=[("a", 1), ("a", 1), ("b", 1)])
    assert sorted(conn.servers) == [("a", 1), ("b", 1)]


@pytest.mark.asyncio
async def test_each_failure_moves_on_and_only_a_full_round_backs_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module.random, "uniform", lambda _low, high: high)
    conn = connector("web-1", tmp_path / "ca.pem", backoff_initial=0.001, backoff_max=0.004)
    tried = await attempts(conn, 12, lambda host, port: ConnectionError("down"))
    assert tried == conn.servers * 4
    waits = list(conn.backoff_waits)
    # Within a round: the initial back-off; after each round: doubling up to the maximum.
    assert waits == pytest.approx(
        [0.001, 0.001, 0.001, 0.001, 0.001, 0.002, 0.001, 0.001, 0.004, 0.001, 0.001, 0.004][
            : len(waits)
        ]
    )
    assert len(waits) >= 11


@pytest.mark.asyncio
async def test_one_server_backs_off_on_every_failure_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module.random, "uniform", lambda _low, high: high)
    conn = connector(
        "web-1", tmp_path / "ca.pem", servers=[("a", 1)], backoff_initial=0.001, backoff_max=0.008
    )
    tried = await attempts(conn, 6, lambda host, port: ConnectionError("down"))
    assert tried == [("a", 1)] * 6
    assert list(conn.backoff_waits)[:5] == pytest.approx([0.001, 0.002, 0.004, 0.008, 0.008])


@pytest.mark.asyncio
async def test_a_busy_hint_is_kept_with_a_quarter_of_it_as_jitter_at_most(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused again and again, the agent waits its hint plus at most a quarter of it, not
    the doubling back-off (which reaches backoff_max): the hint is the turn the server
    booked for it, and a long jitter on top left turns unused (issue 13: the fleet's return
    after a restart). A server that fails otherwise still gets the doubling back-off."""
    monkeypatch.setattr(client_module.random, "uniform", lambda _low, high: high)
    conn = connector(
        "web-1", tmp_path / "ca.pem", servers=[("a", 1)], backoff_initial=0.001, backoff_max=1.0
    )
    hints = iter([0.004, 0.004, 0.004, 0.004, 0.004, 0.004])

    def busy(host: str, port: int) -> Exception:
        return ServerBusy("busy", next(hints, 0.004))

    await attempts(conn, 6, busy)
    waits = list(conn.backoff_waits)[:5]
    assert waits == pytest.approx([0.004 + 0.001] * 5)  # the hint + max(initial, hint / 4)
    failing = connector(
        "web-1", tmp_path / "ca.pem", servers=[("a", 1)], backoff_initial=0.001, backoff_max=1.0
    )
    await attempts(failing, 6, lambda host, port: ConnectionError("down"))
    assert list(failing.backoff_waits)[:5] == pytest.approx([0.001, 0.002, 0.004, 0.008, 0.016])


@pytest.mark.asyncio
async def test_a_busy_server_is_not_tried_again_before_its_hint_but_the_next_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module.random, "uniform", lambda _low, high: 0.0)
    conn = connector(
        "web-1", tmp_path / "ca.pem", servers=SERVERS[:2], backoff_initial=0.001, backoff_max=0.01
    )
    busy = conn.servers[0]

    def fail(host: str, port: int) -> Exception:
        if (host, port) == busy:
            return ServerBusy("busy", 0.5)
        return ConnectionError("down")

    tried = await attempts(conn, 3, fail)
    assert tried == [busy, conn.servers[1], busy]
    waits = list(conn.backoff_waits)
    assert waits[0] == 0.0  # straight on to the other server
    assert waits[1] > 0.3  # back to the busy one: what is left of its hint (0.5 s)
    assert list(conn.busy_hints) == [0.5, 0.5][: len(conn.busy_hints)]


@pytest.fixture
def certs(tmp_path: Path) -> ServerCerts:
    return ensure_server_certs(tmp_path / "server")


async def quic_server(certs: ServerCerts, port: int = 0) -> QuicServer:
    server = QuicServer(
        host="127.0.0.1",
        port=port,
        certs=certs,
        authority=SlowAuthority(delay=0),
        on_connect=_nothing,
        on_message=_nothing,
        on_disconnect=_nothing,
    )
    await server.start()
    return server


@pytest.mark.asyncio
async def test_the_agent_fails_over_between_two_real_servers_and_says_where_it_is(
    certs: ServerCerts,
) -> None:
    one = await quic_server(certs)
    two = await quic_server(certs)
    conn = connector(
        "web-1",
        certs.ca_cert,
        servers=[("127.0.0.1", one.port), ("127.0.0.1", two.port)],
        backoff_initial=0.05,
        backoff_max=0.2,
        connect_timeout=2.0,
    )
    task = asyncio.create_task(conn.run())
    servers = {one.port: one, two.port: two}
    try:
        async with asyncio.timeout(60):
            assert await conn.wait_connected(20)
            first = conn.address
            assert first is not None and conn.server == f"127.0.0.1:{first[1]}"
            await servers.pop(first[1]).close()
            ((other_port, other),) = servers.items()
            await _until(lambda: conn.connected and conn.server == f"127.0.0.1:{other_port}", 30)
            assert other.session("web-1") is not None
    finally:
        await asyncio.wait_for(conn.stop(), 10)
        await asyncio.gather(task, return_exceptions=True)
        for server in servers.values():
            await asyncio.wait_for(server.close(), 10)


@pytest.mark.asyncio
async def test_a_name_with_several_addresses_is_tried_address_by_address(
    certs: ServerCerts, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await quic_server(certs)
    loop = asyncio.get_running_loop()
    resolve = loop.getaddrinfo

    async def getaddrinfo(host: str, port: int, **kwargs: Any) -> Any:
        if host != "replicas.test":
            return await resolve(host, port, **kwargs)
        # The first address has no server: the agent must move on to the second.
        return [
            (socket.AF_INET, socket.SOCK_DGRAM, 17, "", ("127.0.0.2", port)),
            (socket.AF_INET, socket.SOCK_DGRAM, 17, "", ("127.0.0.1", port)),
        ]

    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    conn = connector(
        "web-1",
        certs.ca_cert,
        servers=[("replicas.test", server.port)],
        backoff_initial=0.05,
        backoff_max=0.2,
        connect_timeout=1.0,
    )
    task = asyncio.create_task(conn.run())
    try:
        async with asyncio.timeout(60):
            assert await conn.wait_connected(30)
            assert conn.server == f"replicas.test:{server.port} (127.0.0.1)"
            assert len(conn.backoff_waits) >= 1  # 127.0.0.2 was tried first, and failed
    finally:
        await asyncio.wait_for(conn.stop(), 10)
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.wait_for(server.close(), 10)
