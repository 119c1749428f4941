"""Cluster: which replicas hold a copy of each artifact (a package uploaded through one
replica is known to every replica once complete), and the sealed identity replicas of one
cluster share (CA, server certificate, tokens, secrets key; ``--join-cluster``).

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

ID = sa.String(64)


def upgrade() -> None:
    op.create_table(
        "artifact_copies",
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("server_id", ID, primary_key=True),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("stored_at", sa.Float, nullable=False),
    )
    op.create_table(
        "cluster_secrets",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("sealed", sa.LargeBinary, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("cluster_secrets")
    op.drop_table("artifact_copies")
