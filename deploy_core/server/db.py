"""The server's database: engine set-up, the core's tables, and schema migrations.

SQLite (WAL mode) by default, PostgreSQL by URL.  The core's tables are created and changed
only by the Alembic migrations in ``deploy_core/server/migrations`` (``deployctl db
upgrade``); plugin tables live on :data:`plugin_metadata` and are created when missing.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from deploy_core.private import private_database

metadata = sa.MetaData()
plugin_metadata = sa.MetaData()

ID = sa.String(64)
NAME = sa.String(64)

deployments = sa.Table(
    "deployments",
    metadata,
    sa.Column("deploy_id", ID, primary_key=True),
    sa.Column("client_id", ID, nullable=False, index=True),
    sa.Column("command_type", NAME, nullable=False),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("stage", NAME, nullable=False, default=""),
    sa.Column("progress", sa.Integer, nullable=False, default=0),
    sa.Column("last_seq", sa.Integer, nullable=False, default=-1),
    sa.Column("request", sa.JSON, nullable=False),
    sa.Column("result", sa.JSON),
    sa.Column("error", sa.Text),
    sa.Column("health", sa.JSON),
    sa.Column("rollback", sa.JSON),
    sa.Column("rollback_state", sa.JSON),
    sa.Column("rollback_of", ID),
    sa.Column("rolled_back_by", ID),
    sa.Column("rollback_wanted", sa.Boolean, nullable=False, default=False),
    sa.Column("agent_status", sa.String(32)),
    sa.Column("deadline", sa.Float, nullable=False),
    sa.Column("dispatched_at", sa.Float),
    sa.Column("acked_at", sa.Float),
    sa.Column("created_at", sa.Float, nullable=False, index=True),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float),
    sa.Column("log_bytes", sa.Integer, nullable=False, default=0, server_default="0"),
    sa.Column(
        "log_truncated", sa.Boolean, nullable=False, default=False, server_default=sa.false()
    ),
    # What the deployment changes on its host (DeployType.target_key): which deployment is
    # live there, and which rollbacks would undo a newer one.
    sa.Column("target", sa.String(600)),
)
sa.Index("ix_deployments_open", deployments.c.finished_at, deployments.c.deadline)
sa.Index("ix_deployments_target", deployments.c.client_id, deployments.c.target)

# The stored artifacts each deployment fetches: an agent may fetch only those of deployments
# sent to it.
deploy_artifacts = sa.Table(
    "deploy_artifacts",
    metadata,
    sa.Column(
        "deploy_id",
        ID,
        sa.ForeignKey("deployments.deploy_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("sha256", sa.String(64), primary_key=True, index=True),
)

status_history = sa.Table(
    "status_history",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "deploy_id",
        ID,
        sa.ForeignKey("deployments.deploy_id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    sa.Column("seq", sa.Integer),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("stage", NAME, nullable=False, default=""),
    sa.Column("progress", sa.Integer, nullable=False, default=0),
    sa.Column("message", sa.Text, nullable=False, default=""),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("ts", sa.Float, nullable=False),
)

# Output in chunks: consecutive lines of one stream and stage (a block as the agent sent it),
# the deployment's lines first_line .. first_line + line_count - 1 (server/log_chunks.py).
deploy_log_chunks = sa.Table(
    "deploy_log_chunks",
    metadata,
    sa.Column(
        "deploy_id",
        ID,
        sa.ForeignKey("deployments.deploy_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("first_line", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("line_count", sa.Integer, nullable=False),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Column("stream", sa.String(32), nullable=False),
    sa.Column("stage", NAME, nullable=False, default=""),
    sa.Column("text", sa.Text, nullable=False),
)

clients = sa.Table(
    "clients",
    metadata,
    sa.Column("client_id", ID, primary_key=True),
    # The shared key of an agent enrolled before agents made their own key pairs (cleared
    # when it upgrades); an agent with a key pair has only its public key here.
    sa.Column("agent_key", sa.String(128)),
    sa.Column("public_key", sa.String(64)),
    sa.Column("enrolled_at", sa.Float, nullable=False),
    sa.Column("connected", sa.Boolean, nullable=False, default=False),
    sa.Column("server_id", ID),
    sa.Column("connected_since", sa.Float),
    sa.Column("disconnected_since", sa.Float),
    sa.Column("last_seen", sa.Float),
    sa.Column("remote", sa.String(128)),
    sa.Column("capabilities", sa.JSON),
    sa.Column("revoked_at", sa.Float),
    # The agent's [agent] labels as it last connected with them (deploy_core/labels.py).
    sa.Column("labels", sa.JSON),
)

client_locks = sa.Table(
    "client_locks",
    metadata,
    sa.Column("client_id", ID, primary_key=True),
    sa.Column("deploy_id", ID, nullable=False),
    sa.Column("owner", ID, nullable=False),
    sa.Column("acquired_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
)


# Secret environment values of unfinished deployments, apart from the request record (which
# shows their names only) and deleted when the deployment finishes.
deploy_secrets = sa.Table(
    "deploy_secrets",
    metadata,
    sa.Column(
        "deploy_id",
        ID,
        sa.ForeignKey("deployments.deploy_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("secret_env", sa.JSON, nullable=False),
)

api_tokens = sa.Table(
    "api_tokens",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("scope", sa.String(16), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("last_used", sa.Float),
)

join_tokens = sa.Table(
    "join_tokens",
    metadata,
    sa.Column("token_id", sa.String(16), primary_key=True),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float),
    sa.Column("uses_left", sa.Integer),
    sa.Column("note", sa.String(200), nullable=False),
)

# Outbound webhooks (server/webhooks.py): the subscriptions, their secrets sealed like
# secret_env, and the outbox of deliveries, one row per (webhook, event) retried until
# delivered or given up.
webhooks = sa.Table(
    "webhooks",
    metadata,
    sa.Column("webhook_id", sa.String(16), primary_key=True),
    sa.Column("url", sa.String(2048), nullable=False),
    sa.Column("events", sa.JSON, nullable=False),
    sa.Column("secret", sa.JSON, nullable=False),
    sa.Column("description", sa.String(200), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

webhook_deliveries = sa.Table(
    "webhook_deliveries",
    metadata,
    sa.Column("delivery_id", sa.String(32), primary_key=True),
    sa.Column(
        "webhook_id",
        sa.String(16),
        sa.ForeignKey("webhooks.webhook_id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("event", NAME, nullable=False),
    # What the delivery reports, e.g. "deployment.finished:<deploy_id>": one per webhook.
    sa.Column("event_key", sa.String(200), nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("next_attempt_at", sa.Float, nullable=False),
    sa.Column("last_attempt_at", sa.Float),
    sa.Column("last_status_code", sa.Integer),
    sa.Column("last_error", sa.Text),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float),
    sa.UniqueConstraint("webhook_id", "event_key", name="uq_webhook_deliveries_event"),
)
sa.Index(
    "ix_webhook_deliveries_due", webhook_deliveries.c.status, webhook_deliveries.c.next_attempt_at
)
sa.Index(
    "ix_webhook_deliveries_log", webhook_deliveries.c.webhook_id, webhook_deliveries.c.created_at
)


# Rollouts (server/rollouts.py): one deployment sent to many clients in batches; each target
# gets its deployment id before the deployment exists, so a driver that restarts never
# starts a host twice.  The "rollouts" lease (below) says which server drives them.
rollouts = sa.Table(
    "rollouts",
    metadata,
    sa.Column("rollout_id", ID, primary_key=True),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("kind", NAME, nullable=False),
    sa.Column("command_type", NAME, nullable=False),
    sa.Column("request", sa.JSON, nullable=False),
    sa.Column("deadline_seconds", sa.Float, nullable=False),
    sa.Column("secret_env", sa.JSON),
    sa.Column("selector", sa.JSON),
    sa.Column("strategy", sa.JSON, nullable=False),
    sa.Column("strategy_asked", sa.JSON, nullable=False),
    sa.Column("total", sa.Integer, nullable=False),
    sa.Column("batch_count", sa.Integer, nullable=False),
    sa.Column("current_batch", sa.Integer, nullable=False, default=0),
    sa.Column("batch_started_at", sa.Float),
    sa.Column("paused_for", sa.String(16)),
    sa.Column("reason", sa.Text),
    sa.Column("created_by", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False, index=True),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float),
)

rollout_targets = sa.Table(
    "rollout_targets",
    metadata,
    sa.Column(
        "rollout_id",
        ID,
        sa.ForeignKey("rollouts.rollout_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("position", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("client_id", ID, nullable=False),
    sa.Column("batch", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("deploy_id", ID, unique=True),
    sa.Column("error", sa.Text),
    sa.Column("waiting_since", sa.Float),
    sa.Column("started_at", sa.Float),
    sa.Column("rollback_id", ID),
    sa.Column("rollback_error", sa.Text),
)

rollout_history = sa.Table(
    "rollout_history",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "rollout_id",
        ID,
        sa.ForeignKey("rollouts.rollout_id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("ts", sa.Float, nullable=False),
)

# Background duties (watchdog, retention, ...) run on one replica at a time: the holder of the
# duty's lease row (deploy_core/server/leases.py).  replicas: one heartbeat row per server.
leases = sa.Table(
    "leases",
    metadata,
    sa.Column("duty", sa.String(64), primary_key=True),
    sa.Column("holder", ID, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
)

replicas = sa.Table(
    "replicas",
    metadata,
    sa.Column("server_id", ID, primary_key=True),
    sa.Column("api_url", sa.String(300), nullable=False),
    sa.Column("quic_address", sa.String(300), nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("last_seen", sa.Float, nullable=False),
    sa.Column("heartbeat_interval", sa.Float, nullable=False),
    sa.Column("agents_connected", sa.Integer, nullable=False),
)

# Which replicas hold a copy of an artifact (a row is written once the copy is complete), so
# that every replica knows a package uploaded through any of them (server/artifacts.py).
artifact_copies = sa.Table(
    "artifact_copies",
    metadata,
    sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Column("server_id", ID, primary_key=True),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("stored_at", sa.Float, nullable=False),
)

# The identity the replicas of one cluster share (CA, server certificate, tokens, secrets
# key), sealed with the cluster key each replica is given (``deployctl server --join-cluster``).
cluster_secrets = sa.Table(
    "cluster_secrets",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("sealed", sa.LargeBinary, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)


def normalise_url(url: str) -> str:
    """Accept ``postgresql://`` and ``postgres://`` URLs and use the psycopg 3 driver."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def sqlite_url(path: Path) -> str:
    """The URL of a SQLite database file."""
    return f"sqlite:///{path}"


