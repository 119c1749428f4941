"""The web page's "Containers" section end to end: a real server, a real agent with the Docker
monitor (interval 1 s), a container deployed with deploy.docker on the test bed's engine
(``bash scripts/docker-testbed.sh``), and headless Chromium drawing each managed container's
CPU and memory as SVG from ``GET /api/docker/monitor/{id}/series``.

Without the engine, its registry or Chromium the test skips with the reason
(``DEPLOY_CENTER_STRICT=1`` makes that a failure).
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from conftest import missing_part
from test_docker_e2e import FAST, IMAGE, NAME_LABEL, _testbed_problem, eventually
from test_web_page import Browser, admin_token, open_browser, sign_in

from deploy_core.testing import DeployCenter, free_port

AGENT = "charts-1"
PLAIN = "plain-1"  # an agent without the monitor plugin
HOSTILE = '<img src=x onerror="window.__pwned=1">&amp; "quoted"'


@pytest.fixture(scope="module")
def testbed() -> None:
    problem = _testbed_problem()
    if problem is not None:
        missing_part(problem)


@pytest.fixture(scope="module")
def center(testbed: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeployCenter]:
    c = DeployCenter(tmp_path_factory.mktemp("charts"))
    try:
        c.start_server()
        c.start_agent(AGENT, config="[services.docker_monitor]\ninterval = 1\n")
        c.env["DEPLOY_CORE_DISABLE_PLUGINS"] = "monitor_docker"
        c.start_agent(PLAIN)
        c.env.pop("DEPLOY_CORE_DISABLE_PLUGINS")
        yield c
    finally:
        c.close()


@pytest.fixture
def containers() -> Iterator[list[Any]]:
    """Containers to remove after the test (and those deploy.docker made for ``names``)."""
    client = docker.from_env(timeout=30)
    made: list[Any] = []
    yield made
    for container in client.containers.list(all=True):
        if container in made or container.labels.get(NAME_LABEL, "").startswith("charts-"):
            container.remove(force=True)
    client.close()


def series(center: DeployCenter, client_id: str = AGENT) -> dict[str, Any]:
    view: dict[str, Any] = center.api.request(
        "GET", f"/api/docker/monitor/{client_id}/series?points=120"
    )
    return view


def seed_samples(center: DeployCenter, container_id: str, name: str, count: int) -> None:
    """``count`` older samples of one container, one a second up to a minute ago, straight
    into the server's database: more than the page draws, so the server must thin them."""
    end = time.time() - 60
    rows = [
        (
            AGENT,
            container_id,
            name,
            HOSTILE,
            end - count + i + 0.5,
            "running",
            5 + 5 * math.sin(i / 20),
            1_000_000 + 1000 * i,
            2**30,
            0,
        )
        for i in range(count)
    ]
    with sqlite3.connect(center.server_dir / "deploy-center.db", timeout=30) as db:
        db.executemany(
            "INSERT INTO docker_monitor_samples (client_id, container_id, name, logical_name,"
            " ts, state, cpu_percent, memory_usage, memory_limit, restarts)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )


def by_id(view: dict[str, Any], container_id: str) -> dict[str, Any] | None:
    return next((c for c in view["containers"] if c["id"] == container_id), None)


def drawn(browser: Browser, container_id: str, kind: str) -> dict[str, Any]:
    """What the page drew for one chart: the SVG's scale and every polyline point."""
    chart = f"article[data-container={json.dumps(container_id)}] figure[data-chart={kind!r}]"
    result: dict[str, Any] = browser.js(
        f"(() => {{ const f = document.querySelector({json.dumps(chart)});"
        " const s = f && f.querySelector('svg');"
        " if (!s) return null;"
        " const d = s.dataset;"
        " return {min: +d.min, max: +d.max, t0: +d.t0, t1: +d.t1, w: +d.width, h: +d.height,"
        "  pad: +d.pad, latest: f.querySelector('.spark-latest').textContent,"
        "  labels: [f.querySelector('.spark-max').textContent,"
        "           f.querySelector('.spark-min').textContent],"
        "  title: s.querySelector('title').textContent,"
        "  points: [...s.querySelectorAll('polyline')].flatMap(p => p.getAttribute('points')"
        "    .split(' ').map(xy => xy.split(',').map(Number)))}; })()"
    )
    return result


def expected_points(ts: list[float], values: list[float | None], chart: dict[str, Any]) -> list:
    """Where the API's series should be drawn, by the scale the chart reports — and that
    scale itself checked against the series."""
    present = [(t, float(v)) for t, v in zip(ts, values, strict=True) if v is not None]
    lo, hi = min(v for _, v in present), max(v for _, v in present)
    assert chart["min"] == pytest.approx(lo) and chart["max"] == pytest.approx(hi)
    t0, t1 = present[0][0], present[-1][0]
    assert chart["t0"] == pytest.approx(t0) and chart["t1"] == pytest.approx(t1)
    w, h, pad = chart["w"], chart["h"], chart["pad"]

    def x(t: float) -> float:
        return pad + (t - t0) / (t1 - t0) * (w - 2 * pad) if t1 > t0 else w - pad

    def y(v: float) -> float:
        return h - pad - (v - lo) / (hi - lo) * (h - 2 * pad) if hi > lo else h / 2

    return [(x(t), y(v)) for t, v in present]


def test_the_page_draws_each_managed_containers_state_and_usage_live(
    center: DeployCenter, containers: list[Any], tmp_path: Path
) -> None:
    name = f"charts-{uuid.uuid4().hex[:8]}"
    port = free_port()
    deploy_id = center.api.deploy(
        "docker",
        {
            "client_id": AGENT,
            "image": f"{IMAGE}:healthcheck",
            "container_name": name,
            "ports": [f"127.0.0.1:{port}:8080"],
            "min_uptime": 0.5,
            "stop_timeout": 5,
            "health_checks": [{"type": "http", "port": port, "path": "/healthz", **FAST}],
        },
    )["deploy_id"]
    assert center.wait(deploy_id, timeout=120)["status"] == "success"
    # A managed container whose deployment name (a label: any text) is hostile markup.
    engine = docker.from_env(timeout=30)
    hostile = engine.containers.run(
        f"{IMAGE}:v1",
        detach=True,
        name=f"charts-hostile-{uuid.uuid4().hex[:6]}",
        labels={"deploy-center.managed": "1", NAME_LABEL: HOSTILE},
    )
    containers.append(hostile)
    engine.close()

    def ours() -> dict[str, Any] | None:
        view = series(center)
        mine = next((c for c in view["containers"] if c["logical_name"] == name), None)
        cpu = [v for v in mine["series"]["cpu_percent"] if v is not None] if mine else []
        return mine if len(cpu) >= 3 and by_id(view, hostile.id) else None

    mine = eventually(ours, 60, "three CPU samples of the deployed container")
    cid = mine["id"]
    seed_samples(center, hostile.id, hostile.name, 1000)

    with open_browser() as browser:
        sign_in(browser, center, admin_token(center))
        browser.js("window.__sameDocument = true")
        browser.wait_for(
            f"!!document.querySelector('#clients-body tr[data-client={PLAIN}]')",
            what="the client without the monitor listed",
        )
        # Only the client with the monitor offers its containers.
        assert browser.js(f"!!document.querySelector('button[data-containers={AGENT}]')")
        assert not browser.js(
            f"!!document.querySelector('tr[data-client={PLAIN}] button[data-containers]')"
        )
        assert browser.js("document.getElementById('containers').hidden") is True
        browser.click(f"button[data-containers={AGENT}]")
        article = f"article[data-container={json.dumps(cid)}]"
        browser.wait_for(
            f"!!document.querySelector({json.dumps(article + ' figure[data-chart=cpu] polyline')})",
            what="the CPU chart of the deployed container",
        )

        # Live: more points arrive without a reload (the agent samples every second).
        first = len(drawn(browser, cid, "cpu")["points"])
        lines = json.dumps(article + " figure[data-chart=cpu] polyline")
        browser.wait_for(
            f"[...document.querySelectorAll({lines})]"
            f".reduce((n, p) => n + p.getAttribute('points').split(' ').length, 0) > {first}",
            timeout=30,
            what="the CPU chart growing",
        )
        assert browser.js("window.__sameDocument") is True

        # Stop the samples, let the page catch up with the last one, and compare exactly.
        center.stop_agent(AGENT)
        final = series(center)
        mine, thinned = by_id(final, cid), by_id(final, hostile.id)
        assert mine is not None and thinned is not None
        last_ts, thinned_ts = mine["series"]["ts"][-1], thinned["series"]["ts"][-1]
        memory_svg = json.dumps(article + " figure[data-chart=memory] svg")
        hostile_svg = json.dumps(
            f"article[data-container={json.dumps(hostile.id)}] figure[data-chart=memory] svg"
        )
        browser.wait_for(
            f"(() => {{ const s = document.querySelector({memory_svg});"
            f" const h = document.querySelector({hostile_svg});"
            f" return s && h && Math.abs(+s.dataset.t1 - {last_ts}) < 1e-6"
            f" && Math.abs(+h.dataset.t1 - {thinned_ts}) < 1e-6; }})()",
            timeout=30,
            what="the page showing the last sample",
        )
        # The series is the raw samples here (fewer than 120), so the chart is the samples.
        raw = center.api.request(
            "GET", f"/api/docker/monitor/{AGENT}?since=0&container={cid}&limit=10000"
        )["samples"]
        assert [s["ts"] for s in raw] == mine["series"]["ts"]
        for kind, field in (("cpu", "cpu_percent"), ("memory", "memory_usage")):
            chart = drawn(browser, cid, kind)
            values = mine["series"][field]
            want = expected_points(mine["series"]["ts"], values, chart)
            assert len(chart["points"]) == len(want) == len([v for v in values if v is not None])
            assert 0 < len(chart["points"]) <= 120
            for (gx, gy), (wx, wy) in zip(chart["points"], want, strict=True):
                assert gx == pytest.approx(wx, abs=0.01) and gy == pytest.approx(wy, abs=0.01)
            # The last point is the last sample, and its value is written beside the chart.
            assert raw[-1][field] == values[-1]
            assert chart["points"][-1][1] == pytest.approx(want[-1][1], abs=0.01)
            assert "at " in chart["title"] and "min " in chart["title"]
            print(kind, "drawn", len(chart["points"]), "points, latest", chart["latest"])
        # 1,000 and more samples of the other container: at most 120 points (fewer where the
        # seeded and the live samples leave a gap), each where the API's series puts it.
        assert thinned["samples"] > 1000 and 100 < len(thinned["series"]["ts"]) <= 120
        for kind, field in (("cpu", "cpu_percent"), ("memory", "memory_usage")):
            chart = drawn(browser, hostile.id, kind)
            want = expected_points(thinned["series"]["ts"], thinned["series"][field], chart)
            assert len(chart["points"]) == len(want) == len(thinned["series"]["ts"])
            for (gx, gy), (wx, wy) in zip(chart["points"], want, strict=True):
                assert gx == pytest.approx(wx, abs=0.01) and gy == pytest.approx(wy, abs=0.01)
        cpu_chart, memory_chart = drawn(browser, cid, "cpu"), drawn(browser, cid, "memory")
        assert cpu_chart["latest"].endswith("%")
        assert memory_chart["latest"].split(" ")[1] in {"B", "KiB", "MiB", "GiB"}

        # State and health as the API has them.
        state = browser.js(
            f"document.querySelector({json.dumps(article + ' .ctr-state')}).textContent"
        )
        assert state == mine["state"] == "running"
        health = browser.js(
            f"(document.querySelector({json.dumps(article + ' .ctr-health')}) || {{}}).textContent"
        )
        assert health == mine["health"] and health in {"starting", "healthy"}
        assert (
            browser.js(f"document.querySelector({json.dumps(article + ' .ctr-name')}).textContent")
            == name
        )

        # The hostile label is text: no element made of it, nothing run.
        hostile_article = f"article[data-container={json.dumps(hostile.id)}]"
        assert (
            browser.js(
                f"document.querySelector({json.dumps(hostile_article + ' .ctr-name')}).textContent"
            )
            == HOSTILE
        )
        assert browser.js("document.querySelectorAll('#containers img').length") == 0
        assert browser.js("window.__pwned") is None
        assert browser.problems() == []

        shot = tmp_path / "containers.png"
        browser.js(f"document.querySelector({json.dumps(article)}).scrollIntoView()")
        browser.screenshot(shot)
        print("screenshot:", shot)
        assert shot.stat().st_size > 10_000

        # Closing the section stops it; nothing is read for it any more.
        browser.click("#containers-close")
        assert browser.js("document.getElementById('containers').hidden") is True


def test_the_section_backs_off_while_the_server_is_away_and_comes_back(
    center: DeployCenter, containers: list[Any]
) -> None:
    if AGENT not in center.agents or center.agents[AGENT].poll() is not None:  # stopped above
        center.start_agent(AGENT, config="[services.docker_monitor]\ninterval = 1\n")
    engine = docker.from_env(timeout=30)
    container = engine.containers.run(
        f"{IMAGE}:v1",
        detach=True,
        name=f"charts-away-{uuid.uuid4().hex[:6]}",
        labels={"deploy-center.managed": "1", NAME_LABEL: "charts-away"},
    )
    containers.append(container)
    engine.close()
    eventually(lambda: by_id(series(center), container.id), 60, "the container monitored")
    with open_browser() as browser:
        sign_in(browser, center, admin_token(center))
        browser.click(f"button[data-containers={AGENT}]")
        browser.wait_for(
            "document.getElementById('containers').dataset.loaded === 'true'",
            what="the section read",
        )
        browser.js("window.__sameDocument = true")
        center.stop_server()
        error = browser.wait_for(
            "(() => { const e = document.getElementById('containers-error');"
            " return !e.hidden && e.textContent; })()",
            timeout=30,
            what="the read failing",
        )
        assert "trying again in" in error, error
        center.start_server()
        browser.wait_for(
            "document.getElementById('containers-error').hidden"
            " && document.querySelectorAll('#containers article').length > 0",
            timeout=90,
            what="the section back after the restart",
        )
        assert browser.js("window.__sameDocument") is True
        # Closed, it reads nothing more: no request for the series after Close.
        browser.click("#containers-close")
        browser.js(
            "window.__reads = 0; const f = window.fetch;"
            " window.fetch = (u, o) => { if (String(u).includes('/series')) window.__reads++;"
            " return f(u, o); }"
        )
        time.sleep(3)  # more than the monitor interval and the section's shortest wait
        assert browser.js("window.__reads") == 0
        assert browser.js("document.getElementById('containers').hidden") is True
