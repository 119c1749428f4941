"""The server process: the QUIC endpoint for agents and the HTTP API, in one event loop.

:class:`DeployServer` wires the parts together: records, listeners, deployments
(server/deployments.py), command dispatch (server/dispatch.py), the event router
(server/events.py), and the background loops: the watchdog (server/watchdog.py), heartbeats
(server/heartbeats.py) and retention (server/retention.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import uvicorn
from sqlalchemy.engine import Engine

from deploy_core.labels import LabelError, check_labels
from deploy_core.loopback import is_wildcard_host
from deploy_core.models import DeployStatus
from deploy_core.plugins import DeployPlugins, get_plugins
from deploy_core.server import db
from deploy_core.server.artifact_peers import ArtifactCopies, ClusterArtifacts
from deploy_core.server.artifacts import DEFAULT_MAX_ARTIFACT_BYTES, ArtifactStore
from deploy_core.server.callbacks import Listeners
from deploy_core.server.cluster_bus import BusHandlers, ClusterBus, make_bus
from deploy_core.server.cluster_identity import ClusterSettings
from deploy_core.server.db_health import DbHealth
from deploy_core.server.deployments import Deployments
from deploy_core.server.dispatch import Dispatcher
from deploy_core.server.enrollment import AgentRegistry
from deploy_core.server.events import EventRouter
from deploy_core.server.heartbeats import HeartbeatFlush
from deploy_core.server.http.api import create_app
from deploy_core.server.http.http_limits import HttpLimits
from deploy_core.server.http.tls import ApiTls, ApiTlsChoice, CertificateReloader
from deploy_core.server.ingest import Ingest
from deploy_core.server.leases import LEASE_SECONDS, RETENTION, WATCHDOG, Leases
from deploy_core.server.metrics import ServerMetrics
from deploy_core.server.records import DEFAULT_MAX_LOG_BYTES, RecordStore
from deploy_core.server.replicas import Replicas
from deploy_core.server.retention import Retention
from deploy_core.server.rollback_plan import RollbackDefaults
from deploy_core.server.rollouts import Rollouts, RolloutStore
from deploy_core.server.secret_box import SecretBox
from deploy_core.server.state import SERVER_INFO, ServerState, init_state
from deploy_core.server.tokens import Caller, TokenStore
from deploy_core.server.watchdog import Watchdog
from deploy_core.server.webhooks import Webhooks, WebhookSettings
from deploy_core.transport import AgentSession, QuicServer
from deploy_core.transport.files import DEFAULT_MAX_TRANSFERS

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

#: Every this many heartbeats, the clients recorded as connected here are checked against the
#: open connections (:meth:`DeployServer.reconcile_connected`).
RECONCILE_EVERY = 12

DEFAULT_API_PORT = 8470
DEFAULT_QUIC_PORT = 8471


@dataclass
class ServerConfig:
    """How a server runs.  ``db_url`` defaults to SQLite in the state directory."""

    state_dir: Path
    api_host: str = "127.0.0.1"
    api_port: int = DEFAULT_API_PORT
    quic_host: str = "127.0.0.1"
    quic_port: int = DEFAULT_QUIC_PORT
    db_url: str | None = None
    # Which replica this is; the records of the agents it holds carry it.  Default: made once
    # and kept in the state directory (server.id), so a restarted server knows its own rows.
    server_id: str | None = None
    watchdog_interval: float = 1.0
    heartbeat_flush_interval: float = 5.0
    # Duties (watchdog, retention) run on one replica: the holder of their lease (leases.py).
    lease_seconds: float = LEASE_SECONDS
    deadline_margin: float = 60.0
    migrate: bool = True
    # Names and addresses agents may use to reach the QUIC endpoint: the server certificate
    # covers them (agents check it against the CA with --server-name).
    cert_names: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
    # Plugins' own settings by plugin name (``[plugins.NAME]`` of ``deployctl server
    # --config``); a plugin reads its table with :meth:`DeployServer.plugin_config`.
    plugin_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    # ``[defaults.rollback."<deploy type>"]`` tables of the server config: the rollback a
    # deployment of that type gets when its request names none (server/rollback_plan.py).
    rollback_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Finished deployments older than this are deleted by a daily pass; None keeps them all.
    retention_days: float | None = None
    max_log_bytes: int = DEFAULT_MAX_LOG_BYTES
    # Largest package POST /api/artifacts accepts; past it the upload is refused with 413.
    max_artifact_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES
    # The artifact store's directory (default state_dir/artifacts); replicas may share one,
    # e.g. on NFS (server/artifacts.py). A package missing here is fetched from a peer.
    artifact_dir: Path | None = None
    # Artifact transfers over QUIC sent at once; more wait in line (transport/files.py).
    max_file_transfers: int = DEFAULT_MAX_TRANSFERS
    # Processes serving artifact file streams besides the server's own, each on a UDP port
    # of its own (transport/file_workers.py); 0: the server's process alone.
    file_workers: int = 0
    # Header and body read timeouts and the cap on unauthenticated connections of the HTTP
    # API (server/http_limits.py).
    http_limits: HttpLimits = field(default_factory=HttpLimits)
    # ``[webhooks]`` of the server config: allowed http:// hosts, retry window, timeouts.
    webhooks: WebhookSettings = field(default_factory=WebhookSettings)
    # The API over TLS (server/http/tls.py): None = on unless api_host is loopback; a
    # supplied certificate (full chain) and key instead of the server's own; plain HTTP on a
    # network address only with api_insecure_http.
    api_tls: bool | None = None
    api_cert: Path | None = None
    api_key: Path | None = None
    api_insecure_http: bool = False
    # How often a supplied certificate's files are checked for a renewal (served without a
    # restart).
    api_cert_check_interval: float = 60.0
    # The host name or address other replicas reach this one's API at, and agents its QUIC
    # endpoint (its row in ``replicas``; peers fetch artifacts from that URL).  None: the
    # listening hosts (loopback for a wildcard).
    advertise_host: str | None = None
    # Replicas' shared CA, tokens and secrets key, taken from (or first published to) the
    # database under a cluster key (server/cluster_identity.py); None: the state directory's.
    cluster: ClusterSettings | None = None

    def api_tls_choice(self) -> ApiTlsChoice:
        """The API's TLS options, checked (:class:`~deploy_core.server.http.tls.ApiTlsError`)."""
        return ApiTlsChoice.choose(
            self.api_host,
            tls=self.api_tls,
            cert=self.api_cert,
            key=self.api_key,
            insecure_http=self.api_insecure_http,
        )


