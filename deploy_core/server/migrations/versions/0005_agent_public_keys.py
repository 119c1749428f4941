"""Agents enroll with their own Ed25519 public key: clients.public_key (hex); agent_key (the
shared key the server issued before) becomes optional and is cleared when an agent upgrades.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("clients") as batch:
        batch.add_column(sa.Column("public_key", sa.String(64)))
        batch.alter_column("agent_key", existing_type=sa.String(128), nullable=True)


def downgrade() -> None:
    # An agent known only by its public key cannot be described by the older schema: it
    # would have to enroll again, so its row goes.
    op.execute(sa.text("DELETE FROM clients WHERE agent_key IS NULL"))
    with op.batch_alter_table("clients") as batch:
        batch.alter_column("agent_key", existing_type=sa.String(128), nullable=False)
        batch.drop_column("public_key")
