"""Per-deployment log accounting (limit and truncation marker) and secrets kept apart.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        batch.add_column(sa.Column("log_bytes", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(
            sa.Column("log_truncated", sa.Boolean, nullable=False, server_default=sa.false())
        )
    op.create_table(
        "deploy_secrets",
        sa.Column(
            "deploy_id",
            sa.String(64),
            sa.ForeignKey("deployments.deploy_id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("secret_env", sa.JSON, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("deploy_secrets")
    with op.batch_alter_table("deployments") as batch:
        batch.drop_column("log_truncated")
        batch.drop_column("log_bytes")
