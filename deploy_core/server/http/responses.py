"""The shapes of the HTTP API's answers, as pydantic models.

The handlers build their answers as plain dicts (the ``to_api`` of the rows in
:mod:`deploy_core.server.rows`); these models describe them for the OpenAPI document
(:mod:`deploy_core.server.http.openapi`).  They refuse unknown fields, so a field added to an
answer without being added here fails the response-conformance tests instead of going
undocumented.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from deploy_core.models import DeployStatus


class _Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(BaseModel):
    """Every refusal: what was wrong, and field errors or context where there are some."""

    error: str = Field(description="what was wrong and, where possible, what to do")
    detail: Any = Field(None, description="field errors ({loc, msg, type}) or context")


class HealthView(_Answer):
    """``GET /healthz``: whether this replica should get traffic (``200``) or not (``503``,
    with ``Retry-After``)."""

    ok: bool = Field(description="true: the database answers and the replica is not fenced")
    server_id: str | None = Field(None, description="this replica's id")
    error: str | None = Field(None, description="with 503: why it should get no traffic")
    detail: dict[str, Any] | None = Field(
        None,
        description="with 503: `server_id`, `fenced` (it refuses new work), "
        "`unreachable_seconds` (since the database last answered)",
    )


class DeployAccepted(_Answer):
    """``202`` for a new deployment."""

    deploy_id: str
    status: DeployStatus
    client_connected: bool = Field(description="whether the command could be sent right away")
    url: str


class RollbackAccepted(DeployAccepted):
    """``202`` for a rollback: a deployment of its own, undoing ``rollback_of``."""

    rollback_of: str
    cascade: list[str] = Field(
        description="the deployments this rollback and the ones it asks for next undo, in "
        "order: newer deployments of the same target first, the one asked for last"
    )


class DeploymentView(_Answer):
    """A deployment record; times are ISO 8601 UTC, ``updated_ts`` is for ``?since=``."""

    deploy_id: str
    client_id: str
    command_type: str
    status: DeployStatus
    stage: str
    progress: int = Field(ge=0, le=100)
    finished: bool
    result: dict[str, Any] | None
    error: str | None
    health: list[dict[str, Any]] | None
    rollback: dict[str, Any] | None
    rollback_of: str | None
    rolled_back_by: str | None
    agent_status: str | None
    request: dict[str, Any]
    created_at: str
    updated_at: str
    finished_at: str | None
    deadline: str | None
    updated_ts: float


class HistoryEntry(_Answer):
    """One status change of a deployment."""

    status: str
    stage: str
    progress: int
    message: str
    source: str
    seq: int | None
    timestamp: str


class StatusHistory(_Answer):
    """``GET /api/deploy/{deploy_id}/status``."""

    deploy_id: str
    status: DeployStatus
    history: list[HistoryEntry]


class LogEntry(_Answer):
    """One line of a deployment's output."""

    id: int
    timestamp: str
    stream: str
    stage: str
    line: str


class LogPage(_Answer):
    """``GET /api/deploy/{deploy_id}/logs``: the lines after ``after``; ask again with
    ``after=next_after`` for more."""

    deploy_id: str
    lines: list[LogEntry]
    next_after: int


class DeploymentList(_Answer):
    """``GET /api/deploy/{client_id}/list``: newest first."""

    client_id: str
    total: int
    limit: int
    offset: int
    items: list[DeploymentView]


class DeploymentPage(_Answer):
    """``GET /api/deployments``: every client's deployments, newest first."""

    total: int
    limit: int
    offset: int
    items: list[DeploymentView]


class ClientView(_Answer):
    """An enrolled agent, its connection and what it said it can do."""

    client_id: str
    connected: bool
    connected_here: bool = Field(description="connected to this server replica")
    connected_since: str | None
    disconnected_since: str | None
    last_seen: str | None
    remote: str | None
    enrolled_at: str | None
    revoked_at: str | None
    credential: Literal["public_key", "shared_key"] = Field(
        description="what the agent signs in with: 'public_key', its own Ed25519 key pair; "
        "'shared_key', a secret the server issued before key pairs: the agent is not updated "
        "yet (an updated one upgrades when it connects), and whoever holds that secret can "
        "sign in as it"
    )
    plugins: dict[str, Any]
    capabilities: dict[str, Any]
    labels: dict[str, str] = Field(description="the agent's [agent] labels ({} for none)")


