"""The target tables for a load: the session store's model and Alembic history
(``sessionstore.model``, ``sessionstore.migrate``), re-exported for the runbook, and what only
a load needs — :func:`provisional` creates the schema for a load and removes what it created
when that load does not complete, so an interrupted first run leaves the target exactly as it
was.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sessionmig import defaults as D
from sessionmig.postgres.connect import connect, failure_text
from sessionstore.migrate import ALEMBIC_INI as ALEMBIC_INI
from sessionstore.migrate import APPEND_ONLY_FUNCTION as APPEND_ONLY_FUNCTION
from sessionstore.migrate import HEAD as HEAD
from sessionstore.migrate import LOCK_TIMEOUT as LOCK_TIMEOUT
from sessionstore.migrate import MIGRATIONS as MIGRATIONS
from sessionstore.migrate import TABLES as TABLES
from sessionstore.migrate import VERSION_TABLE as VERSION_TABLE
from sessionstore.migrate import Upgraded as Upgraded
from sessionstore.migrate import alembic_config as alembic_config
from sessionstore.migrate import create_schema_if_missing as create_schema_if_missing
from sessionstore.migrate import db_current as db_current
from sessionstore.migrate import db_history as db_history
from sessionstore.migrate import db_upgrade as db_upgrade
from sessionstore.migrate import upgrade as upgrade
from sessionstore.migrate import upgrade_detail as upgrade_detail
from sessionstore.model import Base as Base
from sessionstore.model import MigrationManifest as MigrationManifest
from sessionstore.model import MigrationReject as MigrationReject
from sessionstore.model import MigrationRun as MigrationRun
from sessionstore.model import SessionRecord as SessionRecord


@contextmanager
def provisional(dsn: str, target_schema: str = D.TARGET_SCHEMA) -> Iterator[str]:
    """Upgrade the schema for a load; if the block does not complete, remove what this call
    created (still empty: nothing was committed into it), so an interrupted or failed first
    run leaves the target exactly as it was. Yields the revision in force.

    Kept apart from the load's own transaction because Alembic runs on its own connection; the
    caller holds the migration lock around both, so nobody else sees the tables come and go
    except an application that would have found them empty anyway.
    """
    done = upgrade_detail(dsn, target_schema)
    try:
        yield done.revision
    except BaseException:
        if done.created_tables or done.created_schema:
            with _shielded():
                remove_created(dsn, target_schema, done)
        raise


def remove_created(dsn: str, target_schema: str, done: Upgraded) -> bool:
    """Drop the tables (and schema) ``done`` created, if every one of them is still empty.

    Returns True when removed. Never raises: it runs while another error is on its way up,
    and says on stderr what it could not do."""
    import psycopg
    from psycopg import sql

    try:
        with connect(dsn, "undo") as conn:
            conn.execute("SELECT set_config('lock_timeout', %s, true)", (LOCK_TIMEOUT,))
            for table in done.created_tables:
                name = sql.Identifier(target_schema, table)
                conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(name))
                row = conn.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(name))
                if table != VERSION_TABLE and row.fetchone()[0]:  # type: ignore[index]
                    conn.rollback()  # something was committed after all: keep everything
                    return False
            for table in done.created_tables:
                conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(target_schema, table)))
            if "session_migration_manifests" in done.created_tables:
                # Revision 0004's trigger function came with the table.
                conn.execute(
                    sql.SQL("DROP FUNCTION IF EXISTS {}()").format(
                        sql.Identifier(target_schema, APPEND_ONLY_FUNCTION)
                    )
                )
            if done.created_schema:
                # RESTRICT: a schema someone else put objects in meanwhile is kept.
                conn.execute("SAVEPOINT keep_schema")
                try:
                    conn.execute(
                        sql.SQL("DROP SCHEMA {} RESTRICT").format(sql.Identifier(target_schema))
                    )
                except psycopg.errors.DependentObjectsStillExist:
                    conn.execute("ROLLBACK TO SAVEPOINT keep_schema")
        return True
    except Exception as exc:
        print(
            f"sessionmig: the empty tables this run created in schema {target_schema!r} could "
            f"not be removed ({failure_text(exc)}); they are harmless, the next run "
            "uses them",
            file=sys.stderr,
        )
        return False


@contextmanager
def _shielded() -> Iterator[None]:
    """Hold off a second Ctrl-C while the undo runs (bounded by connect and lock timeouts)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