#: Seconds a SQLite transaction waits for the server's other threads' transaction to end
#: before it begins anyway (and SQLite's own busy timeout applies, as between processes).
WRITER_WAIT = 30.0


def _one_writer_at_a_time(engine: Engine) -> None:
    """Begin every transaction of ``engine.begin()`` on SQLite with ``BEGIN IMMEDIATE`` (the
    write lock at once, so that a read-then-write such as "apply this report unless
    finished" is atomic), after waiting for the transaction another thread of this process
    holds.  What ``engine.connect()`` reads (it never commits) begins with a plain ``BEGIN``:
    a snapshot of the database, beside the writer (WAL), taking no turn.

    SQLite lets one writer in at a time, and one that finds the lock taken polls: its busy
    handler sleeps 1, 2, 5, 10 … up to 100 ms between tries, however soon the lock is free.
    With the ingest, the dispatcher, a rollout's driver and the API writing at once (a
    rollout to a thousand agents), transactions of a millisecond waited tens to hundreds of
    milliseconds that way.  A lock of the process's own hands the turn over at once and in
    order; other processes on the same file (``deployctl`` admin commands) still meet
    SQLite's busy timeout.
    """
    turn = threading.Lock()
    holders: set[int] = set()  # id() of the DB-API connections that hold ``turn``
    beginning = threading.local()  # .writing: engine.begin() is beginning its transaction

    def raw(connection: Any) -> int:
        return id(getattr(connection, "dbapi_connection", None) or connection)

    def give_back(connection: Any) -> None:
        key = raw(connection)
        if key in holders:
            holders.discard(key)
            turn.release()

    @sa.event.listens_for(engine, "begin")
    def _sqlite_begin(conn: Any) -> None:
        if not getattr(beginning, "writing", False):
            conn.exec_driver_sql("BEGIN")
            return
        key = raw(conn.connection)
        if key not in holders and turn.acquire(timeout=WRITER_WAIT):
            holders.add(key)
        try:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        except BaseException:
            give_back(conn.connection)
            raise

    @contextlib.contextmanager
    def begin() -> Iterator[Connection]:
        # Engine.begin(), telling the "begin" event above that this transaction writes.
        with engine.connect() as conn:
            beginning.writing = True
            try:
                transaction = conn.begin()
            finally:
                beginning.writing = False
            with transaction:
                yield conn

    engine.begin = begin  # type: ignore[method-assign,assignment]

    dialect: Any = engine.dialect

    def ending(end: Callable[[Any], None]) -> Callable[[Any], None]:
        def end_then_give_back(connection: Any) -> None:
            try:
                end(connection)
            finally:
                give_back(connection)

        return end_then_give_back

    # The turn ends once the COMMIT or ROLLBACK has run (the "commit" event comes before
    # it), or when the connection is closed (an invalidated one ends with neither).
    dialect.do_commit = ending(dialect.do_commit)
    dialect.do_rollback = ending(dialect.do_rollback)
    dialect.do_close = ending(dialect.do_close)


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout, foreign keys, secure delete,
    and database files private to the server's user (0600); PostgreSQL gets a connect
    timeout, TCP keepalives and a pool timeout (:data:`PG_CONNECT_ARGS`)."""
    url = normalise_url(url)
    if url.startswith("sqlite"):
        database = sa.engine.make_url(url).database
        if database and database != ":memory:" and not database.startswith("file:"):
            private_database(Path(database))
        engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # The driver issues no BEGIN of its own: _one_writer_at_a_time's "begin" event
            # does (BEGIN IMMEDIATE for engine.begin(), a plain BEGIN for reads).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            # Deleted rows (a finished deployment's sealed secrets) are overwritten on disk.
            cur.execute("PRAGMA secure_delete=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        _one_writer_at_a_time(engine)
        return engine
    # A dead or cut-off PostgreSQL is noticed in seconds, not minutes (server/db_health.py):
    # connecting gives up after CONNECT_TIMEOUT, and an established connection whose packets
    # go unanswered is dropped by TCP keepalives and the user timeout.  Options the URL gives
    # itself (``?connect_timeout=30``) win.
    given = sa.engine.make_url(url).query
    connect_args = {k: v for k, v in PG_CONNECT_ARGS.items() if k not in given}
    return sa.create_engine(
        url,
        pool_pre_ping=True,
        pool_size=10,
        max_overflow=20,
        pool_timeout=POOL_TIMEOUT,
        connect_args=connect_args,
    )


#: Seconds to wait for a PostgreSQL connection (libpq ``connect_timeout``).
CONNECT_TIMEOUT = 5
#: Seconds a request waits for a free pooled connection before it is answered 503.
POOL_TIMEOUT = 10
#: libpq options of every PostgreSQL connection: the connect timeout, keepalives every few
#: seconds on an idle connection, and (``tcp_user_timeout``, ms) a connection whose sent
#: data goes unacknowledged for 10 s is closed.
PG_CONNECT_ARGS: dict[str, Any] = {
    "connect_timeout": CONNECT_TIMEOUT,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 3,
    "keepalives_count": 3,
    "tcp_user_timeout": 10000,
}


def row_dict(row: Any) -> dict[str, Any]:
    """A result row as a plain ``{column: value}`` dict."""
    return dict(row._mapping)


def bulk_insert(
    conn: Connection, table: sa.Table, columns: Sequence[str], rows: Sequence[Sequence[Any]]
) -> None:
    """Insert ``rows`` (values in ``columns`` order) with the driver's own ``executemany``:
    for many small rows, such as a batch of log lines, SQLAlchemy's per-row parameter
    processing costs more than the database does.  Only for columns whose values need no
    type conversion (numbers and strings)."""
    if not rows:
        return
    sql, order = _insert_sql(conn.dialect, table, tuple(columns))
    if order is None:
        params: list[Any] = [dict(zip(columns, row, strict=True)) for row in rows]
    elif order == tuple(range(len(columns))):
        params = list(rows)
    else:
        params = [tuple(row[i] for i in order) for row in rows]
    conn.exec_driver_sql(sql, params)


#: The driver's ``INSERT`` of :func:`bulk_insert` by dialect, table and columns: compiling it
#: cost more than running it for the one or two rows of a status report.
_INSERTS: dict[tuple[str, str, str, tuple[str, ...]], tuple[str, tuple[int, ...] | None]] = {}


def _insert_sql(
    dialect: Any, table: sa.Table, columns: tuple[str, ...]
) -> tuple[str, tuple[int, ...] | None]:
    """The SQL and, for a positional paramstyle, the order of ``columns`` it takes."""
    key = (dialect.name, dialect.paramstyle, table.fullname, columns)
    cached = _INSERTS.get(key)
    if cached is None:
        compiled = table.insert().compile(dialect=dialect, column_keys=list(columns))
        order = (
            tuple(columns.index(name) for name in compiled.positiontup or ())
            if compiled.positional
            else None
        )
        cached = _INSERTS[key] = (str(compiled), order)
    return cached


def migrations_config(engine: Engine) -> Any:
    """An Alembic config pointing at the core's migrations and at ``engine``."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the core's schema to ``revision`` (default: the newest)."""
    from alembic import command

    command.upgrade(migrations_config(engine), revision)


def current_revision(engine: Engine) -> str | None:
    """The schema revision the database is at, or ``None`` for an empty database."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def create_plugin_tables(engine: Engine, metadata_: sa.MetaData | None = None) -> None:
    """Create the tables plugins defined, where missing."""
    (metadata_ or plugin_metadata).create_all(engine)
