"""Which target each deployment changes (live deployment per target, rollback order) and
which artifacts it fetches (an agent may fetch only those of its own deployments).

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        batch.add_column(sa.Column("target", sa.String(600)))
    op.create_index("ix_deployments_target", "deployments", ["client_id", "target"])
    op.create_table(
        "deploy_artifacts",
        sa.Column(
            "deploy_id",
            sa.String(64),
            sa.ForeignKey("deployments.deploy_id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("sha256", sa.String(64), primary_key=True),
    )
    op.create_index("ix_deploy_artifacts_sha256", "deploy_artifacts", ["sha256"])


def downgrade() -> None:
    op.drop_index("ix_deploy_artifacts_sha256", table_name="deploy_artifacts")
    op.drop_table("deploy_artifacts")
    op.drop_index("ix_deployments_target", table_name="deployments")
    with op.batch_alter_table("deployments") as batch:
        batch.drop_column("target")
