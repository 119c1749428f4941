"""``--health TYPE:SPEC`` on ``deployctl deploy`` commands: each check type registers its own
shorthand (``HealthCheckType.shorthand``), so the core knows none of them and a third-party
check adds its own.  The commands run as real ``deployctl`` processes against a loopback HTTP
server that records the request body they send."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import click
import pytest
from test_plugins import _distribution

from deploy_core.cli.common import parse_health

REDIS_CHECK = """
from typing import Literal
from deploy_core.plugin import HealthCheckParams, HealthCheckType, hookimpl

class RedisParams(HealthCheckParams):
    type: Literal["redis"] = "redis"
    port: int

async def probe(params, ctx):
    return None

def shorthand(text):
    if not text.isdigit():
        raise ValueError("the port is a number")
    return {"port": int(text)}

@hookimpl
def deploy_register_health_checks(register):
    register(HealthCheckType(
        name="redis", params=RedisParams, probe=probe,
        shorthand=shorthand, shorthand_usage="PORT",
    ))
"""


def test_the_http_and_tcp_shorthands_are_the_health_checks_plugins() -> None:
    assert parse_health("http:8080/healthz") == {"type": "http", "port": 8080, "path": "/healthz"}
    assert parse_health("http:8080") == {"type": "http", "port": 8080, "path": "/"}
    assert parse_health("http://web:80/a?b=1") == {
        "type": "http",
        "host": "web",
        "port": 80,
        "path": "/a?b=1",
    }
    assert parse_health("tcp:5432") == {"type": "tcp", "port": 5432}
    assert parse_health("tcp:db:5432") == {"type": "tcp", "host": "db", "port": 5432}
    with pytest.raises(click.BadParameter, match=r"expected tcp:\[HOST:\]PORT, got tcp:db"):
        parse_health("tcp:db")
    # script has no shorthand (it needs a file): listed types are only those with one.
    with pytest.raises(click.BadParameter) as refused:
        parse_health("script:x")
    message = refused.value.format_message()
    assert "http:PORT[/PATH] or http://HOST:PORT/PATH, tcp:[HOST:]PORT" in message
    assert "script:" not in message.split(";")[0]


class _Recorder(BaseHTTPRequestHandler):
    bodies: list[tuple[str, dict[str, Any]]] = []

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        self.bodies.append((self.path, json.loads(self.rfile.read(length))))
        answer = json.dumps({"deploy_id": "d-1", "client_connected": True}).encode()
        self.send_response(202)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[tuple[str, list[tuple[str, dict[str, Any]]]]]:
    bodies: list[tuple[str, dict[str, Any]]] = []
    handler = type("Recorder", (_Recorder,), {"bodies": bodies})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", bodies
    finally:
        server.shutdown()
        server.server_close()


DEPLOYCTL = (sys.executable, "-m", "deploy_core.cli", "--log-level", "warning")


def _deploy_shell(
    url: str, plugins: str, pythonpath: str, *args: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *DEPLOYCTL,
            *("deploy", "shell", "--client", "c1", "--script", "true"),
            *("--url", url, "--token", "t", *args),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": pythonpath, "DEPLOY_CORE_PLUGINS": plugins},
    )


def test_a_third_party_check_registers_its_own_shorthand(
    tmp_path: Path, recorder: tuple[str, list[tuple[str, dict[str, Any]]]]
) -> None:
    url, bodies = recorder
    path = _distribution(tmp_path, {"probe": "probe_redis"}, {"probe_redis": REDIS_CHECK})
    ran = _deploy_shell(
        url,
        "deploy_shell,health_checks,probe",
        path,
        "--health",
        "redis:6379",
        "--health",
        "tcp:6380",
        "--health-retries",
        "2",
    )
    assert ran.returncode == 0, ran.stderr
    assert bodies == [
        (
            "/api/deploy/shell",
            {
                "client_id": "c1",
                "script": "true",
                "env": {},
                "timeout": 300,
                "health_checks": [
                    {"type": "redis", "port": 6379, "retries": 2},
                    {"type": "tcp", "port": 6380, "retries": 2},
                ],
            },
        )
    ]
    bad = _deploy_shell(url, "deploy_shell,probe", path, "--health", "redis:six")
    assert bad.returncode == 2 and "expected redis:PORT, got redis:six" in bad.stderr
    # Without the plugin nothing knows redis: refused before anything is sent.
    unknown = _deploy_shell(url, "deploy_shell,health_checks", path, "--health", "redis:6379")
    assert unknown.returncode == 2 and "expected TYPE:SPEC, one of http:" in unknown.stderr
    assert len(bodies) == 1
