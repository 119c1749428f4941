"""Cluster: a lease row per background duty and a heartbeat row per server replica; the
rollout driver's lease is one of them, so its own table (0007) goes.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

ID = sa.String(64)


def upgrade() -> None:
    op.create_table(
        "leases",
        sa.Column("duty", sa.String(64), primary_key=True),
        sa.Column("holder", ID, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
    )
    op.create_table(
        "replicas",
        sa.Column("server_id", ID, primary_key=True),
        sa.Column("api_url", sa.String(300), nullable=False),
        sa.Column("quic_address", sa.String(300), nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("last_seen", sa.Float, nullable=False),
        sa.Column("heartbeat_interval", sa.Float, nullable=False),
        sa.Column("agents_connected", sa.Integer, nullable=False),
    )
    op.drop_table("rollout_lease")


def downgrade() -> None:
    op.create_table(
        "rollout_lease",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
    )
    op.drop_table("replicas")
    op.drop_table("leases")
