"""Deployment output in chunks: deploy_log_chunks (one row per block of lines, with the
deployment's line ids first_line .. first_line + line_count - 1) replaces deploy_logs (one row
per line).  Each stored line becomes a chunk of one line and keeps its id, so an ``after``
a client holds still points at the same place.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

ID = sa.String(64)
NAME = sa.String(64)
# Chunks turned back into lines per statement on downgrade.
DOWNGRADE_BATCH = 500


def upgrade() -> None:
    op.create_table(
        "deploy_log_chunks",
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
        sa.Column("stage", NAME, nullable=False),
        sa.Column("text", sa.Text, nullable=False),
    )
    op.execute(
        sa.text(
            "INSERT INTO deploy_log_chunks"
            " (deploy_id, first_line, line_count, ts, stream, stage, text)"
            " SELECT deploy_id, id, 1, ts, stream, stage, line FROM deploy_logs"
        )
    )
    op.drop_table("deploy_logs")


def downgrade() -> None:
    logs = op.create_table(
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
    assert logs is not None
    chunks = sa.table(
        "deploy_log_chunks",
        sa.column("deploy_id"),
        sa.column("first_line"),
        sa.column("line_count"),
        sa.column("ts"),
        sa.column("stream"),
        sa.column("stage"),
        sa.column("text"),
    )
    conn = op.get_bind()
    # Lines get new ids (the old table numbers lines across deployments), in output order.
    position: tuple[str, int] = ("", -1)
    while True:
        rows = conn.execute(
            sa.select(chunks)
            .where(sa.tuple_(chunks.c.deploy_id, chunks.c.first_line) > sa.tuple_(*position))
            .order_by(chunks.c.deploy_id, chunks.c.first_line)
            .limit(DOWNGRADE_BATCH)
        ).all()
        if not rows:
            break
        conn.execute(
            logs.insert(),
            [
                {
                    "deploy_id": row.deploy_id,
                    "ts": row.ts,
                    "stream": row.stream,
                    "stage": row.stage,
                    "line": line,
                }
                for row in rows
                for line in row.text.split("\n", row.line_count - 1)
            ],
        )
        position = (rows[-1].deploy_id, rows[-1].first_line)
    op.drop_table("deploy_log_chunks")
