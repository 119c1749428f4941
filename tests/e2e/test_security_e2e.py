"""Who gets in: token scopes, join tokens that expire or run out, revoked agents, and every
route refusing requests without credentials."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from deploy_core.client import ApiError, DeployClient
from deploy_core.server.http.admin import admin_routes
from deploy_core.server.http.api import api_routes
from deploy_core.testing import DeployCenter


@pytest.fixture(scope="module")
def center(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeployCenter]:
    c = DeployCenter(tmp_path_factory.mktemp("security"))
    try:
        c.start_server()
        c.start_agent("s1")
        yield c
    finally:
        c.close()


def _wait_for(predicate: object, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise TimeoutError("condition not met in time")


def test_every_route_refuses_missing_and_wrong_tokens(center: DeployCenter) -> None:
    paths = []
    for route in api_routes() + admin_routes():
        path = re.sub(r"\{[^}]+\}", "x1", route.path)  # type: ignore[attr-defined]
        for method in route.methods or ():  # type: ignore[attr-defined]
            if method != "HEAD":
                paths.append((method, "/api" + path))
    assert len(paths) >= 18
    for method, path in paths:
        for headers in (
            {},
            {"Authorization": "Bearer nope"},
            {"Authorization": "Bearer"},
            {"Authorization": "Token " + (center.server_dir / "admin.token").read_text().strip()},
        ):
            response = httpx.request(method, center.api.url + path, headers=headers)
            assert response.status_code == 401, (method, path, headers, response.text)
            assert "token" in response.json()["error"]


def test_scopes_read_deploy_admin(center: DeployCenter) -> None:
    tokens = {
        scope: center.api.request(
            "POST", "/api/tokens", json={"name": f"t-{scope}", "scope": scope}
        )["token"]
        for scope in ("read", "deploy", "admin")
    }
    read = DeployClient(center.api.url, tokens["read"])
    deploy = DeployClient(center.api.url, tokens["deploy"])
    admin = DeployClient(center.api.url, tokens["admin"])
    try:
        assert read.clients()
        with pytest.raises(ApiError) as err:
            read.deploy("shell", {"client_id": "s1", "script": "true"})
        assert err.value.status == 403 and "needs 'deploy'" in str(err.value)
        deploy_id = deploy.deploy("shell", {"client_id": "s1", "script": "true"})["deploy_id"]
        assert deploy.wait(deploy_id, timeout=30)["status"] == "success"
        with pytest.raises(ApiError) as err:
            deploy.request("POST", "/api/tokens", json={"name": "x", "scope": "admin"})
        assert err.value.status == 403
        with pytest.raises(ApiError) as err:
            deploy.request("POST", "/api/clients/s1/revoke")
        assert err.value.status == 403
        listed = admin.request("GET", "/api/tokens")["tokens"]
        assert {t["name"] for t in listed} >= {"t-read", "t-deploy", "t-admin"}
        assert all("token" not in t and "token_hash" not in t for t in listed)
        admin.request("DELETE", "/api/tokens/t-read")
        with pytest.raises(ApiError) as err:
            read.clients()
        assert err.value.status == 401
    finally:
        for c in (read, deploy, admin):
            c.close()
    # Tokens never reach the log.
    log = center.log("server")
    assert not any(t in log for t in tokens.values())


def test_bad_token_requests_are_refused(center: DeployCenter) -> None:
    for body in (
        {"name": "../x", "scope": "read"},
        {"name": "ok", "scope": "root"},
        {"name": "ok"},
        {"name": "ok", "scope": "read", "extra": 1},
    ):
        with pytest.raises(ApiError) as err:
            center.api.request("POST", "/api/tokens", json=body)
        assert err.value.status == 422
    center.api.request("POST", "/api/tokens", json={"name": "dup", "scope": "read"})
    with pytest.raises(ApiError) as err:
        center.api.request("POST", "/api/tokens", json={"name": "dup", "scope": "read"})
    assert err.value.status == 409
    for body in ({"ttl": -1}, {"uses": 0}, {"ttl": "soon"}, {"uses": True}, {"ttl": True}):
        with pytest.raises(ApiError) as err:
            center.api.request("POST", "/api/join-tokens", json=body)
        assert err.value.status == 422


def test_single_use_and_expiring_join_tokens(center: DeployCenter, tmp_path: Path) -> None:
    once = center.api.request("POST", "/api/join-tokens", json={"uses": 1})
    token_file = tmp_path / "once.token"
    token_file.write_text(once["token"])
    center.start_agent("joined-once", join_token_file=token_file)
    center.start_agent("second-use", join_token_file=token_file, wait=False)
    _wait_for(lambda: "join token used up" in center.log("agent-second-use"), 20)
    short = center.api.request("POST", "/api/join-tokens", json={"ttl": 0.5})
    expired_file = tmp_path / "short.token"
    expired_file.write_text(short["token"])
    time.sleep(1)
    center.start_agent("too-late", join_token_file=expired_file, wait=False)
    _wait_for(lambda: "join token expired" in center.log("agent-too-late"), 20)
    known = {c["client_id"] for c in center.api.clients()}
    assert "joined-once" in known and "second-use" not in known and "too-late" not in known


def test_revoked_agent_is_cut_off_and_gets_no_command(center: DeployCenter) -> None:
    center.start_agent("doomed")
    center.api.request("POST", "/api/clients/doomed/revoke")
    center.wait_connected("doomed", connected=False, timeout=10)
    _wait_for(lambda: "revoked" in center.log("agent-doomed"), 20)
    deploy_id = center.deploy("shell", "doomed", script="true", deadline=2)
    record = center.wait(deploy_id, timeout=30)
    assert record["status"] == "timeout" and "never started" in record["error"]
    # Re-enrolling the same id needs the operator to forget it first.
    center.stop_agent("doomed")
    center.api.request("DELETE", "/api/clients/doomed")
    assert "doomed" not in {c["client_id"] for c in center.api.clients()}


def test_an_existing_client_id_cannot_be_taken_over(center: DeployCenter, tmp_path: Path) -> None:
    # A second agent with a fresh state directory claims the id "s1" with the join token.
    center.root.joinpath("agent-s1-impostor").mkdir()
    proc = center._spawn(
        [
            "agent",
            "--server",
            f"127.0.0.1:{center.quic_port}",
            "--client-id",
            "s1",
            "--state-dir",
            str(center.root / "agent-s1-impostor"),
            "--ca",
            str(center.server_dir / "ca.pem"),
            "--join-token-file",
            str(center.server_dir / "join.token"),
        ],
        "agent-s1-impostor.log",
    )
    try:
        _wait_for(lambda: "already enrolled" in center.log("agent-s1-impostor"), 20)
    finally:
        proc.kill()
        proc.wait(10)
    assert center.api.request("GET", "/api/clients/s1")["connected"] is True
