"""The OpenAPI document: valid 3.1, every mounted route in it and nothing else, a token on
every /api operation, and real answers of a running server in the documented shapes."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import pytest
import schemathesis
from security_harness import running_server
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute

from deploy_core.models import ID_PATTERN, DeployCallbackPayload, DeployStatus, DeployStatusReport
from deploy_core.models import LogLine as WireLogLine
from deploy_core.server.app import DeployServer
from deploy_core.server.http.auth import needed_scope

HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


class Api:
    """A running server, its document and an admin client."""

    def __init__(self, server: DeployServer) -> None:
        self.server = server
        self.http = httpx.Client(
            base_url=server.api_url,
            headers={"Authorization": f"Bearer {server.state.admin_token}"},
            timeout=30,
        )
        self.doc: dict[str, Any] = self.http.get("/openapi.json").json()

    def check(self, response: httpx.Response, path: str, method: str = "get") -> Any:
        """Assert ``response`` is documented for the operation and matches its schema."""
        responses = self.doc["paths"][path][method]["responses"]
        assert str(response.status_code) in responses, (path, method, response.text)
        content = responses[str(response.status_code)].get("content", {})
        assert response.headers["content-type"].split(";")[0] in content, response.headers
        schema = content["application/json"]["schema"]
        body = response.json()
        validator = jsonschema_rs.Draft202012Validator(
            {**schema, "components": self.doc["components"]}
        )
        errors = [f"{e.instance_path}: {e.message}" for e in validator.iter_errors(body)]
        assert not errors, (path, method, errors[:5], body)
        return body


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    with running_server(tmp_path_factory.mktemp("openapi")) as (server, _loop):
        client = Api(server)
        try:
            yield client
        finally:
            client.http.close()


def _app_routes(server: DeployServer) -> list[BaseRoute]:
    app: Any = server.app
    while not hasattr(app, "routes"):  # through the middleware: timing, TokenAuth, /metrics
        app = app.app
    return list(app.routes)


def _walk(routes: list[BaseRoute], prefix: str = "") -> Iterator[tuple[str, str, Any]]:
    for route in routes:
        if isinstance(route, Mount) and route.routes:
            yield from _walk(list(route.routes), prefix + route.path)
        elif isinstance(route, Mount):
            yield "GET", prefix + route.path + "/{path}", route.app
        elif isinstance(route, WebSocketRoute):
            yield "WEBSOCKET", prefix + route.path, route.endpoint
        elif isinstance(route, Route):
            for method in route.methods or ():
                if method != "HEAD":
                    yield method, re.sub(r":[^}]+\}", "}", prefix + route.path), route.endpoint


def test_the_document_is_valid_openapi_3_1(api: Api) -> None:
    assert api.doc["openapi"].startswith("3.1")
    schemathesis.openapi.from_dict(api.doc).validate()


def test_every_mounted_route_is_documented_and_every_documented_route_is_mounted(
    api: Api,
) -> None:
    kinds = sorted(t.kind for t in api.server.plugins.deploy_types.entries.values())
    assert "shell" in kinds
    mounted: set[tuple[str, str]] = set()
    for method, path, endpoint in _walk(_app_routes(api.server)):
        if (method, path) == ("POST", "/api/deploy/{kind}"):
            mounted |= {("POST", f"/api/deploy/{kind}") for kind in kinds}
        else:
            mounted.add((method, path))
        if method != "WEBSOCKET" and getattr(endpoint, "__module__", "").startswith("deploy_core"):
            documented = api.doc["paths"].get(path) or api.doc["paths"][f"/api/deploy/{kinds[0]}"]
            op = documented.get(method.lower()) or documented["post"]
            assert not op.get("x-unmodelled"), f"core route {method} {path} has no model"
    documented = {
        (method.upper(), path)
        for path, item in api.doc["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }
    documented |= {("WEBSOCKET", ws["path"]) for ws in api.doc["x-websockets"]}
    assert documented == mounted


def test_every_api_operation_needs_a_bearer_token_and_says_which_scope(api: Api) -> None:
    assert api.doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for path, item in api.doc["paths"].items():
        for method, op in item.items():
            if not path.startswith("/api"):
                assert op["security"] == [], path  # the page, its files and this document
                continue
            assert op["security"] == [{"bearer": []}], (method, path)
            assert op["x-required-scope"] == needed_scope(method.upper(), path)
            assert {"401", "403"} <= set(op["responses"]), (method, path)
            assert op["responses"]["401"]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ErrorBody"
            }


def test_ids_and_query_parameters_are_bounded(api: Api) -> None:
    params = {
        (path, p["name"]): p["schema"]
        for path, item in api.doc["paths"].items()
        for op in item.values()
        if not op.get("x-unmodelled")  # a plugin's route validates its own parameters
        for p in op.get("parameters", [])
    }
    for (path, name), schema in params.items():
        if name in ("deploy_id", "client_id"):
            assert schema["pattern"] == ID_PATTERN == r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", path
    wait = params[("/api/deploy/{deploy_id}", "wait")]
    assert (wait["minimum"], wait["maximum"]) == (0, 60)
    assert params[("/api/deploy/{deploy_id}/logs", "limit")]["maximum"] == 10000
    assert params[("/api/deploy/{client_id}/list", "limit")]["maximum"] == 500
    for name in ("after", "since", "offset", "follow"):
        assert any(n == name for _, n in params), name


def test_deploy_bodies_spell_out_the_plugins_checks_and_rollbacks(api: Api) -> None:
    shell = api.doc["paths"]["/api/deploy/shell"]["post"]["requestBody"]
    ref = shell["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    body = api.doc["components"]["schemas"][ref]
    assert {"client_id", "script"} <= set(body["required"])
    assert body["additionalProperties"] is False
    checks = body["properties"]["health_checks"]["items"]["oneOf"]
    assert len(checks) == len(api.server.plugins.health_checks.entries)
    assert all(c["required"] == ["type"] for c in checks)


def test_real_answers_have_the_documented_shapes(api: Api) -> None:
    server, http = api.server, api.http
    records = server.records
    records.enroll("seed-1", "00" * 32)
    records.set_connected("seed-1", remote="127.0.0.1:1", capabilities=server_caps(server))
    records.set_disconnected("seed-1", last_seen=time.time())

    accepted = api.check(
        http.post("/api/deploy/shell", json={"client_id": "seed-1", "script": "echo hi"}),
        "/api/deploy/shell",
        "post",
    )
    deploy_id = accepted["deploy_id"]
    busy = http.post("/api/deploy/shell", json={"client_id": "seed-1", "script": "true"})
    assert busy.status_code == 409
    api.check(busy, "/api/deploy/shell", "post")
    records.apply_report(
        "seed-1",
        DeployStatusReport(
            deploy_id=deploy_id,
            command_type="deploy.shell",
            status=DeployStatus.SCRIPT_RUNNING,
            progress=50,
            seq=0,
            logs=[WireLogLine(line="hi"), WireLogLine(line="oops", stream="stderr")],
        ),
    )
    records.finish(
        "seed-1",
        DeployCallbackPayload(
            callback_id=deploy_id,
            command_type="deploy.shell",
            deploy_type="shell",
            status=DeployStatus.SUCCESS,
            success=True,
            result={"exit_code": 0, "stdout_tail": "hi\n"},
        ),
    )

    record = api.check(http.get(f"/api/deploy/{deploy_id}"), "/api/deploy/{deploy_id}")
    assert record["status"] == "success" and record["finished"]
    history = api.check(
        http.get(f"/api/deploy/{deploy_id}/status"), "/api/deploy/{deploy_id}/status"
    )
    assert len(history["history"]) >= 2
    logs = api.check(http.get(f"/api/deploy/{deploy_id}/logs"), "/api/deploy/{deploy_id}/logs")
    assert [line["line"] for line in logs["lines"]] == ["hi", "oops"]
    api.check(http.get("/api/deploy/seed-1/list"), "/api/deploy/{client_id}/list")
    api.check(http.get("/api/deployments?unfinished=0"), "/api/deployments")
    rollback = http.post(f"/api/deploy/{deploy_id}/rollback")
    assert rollback.status_code == 409  # nothing to restore: no rollback was asked for
    api.check(rollback, "/api/deploy/{deploy_id}/rollback", "post")

    clients = api.check(http.get("/api/clients"), "/api/clients")
    assert [c["client_id"] for c in clients["clients"]] == ["seed-1"]
    api.check(http.get("/api/clients/seed-1"), "/api/clients/{client_id}")
    api.check(http.get("/api/plugins"), "/api/plugins")
    api.check(http.get("/api/schemas"), "/api/schemas")
    api.check(http.get("/api/info"), "/api/info")

    token = api.check(
        http.post("/api/tokens", json={"name": "reader", "scope": "read"}), "/api/tokens", "post"
    )
    api.check(http.get("/api/tokens"), "/api/tokens")
    join = api.check(
        http.post("/api/join-tokens", json={"ttl": 60, "uses": 1}), "/api/join-tokens", "post"
    )
    api.check(http.get("/api/join-tokens"), "/api/join-tokens")
    api.check(
        http.delete(f"/api/join-tokens/{join['token_id']}"), "/api/join-tokens/{token_id}", "delete"
    )
    reader = httpx.get(
        f"{server.api_url}/api/tokens", headers={"Authorization": f"Bearer {token['token']}"}
    )
    assert reader.status_code == 403
    api.check(reader, "/api/tokens")
    api.check(http.delete("/api/tokens/reader"), "/api/tokens/{name}", "delete")
    api.check(http.post("/api/clients/seed-1/revoke"), "/api/clients/{client_id}/revoke", "post")
    api.check(http.delete("/api/clients/seed-1"), "/api/clients/{client_id}", "delete")

    stored = api.check(http.post("/api/artifacts", content=b"package"), "/api/artifacts", "post")
    again = http.post("/api/artifacts", content=b"package")
    assert again.status_code == 200 and api.check(again, "/api/artifacts", "post")["existing"]
    api.check(http.get(f"/api/artifacts/{stored['sha256']}"), "/api/artifacts/{sha256}")

    # Refusals have the error shape too.
    api.check(httpx.get(f"{server.api_url}/api/info"), "/api/info")  # 401
    api.check(http.get("/api/deploy/nope"), "/api/deploy/{deploy_id}")  # 404
    api.check(http.get("/api/deploy/seed-1/list?limit=0"), "/api/deploy/{client_id}/list")
    bad = http.post("/api/deploy/shell", json={"client_id": "../x", "script": ""})
    assert bad.status_code == 422
    assert {tuple(d["loc"]) for d in api.check(bad, "/api/deploy/shell", "post")["detail"]} == {
        ("client_id",),
        ("script",),
    }


def server_caps(server: DeployServer) -> dict[str, Any]:
    """What an agent with the server's own plugins would announce."""
    return {"agent_version": "test", **server.plugins.capabilities()}


