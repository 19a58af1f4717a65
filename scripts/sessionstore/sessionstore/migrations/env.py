"""Alembic environment of the target tables, in one schema, under ``lock_timeout``.

Two callers. :func:`sessionstore.migrate.upgrade_detail` hands over its open connection, the
schema and the lock timeout in ``config.attributes``. The plain ``alembic`` command (with the
package's ``alembic.ini``) names them itself: ``-x dsn=…``, else the variable ``-x dsn_env=NAME``
names, else ``DATABASE_URL`` (any DSN form libpq accepts); ``-x schema=NAME`` (default
``public``); ``-x lock_timeout=5s``. The version table lives in the target schema, so two
schemas of one database are migrated independently.
"""

from __future__ import annotations

import os
from logging.config import fileConfig
from typing import Any

from alembic import context
from alembic.util import CommandError
from sqlalchemy import text
from sqlalchemy.dialects import postgresql
from sqlalchemy.pool import NullPool

from sessionstore.connect import engine, sqlalchemy_url
from sessionstore.defaults import TARGET_SCHEMA
from sessionstore.errors import StoreError
from sessionstore.migrate import LOCK_TIMEOUT, create_schema_if_missing
from sessionstore.model import Base

config = context.config
# Commands that only read: they never create the schema they are asked about.
READ_ONLY_COMMANDS = {"current", "history", "heads", "show", "branches", "check"}


def migrate(connection: Any, schema: str, lock_timeout: str) -> None:
    """Run the revisions on ``connection`` (inside its transaction) in ``schema``."""
    quoted = connection.dialect.identifier_preparer.quote(schema)
    # Unqualified names in the revisions land in the target schema, and only there.
    connection.execute(text(f"SET LOCAL search_path TO {quoted}"))
    # The target may be live: a revision that must wait for a lock the application holds gives
    # up after lock_timeout instead of queueing every application query behind its own wait.
    connection.execute(
        text("SELECT set_config('lock_timeout', :value, true)"), {"value": lock_timeout}
    )
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        version_table_schema=schema,
        transactional_ddl=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _command() -> str:
    cmd = getattr(config.cmd_opts, "cmd", None)
    return getattr(cmd[0], "__name__", "") if cmd else ""


def _dsn(x: dict[str, str]) -> str:
    """The DSN the operator named; the empty string is libpq's environment (PGHOST …)."""
    if "dsn" in x:
        return x["dsn"]
    variable = x.get("dsn_env", "DATABASE_URL")
    value = os.environ.get(variable)
    if value is None:
        if any(os.environ.get(v) for v in ("PGHOST", "PGSERVICE", "PGDATABASE")):
            return ""
        raise CommandError(
            f"no database named; export {variable}=postgresql://user@host:5432/db "
            "(password in ~/.pgpass or PGPASSWORD), or pass -x dsn=…, or set PGHOST/PGSERVICE"
        )
    return value


def from_command_line() -> None:
    """The plain ``alembic`` command: the database, schema and lock timeout from ``-x``."""
    if config.config_file_name is not None:
        fileConfig(config.config_file_name, disable_existing_loggers=False)
    x = context.get_x_argument(as_dictionary=True)
    dsn = _dsn(x)
    schema = x.get("schema", TARGET_SCHEMA)
    lock_timeout = x.get("lock_timeout", LOCK_TIMEOUT)
    if context.is_offline_mode():
        context.configure(
            url=sqlalchemy_url(dsn),
            target_metadata=Base.metadata,
            version_table_schema=schema,
            literal_binds=True,
            transactional_ddl=True,
        )
        quoted = postgresql.dialect().identifier_preparer.quote(schema)
        with context.begin_transaction():
            context.execute(f"SET LOCAL search_path TO {quoted}")
            context.execute(f"SET LOCAL lock_timeout = '{lock_timeout.replace(chr(39), '')}'")
            context.run_migrations()
        return
    target = engine(dsn, "alembic", poolclass=NullPool)
    try:
        with target.begin() as connection:
            if _command() not in READ_ONLY_COMMANDS:
                create_schema_if_missing(connection, schema, lock_timeout)
            migrate(connection, schema, lock_timeout)
    finally:
        target.dispose()


handed_over = config.attributes.get("connection")
if handed_over is not None:
    migrate(
        handed_over,
        config.attributes.get("target_schema", TARGET_SCHEMA),
        config.attributes.get("lock_timeout", LOCK_TIMEOUT),
    )
else:
    try:
        from_command_line()
    except StoreError as exc:
        # Alembic prints a CommandError as one "FAILED:" line; ours already say what to do.
        raise CommandError(str(exc)) from None
