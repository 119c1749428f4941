"""The web page with a fleet (issue 14 §6): 2,000 clients are shown as counts by state and
by label with one page of rows, searchable and filterable, and the panels below them stay on
the first screen; the live socket sends the counts, not 2,000 rows.  Real headless Chromium
(the harness of test_web_page.py) against a real server process whose database holds 2,000
seeded client rows (``tests/client_seed.py``): the page and the API are under test, not 2,000
agent connections.  Then a rollout with real agents, watched and promoted from the page.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from client_seed import client_id, expected, seed_clients
from test_rollouts_e2e import WHO
from test_web_page import Browser, admin_token, live_url, open_browser, sign_in
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from deploy_core.server.db import clients
from deploy_core.testing import DeployCenter

FLEET = 2000
PAGE = 25
ROWS = "[...document.querySelectorAll('#clients-body tr[data-client]')].map(r => r.dataset.client)"
RANGE = "document.getElementById('clients-range').textContent"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeployCenter]:
    c = DeployCenter(tmp_path_factory.mktemp("fleet"))
    try:
        c.start_server()
        seed_clients(db_url(c), FLEET)
        yield c
    finally:
        c.close()


def db_url(center: DeployCenter) -> str:
    return f"sqlite:///{center.server_dir / 'deploy-center.db'}"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with open_browser() as b:
        yield b


def state_count(browser: Browser, state: str) -> int:
    text = browser.js(
        f"document.querySelector('#clients-states [data-state=\"{state}\"] .count').textContent"
    )
    return int(text.replace(",", ""))


def label_count(browser: Browser, pair: str) -> int:
    text = browser.js(
        f"document.querySelector('#clients-labels [data-label=\"{pair}\"] .count').textContent"
    )
    return int(text.replace(",", ""))


DASH = "\u2013"  # the page writes ranges "1<en dash>25 of 2,000"


def showing(browser: Browser, first: int, last: int, total: int, what: str) -> None:
    shown = f"{first:,}{DASH}{last:,} of {total:,}"
    browser.wait_for(f"{RANGE} === '{shown}'", timeout=60, what=f"{what}: {shown}")


def test_first_screen_with_2000_clients(fleet: DeployCenter, browser: Browser) -> None:
    started = time.monotonic()
    sign_in(browser, fleet, admin_token(fleet))
    showing(browser, 1, PAGE, FLEET, "the first page")
    print(f"sign-in to the first page of {FLEET} clients: {time.monotonic() - started:.2f} s")
    assert browser.js(ROWS) == [client_id(n) for n in range(PAGE)]
    # The counts, by state and by label, as the seed made them.
    assert state_count(browser, "all") == FLEET
    for state in ("connected", "disconnected", "revoked"):
        assert state_count(browser, state) == len(expected(FLEET, state=state)), state
    for role in ("web", "db", "cache"):
        assert label_count(browser, f"role={role}") == len(expected(FLEET, role=role))
    for zone in ("eu-1", "us-1"):
        assert label_count(browser, f"zone={zone}") == len(expected(FLEET, zone=zone))
    browser.wait_for(
        "document.getElementById('clients-enrolled').textContent.includes('2,000 enrolled')",
        what="the live count of enrolled clients",
    )
    row = "document.querySelector('#clients-body tr[data-client=\"host-0001\"]')"
    assert "connected" in browser.js(f"{row}.innerText")
    assert "role=db" in browser.js(f"{row}.innerText")
    # The first screen: a bounded page, and the deployments panel without scrolling.
    height = browser.js("document.documentElement.scrollHeight")
    viewport = browser.js("window.innerHeight")
    assert height < 4 * viewport, height
    top = browser.js("document.getElementById('deployments').getBoundingClientRect().top")
    assert top < viewport, f"the deployments panel starts at {top}px, below the first screen"
    assert browser.js("document.getElementById('clients').getBoundingClientRect().height") < 900
    print(f"page height with {FLEET} clients: {height} px; deployments panel at {top:.0f} px")

    # Paging, forward and back.
    browser.click("#clients-next")
    showing(browser, PAGE + 1, 2 * PAGE, FLEET, "the second page")
    assert browser.js(ROWS) == [client_id(n) for n in range(PAGE, 2 * PAGE)]
    browser.click("#clients-prev")
    showing(browser, 1, PAGE, FLEET, "the first page again")
    assert browser.js("document.getElementById('clients-prev').disabled") is True

    # A label from the counts, then a typed one: both must hold.
    web = expected(FLEET, role="web")
    browser.click('#clients-labels [data-label="role=web"]')
    showing(browser, 1, PAGE, len(web), "role=web")
    assert browser.js(ROWS) == web[:PAGE]
    assert (
        browser.js(
            "document.querySelector('#clients-labels [data-label=\"role=web\"]')"
            ".getAttribute('aria-pressed')"
        )
        == "true"
    )
    # Per state, the web clients (state counts follow the other filters).
    assert state_count(browser, "revoked") == len(expected(FLEET, role="web", state="revoked"))
    browser.type_into("#clients-label", "zone=eu-1")
    browser.click("#clients-label-add")
    both = expected(FLEET, role="web", zone="eu-1")
    showing(browser, 1, PAGE, len(both), "role=web and zone=eu-1")
    assert browser.js(ROWS) == both[:PAGE]
    browser.click('#clients-states [data-state="revoked"]')
    revoked = expected(FLEET, role="web", zone="eu-1", state="revoked")
    showing(browser, 1, PAGE, len(revoked), "revoked web clients in eu-1")
    assert browser.js(ROWS) == revoked[:PAGE]
    browser.click("#clients-next")
    showing(browser, PAGE + 1, 2 * PAGE, len(revoked), "their second page")
    browser.click("#clients-next")
    showing(browser, 2 * PAGE + 1, len(revoked), len(revoked), "their last page")
    assert browser.js(ROWS) == revoked[2 * PAGE :]
    assert browser.js("document.getElementById('clients-next').disabled") is True

    # Filters off one by one; then a search.
    browser.click('#clients-states [data-state="all"]')
    browser.click('#clients-active [data-filter="zone=eu-1"]')
    browser.click('#clients-active [data-filter="role=web"]')
    showing(browser, 1, PAGE, FLEET, "every client again")
    browser.type_into("#clients-q", "HOST-19")
    showing(browser, 1, PAGE, 100, "the search host-19")
    assert browser.js(ROWS) == [client_id(n) for n in range(1900, 1900 + PAGE)]
    browser.js(  # what emptying the field by hand does
        "(q => { q.value = ''; q.dispatchEvent(new Event('input')); })"
        "(document.getElementById('clients-q'))"
    )
    showing(browser, 1, PAGE, FLEET, "no search")

    # A label filter the server refuses: its 422, as written.
    browser.type_into("#clients-label", "role")
    browser.click("#clients-label-add")
    browser.wait_for("!document.getElementById('clients-error').hidden", what="the refusal")
    message = browser.js("document.querySelector('#clients-error .message').textContent")
    assert "invalid label filter" in message and "expected key=value" in message
    browser.click('#clients-active [data-filter="role"]')
    browser.wait_for("document.getElementById('clients-error').hidden", what="the error gone")
    showing(browser, 1, PAGE, FLEET, "every client after the bad filter")
    # The browser logs the refused request itself; nothing else went wrong.
    assert browser.problems() == [
        "Failed to load resource: the server responded with a status of 422 (Unprocessable Entity)"
    ]
    browser.events.clear()


def test_the_page_follows_a_client_that_disconnects(fleet: DeployCenter, browser: Browser) -> None:
    sign_in(browser, fleet, admin_token(fleet))
    showing(browser, 1, PAGE, FLEET, "the first page")
    browser.js("window.__sameDocument = true")
    connected = state_count(browser, "connected")
    row = f"document.querySelector('#clients-body tr[data-client=\"{client_id(2)}\"]')"
    assert browser.js(f"{row}.dataset.connected") == "true"
    engine = sa.create_engine(db_url(fleet))
    try:
        with engine.begin() as conn:
            conn.execute(
                clients.update()
                .where(clients.c.client_id == client_id(2))
                .values(connected=False, disconnected_since=time.time())
            )
    finally:
        engine.dispose()
    browser.wait_for(f"{row}.dataset.connected === 'false'", what="host-0002 disconnected")
    browser.wait_for(
        "document.querySelector('#clients-states [data-state=\"connected\"] .count')"
        f".textContent === '{connected - 1:,}'",
        what="one connected client fewer",
    )
    assert browser.js("window.__sameDocument") is True
    assert browser.problems() == []


def test_the_live_socket_sends_counts_not_rows_when_asked(fleet: DeployCenter) -> None:
    token = admin_token(fleet)
    with connect(live_url(fleet), max_size=2**24) as ws:
        ws.send(json.dumps({"type": "auth", "token": token, "clients": "summary"}))
        assert json.loads(ws.recv(timeout=10))["type"] == "hello"
        first = ws.recv(timeout=10)
        message = json.loads(first)
        assert message["type"] == "clients_summary"
        assert message["summary"]["total"] == FLEET
        assert message["summary"]["labels"]["zone"]["us-1"] == len(expected(FLEET, zone="us-1"))
    with connect(live_url(fleet), max_size=2**24) as ws:  # as before: every client
        ws.send(json.dumps({"type": "auth", "token": token}))
        assert json.loads(ws.recv(timeout=10))["type"] == "hello"
        full = ws.recv(timeout=10)
        assert len(json.loads(full)["clients"]) == FLEET
    print(
        f"live socket's first clients message: {len(first):,} bytes as counts, "
        f"{len(full):,} bytes as the whole list"
    )
    # Programs that send the header ask on the URL.
    with connect(
        live_url(fleet) + "?clients=summary",
        additional_headers={"Authorization": f"Bearer {token}"},
    ) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "hello"
        assert json.loads(ws.recv(timeout=10))["type"] == "clients_summary"
    for url, auth in (
        (live_url(fleet) + "?clients=everything", {"type": "auth", "token": token}),
        (live_url(fleet), {"type": "auth", "token": token, "clients": 5}),
        (live_url(fleet), {"type": "auth", "token": token, "clients": "LIST"}),
    ):
        with connect(url) as ws:
            ws.send(json.dumps(auth))
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    ws.recv(timeout=10)
        rcvd = closed.value.rcvd
        assert rcvd is not None and rcvd.code == 4400, (url, auth)
        assert rcvd.reason == "clients must be one of list, summary"
    with httpx.Client(base_url=fleet.api.url, headers={"Authorization": f"Bearer {token}"}) as h:
        page = h.get("/api/clients", params={"limit": PAGE, "summary": 1})
        assert page.status_code == 200
        print(f"GET /api/clients?limit={PAGE}&summary=1: {len(page.content):,} bytes")


def test_a_label_on_every_client_keeps_the_first_screen(
    fleet: DeployCenter, browser: Browser
) -> None:
    """2,000 distinct values of one label (a label per host): the server counts the 500
    most common pairs and says so; the counts scroll in a box of their own."""
    engine = sa.create_engine(db_url(fleet))
    try:
        with engine.begin() as conn:
            rows = conn.execute(sa.select(clients.c.client_id, clients.c.labels)).all()
            conn.execute(
                clients.update()
                .where(clients.c.client_id == sa.bindparam("cid"))
                .values(labels=sa.bindparam("new")),
                [{"cid": cid, "new": {**(labels or {}), "host": cid}} for cid, labels in rows],
            )
    finally:
        engine.dispose()
    sign_in(browser, fleet, admin_token(fleet))
    showing(browser, 1, PAGE, FLEET, "the first page")
    hint = "document.getElementById('clients-labels').innerText"
    browser.wait_for(f"{hint}.includes('Only the 500 most common labels are counted')")
    assert browser.js("document.querySelectorAll('#clients-labels [data-label]').length") == 500
    assert label_count(browser, "role=web") == len(expected(FLEET, role="web"))
    viewport = browser.js("window.innerHeight")
    top = browser.js("document.getElementById('deployments').getBoundingClientRect().top")
    assert top < viewport, f"the deployments panel starts at {top}px, below the first screen"
    # A value beyond the counts is still a filter away.
    browser.type_into("#clients-label", "host=host-1999")
    browser.click("#clients-label-add")
    showing(browser, 1, 1, 1, "the one host")
    assert browser.js(ROWS) == [client_id(1999)]
    assert browser.problems() == []


# --------------------------------------------------------------------------- a rollout

AGENTS = ["web-a", "web-b", "web-c", "web-d"]


@pytest.fixture(scope="module")
def center(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeployCenter]:
    c = DeployCenter(tmp_path_factory.mktemp("web-rollout"))
    try:
        c.start_server()
        for name in AGENTS:
            c.start_agent(name, config='[agent]\nlabels = {role = "web"}\n')
        yield c
    finally:
        c.close()


def wait_rollout(center: DeployCenter, rollout_id: str, status: str) -> None:
    """Until the API shows the rollout in ``status`` (at most 120 s)."""
    end = time.monotonic() + 120
    while (now := center.api.request("GET", f"/api/rollouts/{rollout_id}"))["status"] != status:
        assert time.monotonic() < end, f"rollout still {now['status']}, not {status}: {now}"
        time.sleep(0.2)


def test_a_rollout_seen_and_promoted_from_the_page(
    center: DeployCenter, browser: Browser, tmp_path: Path
) -> None:
    sign_in(browser, center, admin_token(center))
    answer = center.api.request(
        "POST",
        "/api/rollouts",
        json={
            "type": "shell",
            "request": {"script": "echo rolled on $(hostname)", "timeout": 60},
            "targets": {"selector": {"role": "web"}},
            "strategy": {"canary": 1, "canary_action": "pause", "batch_size": 2},
        },
    )
    rollout_id = answer["rollout_id"]
    link = f'#rollouts-body a[data-rollout="{rollout_id}"]'
    browser.wait_for(
        f"!!document.querySelector('{link}')", timeout=60, what="the rollout in the list"
    )
    # The list is redrawn on every live rollout event; a redraw between the mouse's press and
    # release loses the click (as it would a person's), so click again until the view opens.
    for _ in range(5):
        browser.click(link)
        try:
            browser.wait_for(
                f"location.hash === '#rollout/{rollout_id}'", timeout=5, what="the rollout opened"
            )
            break
        except AssertionError:
            continue
    wait_rollout(center, rollout_id, "paused")  # a loaded machine runs the canary slowly
    browser.wait_for(
        "document.getElementById('r-status').textContent === 'paused'",
        what="the rollout paused after its canary",
    )
    chips = "[...document.querySelectorAll('#r-batches .chip')]"
    assert browser.js(f"{chips}.map(c => c.dataset.client)") == AGENTS
    assert browser.js(f"{chips}.map(c => c.dataset.status)") == [
        "success",
        "waiting",
        "waiting",
        "waiting",
    ]
    assert browser.js("[...document.querySelectorAll('#r-batches .batch')].length") == 3
    assert "canary" in browser.js("document.querySelector('#r-batches .batch').innerText")
    assert browser.js("document.getElementById('r-promote').hidden") is False
    assert browser.js("document.getElementById('r-resume').hidden") is True
    assert (
        browser.js("document.querySelector('#r-counts [data-count=\"success\"]').textContent")
        == "success 1"
    )
    browser.click("#r-promote")
    wait_rollout(center, rollout_id, "succeeded")
    browser.wait_for(
        "document.getElementById('r-status').textContent === 'succeeded'",
        what="the rollout succeeded",
    )
    browser.wait_for(f"{chips}.every(c => c.dataset.status === 'success')", what="every chip green")
    assert browser.js("document.getElementById('r-abort').hidden") is True
    row = f"document.querySelector('tr[data-rollout-row=\"{rollout_id}\"]').innerText"
    assert "succeeded" in browser.js(row) and "4/4 done" in browser.js(row)
    # Each chip leads to its host's own deployment.
    deploy_id = browser.js(f"{chips}[3].dataset.deploy")
    assert center.api.get(deploy_id)["status"] == "success"
    assert center.api.get(deploy_id)["client_id"] == AGENTS[3]
    shot = tmp_path / "web-rollout.png"
    browser.screenshot(shot)
    print(f"screenshot: {shot}")
    assert browser.problems() == []


def test_a_rollout_paused_resumed_and_aborted_from_the_page(
    center: DeployCenter, browser: Browser
) -> None:
    sign_in(browser, center, admin_token(center))
    rollout_id = center.api.request(
        "POST",
        "/api/rollouts",
        json={
            "type": "shell",
            "request": {"script": "sleep 3; echo slow", "timeout": 60},
            "targets": {"clients": AGENTS},
            "strategy": {"max_parallel": 1},
        },
    )["rollout_id"]
    browser.js(f"location.hash = '#rollout/{rollout_id}'")
    status = "document.getElementById('r-status').textContent"
    browser.wait_for(f"{status} === 'running'", timeout=60, what="the rollout running")
    browser.click("#r-pause")
    browser.wait_for(f"{status} === 'paused'", what="paused by the operator")
    assert "paused by an operator" in browser.js("document.getElementById('r-paused').textContent")
    assert browser.js("document.getElementById('r-promote').hidden") is True
    browser.click("#r-resume")
    browser.wait_for(f"{status} === 'running'", what="running again")
    # A button the view still showed after the rollout moved on: the API's 409, as written.
    browser.js("document.getElementById('r-promote').hidden = false")
    browser.click("#r-promote")
    browser.wait_for("!document.getElementById('r-action-error').hidden", what="the refusal")
    shown = browser.js("document.querySelector('#r-action-error .message').textContent")
    refused = httpx.post(
        f"{center.api.url}/api/rollouts/{rollout_id}/promote",
        headers={"Authorization": f"Bearer {admin_token(center)}"},
    )
    assert refused.status_code == 409 and shown == refused.json()["error"]
    assert browser.js("document.querySelector('#r-action-error .where').textContent") == (
        f"POST /api/rollouts/{rollout_id}/promote \u2192 409"
    )
    browser.js("window.confirm = () => true")  # the operator says yes
    browser.click("#r-abort")
    browser.wait_for(f"{status} === 'aborted'", what="the rollout aborted")
    chips = "[...document.querySelectorAll('#r-batches .chip')].map(c => c.dataset.status)"
    browser.wait_for(f"{chips}.includes('skipped')", what="targets never started: skipped")
    final = center.api.request("GET", f"/api/rollouts/{rollout_id}")
    assert final["status"] == "aborted"
    for name in ("r-pause", "r-resume", "r-promote", "r-abort"):
        assert browser.js(f"document.getElementById('{name}').hidden") is True, name
    # The 409 above is in the browser's log; nothing else went wrong.
    assert browser.problems() == [
        "Failed to load resource: the server responded with a status of 409 (Conflict)"
    ]
    browser.events.clear()


def test_a_failing_host_stops_the_rollout_and_is_named_with_its_error(
    center: DeployCenter, browser: Browser
) -> None:
    sign_in(browser, center, admin_token(center))
    script = WHO + 'echo "on $host"; if [ "$host" = web-b ]; then echo broken >&2; exit 3; fi\n'
    rollout_id = center.api.request(
        "POST",
        "/api/rollouts",
        json={
            "type": "shell",
            "request": {"script": script, "timeout": 60},
            "targets": {"clients": AGENTS},
            "strategy": {"max_parallel": 1, "max_failures": 0},
        },
    )["rollout_id"]
    browser.js(f"location.hash = '#rollout/{rollout_id}'")
    wait_rollout(center, rollout_id, "failed")
    browser.wait_for(
        "document.getElementById('r-status').textContent === 'failed'", what="the rollout failed"
    )
    chips = "[...document.querySelectorAll('#r-batches .chip')].map(c => c.dataset.status)"
    browser.wait_for(
        f"{chips}.join() === 'success,failed,skipped,skipped'", what="web-b red, c and d skipped"
    )
    assert browser.js("document.getElementById('r-failing-box').hidden") is False
    failing = browser.js(
        "[...document.querySelectorAll('#r-failing li')].map(li => li.dataset.client)"
    )
    assert failing == ["web-b"]
    line = browser.js("document.querySelector('#r-failing li').innerText")
    record = center.api.get(browser.js("document.querySelector('#r-failing li a').hash.slice(8)"))
    assert record["client_id"] == "web-b" and record["status"] == "failed"
    assert "failed" in line and record["error"] in line
    reason = center.api.request("GET", f"/api/rollouts/{rollout_id}")["reason"]
    assert browser.js("document.getElementById('r-reason').textContent") == reason
    assert browser.problems() == []


def test_older_rollouts_are_a_click_away(center: DeployCenter, browser: Browser) -> None:
    for _ in range(22):
        made = center.api.request(
            "POST",
            "/api/rollouts",
            json={
                "type": "shell",
                "request": {"script": "true"},
                "targets": {"clients": ["web-a"]},
            },
        )
        center.api.request("POST", f"/api/rollouts/{made['rollout_id']}/abort")
    total = center.api.request("GET", "/api/rollouts?limit=1")["total"]
    assert total >= 22
    sign_in(browser, center, admin_token(center))
    rows = "document.querySelectorAll('#rollouts-body tr').length"
    browser.wait_for(f"{rows} === 20", what="the 20 newest rollouts")
    assert browser.js("document.getElementById('rollouts-count').textContent") == (
        f"20 newest of {total}"
    )
    browser.click("#rollouts-older")
    browser.wait_for(f"{rows} === {min(total, 40)}", what="the older ones too")
    listed = browser.js(
        "[...document.querySelectorAll('#rollouts-body a[data-rollout]')]"
        ".map(a => a.dataset.rollout)"
    )
    newest = center.api.request("GET", f"/api/rollouts?limit={min(total, 40)}")["items"]
    assert listed == [r["rollout_id"] for r in newest]
    assert browser.problems() == []