class LiveDeployment(_Answer):
    """The deployment live on one target of a client: its newest success not undone."""

    target: str = Field(description="what it changed: '<deploy type>:<directory or name>'")
    deploy_id: str
    command_type: str
    finished_at: str | None


class ClientDetail(ClientView):
    """``GET /api/clients/{client_id}``: a client, the deployment it is busy with, and what
    is live on each of its targets."""

    busy_with: str | None
    live: list[LiveDeployment]


class ClientSummary(_Answer):
    """Counts of the clients a ``GET /api/clients`` matches, made by the database."""

    total: int = Field(description="clients matching every filter")
    states: dict[str, int] = Field(
        description="per state (connected, disconnected, revoked), the clients matching the "
        "other filters (all but state)"
    )
    labels: dict[str, dict[str, int]] = Field(
        description="per label key, per value, the clients matching every filter that have it"
    )
    labels_truncated: bool = Field(
        description="true when there were more than 500 key/value pairs: the least common "
        "are left out"
    )


class ClientList(_Answer):
    """``GET /api/clients``: a page of clients, by id."""

    clients: list[ClientView]
    total: int = Field(description="clients matching the filters, on every page")
    limit: int
    next_cursor: str | None = Field(
        description="pass as `cursor` for the next page; null on the last"
    )
    summary: ClientSummary | None = Field(None, description="with `summary=1`")


class PluginView(_Answer):
    """A loaded plugin and what it registered, or one that failed to load (``error``)."""

    name: str
    version: str | None = None
    builtin: bool | None = None
    hooks: list[str] | None = None
    deploy_types: list[str] | None = None
    health_checks: list[str] | None = None
    rollback_strategies: list[str] | None = None
    event_handlers: list[str] | None = None
    routes: list[str] | None = None
    agent_services: list[str] | None = None
    cli_commands: list[str] | None = None
    error: str | None = None


class PluginList(_Answer):
    """``GET /api/plugins``."""

    plugins: list[PluginView]


class SchemaSet(_Answer):
    """``GET /api/schemas``: JSON Schema of the wire models and of each deploy request."""

    wire: dict[str, dict[str, Any]]
    deploy_requests: dict[str, dict[str, Any]]


class RollbackDefaultView(_Answer):
    """What a deploy request without a ``rollback`` field gets (docs/api.md, "Rollback")."""

    strategy: str | None = Field(description="the strategy; null: a failure is not undone")
    source: Literal["server defaults", "deploy type default", "opted out", "none"]
    note: str
    options: dict[str, Any] = Field(
        description='options from the server config; "{param}" values come from each request'
    )


class ServerInfo(_Answer):
    """``GET /api/info``."""

    version: str
    server_id: str
    quic_port: int
    started_at: str | None
    rollback_defaults: dict[str, RollbackDefaultView] = Field(
        description="per deploy type, the rollback a request that names none gets"
    )


class ApiTokenCreated(_Answer):
    """A new API token; its value is shown this once."""

    name: str
    scope: Literal["metrics", "read", "deploy", "admin"]
    token: str


class ApiTokenView(_Answer):
    """A named API token, never its value."""

    name: str
    scope: Literal["metrics", "read", "deploy", "admin"]
    created_at: str | None
    last_used: str | None


class ApiTokenList(_Answer):
    """``GET /api/tokens``."""

    tokens: list[ApiTokenView]


class JoinTokenCreated(_Answer):
    """A new join token; its value is shown this once."""

    token_id: str
    token: str
    expires_at: str | None
    uses: int | None


class JoinTokenView(_Answer):
    """A join token, never its value."""

    token_id: str
    created_at: str | None
    expires_at: str | None
    uses_left: int | None
    note: str


class JoinTokenList(_Answer):
    """``GET /api/join-tokens``."""

    join_tokens: list[JoinTokenView]


class Revoked(_Answer):
    """What was revoked: a token name, a join token id or a client id."""

    revoked: str


class Forgotten(_Answer):
    """The client whose enrolment was dropped."""

    forgotten: str


class ArtifactView(_Answer):
    """A stored artifact (a package, kept by its SHA-256)."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=1)
    created_at: str
    url: str


class ArtifactStored(ArtifactView):
    """``POST /api/artifacts``: ``existing`` when the same bytes were there already."""

    existing: bool
