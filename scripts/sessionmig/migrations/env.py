"""Alembic environment: runs on the connection ``schema.upgrade`` hands over, in its schema."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from sessionmig.schema import LOCK_TIMEOUT, Base

config = context.config
connection = config.attributes["connection"]
schema = config.attributes.get("target_schema", "public")
quoted = connection.dialect.identifier_preparer.quote(schema)
# Unqualified names in the revisions land in the target schema, and only there.
connection.execute(text(f"SET LOCAL search_path TO {quoted}"))
# The target may be live: a revision that must wait for a lock the application holds gives up
# after lock_timeout instead of queueing every application query behind its own wait.
connection.execute(
    text("SELECT set_config('lock_timeout', :value, true)"),
    {"value": config.attributes.get("lock_timeout", LOCK_TIMEOUT)},
)
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    version_table_schema=schema,
    transactional_ddl=True,
)
with context.begin_transaction():
    context.run_migrations()
