"""Hostile HTTP input schemathesis does not send: oversize and endless bodies, JSON nested
past the parser's depth, NaN, odd yes/no values, and methods a path does not serve."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest
from security_harness import running_server

from deploy_core.server.app import DeployServer
from deploy_core.server.http.web import MAX_BODY_BYTES


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeployServer]:
    with running_server(tmp_path_factory.mktemp("edges")) as (srv, _loop):
        yield srv


@pytest.fixture
def http(server: DeployServer) -> Iterator[httpx.Client]:
    token = server.state.admin_token
    with httpx.Client(
        base_url=server.api_url, headers={"Authorization": f"Bearer {token}"}, timeout=30
    ) as client:
        yield client


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"[" * 200_000 + b"]" * 200_000, "nested too deeply"),
        (b'{"name": "x", "scope": NaN}', "NaN is not a JSON number"),
        (b'{"name": "x", "scope": Infinity}', "Infinity is not a JSON number"),
        (b"\xff\xfe{}", "not JSON"),
    ],
)
def test_bodies_that_are_not_json_we_accept_get_400(
    http: httpx.Client, body: bytes, problem: str
) -> None:
    answer = http.post("/api/tokens", content=body)
    assert answer.status_code == 400, answer.text
    assert problem in answer.json()["error"]


def test_a_body_over_the_limit_is_refused_by_its_declared_length(http: httpx.Client) -> None:
    answer = http.post("/api/join-tokens", content=b"{" + b" " * MAX_BODY_BYTES + b"}")
    assert answer.status_code == 413
    assert f"over {MAX_BODY_BYTES} bytes" in answer.json()["error"]


def test_an_undeclared_endless_body_is_cut_off_at_the_limit(server: DeployServer) -> None:
    # Chunked, so no Content-Length: the server must stop reading on its own.
    host, port = server.api_url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /api/join-tokens HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Authorization: Bearer " + server.state.admin_token.encode() + b"\r\n\r\n"
        )
        chunk = b"x" * 65536
        answer = b""
        for _ in range(4 * MAX_BODY_BYTES // len(chunk)):  # four times the limit, at most
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except OSError:
                break  # closed on us: fine, as long as it answered first
            sock.settimeout(0.001)
            try:
                answer += sock.recv(65536)
            except (TimeoutError, BlockingIOError):
                pass
            finally:
                sock.settimeout(10)
            if answer:
                break
        answer += sock.recv(65536) if not answer else b""
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


@pytest.mark.parametrize(
    ("url", "parameter"),
    [
        ("/api/deployments?unfinished=maybe", "unfinished"),
        ("/api/deployments?unfinished=", "unfinished"),
        ("/api/deploy/nope/logs?follow=2", "follow"),
        ("/api/deployments?client_id=web-1%0A", "client_id"),
    ],
)
def test_odd_query_values_are_refused_not_read_as_no(
    http: httpx.Client, server: DeployServer, url: str, parameter: str
) -> None:
    if "logs" in url:  # the deployment must exist for the parameter to be read
        server.records.enroll("edge-1", "00" * 32)
        deploy_id = http.post("/api/deploy/shell", json={"client_id": "edge-1", "script": "true"})
        url = url.replace("nope", deploy_id.json()["deploy_id"])
    answer = http.get(url)
    assert answer.status_code == 422, answer.text
    assert parameter in answer.json()["error"]


def test_yes_and_no_spellings_are_accepted(http: httpx.Client) -> None:
    for value in ("1", "true", "yes", "0", "false", "no"):
        assert http.get(f"/api/deployments?unfinished={value}").status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PUT", "/api/tokens", "GET, HEAD, POST"),
        ("PATCH", "/api/join-tokens", "GET, HEAD, POST"),
        ("PUT", "/api/clients/web-1", "DELETE, GET, HEAD"),
        ("DELETE", "/api/info", "GET, HEAD"),
        ("POST", "/static/style.css", "GET, HEAD"),
        ("PUT", "/openapi.json", "GET, HEAD"),
    ],
)
def test_a_405_lists_every_method_the_path_serves(
    http: httpx.Client, method: str, path: str, allow: str
) -> None:
    answer = http.request(method, path)
    assert answer.status_code == 405
    assert answer.headers["allow"] == allow
    assert f"method {method} not allowed" in answer.json()["error"]


@pytest.mark.parametrize(
    ("headers", "query"),
    [({"X-Content-SHA256": ""}, ""), ({}, "?sha256="), ({"X-Content-SHA256": "abc"}, "")],
)
def test_an_empty_or_malformed_announced_hash_is_refused(
    http: httpx.Client, headers: dict[str, str], query: str
) -> None:
    answer = http.post(f"/api/artifacts{query}", content=b"package bytes", headers=headers)
    assert answer.status_code == 422
    assert "SHA-256" in answer.json()["error"]