class _UvicornServer(uvicorn.Server):
    """Uvicorn without its own signal handling: the process owner decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class DeployServer:
    """One server replica."""

    def __init__(self, config: ServerConfig, plugins: DeployPlugins | None = None) -> None:
        self.config = config
        self.plugins = plugins or get_plugins()
        # Checked against the plugins now: a wrong default stops the server from starting.
        self.rollback_defaults = RollbackDefaults(config.rollback_defaults, self.plugins)
        self.listeners = Listeners()
        self.metrics = ServerMetrics(self)
        self.events = EventRouter(self)
        self.started_at = time.time()
        self.state: ServerState
        self.engine: Engine
        self.records: RecordStore
        self.ingest: Ingest
        self.transport: QuicServer
        self.artifacts: ArtifactStore
        self.artifact_source: ClusterArtifacts
        self.dispatcher: Dispatcher
        self.deployments: Deployments
        self.watchdog: Watchdog
        self.rollouts: Rollouts
        self.bus: ClusterBus | None = None
        self._http: _UvicornServer | None = None
        self.api_tls: ApiTls | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._beats = 0
        # Agents recorded as connected here (before a restart: those about to come back),
        # which sizes the heartbeat interval asked of each (QuicServer.heartbeat_interval).
        self._expected_agents = 0
        self.api_port = config.api_port
        self.db_health: DbHealth | None = None

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        """Open the database, start the QUIC endpoint, the HTTP API and the background loops."""
        cfg = self.config
        tls = await asyncio.to_thread(cfg.api_tls_choice)
        self.state = await asyncio.to_thread(
            init_state,
            cfg.state_dir,
            hostnames=tls.hostnames(cfg.cert_names, cfg.api_host),
            cluster=cfg.cluster,
            db_url=cfg.db_url,
            migrate=cfg.migrate,
        )
        self.api_tls = tls.files(self.state.certs)
        tls.log_start(cfg.api_host, cfg.cert_names, ServerConfig.cert_names)
        url = cfg.db_url or db.sqlite_url(self.state.database_file)
        self.engine = db.make_engine(url)
        if cfg.migrate:
            await asyncio.to_thread(db.upgrade, self.engine)
        # Plugins' tables live on one process-wide MetaData; a plugin defines each table once
        # (``if name not in metadata.tables``), see docs/plugins.md.
        self.plugin_metadata = db.plugin_metadata
        self.plugins.create_tables(self.plugin_metadata)
        await asyncio.to_thread(db.create_plugin_tables, self.engine, self.plugin_metadata)
        if cfg.server_id is None:
            cfg.server_id = await asyncio.to_thread(self._stable_server_id)
        # 503s and fencing when the database is unreachable (server/db_health.py).
        self.db_health = DbHealth(
            self.engine, server_id=cfg.server_id, fence_after=cfg.lease_seconds
        )
        self.db_health.watch()
        self.records = RecordStore(
            self.engine,
            server_id=cfg.server_id,
            max_log_bytes=cfg.max_log_bytes,
            secret_box=await asyncio.to_thread(SecretBox.from_state_dir, cfg.state_dir),
        )
        self.ingest = Ingest(self.engine, on_batch=self.metrics.ingest_batch)  # group commit
        self.ingest.start()
        if sealed := await self.db(self.records.seal_plaintext_secrets):
            log.info("sealed the plaintext secret_env of %d unfinished deployments", sealed)
        self.tokens = TokenStore(
            self.engine,
            admin_token=self.state.admin_token,
            join_token_file=self.state.join_token_file,
        )
        await self.db(self.records.mark_all_disconnected)
        self.webhooks = Webhooks(
            self.engine, self.records.secret_box, cfg.webhooks, listeners=self.listeners
        )
        self.artifacts = await asyncio.to_thread(
            ArtifactStore,
            cfg.artifact_dir or cfg.state_dir / "artifacts",
            max_bytes=cfg.max_artifact_bytes,
            replica=cfg.server_id,
        )
        self.artifact_source = ClusterArtifacts(
            self.artifacts,
            ArtifactCopies(self.engine, cfg.server_id),
            admin_token=self.state.admin_token,
            ca_file=self.api_tls.ca if self.api_tls else None,
            own_api_url=lambda: self.announced_api_url,
        )
        await self.artifact_source.reconcile()
        self._expected_agents = len(await self.db(self.records.connected_here))
        self.transport = QuicServer(
            host=cfg.quic_host,
            port=cfg.quic_port,
            certs=self.state.certs,
            authority=AgentRegistry(self.records, self.tokens, self.db),
            on_connect=self._on_connect,
            on_message=self.events.route,
            on_disconnect=self._on_disconnect,
            files=self.artifact_source,
            may_fetch=self._may_fetch,
            max_file_transfers=cfg.max_file_transfers,
            file_workers=cfg.file_workers,
            artifact_root=self.artifacts.root,
            fleet_size=lambda: self._expected_agents,
        )
        self.dispatcher = Dispatcher(self.records, self.transport, max_log_bytes=cfg.max_log_bytes)
        self.deployments = Deployments(self.records, self.plugins, self.listeners, self.dispatcher)
        self.rollouts = Rollouts(
            RolloutStore(self.engine, self.records.secret_box),
            self.deployments,
            self.listeners,
            owner=cfg.server_id,
            lease_seconds=cfg.lease_seconds,
        )
        duties = (WATCHDOG,) if cfg.retention_days is None else (WATCHDOG, RETENTION)
        self.leases = Leases(self.engine, cfg.server_id, duties, seconds=cfg.lease_seconds)
        self.replicas = Replicas(self.engine, cfg.server_id)
        self.webhooks.follow_rollouts(self.rollouts)
        self.watchdog = Watchdog(
            self.records,
            expired=self.metrics.watch_expiries(self.deployments.expired),
            interval=cfg.watchdog_interval,
            may_run=lambda: self.leases.holds(WATCHDOG),
        )
        self.bus = make_bus(self.engine, cfg.server_id, self._bus_handlers())
        if self.bus is not None:  # several replicas may share this database
            self.dispatcher.bus = self.bus
            self.listeners.on_local = self.bus.record_changed
            self.rollouts.feed.on_local = self.bus.rollout_changed
        await self.transport.start()
        if self.bus is not None:
            await self.bus.start()
        self.app = create_app(self)
        self._http = _UvicornServer(
            uvicorn.Config(
                self.app,
                host=cfg.api_host,
                port=cfg.api_port,
                log_level="warning",
                lifespan="off",
                access_log=False,
                log_config=None,  # through the root logger, in the --log-format chosen
                http=cfg.http_limits.protocol(),
                ssl_certfile=self.api_tls.cert if self.api_tls else None,
                ssl_keyfile=self.api_tls.key if self.api_tls else None,
            )
        )
        http_task = asyncio.create_task(self._http.serve(), name="http")
        self._tasks.append(http_task)
        while not self._http.started:
            if http_task.done():
                http_task.result()
                raise RuntimeError(
                    f"the HTTP API could not listen on {cfg.api_host}:{cfg.api_port}"
                )
            await asyncio.sleep(0.01)
        self.api_port = self._http.servers[0].sockets[0].getsockname()[1]
        if self.api_tls is not None and self.api_tls.ca is None and self._http.config.ssl:
            reloader = CertificateReloader(self.api_tls)
            reloader.install(self._http.config.ssl)
            interval = cfg.api_cert_check_interval
            self._tasks.append(asyncio.create_task(reloader.run(interval), name="api-cert"))
        await self.db(self.leases.try_all)
        await self._beat()
        self._tasks.append(asyncio.create_task(self.leases.keep(), name="leases"))
        self._tasks.append(asyncio.create_task(self.watchdog.run(), name="watchdog"))
        self._tasks.append(asyncio.create_task(self.rollouts.run(), name="rollouts"))
        self._tasks.append(asyncio.create_task(self.webhooks.run(), name="webhooks"))
        heartbeats = HeartbeatFlush(
            self.records,
            sessions=self.transport.sessions,
            interval=cfg.heartbeat_flush_interval,
            then=self._beat,
            health=self.db_health,
        )
        self._tasks.append(asyncio.create_task(heartbeats.run(), name="heartbeats"))
        if cfg.retention_days is not None:
            retention = Retention(
                self.records,
                days=cfg.retention_days,
                may_run=lambda: self.leases.holds(RETENTION),
                rollouts=self.rollouts.store,
            )
            self._tasks.append(asyncio.create_task(retention.run(), name="retention"))
        info = {
            "api_url": self.api_url,
            "quic": f"{cfg.quic_host}:{self.transport.port}",
            "ca": str(self.state.certs.ca_cert),
            # What deployctl verifies the API with (None: a supplied certificate).
            "api_ca": str(self.api_tls.ca) if self.api_tls and self.api_tls.ca else None,
            "admin_token_file": str(self.state.admin_token_file),
            "join_token_file": str(self.state.join_token_file),
            "pid": os.getpid(),
        }
        (cfg.state_dir / SERVER_INFO).write_text(json.dumps(info, indent=2) + "\n")
        log.info("server %s: API %s, QUIC %s", cfg.server_id, self.api_url, info["quic"])

    def plugin_config(self, name: str) -> dict[str, Any]:
        """The settings an operator gave plugin ``name`` (empty when none)."""
        return dict(self.config.plugin_settings.get(name, {}))

    def _stable_server_id(self) -> str:
        path = self.config.state_dir / "server.id"
        if not path.exists():
            path.write_text(f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}\n")
        return path.read_text().strip()

    @property
    def api_url(self) -> str:
        """Base URL of the HTTP API, as a client on this host reaches it (loopback when it
        listens on every address)."""
        host = self.config.api_host
        if is_wildcard_host(host):
            host = "::1" if ":" in host else "127.0.0.1"
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.api_tls else 'http'}://{host}:{self.api_port}"

    @property
    def announced_api_url(self) -> str:
        """The API URL this replica announces to the others (``--advertise-host``)."""
        host = self.config.advertise_host
        if host is None:
            return self.api_url
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.api_tls else 'http'}://{host}:{self.api_port}"

    @property
    def announced_quic_address(self) -> str:
        """The QUIC address this replica announces (``--advertise-host``)."""
        host = self.config.advertise_host or self.config.quic_host
        host = f"[{host}]" if ":" in host else host
        return f"{host}:{self.transport.port}"

    async def stop(self) -> None:
        """Stop serving: HTTP, loops, then the QUIC endpoint and the database."""
        if self._http is not None:
            self._http.should_exit = True
        for task in self._tasks:
            if task.get_name() != "http":
                task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if getattr(self, "bus", None) is not None:
            assert self.bus is not None
            await self.bus.close()
        with contextlib.suppress(Exception):  # AttributeError: never started; or no database
            await self.db(self.leases.release_all)  # the others take the duties at once
            await self.db(self.replicas.remove)
        with contextlib.suppress(AttributeError):
            await self.transport.close()
        with contextlib.suppress(AttributeError):
            await self.artifact_source.close()
        await self.events.drain()  # the agents' messages being stored
        with contextlib.suppress(AttributeError):
            await self.ingest.close()  # commits what the connections queued
        with contextlib.suppress(AttributeError):
            self.engine.dispose()

    async def db(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Run a blocking records call in a worker thread."""
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def caller(self, token: str) -> Caller | None:
        """Who an API token belongs to (``None``: nobody).  The admin token needs no query,
        nor a worker thread's round trip; a named token is read from the database each
        time, so a revocation counts at once on every replica."""
        return self.tokens.admin(token) or await self.db(self.tokens.verify, token)

    # ------------------------------------------------------------------ transport callbacks

    async def _on_connect(self, session: AgentSession) -> None:
        capabilities = dict(session.capabilities)
        try:
            labels = check_labels(capabilities.pop("labels", {}), what="labels")
        except LabelError as exc:
            log.warning("agent %s connects without its labels: %s", session.client_id, exc)
            labels = {}
        remote = f"{session.remote[0]}:{session.remote[1]}"
        await self.ingest.submit_or_run(
            lambda conn: self.records.set_connected_in(
                conn, session.client_id, remote=remote, capabilities=capabilities, labels=labels
            )
        )
        log.info("agent %s connected from %s", session.client_id, session.remote[0])
        self.webhooks.agent_connected(session.client_id, session.remote[0])
        await self.dispatcher.redeliver(session)

    async def _on_disconnect(self, session: AgentSession) -> None:
        await self.ingest.submit_or_run(
            lambda conn: self.records.set_disconnected_in(
                conn, session.client_id, last_seen=session.last_seen
            )
        )
        log.info("agent %s disconnected", session.client_id)
        self.webhooks.agent_disconnected(session.client_id)

    async def _may_fetch(self, client_id: str, sha256: str) -> bool:
        return await self.db(self.records.may_fetch, client_id, sha256)

    # ------------------------------------------------------------------ background loops

    async def _beat(self) -> None:
        """This replica's row in ``replicas`` (GET /api/cluster), and every
        :data:`RECONCILE_EVERY` beats the clients' rows put right."""
        await self.db(
            self.replicas.beat,
            api_url=self.announced_api_url,
            quic_address=self.announced_quic_address,
            started_at=self.started_at,
            interval=self.config.heartbeat_flush_interval,
            agents_connected=len(self.transport.sessions),
        )
        self._beats += 1
        if self._beats % RECONCILE_EVERY == 0:
            await self.reconcile_connected()

    async def reconcile_connected(self) -> list[str]:
        """Mark disconnected the clients recorded as connected to this replica whose
        connection is gone: a disconnect that could not be recorded (the database was
        unreachable when it happened) must not leave an agent listed as connected, which
        would also tell the other replicas to send it work here.  Returns their ids."""
        checked_from = time.time()
        recorded = await self.db(self.records.connected_here)
        gone = [c for c in recorded if not self.is_connected(c)]
        self._expected_agents = len(recorded) - len(gone)
        if gone:
            gone = await self.db(self.records.mark_gone, gone, connected_before=checked_from)
            log.info(
                "%d agents recorded as connected here were not: marked disconnected", len(gone)
            )
        return gone

    async def revoke_client(self, client_id: str) -> bool:
        """Refuse the agent from now on and cut its connection (on whichever replica)."""
        done = await self.db(self.records.revoke_client, client_id)
        await self._cut([client_id])
        if self.bus is not None:
            self.bus.revoke(client_id)
        return done

    async def _cut(self, client_ids: list[str]) -> None:
        for client_id in client_ids:
            session = self.transport.session(client_id)
            if session is not None:
                session.close("revoked by an operator")

    # ------------------------------------------------------------------ the cluster bus

    def _bus_handlers(self) -> BusHandlers:
        async def dispatch(pairs: list[tuple[str, str]]) -> None:
            await self.dispatcher.deliver_announced(pairs)

        async def records(deploy_ids: list[str]) -> None:
            wanted = [d for d in deploy_ids if self.listeners.wants_remote(d)]
            for record in await self.db(self.records.get_many, wanted) if wanted else []:
                self.listeners.publish(record.to_api(), remote=True)

        async def rollouts(rollout_ids: list[str]) -> None:
            if self.rollouts.feed.wants_remote():
                for rollout_id in rollout_ids:
                    await self.rollouts.publish(rollout_id, remote=True)

        async def resync() -> None:
            if sent := await self.dispatcher.resync():
                log.info("cluster bus: sent %d deployments found unsent", sent)

        return BusHandlers(
            dispatch=dispatch, records=records, rollouts=rollouts, revoke=self._cut, resync=resync
        )

    def is_connected(self, client_id: str) -> bool:
        """Whether the agent is connected to this replica right now."""
        session = self.transport.session(client_id)
        return session is not None and not session.closed


def terminal(status: str) -> bool:
    """Whether ``status`` ends a deployment."""
    return DeployStatus(status).terminal
