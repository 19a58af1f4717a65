"""Create sessions, session_migration_rejects and session_migration_runs.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TSTZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "sessions",
        sa.Column("session_id", sa.Text(), primary_key=True),
        sa.Column("user_id", sa.Text()),
        sa.Column("metadata", JSONB()),
        sa.Column("created_at", TSTZ, nullable=False),
        sa.Column("expires_at", TSTZ, nullable=False),
        sa.Column("last_activity", TSTZ, nullable=False),
        sa.Column("request_count", sa.Integer(), nullable=False, server_default=sa.text("0")),
    )
    op.create_index("idx_expires_at", "sessions", ["expires_at"])
    op.create_table(
        "session_migration_rejects",
        sa.Column("id", sa.BigInteger(), primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.Text(), nullable=False),
        sa.Column("source_rowid", sa.BigInteger(), nullable=False),
        sa.Column("session_id", sa.Text()),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("raw", JSONB(), nullable=False),
        sa.Column("recorded_at", TSTZ, nullable=False, server_default=sa.func.now()),
    )
    op.create_index("ix_session_migration_rejects_run_id", "session_migration_rejects", ["run_id"])
    op.create_table(
        "session_migration_runs",
        sa.Column("run_id", sa.Text(), primary_key=True),
        sa.Column("step", sa.Text(), nullable=False),
        sa.Column("started_at", TSTZ, nullable=False),
        sa.Column("finished_at", TSTZ, nullable=False),
        sa.Column("dry_run", sa.Boolean(), nullable=False, server_default=sa.text("false")),
        sa.Column("source_path", sa.Text(), nullable=False),
        sa.Column("source_sha256", sa.Text(), nullable=False),
        sa.Column("source_timezone", sa.Text(), nullable=False),
        sa.Column("rows_read", sa.BigInteger(), nullable=False),
        sa.Column("inserted", sa.BigInteger(), nullable=False),
        sa.Column("unchanged", sa.BigInteger(), nullable=False),
        sa.Column("conflicting", sa.BigInteger(), nullable=False),
        sa.Column("updated", sa.BigInteger(), nullable=False),
        sa.Column("rejected", sa.BigInteger(), nullable=False),
        sa.Column("parameters", JSONB(), nullable=False),
        sa.Column("operator", sa.Text()),
        sa.Column("host", sa.Text()),
    )


def downgrade() -> None:
    op.drop_table("session_migration_runs")
    op.drop_index("ix_session_migration_rejects_run_id", "session_migration_rejects")
    op.drop_table("session_migration_rejects")
    op.drop_index("idx_expires_at", "sessions")
    op.drop_table("sessions")
