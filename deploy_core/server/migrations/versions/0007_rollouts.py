"""Labels and rollouts (issue 14): clients.labels (the agent's [agent] labels), rollouts with
their targets and history, and rollout_lease (which server drives the rollouts).

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

ID = sa.String(64)
NAME = sa.String(64)


def upgrade() -> None:
    with op.batch_alter_table("clients") as batch:
        batch.add_column(sa.Column("labels", sa.JSON))
    op.create_table(
        "rollouts",
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
        sa.Column("current_batch", sa.Integer, nullable=False),
        sa.Column("batch_started_at", sa.Float),
        sa.Column("paused_for", sa.String(16)),
        sa.Column("reason", sa.Text),
        sa.Column("created_by", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False, index=True),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("finished_at", sa.Float),
    )
    op.create_table(
        "rollout_targets",
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
    op.create_table(
        "rollout_history",
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
    op.create_table(
        "rollout_lease",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("rollout_lease")
    op.drop_table("rollout_history")
    op.drop_table("rollout_targets")
    op.drop_table("rollouts")
    with op.batch_alter_table("clients") as batch:
        batch.drop_column("labels")
