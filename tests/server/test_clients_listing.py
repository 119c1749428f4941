"""``GET /api/clients`` for a fleet: pages by id with a cursor, filters by state, search and
labels, counts made by the database (``summary=1``), and every bad query parameter refused
with ``422`` — on SQLite and PostgreSQL, against a real server with seeded client rows.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import sqlalchemy as sa
from client_seed import client_id, expected, seed_clients
from test_client_credential_kind import deployctl_clients, http

from deploy_core.server.app import DeployServer, ServerConfig
from deploy_core.server.clients import ClientFilter
from deploy_core.server.db import clients
from deploy_core.server.http.responses import ClientList

__all__ = ["http"]  # the admin's HTTP client of test_client_credential_kind, on this server
COUNT = 230


@pytest_asyncio.fixture
async def server(tmp_path: Path, db_url: str) -> AsyncIterator[DeployServer]:
    server = DeployServer(
        ServerConfig(state_dir=tmp_path / "server", api_port=0, quic_port=0, db_url=db_url)
    )
    await server.start()
    try:
        seed_clients(db_url, COUNT)
        yield server
    finally:
        await server.stop()


async def get(http: httpx.AsyncClient, **params: Any) -> dict[str, Any]:
    answer = await http.get("/api/clients", params=params)
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    ClientList.model_validate(body)  # as the OpenAPI document says
    return body


async def every_page(http: httpx.AsyncClient, **params: Any) -> tuple[list[str], int]:
    """Follow ``next_cursor`` to the end: the ids in order and how many pages."""
    ids: list[str] = []
    pages = 0
    cursor = None
    while pages < 100:
        body = await get(http, **params, **({"cursor": cursor} if cursor else {}))
        ids += [c["client_id"] for c in body["clients"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            return ids, pages
    raise AssertionError("paging never ended")


async def test_default_page_then_every_page_in_id_order(http: httpx.AsyncClient) -> None:
    first = await get(http)
    assert first["total"] == COUNT and first["limit"] == 100
    assert [c["client_id"] for c in first["clients"]] == [client_id(n) for n in range(100)]
    assert first["next_cursor"] and "summary" not in first
    ids, pages = await every_page(http, limit=7)
    assert ids == [client_id(n) for n in range(COUNT)]
    assert pages == -(-COUNT // 7)
    # A page exactly as long as what is left ends the listing: no empty page after it.
    last = await get(http, limit=COUNT)
    assert len(last["clients"]) == COUNT and last["next_cursor"] is None


async def test_filters_by_state_search_and_labels(http: httpx.AsyncClient) -> None:
    for state in ("connected", "disconnected", "revoked"):
        ids, _ = await every_page(http, state=state, limit=50)
        assert ids == expected(COUNT, state=state), state
        rows = (await get(http, state=state, limit=5))["clients"]
        assert all(bool(r["revoked_at"]) == (state == "revoked") for r in rows)
        assert all(r["connected"] == (state == "connected") for r in rows)
    # Search: a substring of the id or of the address, any case.
    assert [c["client_id"] for c in (await get(http, q="HOST-012"))["clients"]] == [
        client_id(n) for n in range(120, 130)
    ]
    assert [c["client_id"] for c in (await get(http, q="10.0.0.17:"))["clients"]] == [client_id(17)]
    # LIKE's wildcards are plain characters here.
    assert (await get(http, q="host_0"))["total"] == 0
    assert (await get(http, q="%"))["total"] == 0
    both = await get(http, q="host-01", state="revoked")
    assert [c["client_id"] for c in both["clients"]] == [client_id(n) for n in range(100, 200, 10)]


async def test_label_filters_and_their_counts(http: httpx.AsyncClient) -> None:
    ids, _ = await every_page(http, label="role=web", limit=40)
    assert ids == expected(COUNT, role="web")
    both = await get(http, label=["role=db", "zone=eu-1"], state="connected", limit=1000)
    assert [c["client_id"] for c in both["clients"]] == expected(
        COUNT, role="db", zone="eu-1", state="connected"
    )
    assert both["clients"][0]["labels"] == {"role": "db", "zone": "eu-1"}
    assert (await get(http, label="role=Web"))["total"] == 0  # values compare exactly
    assert (await get(http, label="team=web"))["total"] == 0
    # The same pair twice is one filter.
    assert (await get(http, label=["zone=us-1", "zone=us-1"]))["total"] == len(
        expected(COUNT, zone="us-1")
    )
    summary = (await get(http, summary=1, label="zone=us-1", limit=1))["summary"]
    assert summary["labels"] == {
        "role": {r: len(expected(COUNT, zone="us-1", role=r)) for r in ("web", "db", "cache")},
        "zone": {"us-1": len(expected(COUNT, zone="us-1"))},
    }
    assert summary["labels_truncated"] is False


async def test_summary_counts_by_state_in_the_database(http: httpx.AsyncClient) -> None:
    body = await get(http, summary=1, limit=1)
    states = {s: len(expected(COUNT, state=s)) for s in ("connected", "disconnected", "revoked")}
    assert body["summary"]["total"] == COUNT
    assert body["summary"]["states"] == states
    # Per state, what choosing it would list; total, what the filters match.
    chosen = await get(http, summary="yes", state="revoked", q="host-00")
    ids = [c["client_id"] for c in chosen["clients"]]
    assert ids == [n for n in expected(COUNT, state="revoked") if n.startswith("host-00")]
    assert chosen["summary"]["total"] == chosen["total"] == len(ids)
    assert chosen["summary"]["states"]["connected"] == len(
        [n for n in expected(COUNT, state="connected") if n.startswith("host-00")]
    )


def cursor_of(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("state=gone", "unknown state 'gone' (one of: connected, disconnected, revoked)"),
        ("state=connected&state=revoked", "query parameter state given 2 times"),
        ("limit=0", "query parameter limit must be between 1 and 1000"),
        ("limit=1001", "query parameter limit must be between 1 and 1000"),
        ("limit=ten", "query parameter limit must be an integer, got 'ten'"),
        ("limit=5&limit=6", "query parameter limit given 2 times"),
        ("cursor=", "invalid cursor ''"),
        ("cursor=%21%21", "invalid cursor '!!'"),
        ("cursor=" + cursor_of("a b"), "invalid cursor"),
        ("cursor=" + cursor_of("x" * 65), "invalid cursor"),
        ("cursor=" + "A" * 101, "invalid cursor"),
        ("cursor=%FF%FE", "invalid cursor"),
        ("label=role", "invalid label filter: label selector 'role': expected key=value"),
        ("label==web", "invalid label filter: label selector: invalid key ''"),
        ("label=role=a%20b", "invalid value 'a b' of 'role'"),
        ("label=role=web&label=role=db", "names 'role' twice with different values"),
        ("label=" + "&label=".join(["a=b"] * 17), "at most 16 label filters"),
        ("q=" + "x" * 129, "query parameter q is over 128 characters"),
        ("q=host%00", "query parameter q must not contain control characters"),
        ("q=a%0Ab", "query parameter q must not contain control characters"),
        ("summary=maybe", "query parameter summary must be one of"),
        ("limt=5", "unknown query parameter 'limt'"),
    ],
)
async def test_bad_query_parameters_are_refused(
    http: httpx.AsyncClient, query: str, words: str
) -> None:
    answer = await http.get("/api/clients?" + query)
    assert answer.status_code == 422, answer.text
    assert words in answer.json()["error"]


async def test_a_cursor_past_the_end_and_one_for_a_forgotten_client(
    http: httpx.AsyncClient,
) -> None:
    # A cursor names the id to continue after, whether or not that client is still there.
    after = await get(http, cursor=cursor_of(client_id(COUNT - 3)))
    assert [c["client_id"] for c in after["clients"]] == [
        client_id(COUNT - 2),
        client_id(COUNT - 1),
    ]
    assert after["total"] == COUNT and after["next_cursor"] is None
    assert (await get(http, cursor=cursor_of("zzz")))["clients"] == []
    page = await get(http, limit=3)
    gone = page["clients"][-1]["client_id"]
    assert (await http.post(f"/api/clients/{gone}/revoke")).status_code == 200
    assert (await http.delete(f"/api/clients/{gone}")).status_code == 200
    after_gone = await get(http, cursor=page["next_cursor"], limit=2)
    assert [c["client_id"] for c in after_gone["clients"]] == [client_id(3), client_id(4)]
    assert after_gone["total"] == COUNT - 1


async def test_deployctl_clients_filters_pages_and_shows_labels(
    server: DeployServer, http: httpx.AsyncClient
) -> None:
    # Every client, read a page (of 1,000) at a time: all 230, in order.
    listed = json.loads(await deployctl_clients(server, "--json"))
    assert [c["client_id"] for c in listed] == [client_id(n) for n in range(COUNT)]
    web_eu = expected(COUNT, role="web", zone="eu-1", state="connected")
    out = await deployctl_clients(
        server, "list", "--label", "role=web", "--label", "zone=eu-1", "--state", "connected"
    )
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == web_eu
    assert all(line.endswith("[role=web,zone=eu-1]") for line in lines), lines[:3]
    some = await deployctl_clients(server, "--search", "host-01", "--limit", "4")
    assert [line.split()[0] for line in some.splitlines()[:4]] == [
        client_id(n) for n in range(100, 104)
    ]
    assert some.splitlines()[4] == "(4 of 100 shown: raise --limit or narrow the filters)"
    limited = json.loads(await deployctl_clients(server, "--json", "--limit", "2"))
    assert [c["client_id"] for c in limited] == [client_id(0), client_id(1)]
    assert (await deployctl_clients(server, "--label", "role=none")) == "no client matches\n"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--label", "role"), "invalid label filter: label selector 'role': expected key=value"),
        (("--state", "gone"), "'gone' is not one of 'connected', 'disconnected', 'revoked'"),
        (("--limit", "0"), "0 is not in the range 1<=x<=1000"),
    ],
)
async def test_deployctl_clients_refuses_bad_filters(
    server: DeployServer, args: tuple[str, ...], words: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEPLOY_CENTER_")}
    env["DEPLOY_CENTER_URL"] = server.api_url
    env["DEPLOY_CENTER_TOKEN"] = server.state.admin_token
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "deploy_core.cli", "clients", *args,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode != 0 and not out
    assert words in err.decode(), err.decode()


async def test_the_fingerprint_changes_with_the_list_not_with_heartbeats(
    server: DeployServer,
) -> None:
    """What the live feed compares each second instead of reading every client."""
    records = server.records
    seen = [records.clients_fingerprint()]

    def changed() -> bool:
        seen.append(records.clients_fingerprint())
        return seen[-1] != seen[-2]

    records.touch_clients({client_id(1): 1e9, client_id(2): 1e9})  # heartbeats: not news
    assert not changed()
    records.set_disconnected(client_id(1), last_seen=1e9)  # another server's client: no-op
    assert not changed()
    await asyncio.sleep(0.01)  # times move on, as between two real events
    records.set_connected(client_id(8), remote="10.9.9.9:1", capabilities={}, labels={})
    assert changed()
    records.set_disconnected(client_id(8), last_seen=1e9)
    assert changed()
    assert records.revoke_client(client_id(3))
    assert changed()
    assert records.forget_client(client_id(3))
    assert changed()
    assert records.enroll("newcomer", public_key="ab" * 32)
    assert changed()
    summary = records.summarize_clients(ClientFilter())
    assert summary["total"] == COUNT
    assert summary["states"]["disconnected"] == len(expected(COUNT, state="disconnected")) + 2


OLD_ANSWER = {
    "clients": [
        {
            "client_id": name,
            "connected": True,
            "connected_since": "2026-12-01T00:00:00Z",
            "disconnected_since": None,
            "revoked_at": None,
            "credential": "public_key",
            "capabilities": {"deploy_types": ["deploy.shell"]},
        }
        for name in ("old-1", "old-2")
    ]
}


@pytest.mark.parametrize(
    ("args", "listed"),
    [((), ["old-1", "old-2"]), (("--label", "role=web"), None), (("--limit", "1"), None)],
)
def test_deployctl_clients_and_a_server_from_before_pages(
    args: tuple[str, ...], listed: list[str] | None
) -> None:
    """A server that answers every client whatever it is asked: listed as before without
    filters; with a filter or a limit, refused rather than shown unfiltered."""
    import http.server
    import subprocess
    import threading

    class Old(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(OLD_ANSWER).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:
            pass

    old = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Old)
    threading.Thread(target=old.serve_forever, daemon=True).start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEPLOY_CENTER_")}
        env["DEPLOY_CENTER_URL"] = f"http://127.0.0.1:{old.server_address[1]}"
        env["DEPLOY_CENTER_TOKEN"] = "any"
        done = subprocess.run(
            [sys.executable, "-m", "deploy_core.cli", "clients", *args],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        old.shutdown()
        old.server_close()
    if listed is None:
        assert done.returncode != 0 and not done.stdout
        assert "this server lists clients without filters or pages" in done.stderr
    else:
        assert done.returncode == 0, done.stderr
        assert [line.split()[0] for line in done.stdout.splitlines()] == listed


async def test_rows_whose_labels_are_not_an_object_are_counted_without_labels(
    server: DeployServer, http: httpx.AsyncClient
) -> None:
    """A JSON null, a string or a list where labels belong (rows written by hand or by an
    older server) must not fail the counts, which unpack every row's labels in SQL."""
    with server.records.engine.begin() as conn:
        for n, odd in ((1, sa.JSON.NULL), (2, "web"), (3, ["role", "web"]), (4, None)):
            conn.execute(
                clients.update().where(clients.c.client_id == client_id(n)).values(labels=odd)
            )
    body = await get(http, summary=1, limit=5)
    assert body["summary"]["total"] == COUNT
    web = [n for n in expected(COUNT, role="web") if n != client_id(3)]  # 3 lost its labels
    assert body["summary"]["labels"]["role"]["web"] == len(web)
    listed = (await get(http, label="role=web", limit=3))["clients"]
    assert [c["client_id"] for c in listed] == web[:3]
    odd = (await get(http, q="host-000", limit=5))["clients"]
    assert [c["labels"] for c in odd[1:5]] == [{}, {}, {}, {}]
