"""API tokens with scopes, join tokens with expiry and uses, client revocation.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_tokens",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("last_used", sa.Float),
    )
    op.create_table(
        "join_tokens",
        sa.Column("token_id", sa.String(16), primary_key=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float),
        sa.Column("uses_left", sa.Integer),
        sa.Column("note", sa.String(200), nullable=False),
    )
    with op.batch_alter_table("clients") as batch:
        batch.add_column(sa.Column("revoked_at", sa.Float))


def downgrade() -> None:
    with op.batch_alter_table("clients") as batch:
        batch.drop_column("revoked_at")
    op.drop_table("join_tokens")
    op.drop_table("api_tokens")
