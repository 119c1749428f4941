"""The plugin as the core sees it: registration, the route on a real server, monitor data
from a real agent process, and a server or agent without the plugin."""

from __future__ import annotations

import sqlite3
import time
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from monitor_bed import RunContainer, eventually

from deploy_core import cli
from deploy_core.client import ApiError
from deploy_core.plugins import load_plugins
from deploy_core.testing import DeployCenter
from monitor_docker.cli import render_ps
from monitor_docker.store import CLIENTS, CURRENT, SAMPLES


def test_registered_through_the_entry_point() -> None:
    plugins = load_plugins(env={"DEPLOY_CORE_PLUGINS": "monitor_docker"})
    assert plugins.agent_services.names() == ["docker_monitor"]
    assert "docker.monitor" in plugins.event_handlers.names()
    assert plugins.route_sets.names() == ["docker_monitor"]
    metadata = sa.MetaData()
    plugins.create_tables(metadata)
    assert set(metadata.tables) == {SAMPLES, CURRENT, CLIENTS}


def test_deployctl_gets_the_docker_group() -> None:
    plugins = load_plugins(env={"DEPLOY_CORE_PLUGINS": "monitor_docker"})
    assert plugins.cli_commands.names() == ["docker"]
    assert "ps" in plugins.cli_commands.entries["docker"].commands  # type: ignore[attr-defined]


def monitor(center: DeployCenter, client_id: str, query: str = "") -> dict[str, Any]:
    answer: dict[str, Any] = center.api.request("GET", f"/api/docker/monitor/{client_id}{query}")
    return answer


def test_the_route_answers_for_enrolled_clients_only(deploy_center: DeployCenter) -> None:
    deploy_center.env["DEPLOY_MONITOR_DOCKER_INTERVAL"] = "1"
    deploy_center.start_agent("quiet")
    view = monitor(deploy_center, "quiet")
    assert view["client_id"] == "quiet" and isinstance(view["containers"], list)
    with pytest.raises(ApiError) as err:
        monitor(deploy_center, "nobody")
    assert err.value.status == 404 and "nobody" in str(err.value)
    for query, name in [
        ("?since=yesterday", "since"),
        ("?limit=0", "limit"),
        ("?limit=x", "limit"),
    ]:
        with pytest.raises(ApiError) as err:
            monitor(deploy_center, "quiet", query)
        assert err.value.status == 422 and name in str(err.value), query
    with pytest.raises(ApiError) as err:
        monitor(deploy_center, "quiet", "?since=2000&until=1000")
    assert err.value.status == 422
    raw = httpx.get(f"{deploy_center.api.url}/api/docker/monitor/quiet")
    assert raw.status_code == 401


def test_a_real_agent_reports_a_container_within_two_intervals(
    deploy_center: DeployCenter, run_container: RunContainer
) -> None:
    interval = 2.0
    container = run_container()
    started = time.time()
    deploy_center.start_agent(
        "host-1", config=f"[services.docker_monitor]\ninterval = {interval}\n"
    )

    def reported() -> dict[str, Any] | None:
        rows = [
            c for c in monitor(deploy_center, "host-1")["containers"] if c["id"] == container.id
        ]
        return rows[0] if rows else None

    row = eventually(reported, 2 * interval + 3, "the container in the monitor API")
    assert row["state"] == "running" and row["memory_usage"] > 0 and row["managed"] is True
    container.stop(timeout=5)
    row = eventually(
        lambda: (r := reported()) and r["state"] == "exited" and r,
        2 * interval + 5,
        "the stopped container as exited",
    )
    assert row["exit_code"] == 0
    view = monitor(deploy_center, "host-1", f"?since={started}&container={container.name}")
    states = [s["state"] for s in view["samples"]]
    assert states[0] == "running" and states[-1] == "exited"
    assert view["interval"] == interval and view["error"] is None
    ps = CliRunner().invoke(
        cli.main,
        ["docker", "ps", "--client", "host-1", "--state-dir", str(deploy_center.server_dir)],
    )
    assert ps.exit_code == 0, ps.output
    lines = ps.output.splitlines()
    assert lines[0].split()[:3] == ["NAME", "STATE", "HEALTH"]
    assert any(line.startswith(container.name) and "exited (0)" in line for line in lines)


def test_a_server_without_the_plugin_has_no_route_and_no_tables(
    deploy_center: DeployCenter,
) -> None:
    deploy_center.stop_server()
    deploy_center.env["DEPLOY_CORE_DISABLE_PLUGINS"] = "monitor_docker"
    bare = DeployCenter(deploy_center.root / "bare", env=deploy_center.env)
    try:
        bare.start_server()
        bare.env.pop("DEPLOY_CORE_DISABLE_PLUGINS")
        bare.env["DEPLOY_MONITOR_DOCKER_INTERVAL"] = "0.5"
        bare.start_agent("with-plugin")  # sends batches the server refuses; nothing breaks
        with pytest.raises(ApiError) as err:
            monitor(bare, "with-plugin")
        assert err.value.status == 404 and "no route" in str(err.value)
        time.sleep(1.5)
        with sqlite3.connect(bare.server_dir / "deploy-center.db") as db:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
        assert not tables & {SAMPLES, CURRENT, CLIENTS}
        refusal = "no handler for event 'docker.monitor'"
        eventually(lambda: refusal in bare.log("agent-with-plugin"), 10, "the refusal")
        assert bare.api.clients()[0]["connected"] is True
    finally:
        bare.close()


def test_ps_lines_show_state_health_usage_and_image() -> None:
    view = {
        "client_id": "web-1",
        "last_report": "2026-01-01T00:00:00Z",
        "error": "engine gone",
        "containers": [
            {
                "name": "api",
                "state": "running",
                "exit_code": None,
                "health": "healthy",
                "cpu_percent": 1.5,
                "memory_usage": 3 * 1024 * 1024,
                "memory_limit": 2 * 1024**3,
                "restarts": 1,
                "image": "web:v1",
            }
        ],
    }
    lines = render_ps(view)
    assert lines[1].split() == [
        "api",
        "running",
        "healthy",
        "1.50%",
        "3.0MiB",
        "/",
        "2.0GiB",
        "1",
        "web:v1",
    ]
    assert lines[-2:] == [
        "client web-1: last report 2026-01-01T00:00:00Z",
        "engine error: engine gone",
    ]