def test_the_document_is_public_and_the_api_is_not(api: Api, tmp_path: Path) -> None:
    public = httpx.get(f"{api.server.api_url}/openapi.json")
    assert public.status_code == 200 and public.json() == api.doc
    assert httpx.get(f"{api.server.api_url}/api/plugins").status_code == 401


def test_result_models_are_published_from_the_registry(api: Api) -> None:
    """Each loaded deploy type's registered result model, and no other, is in /api/schemas
    and /openapi.json: the core names no plugin's result."""
    types = api.server.plugins.deploy_types.entries.values()
    results = {t.result.__name__: t.result for t in types if t.result is not None}
    assert "DeployShellResult" in results  # deploy_shell is loaded here
    wire = api.http.get("/api/schemas").json()["wire"]
    assert {"DeployStatusReport", "HealthCheckResult", "RollbackResult"} <= set(wire)
    result_names = {name for name in wire if name.startswith("Deploy") and "Result" in name}
    assert result_names == set(results)
    for name, model in results.items():
        assert wire[name] == model.model_json_schema()
        assert name in api.doc["components"]["schemas"]
    shell = jsonschema_rs.Draft202012Validator(wire["DeployShellResult"])
    assert shell.is_valid({"exit_code": 0, "stdout_tail": "hi\n"})
    assert not shell.is_valid({"exit_code": 0, "unknown": 1})
