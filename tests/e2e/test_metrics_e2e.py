"""Prometheus metrics end to end: a real server process and a real agent process, scraped
over HTTP and parsed with prometheus_client's own parser (issue 16 §1)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from deploy_core.testing import DeployCenter, free_port

Samples = dict[str, list[tuple[dict[str, str], float]]]


@pytest.fixture(scope="module")
def center(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeployCenter]:
    c = DeployCenter(tmp_path_factory.mktemp("center"))
    c.agent_metrics_port = free_port()  # type: ignore[attr-defined]
    try:
        c.start_server()
        c.start_agent(
            "web-1",
            config=f'[metrics]\nlisten = "127.0.0.1:{c.agent_metrics_port}"\n',  # type: ignore[attr-defined]
        )
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def metrics_token(center: DeployCenter) -> str:
    token: str = center.api.request(
        "POST", "/api/tokens", json={"name": "prometheus", "scope": "metrics"}
    )["token"]
    return token


def scrape(url: str, token: str | None) -> tuple[dict[str, Any], Samples]:
    """The metric families (name -> type) and every sample (name -> [(labels, value)])."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    answer = httpx.get(url, headers=headers, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    types: dict[str, Any] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(answer.text):
        types[family.name] = family.type
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return types, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` (0 if none)."""
    return sum(
        v for have, v in samples.get(name, []) if all(have.get(k) == w for k, w in labels.items())
    )


def server_metrics(center: DeployCenter, token: str) -> tuple[dict[str, Any], Samples]:
    return scrape(f"http://127.0.0.1:{center.api_port}/metrics", token)


def wait_for(
    center: DeployCenter, token: str, name: str, at_least: float, **labels: str
) -> Samples:
    """Scrape until ``name`` reaches ``at_least`` (a status change is counted when the server
    publishes it, which may follow the API's answer by a moment)."""
    end = time.monotonic() + 30
    while True:
        _types, samples = server_metrics(center, token)
        if value(samples, name, **labels) >= at_least or time.monotonic() > end:
            return samples
        time.sleep(0.2)


def test_values_move_after_a_success_and_a_failure(
    center: DeployCenter, metrics_token: str
) -> None:
    types, before = server_metrics(center, metrics_token)
    expected = {
        "deploy_center_deployments_started": "counter",
        "deploy_center_deployments_finished": "counter",
        "deploy_center_deployment_duration_seconds": "histogram",
        "deploy_center_deployment_status_duration_seconds": "histogram",
        "deploy_center_deployments_active": "gauge",
        "deploy_center_agents_connected": "gauge",
        "deploy_center_agents_known": "gauge",
        "deploy_center_agent_connects": "counter",
        "deploy_center_agent_disconnects": "counter",
        "deploy_center_agent_refusals": "counter",
        "deploy_center_quic_messages": "counter",
        "deploy_center_quic_message_bytes": "counter",
        "deploy_center_artifact_bytes_served": "counter",
        "deploy_center_watchdog_timeouts": "counter",
        "deploy_center_rollbacks": "counter",
        "deploy_center_ingest_batch_size": "histogram",
        "deploy_center_ingest_commit_seconds": "histogram",
        "deploy_center_http_request_duration_seconds": "histogram",
        "deploy_center_build_info": "gauge",
    }
    for name, kind in expected.items():
        assert types.get(name) == kind, (name, types.get(name))
    assert value(before, "deploy_center_agents_connected") == 1
    assert value(before, "deploy_center_agents_known", state="enrolled") == 1
    assert value(before, "deploy_center_agent_connects_total") >= 1
    assert (
        value(before, "deploy_center_quic_messages_total", direction="received", kind="auth") >= 1
    )

    ok = center.deploy("shell", "web-1", script="echo fine")
    assert center.wait(ok)["status"] == "success"
    bad = center.deploy("shell", "web-1", script="echo no >&2; exit 3")
    assert center.wait(bad)["status"] == "failed"
    after = wait_for(center, metrics_token, "deploy_center_deployments_finished_total", 2)

    shell = {"type": "deploy.shell"}
    started = value(after, "deploy_center_deployments_started_total", **shell)
    assert started - value(before, "deploy_center_deployments_started_total", **shell) == 2
    for status in ("success", "failed"):
        moved = value(
            after, "deploy_center_deployments_finished_total", status=status, **shell
        ) - value(before, "deploy_center_deployments_finished_total", status=status, **shell)
        assert moved == 1, status
    count = "deploy_center_deployment_duration_seconds_count"
    assert value(after, count, **shell) - value(before, count, **shell) == 2
    # The +Inf bucket holds every observation; the sum is a real duration.
    assert value(after, "deploy_center_deployment_duration_seconds_bucket", le="+Inf", **shell) == (
        value(after, count, **shell)
    )
    assert value(after, "deploy_center_deployment_duration_seconds_sum", **shell) > 0
    # Each stage the shell type passes through is timed.
    for status in ("pending", "script_running"):
        assert (
            value(
                after,
                "deploy_center_deployment_status_duration_seconds_count",
                status=status,
                **shell,
            )
            >= 2
        ), status
    assert value(after, "deploy_center_deployments_active") == 0
    # The agents' reports were committed by the ingest, batch by batch.
    for name in ("deploy_center_ingest_batch_size", "deploy_center_ingest_commit_seconds"):
        assert value(after, f"{name}_count") > value(before, f"{name}_count"), name
    assert value(after, "deploy_center_ingest_batch_size_sum") >= value(
        after, "deploy_center_ingest_batch_size_count"
    )
    # Events and acknowledgements moved, with their bytes.
    received = value(after, "deploy_center_quic_messages_total", direction="received", kind="event")
    assert received > value(
        before, "deploy_center_quic_messages_total", direction="received", kind="event"
    )
    assert (
        value(after, "deploy_center_quic_message_bytes_total", direction="sent", kind="command") > 0
    )
    # Routes by template: the deploy ids the test fetched are in no label.
    routes = {
        labels["route"] for labels, _ in after["deploy_center_http_request_duration_seconds_count"]
    }
    assert "/api/deploy/{kind}" in routes
    assert "/api/deploy/{deploy_id}" in routes
    every_label = {v for series in after.values() for labels, _ in series for v in labels.values()}
    assert not any(ok in v or bad in v for v in every_label)
    assert (
        value(
            after,
            "deploy_center_http_request_duration_seconds_count",
            method="POST",
            route="/api/deploy/{kind}",
            status="202",
        )
        >= 2
    )


def test_the_agent_serves_its_own_metrics(center: DeployCenter, metrics_token: str) -> None:
    port = center.agent_metrics_port  # type: ignore[attr-defined]
    _types, before = scrape(f"http://127.0.0.1:{port}/metrics", None)
    deploy_id = center.deploy("shell", "web-1", script="exit 1")
    assert center.wait(deploy_id)["status"] == "failed"
    failed = {"type": "deploy.shell", "status": "failed"}
    # The agent counts a deployment when its run returns, which may follow the callback the
    # server already has by a moment.
    end = time.monotonic() + 30
    while True:
        types, after = scrape(f"http://127.0.0.1:{port}/metrics", None)
        moved = value(after, "deploy_center_agent_deployments_total", **failed) - value(
            before, "deploy_center_agent_deployments_total", **failed
        )
        if moved or time.monotonic() > end:
            break
        time.sleep(0.2)
    assert moved == 1
    assert types["deploy_center_agent_deployments"] == "counter"
    assert types["deploy_center_agent_deployment_duration_seconds"] == "histogram"
    assert value(after, "deploy_center_agent_connected") == 1
    assert value(after, "deploy_center_agent_connects_total") >= 1
    assert value(after, "deploy_center_agent_deployment_duration_seconds_count") >= 1


def test_a_scrape_needs_the_metrics_scope_and_that_scope_reads_nothing_else(
    center: DeployCenter, metrics_token: str
) -> None:
    url = f"http://127.0.0.1:{center.api_port}"
    assert httpx.get(f"{url}/metrics", timeout=30).status_code == 401
    wrong = httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer nope"}, timeout=30)
    assert wrong.status_code == 401
    as_metrics = {"Authorization": f"Bearer {metrics_token}"}
    for path in ("/api/deployments", "/api/clients", "/api/info"):
        refused = httpx.get(f"{url}{path}", headers=as_metrics, timeout=30)
        assert refused.status_code == 403, (path, refused.text)
        assert "needs 'read'" in refused.json()["error"]
    posted = httpx.post(f"{url}/metrics", headers=as_metrics, timeout=30)
    assert posted.status_code in (403, 405)
    # Scopes are ordered: a read token may scrape too.
    read = center.api.request("POST", "/api/tokens", json={"name": "reader", "scope": "read"})
    ok = httpx.get(
        f"{url}/metrics", headers={"Authorization": f"Bearer {read['token']}"}, timeout=30
    )
    assert ok.status_code == 200
    # The refusals are themselves timed, under the route's name and their status.
    _types, samples = server_metrics(center, metrics_token)
    assert (
        value(
            samples,
            "deploy_center_http_request_duration_seconds_count",
            route="/metrics",
            status="401",
        )
        >= 2
    )
    # A path no route serves is counted as "unmatched", never under its own name.
    for n in range(3):
        httpx.get(f"{url}/api/no/such/route/{n}{'x' * 40}", headers=as_metrics, timeout=30)
    _types, samples = server_metrics(center, metrics_token)
    series = samples["deploy_center_http_request_duration_seconds_count"]
    assert not any("xxxx" in labels["route"] for labels, _ in series)
    assert (
        value(samples, "deploy_center_http_request_duration_seconds_count", route="unmatched") >= 3
    )


def test_a_deadline_passed_while_the_agent_was_away_counts_as_a_watchdog_timeout(
    center: DeployCenter, metrics_token: str
) -> None:
    _types, before = server_metrics(center, metrics_token)
    center.stop_agent("web-1")
    center.wait_connected("web-1", connected=False)
    try:
        deploy_id = center.deploy("shell", "web-1", script="echo never", deadline=1)
        assert center.wait(deploy_id)["status"] == "timeout"
        after = wait_for(center, metrics_token, "deploy_center_watchdog_timeouts_total", 1)
        timeouts = "deploy_center_watchdog_timeouts_total"
        assert value(after, timeouts, type="deploy.shell") - value(before, timeouts) == 1
        assert value(after, "deploy_center_agents_connected") == 0
        disconnects = "deploy_center_agent_disconnects_total"
        assert value(after, disconnects) - value(before, disconnects) == 1
        assert value(after, "deploy_center_deployments_finished_total", status="timeout") >= 1
    finally:
        center.start_agent(
            "web-1",
            config=f'[metrics]\nlisten = "127.0.0.1:{center.agent_metrics_port}"\n',  # type: ignore[attr-defined]
        )


def test_a_metrics_port_in_use_leaves_the_agent_deploying(center: DeployCenter) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        center.start_agent("web-2", config=f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
        try:
            deploy_id = center.deploy("shell", "web-2", script="echo still here")
            assert center.wait(deploy_id)["status"] == "success"
            assert "agent metrics not served: cannot listen on 127.0.0.1" in center.log(
                "agent-web-2"
            )
        finally:
            center.stop_agent("web-2")


@pytest.mark.parametrize(
    ("table", "says"),
    [
        ('[metrics]\nlisten = "127.0.0.1"\n', "HOST:PORT"),
        ('[metrics]\nlisten = "127.0.0.1:0"\n', "HOST:PORT"),
        ('[metrics]\nlisten = "127.0.0.1:99999"\n', "HOST:PORT"),
        ("[metrics]\nlisten = 9471\n", "HOST:PORT"),
        ('[metrics]\nlisten = "[nope]:9471"\n', "HOST:PORT"),
        ('[metrics]\nlisten = "[1::2::3]:9471"\n', "not an IPv6 address"),
        ('[metrics]\nlisten = "127.0.0.1:9471"\nport = 1\n', "holds only listen"),
        ('metrics = "127.0.0.1:9471"\n', "holds only listen"),
    ],
)
def test_a_wrong_metrics_table_stops_the_agent_with_the_reason(
    tmp_path: Path, table: str, says: str
) -> None:
    from click.testing import CliRunner

    from deploy_core.cli import main

    config = tmp_path / "agent.toml"
    config.write_text(table)
    (tmp_path / "ca.pem").write_text("")
    result = CliRunner().invoke(
        main,
        [
            *("agent", "--server", "127.0.0.1:1", "--client-id", "web-9"),
            *("--state-dir", str(tmp_path / "state"), "--ca", str(tmp_path / "ca.pem")),
            *("--config", str(config)),
        ],
    )
    assert result.exit_code == 2, result.output
    assert says in result.output
    assert str(config) in result.output


def test_artifact_bytes_served_count_a_package_sent_to_the_agent(
    center: DeployCenter, metrics_token: str, tmp_path: Path
) -> None:
    import io
    import os
    import tarfile

    from deploy_core.plugins import get_plugins

    if "deploy.tar" not in get_plugins().deploy_types:
        pytest.skip("needs the deploy_tar plugin")
    payload = os.urandom(300_000)  # does not compress: the package is about this big
    package = tmp_path / "app.tar.gz"
    with tarfile.open(package, "w:gz") as tar:
        info = tarfile.TarInfo("blob.bin")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    sha = center.api.upload_artifact(package)["sha256"]
    _types, before = server_metrics(center, metrics_token)
    deploy_id = center.deploy("tar", "web-1", artifact=sha, target_dir=str(tmp_path / "app"))
    assert center.wait(deploy_id)["status"] == "success"
    _types, after = server_metrics(center, metrics_token)
    served = "deploy_center_artifact_bytes_served_total"
    assert value(after, served) - value(before, served) >= package.stat().st_size
    # The transfer left the server's line of file transfers empty.
    assert {"active", "waiting"} == {
        have["state"] for have, _ in after.get("deploy_center_file_transfers", [])
    }
    assert "deploy_center_file_transfer_bytes_buffered" in after
    assert value(after, "deploy_center_file_transfers", state="active") == 0
    assert value(after, "deploy_center_file_transfers", state="waiting") == 0
    assert value(after, "deploy_center_file_transfer_bytes_buffered") == 0
    assert value(after, "deploy_center_deployments_finished_total", type="deploy.tar") == 1


def test_a_metrics_token_is_refused_on_every_api_route_and_the_live_socket(
    center: DeployCenter, metrics_token: str
) -> None:
    import asyncio
    import json
    import re

    import websockets

    from deploy_core.server.http.admin import admin_routes
    from deploy_core.server.http.api import api_routes
    from deploy_core.server.http.artifacts import artifact_routes

    headers = {"Authorization": f"Bearer {metrics_token}"}
    tried = 0
    for route in api_routes() + admin_routes() + artifact_routes():
        path = "/api" + re.sub(r"\{[^}]+\}", "x1", route.path)  # type: ignore[attr-defined]
        for method in route.methods or ():  # type: ignore[attr-defined]
            answer = httpx.request(method, f"{center.api.url}{path}", headers=headers, timeout=30)
            assert answer.status_code == 403, (method, path, answer.text)
            tried += 1
    assert tried >= 20

    async def live() -> int:
        url = f"ws://127.0.0.1:{center.api_port}/api/live"
        async with websockets.connect(url) as socket:
            await socket.send(json.dumps({"type": "auth", "token": metrics_token}))
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(socket.recv(), 30)
            assert closed.value.rcvd is not None
            return closed.value.rcvd.code

    assert asyncio.run(live()) == 4403


def test_deployctl_makes_a_metrics_token_that_scrapes(center: DeployCenter) -> None:
    from click.testing import CliRunner

    from deploy_core.cli import main

    result = CliRunner().invoke(
        main,
        ["token", "create", "scraper", "--scope", "metrics", "--state-dir", str(center.server_dir)],
    )
    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    types, _samples = server_metrics(center, token)
    assert types["deploy_center_deployments_finished"] == "counter"
    listed = {t["name"]: t["scope"] for t in center.api.request("GET", "/api/tokens")["tokens"]}
    assert listed["scraper"] == "metrics"


def test_an_agent_loads_the_metrics_library_only_when_asked(tmp_path: Path) -> None:
    from test_agent_imports_e2e import imported_modules

    c = DeployCenter(tmp_path / "center", env={"PYTHONPROFILEIMPORTTIME": "1"})
    try:
        c.start_server()
        c.start_agent("plain-1")
        c.start_agent("watched-1", config=f'[metrics]\nlisten = "127.0.0.1:{free_port()}"\n')
        for client_id in ("plain-1", "watched-1"):
            deploy_id = c.deploy("shell", client_id, script="true")
            assert c.wait(deploy_id)["status"] == "success"
    finally:
        c.close()
    plain = imported_modules(c.log("agent-plain-1"))
    watched = imported_modules(c.log("agent-watched-1"))
    assert "deploy_core.agent.runtime" in plain  # the report is there to be read
    assert not any(m.split(".")[0] == "prometheus_client" for m in plain)
    assert "prometheus_client" in watched


def test_up_checks_the_local_agent_s_metrics_table_before_starting(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from deploy_core.cli import main

    config = tmp_path / "agent.toml"
    config.write_text('[metrics]\nlisten = "everywhere"\n')
    state = tmp_path / "state"
    result = CliRunner().invoke(
        main, ["up", "--state-dir", str(state), "--agent-config", str(config)]
    )
    assert result.exit_code == 2, result.output
    assert "--agent-config" in result.output and "HOST:PORT" in result.output
    assert not state.exists()  # nothing started
