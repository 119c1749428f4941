"""The OpenAPI 3.1 document of the HTTP API, served at ``GET /openapi.json``.

Request bodies are the pydantic models the handlers validate with (each deploy type's
:func:`~deploy_core.server.http.requests.request_model`, the admin bodies), with the health
check and rollback options spelled out from the plugins that provide them.  Answers are
described by :mod:`deploy_core.server.http.responses`; the tests check real answers against the
document, so it cannot drift from the code unnoticed.  Plugin routes are listed with what can
be known about them: path, method, scope and their handler's docstring.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute

from deploy_core import __version__
from deploy_core.models import ID_PATTERN, DeployStatus
from deploy_core.server.clients import CLIENT_STATES
from deploy_core.server.db_health import HEALTH_PATH, RETRY_AFTER
from deploy_core.server.http.admin import NewApiToken, NewJoinToken
from deploy_core.server.http.auth import needed_scope
from deploy_core.server.http.cluster import ClusterView
from deploy_core.server.http.info import (
    CLIENTS_LIMIT,
    CLIENTS_MAX_LIMIT,
    CURSOR_PATTERN,
    LABEL_FILTER_PATTERN,
    MAX_LABEL_FILTERS,
    MAX_SEARCH,
    SEARCH_PATTERN,
)
from deploy_core.server.http.requests import RollbackOptions, request_model
from deploy_core.server.http.responses import (
    ApiTokenCreated,
    ApiTokenList,
    ArtifactStored,
    ArtifactView,
    ClientDetail,
    ClientList,
    DeployAccepted,
    DeploymentList,
    DeploymentPage,
    DeploymentView,
    ErrorBody,
    Forgotten,
    HealthView,
    JoinTokenCreated,
    JoinTokenList,
    LogPage,
    PluginList,
    Revoked,
    RollbackAccepted,
    SchemaSet,
    ServerInfo,
    StatusHistory,
)
from deploy_core.server.http.rollouts import (
    NewRollout,
    RolloutAccepted,
    RolloutPage,
    RolloutView,
)
from deploy_core.server.http.web import FLAG_VALUES
from deploy_core.server.http.webhooks import (
    WEBHOOK_ID_PATTERN,
    DeliveryLog,
    NewWebhook,
    PingAccepted,
    WebhookList,
    WebhookRemoved,
    WebhookView,
)
from deploy_core.server.rollouts import STATUSES as ROLLOUT_STATUSES
from deploy_core.server.tokens import TOKEN_NAME
from deploy_core.transport.files import SHA256_PATTERN

if TYPE_CHECKING:
    from deploy_core.plugins import DeployPlugins
    from deploy_core.registry import DeployType

OPENAPI_VERSION = "3.1.0"
TOKEN_ID_PATTERN = r"^[0-9a-f]{1,16}$"

# --------------------------------------------------------------------------- operations

ERROR_TEXT = {
    400: "the body is not JSON",
    401: "no valid API token",
    403: "the token's scope is too small",
    404: "no such thing",
    409: "refused in the current state (busy client, duplicate name, connected client …)",
    413: "the body is over the size limit",
    422: "a parameter or the body is invalid; `detail` names the fields",
    503: "the server cannot reach its database (the token check reads it too, so any `/api` "
    "route may answer this), or this replica is fenced: cut off from its database for longer "
    "than its lease, it refuses new work (deploy, rollback, rollout) until the database "
    "answers; `detail` has `server_id`, `fenced` and `unreachable_seconds`; try again after "
    "`Retry-After` seconds, or on another replica",
}
#: The header of every ``503`` (server/db_health.py).
RETRY_AFTER_HEADER = {
    "Retry-After": {
        "description": "seconds to wait before trying again",
        "schema": {"type": "integer", "minimum": 0, "examples": [RETRY_AFTER]},
    }
}


def _param(where: str, name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    """A parameter ``in`` path, query or header; only path parameters are required."""
    return {
        "name": name,
        "in": where,
        "required": where == "path",
        "description": description,
        "schema": schema,
    }


def _path(name: str, pattern: str, description: str) -> dict[str, Any]:
    return _param("path", name, {"type": "string", "pattern": pattern}, description)


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return _param("query", name, schema, description)


def _integer(low: int, high: int, default: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": low, "maximum": high, "default": default}


def _number(low: float, high: float, default: float) -> dict[str, Any]:
    return {"type": "number", "minimum": low, "maximum": high, "default": default}


SHA256 = {"type": "string", "pattern": SHA256_PATTERN}
DEPLOY_ID = _path("deploy_id", ID_PATTERN, "a deployment's id")
CLIENT_ID = _path("client_id", ID_PATTERN, "an agent's client id")
#: The values a yes/no query parameter takes (:func:`deploy_core.server.http.web.flag_param`).
FLAG = {"type": "string", "enum": list(FLAG_VALUES), "default": "0"}
LIMIT = _query("limit", _integer(1, 500, 50), "page size")
OFFSET = _query("offset", _integer(0, 10**9, 0), "deployments to skip")
WEBHOOK_ID = _path("webhook_id", WEBHOOK_ID_PATTERN, "a webhook's id")
ROLLOUT_ID = _path("rollout_id", ID_PATTERN, "a rollout's id")


class Spec(NamedTuple):
    """How a core route answers: its success status and model, its refusals, its
    parameters and its body model."""

    status: int
    answer: type[BaseModel]
    refusals: tuple[int, ...] = ()
    parameters: tuple[dict[str, Any], ...] = ()
    #: A request model for a JSON body, or ``bytes`` for a raw upload.
    body: type[BaseModel] | type[bytes] | None = None
    #: Other success statuses with the same answer.
    also: tuple[int, ...] = ()


#: Every core route by (method, path as mounted); the deploy route is :data:`DEPLOY_ROUTE`.
CORE_OPERATIONS: dict[tuple[str, str], Spec] = {
    ("GET", "/api/deploy/{deploy_id}"): Spec(200, DeploymentView, (404, 422), (
        DEPLOY_ID,
        _query("wait", _number(0, 60, 0), "seconds to wait for a change (after `since`) or "
               "for the end"),
        _query("since", _number(-1, 1e12, -1), "an `updated_ts`: answer once the record "
               "changed after it"),
    )),
    ("GET", "/api/deploy/{deploy_id}/status"): Spec(200, StatusHistory, (404,), (DEPLOY_ID,)),
    ("GET", "/api/deploy/{deploy_id}/logs"): Spec(200, LogPage, (404, 422), (
        DEPLOY_ID,
        _query("after", _integer(0, 2**62, 0), "the `id` of the last line already read"),
        _query("limit", _integer(1, 10000, 1000), "at most this many lines"),
        _query("follow", FLAG, "stream JSON lines (application/x-ndjson) until the end"),
        _query("max_wait", _number(1, 86400, 3600), "with `follow`: seconds after which the "
               'stream ends with {"end": false}'),
    )),
    ("POST", "/api/deploy/{deploy_id}/rollback"): Spec(202, RollbackAccepted,
                                                       (400, 404, 409, 413, 422), (DEPLOY_ID,),
                                                       RollbackOptions),
    ("GET", "/api/deploy/{client_id}/list"): Spec(200, DeploymentList, (404, 422),
                                                  (CLIENT_ID, LIMIT, OFFSET)),
    ("GET", "/api/deployments"): Spec(200, DeploymentPage, (422,), (
        _query("status", {"type": "string", "enum": [s.value for s in DeployStatus]},
               "only deployments in this status"),
        _query("client_id", {"type": "string", "pattern": ID_PATTERN}, "only this client's"),
        _query("unfinished", FLAG, "only deployments still running"),
        LIMIT,
        OFFSET,
    )),
    ("POST", "/api/artifacts"): Spec(201, ArtifactStored, (413, 422), (
        _param("header", "X-Content-SHA256", SHA256, "the SHA-256 the body must hash to"),
        _query("sha256", SHA256, "the same, for clients that cannot set headers"),
    ), bytes, (200,)),
    ("GET", "/api/artifacts/{sha256}"): Spec(200, ArtifactView, (404, 422), (
        _path("sha256", SHA256_PATTERN, "the artifact's SHA-256"),
    )),
    ("GET", "/api/clients"): Spec(200, ClientList, (422,), (
        _query("state", {"type": "string", "enum": list(CLIENT_STATES)}, "only clients in "
               "this state"),
        _query("q", {"type": "string", "maxLength": MAX_SEARCH, "pattern": SEARCH_PATTERN},
               "only clients whose id or address contains this (any case)"),
        _query("label", {"type": "array", "maxItems": MAX_LABEL_FILTERS,
                         "items": {"type": "string", "pattern": LABEL_FILTER_PATTERN}},
               "key=value, repeated: only clients with every one of these labels (a key "
               "given twice with different values is refused)"),
        _query("limit", _integer(1, CLIENTS_MAX_LIMIT, CLIENTS_LIMIT), "page size"),
        _query("cursor", {"type": "string", "pattern": CURSOR_PATTERN},
               "the `next_cursor` of the page before (another value is refused)"),
        _query("summary", FLAG, "add `summary`: counts by state and by label"),
    )),
    ("GET", "/api/clients/{client_id}"): Spec(200, ClientDetail, (404,), (CLIENT_ID,)),
    ("GET", "/api/plugins"): Spec(200, PluginList),
    ("GET", "/api/schemas"): Spec(200, SchemaSet),
    ("GET", "/api/info"): Spec(200, ServerInfo),
    ("GET", "/api/cluster"): Spec(200, ClusterView),
    ("GET", HEALTH_PATH): Spec(200, HealthView, also=(503,)),
    ("POST", "/api/tokens"): Spec(201, ApiTokenCreated, (400, 409, 413, 422), (), NewApiToken),
    ("GET", "/api/tokens"): Spec(200, ApiTokenList),
    ("DELETE", "/api/tokens/{name}"): Spec(200, Revoked, (404,), (
        _path("name", TOKEN_NAME.pattern, "the token's name"),
    )),
    ("POST", "/api/join-tokens"): Spec(201, JoinTokenCreated, (400, 413, 422), (), NewJoinToken),
    ("GET", "/api/join-tokens"): Spec(200, JoinTokenList),
    ("DELETE", "/api/join-tokens/{token_id}"): Spec(200, Revoked, (404,), (
        _path("token_id", TOKEN_ID_PATTERN, "the join token's id"),
    )),
    ("POST", "/api/clients/{client_id}/revoke"): Spec(200, Revoked, (404,), (CLIENT_ID,)),
    ("DELETE", "/api/clients/{client_id}"): Spec(200, Forgotten, (404, 409), (CLIENT_ID,)),
    ("POST", "/api/webhooks"): Spec(201, WebhookView, (400, 409, 413, 422), (), NewWebhook),
    ("GET", "/api/webhooks"): Spec(200, WebhookList),
    ("GET", "/api/webhooks/{webhook_id}"): Spec(200, WebhookView, (404,), (WEBHOOK_ID,)),
    ("DELETE", "/api/webhooks/{webhook_id}"): Spec(200, WebhookRemoved, (404,), (WEBHOOK_ID,)),
    ("GET", "/api/webhooks/{webhook_id}/deliveries"): Spec(200, DeliveryLog, (404, 422), (
        WEBHOOK_ID,
        _query("status", {"type": "string", "enum": ["pending", "delivered", "failed"]},
               "only deliveries in this status"),
        _query("limit", _integer(1, 500, 50), "at most this many, newest first"),
    )),
    ("POST", "/api/webhooks/{webhook_id}/ping"): Spec(202, PingAccepted, (404,), (WEBHOOK_ID,)),
    ("POST", "/api/rollouts"): Spec(202, RolloutAccepted, (400, 404, 409, 413, 422), (),
                                    NewRollout),
    ("GET", "/api/rollouts"): Spec(200, RolloutPage, (422,), (
        _query("status", {"type": "string", "enum": list(ROLLOUT_STATUSES)},
               "only rollouts in this status"),
        _query("active", FLAG, "only rollouts not ended"),
        _query("client_id", {"type": "string", "pattern": ID_PATTERN},
               "only rollouts with this client among their targets"),
        LIMIT,
        _query("offset", _integer(0, 10**9, 0), "rollouts to skip"),
    )),
    ("GET", "/api/rollouts/{rollout_id}"): Spec(200, RolloutView, (404,), (ROLLOUT_ID,)),
    **{
        ("POST", f"/api/rollouts/{{rollout_id}}/{action}"): Spec(
            200, RolloutView, (404, 409, 422), (ROLLOUT_ID,)
        )
        for action in ("pause", "resume", "promote", "abort")
    },
}  # fmt: skip
#: The one route that is a template over the registered deploy types: one path per kind.
DEPLOY_ROUTE = ("POST", "/api/deploy/{kind}")
DEPLOY_REFUSALS = (400, 404, 409, 413, 422)
#: Public routes that answer with something other than JSON.
PUBLIC_MEDIA = {"/": "text/html"}

#: Core routes that answer with raw bytes: their refusals and parameters.
BINARY_OPERATIONS: dict[tuple[str, str], tuple[tuple[int, ...], tuple[dict[str, Any], ...]]] = {
    ("GET", "/api/artifacts/{sha256}/content"): (
        (404, 422),
        (_path("sha256", SHA256_PATTERN, "the artifact's SHA-256"),),
    ),
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _doc(endpoint: Any) -> tuple[str, str]:
    """The summary (first paragraph, on one line) and the rest of a handler's docstring."""
    doc = (getattr(endpoint, "__doc__", None) or "").strip()
    first, _, rest = doc.partition("\n\n")
    return " ".join(first.split()), rest.strip()


