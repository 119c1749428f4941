"""Initial schema: deployments, status history, logs, clients, client locks.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

ID = sa.String(64)
NAME = sa.String(64)


def upgrade() -> None:
    op.create_table(
        "deployments",
        sa.Column("deploy_id", ID, primary_key=True),
        sa.Column("client_id", ID, nullable=False, index=True),
        sa.Column("command_type", NAME, nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("stage", NAME, nullable=False),
        sa.Column("progress", sa.Integer, nullable=False),
        sa.Column("last_seq", sa.Integer, nullable=False),
        sa.Column("request", sa.JSON, nullable=False),
        sa.Column("result", sa.JSON),
        sa.Column("error", sa.Text),
        sa.Column("health", sa.JSON),
        sa.Column("rollback", sa.JSON),
        sa.Column("rollback_state", sa.JSON),
        sa.Column("rollback_of", ID),
        sa.Column("rolled_back_by", ID),
        sa.Column("rollback_wanted", sa.Boolean, nullable=False),
        sa.Column("agent_status", sa.String(32)),
        sa.Column("deadline", sa.Float, nullable=False),
        sa.Column("dispatched_at", sa.Float),
        sa.Column("acked_at", sa.Float),
        sa.Column("created_at", sa.Float, nullable=False, index=True),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("finished_at", sa.Float),
    )
    op.create_index("ix_deployments_open", "deployments", ["finished_at", "deadline"])
    op.create_table(
        "status_history",
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
        sa.Column("stage", NAME, nullable=False),
        sa.Column("progress", sa.Integer, nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("ts", sa.Float, nullable=False),
    )
    op.create_table(
        "deploy_logs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "deploy_id",
            ID,
            sa.ForeignKey("deployments.deploy_id", ondelete="CASCADE"),
            nullable=False,
            index=True,
        ),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("stream", sa.String(32), nullable=False),
        sa.Column("stage", NAME, nullable=False),
        sa.Column("line", sa.Text, nullable=False),
    )
    op.create_table(
        "clients",
        sa.Column("client_id", ID, primary_key=True),
        sa.Column("agent_key", sa.String(128), nullable=False),
        sa.Column("enrolled_at", sa.Float, nullable=False),
        sa.Column("connected", sa.Boolean, nullable=False),
        sa.Column("server_id", ID),
        sa.Column("connected_since", sa.Float),
        sa.Column("disconnected_since", sa.Float),
        sa.Column("last_seen", sa.Float),
        sa.Column("remote", sa.String(128)),
        sa.Column("capabilities", sa.JSON),
    )
    op.create_table(
        "client_locks",
        sa.Column("client_id", ID, primary_key=True),
        sa.Column("deploy_id", ID, nullable=False),
        sa.Column("owner", ID, nullable=False),
        sa.Column("acquired_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    for table in ("client_locks", "clients", "deploy_logs", "status_history", "deployments"):
        op.drop_table(table)
