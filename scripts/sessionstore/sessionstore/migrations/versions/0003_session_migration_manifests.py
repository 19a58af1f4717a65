"""Keep each run's manifest digest in the target (session_migration_manifests).

A run folder's manifest carries its own sha256, but that digest has no key: whoever can edit
the folder can re-seal it. The run therefore records the digest here when it is sealed, and
``sessionmig verify RUN_DIR --env ENV`` compares the folder with this row. One row per run,
written once.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A new table takes no lock any running query holds: safe on a live target.
    op.create_table(
        "session_migration_manifests",
        sa.Column("run_id", sa.Text(), primary_key=True),
        sa.Column("manifest_sha256", sa.Text(), nullable=False),
        sa.Column("environment", sa.Text()),
        sa.Column("verdict", sa.Text()),
        sa.Column(
            "sealed_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
    )


def downgrade() -> None:
    op.drop_table("session_migration_manifests")