def _operation(
    route: Mounted,
    answer: tuple[int, dict[str, Any]],
    refusals: tuple[int, ...] = (),
    parameters: tuple[dict[str, Any], ...] = (),
    body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    summary, description = _doc(route.endpoint)
    op: dict[str, Any] = {
        "operationId": f"{route.method.lower()}_{re.sub(r'[^A-Za-z0-9]+', '_', route.path)}".rstrip(
            "_"
        ),
        "summary": summary,
        "responses": {str(answer[0]): answer[1]},
    }
    if description:
        op["description"] = description
    if route.path.startswith("/api"):
        # The same rule as TokenAuth: everything under /api needs a token.
        scope = needed_scope(route.method, route.path)
        op["description"] = (description + "\n\n" if description else "") + f"Needs `{scope}`."
        op["security"] = [{"bearer": []}]
        op["x-required-scope"] = scope
        refusals = (401, 403, 503, *refusals)
    else:
        op["security"] = []
    if parameters:
        op["parameters"] = list(parameters)
    if body is not None:
        op["requestBody"] = {"required": True, "content": body}
    for status in sorted(set(refusals)):
        op["responses"][str(status)] = _json(_ref("ErrorBody"), ERROR_TEXT[status])
    return op


def _body(spec: Spec, refs: dict[str, Any]) -> dict[str, Any] | None:
    """The request body's content map: JSON of a model, or raw bytes."""
    if spec.body is None:
        return None
    if spec.body is bytes:
        return {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
    return {"application/json": {"schema": refs[spec.body.__name__]}}


# --------------------------------------------------------------------------- deploy bodies


def _require(ref: dict[str, str], field: str | None) -> dict[str, Any]:
    return {"allOf": [ref], "required": [field]} if field else ref


def _deploy_body(
    schema: dict[str, Any], deploy_type: DeployType, plugins: DeployPlugins, refs: dict[str, Any]
) -> dict[str, Any]:
    """A request model's schema with ``health_checks`` and ``rollback`` as the plugins
    validate them: each check by its ``type``, each rollback by its ``strategy`` (which may be
    left out when the deploy type names a default strategy)."""
    props = dict(schema["properties"])
    checks = [
        _require(refs[check.params.__name__], "type")
        for _name, check in sorted(plugins.health_checks.entries.items())
    ]
    props["health_checks"] = {
        **props["health_checks"],
        "items": {"oneOf": checks} if checks else {"not": {}},
    }
    default = deploy_type.default_rollback
    strategies = [
        _require(refs[s.params.__name__], None if name == default else "strategy")
        for name, s in sorted(plugins.rollback_strategies.entries.items())
    ]
    props["rollback"] = {
        "anyOf": [{"anyOf": strategies}, {"type": "null"}] if strategies else [{"type": "null"}],
        "default": None,
        "description": props["rollback"].get("description", ""),
    }
    return {**schema, "properties": props}


# --------------------------------------------------------------------------- the routes


class Mounted(NamedTuple):
    """One route of the app as a client sees it: ``protocol`` is ``http``, ``websocket``
    or ``files`` (a mounted app such as the static files)."""

    protocol: str
    method: str
    path: str
    endpoint: Any


def _template(path: str) -> str:
    """A Starlette path as OpenAPI writes it: ``{id:str}`` -> ``{id}``."""
    return re.sub(r"\{([^}:]+)(:[^}]+)?\}", r"{\1}", path)


def mounted_routes(routes: Sequence[BaseRoute], prefix: str = "") -> list[Mounted]:
    """Every route of an app, through its mounts (``HEAD`` is implied by ``GET``)."""
    found: list[Mounted] = []
    for route in routes:
        if isinstance(route, Mount) and route.routes:
            found += mounted_routes(route.routes, prefix + route.path)
        elif isinstance(route, Mount):
            found.append(Mounted("files", "GET", prefix + route.path + "/{path}", route.app))
        elif isinstance(route, WebSocketRoute):
            path = _template(prefix + route.path)
            found.append(Mounted("websocket", "GET", path, route.endpoint))
        elif isinstance(route, Route):
            path = _template(prefix + route.path)
            found += [Mounted("http", m, path, route.endpoint) for m in sorted(route.methods or ())
                      if m != "HEAD"]  # fmt: skip
    return found


def _files_operation(route: Mounted) -> dict[str, Any]:
    directory = getattr(route.endpoint, "directory", None)
    names = sorted(p.name for p in Path(directory).iterdir()) if directory else []
    param = _path("path", r"^[^/]+$", "a file name")
    if names:
        param["schema"] = {"type": "string", "enum": names}
    op = _operation(route, (200, {"description": "the file"}), (404,), (param,))
    op["summary"] = f"Public files under {route.path.removesuffix('/{path}')}"
    return op


def _unmodelled_operation(route: Mounted) -> dict[str, Any]:
    """What can be said of a route without a model: its docstring, parameters and scope."""
    params = tuple(
        _path(name, r"^[^/]+$", "see the route's documentation")
        for name in re.findall(r"\{([^}]+)\}", route.path)
    )
    op = _operation(route, (200, {"description": "see the route's documentation"}), (), params)
    op["responses"]["default"] = {"description": "as the route's documentation says"}
    op["x-module"] = getattr(route.endpoint, "__module__", "")
    op["x-unmodelled"] = True
    return op


# --------------------------------------------------------------------------- the document


def build_openapi(plugins: DeployPlugins, routes: Sequence[BaseRoute]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of an app that mounts ``routes`` with ``plugins`` loaded.

    Core routes are described from :data:`CORE_OPERATIONS` and the pydantic models; a route
    with no entry there (a plugin's) gets what its path and docstring tell, marked
    ``x-unmodelled``.  WebSocket routes, which OpenAPI cannot describe, are listed under
    ``x-websockets``.

    :param plugins: the server's plugins (deploy types, health checks, rollback strategies).
    :param routes: the app's routes as mounted.
    """

    types = sorted(plugins.deploy_types.entries.values(), key=lambda t: t.kind)
    inputs: set[type[BaseModel]] = {request_model(t) for t in types}
    inputs |= {c.params for c in plugins.health_checks.entries.values()}
    inputs |= {s.params for s in plugins.rollback_strategies.entries.values()}
    answers: set[type[BaseModel]] = {DeployAccepted, ErrorBody}
    # A record's result is the type's registered model: published so clients can read it.
    answers |= {t.result for t in types if t.result is not None}
    for core in CORE_OPERATIONS.values():
        answers.add(core.answer)
        if core.body is not None and issubclass(core.body, BaseModel):
            inputs.add(core.body)
    keys, defs = models_json_schema(
        [(m, "validation") for m in sorted(inputs, key=lambda m: m.__name__)]
        + [(m, "serialization") for m in sorted(answers, key=lambda m: m.__name__)],
        ref_template="#/components/schemas/{model}",
    )
    schemas: dict[str, Any] = dict(defs.get("$defs", {}))
    refs = {model.__name__: ref for (model, _mode), ref in keys.items()}
    for t in types:
        name = refs[request_model(t).__name__]["$ref"].rsplit("/", 1)[1]
        schemas[name] = _deploy_body(schemas[name], t, plugins, refs)

    paths: dict[str, dict[str, Any]] = {}
    websockets: list[dict[str, Any]] = []
    for route in mounted_routes(routes):
        if route.protocol == "websocket":
            websockets.append({"path": route.path, "summary": _doc(route.endpoint)[0]})
            continue
        if route.protocol == "files":
            paths[route.path] = {"get": _files_operation(route)}
            continue
        if (route.method, route.path) == DEPLOY_ROUTE:
            for t in types:
                kind = route._replace(path=f"/api/deploy/{t.kind}")
                accepted = _json(refs["DeployAccepted"], "accepted; the agent runs it next")
                body = {"application/json": {"schema": refs[request_model(t).__name__]}}
                op = _operation(kind, (202, accepted), DEPLOY_REFUSALS, body=body)
                op["summary"] = f"Start a {t.name} deployment"
                paths.setdefault(kind.path, {})["post"] = op
            continue
        spec = CORE_OPERATIONS.get((route.method, route.path))
        if spec is not None:
            answer = _json(refs[spec.answer.__name__], _doc(spec.answer)[0])
            op = _operation(
                route, (spec.status, answer), spec.refusals, spec.parameters, _body(spec, refs)
            )
            op["responses"].update({str(status): answer for status in spec.also})
        elif (route.method, route.path) in BINARY_OPERATIONS:
            refusals, params = BINARY_OPERATIONS[(route.method, route.path)]
            raw = {"type": "string", "format": "binary"}
            ok = {
                "description": _doc(route.endpoint)[0],
                "content": {"application/octet-stream": {"schema": raw}},
            }
            op = _operation(route, (200, ok), refusals, params)
        elif route.path in PUBLIC_MEDIA or route.path == "/openapi.json":
            media = PUBLIC_MEDIA.get(route.path, "application/json")
            ok = {"description": _doc(route.endpoint)[0], "content": {media: {"schema": {}}}}
            op = _operation(route, (200, ok))
        else:
            op = _unmodelled_operation(route)
        paths.setdefault(route.path, {})[route.method.lower()] = op
    for item in paths.values():
        for op in item.values():
            if "503" in op["responses"]:
                op["responses"]["503"] = {**op["responses"]["503"], "headers": RETRY_AFTER_HEADER}
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Deploy Center API",
            "version": __version__,
            "description": "Deploy shell scripts, packages and containers to agents. Every "
            "`/api` route needs `Authorization: Bearer <token>`; a refusal is "
            '`{"error": "…", "detail": …}`. While the server cannot reach its database any '
            "`/api` route answers `503` with `Retry-After`; `GET /healthz` (public) says "
            "whether a replica should get traffic.",
        },
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": dict(sorted(schemas.items())),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "an API token (deployctl token create) or the server's "
                    "admin.token",
                }
            },
        },
        "x-websockets": websockets,
    }
