"""The one definition of the target tables (SQLAlchemy model) and how to create them (Alembic).

``sessions`` follows the digest's model with two deliberate changes: ``metadata`` is ``jsonb``
(mapped to the attribute ``metadata_``, since SQLAlchemy reserves ``metadata`` on declarative
classes) and the id columns are ``text`` rather than ``varchar(100)``, so that no valid source
value is ever truncated or refused for its length.

The target may be live: every statement here that takes a lock does so under ``lock_timeout``
(:data:`LOCK_TIMEOUT`), so a migration that meets a lock the application holds gives up with a
clear message instead of queueing the application behind it. :func:`provisional` creates the
schema for a load and removes what it created when that load does not complete, so an
interrupted first run leaves the target exactly as it was.

Alembic as its users know it: the package ships ``alembic.ini`` (:data:`ALEMBIC_INI`), so
``alembic -c ALEMBIC_INI -x schema=NAME upgrade head|current`` works against ``DATABASE_URL``;
:func:`db_upgrade`, :func:`db_current` and :func:`db_history` are the same three commands for
``sessionmig db``.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Index,
    Integer,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from . import defaults as D
from .connect import connect, engine, failure_text
from .errors import TargetError

MIGRATIONS = Path(__file__).parent / "migrations"
# The installed Alembic configuration: ``alembic -c ALEMBIC_INI -x schema=… current`` works
# against DATABASE_URL (see the file's header).
ALEMBIC_INI = Path(__file__).parent / "alembic.ini"
HEAD = "0004"
# How long any DDL waits for a lock before giving up (PostgreSQL interval syntax).
LOCK_TIMEOUT = D.LOCK_TIMEOUT


class Base(DeclarativeBase):
    """Declarative base of the target tables."""


class SessionRecord(Base):
    """A web-app session, as the new ``SessionManager`` stores it."""

    __tablename__ = "sessions"
    # Byte order: a session id is a token (revision 0002).
    session_id: Mapped[str] = mapped_column(Text(collation="C"), primary_key=True)
    user_id: Mapped[str | None] = mapped_column(Text)
    metadata_: Mapped[Any | None] = mapped_column("metadata", JSONB)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    last_activity: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    request_count: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))

    __table_args__ = (Index("idx_expires_at", "expires_at"),)


class MigrationReject(Base):
    """A source row that could not land: its raw values, why, and where it came from."""

    __tablename__ = "session_migration_rejects"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(Text, nullable=False, index=True)
    source_rowid: Mapped[int] = mapped_column(BigInteger, nullable=False)
    session_id: Mapped[str | None] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text, nullable=False)
    message: Mapped[str] = mapped_column(Text, nullable=False)
    raw: Mapped[Any] = mapped_column(JSONB, nullable=False)
    recorded_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )


class MigrationRun(Base):
    """One audit row per committed migrate (and later rollback/finalize) run."""

    __tablename__ = "session_migration_runs"
    run_id: Mapped[str] = mapped_column(Text, primary_key=True)
    step: Mapped[str] = mapped_column(Text, nullable=False)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    finished_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    dry_run: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=text("false"))
    source_path: Mapped[str] = mapped_column(Text, nullable=False)
    source_sha256: Mapped[str] = mapped_column(Text, nullable=False)
    source_timezone: Mapped[str] = mapped_column(Text, nullable=False)
    rows_read: Mapped[int] = mapped_column(BigInteger, nullable=False)
    inserted: Mapped[int] = mapped_column(BigInteger, nullable=False)
    unchanged: Mapped[int] = mapped_column(BigInteger, nullable=False)
    conflicting: Mapped[int] = mapped_column(BigInteger, nullable=False)
    updated: Mapped[int] = mapped_column(BigInteger, nullable=False)
    rejected: Mapped[int] = mapped_column(BigInteger, nullable=False)
    parameters: Mapped[Any] = mapped_column(JSONB, nullable=False)
    operator: Mapped[str | None] = mapped_column(Text)
    host: Mapped[str | None] = mapped_column(Text)

    # Revision 0004: one catch-up pass per number, one overlap rollback per migrate run, kept by
    # the target itself (a lock connection can vanish; a unique index cannot).
    __table_args__ = (
        Index(
            "uq_session_migration_runs_catchup_pass",
            text("(parameters->>'migrate_run_id')"),
            text("((parameters->>'catchup_pass')::int)"),
            unique=True,
            postgresql_where=text("step = 'catchup'"),
        ),
        Index(
            "uq_session_migration_runs_overlap_rollback",
            text("(parameters->>'migrate_run_id')"),
            unique=True,
            postgresql_where=text(
                "step = 'rollback' AND parameters->>'mode' = 'overlap' "
                "AND parameters->>'state' = 'intent'"
            ),
        ),
    )


class MigrationManifest(Base):
    """The digest of each run's sealed manifest, so a re-sealed run folder is caught (0003)."""

    __tablename__ = "session_migration_manifests"
    run_id: Mapped[str] = mapped_column(Text, primary_key=True)
    manifest_sha256: Mapped[str] = mapped_column(Text, nullable=False)
    environment: Mapped[str | None] = mapped_column(Text)
    verdict: Mapped[str | None] = mapped_column(Text)
    sealed_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )


TABLES = (
    "sessions",
    "session_migration_rejects",
    "session_migration_runs",
    "session_migration_manifests",
)
VERSION_TABLE = "alembic_version"
APPEND_ONLY_FUNCTION = "session_migration_append_only"  # revision 0004


@dataclass(frozen=True)
class Upgraded:
    """What one :func:`upgrade` did: the revision now in force and what it created."""

    revision: str
    created_schema: bool
    created_tables: tuple[str, ...]


def _present(conn: Any, schema: str) -> tuple[bool, set[str]]:
    """(schema exists, which of our tables and the version table exist) in ``schema``."""
    exists = conn.execute(
        text("SELECT to_regnamespace(:s) IS NOT NULL"), {"s": _quoted(conn, schema)}
    ).scalar()
    tables = {
        name
        for (name,) in conn.execute(
            text("SELECT tablename FROM pg_tables WHERE schemaname = :s"), {"s": schema}
        )
    }
    return bool(exists), tables & {*TABLES, VERSION_TABLE}


def alembic_config(target_schema: str = D.TARGET_SCHEMA) -> Any:
    """The Alembic ``Config`` of the installed ``alembic.ini``, aimed at ``target_schema``."""
    from alembic.config import Config

    config = Config(str(ALEMBIC_INI))
    # The ini's %(here)s resolves from the file; set it again in case the ini was copied.
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["target_schema"] = target_schema
    config.attributes["lock_timeout"] = LOCK_TIMEOUT
    return config


def create_schema_if_missing(
    conn: Any, target_schema: str, lock_timeout: str = LOCK_TIMEOUT
) -> bool:
    """Create ``target_schema`` when it does not exist (in ``conn``'s transaction, under
    ``lock_timeout``); True when it was created."""
    conn.execute(text("SELECT set_config('lock_timeout', :v, true)"), {"v": lock_timeout})
    existed, _ = _present(conn, target_schema)
    # Only when missing: CREATE SCHEMA IF NOT EXISTS would need the database-level CREATE
    # privilege even for a schema that is already there.
    if not existed:
        conn.execute(text(f"CREATE SCHEMA {_quoted(conn, target_schema)}"))
    return not existed


def upgrade_detail(
    dsn: str, target_schema: str = D.TARGET_SCHEMA, revision: str = "head"
) -> Upgraded:
    """``alembic upgrade`` on ``target_schema`` (created if missing), under ``lock_timeout``."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    config = alembic_config(target_schema)
    target = engine(dsn, "schema")
    try:
        with target.begin() as conn:
            _, before = _present(conn, target_schema)
            created_schema = create_schema_if_missing(conn, target_schema)
            config.attributes["connection"] = conn
            command.upgrade(config, revision)
            context = MigrationContext.configure(conn, opts={"version_table_schema": target_schema})
            _, after = _present(conn, target_schema)
            return Upgraded(
                context.get_current_revision() or "",
                created_schema,
                tuple(sorted(after - before)),
            )
    except Exception as exc:
        if _is_lock_timeout(exc):
            raise TargetError(
                f"creating the tables in schema {target_schema!r}: a lock held by another "
                f"session (the application?) was not released within lock_timeout "
                f"{LOCK_TIMEOUT}; nothing was changed. Run again when the target is quiet "
                f"({failure_text(exc)})"
            ) from None
        raise
    finally:
        target.dispose()


def upgrade(dsn: str, target_schema: str = D.TARGET_SCHEMA, revision: str = "head") -> str:
    """``alembic upgrade head`` on ``target_schema`` (created if missing); returns the revision."""
    return upgrade_detail(dsn, target_schema, revision).revision


# --- ``sessionmig db upgrade|current|history``: Alembic's commands without the ini's path -----


def db_upgrade(dsn: str, target_schema: str = D.TARGET_SCHEMA, revision: str = "head") -> str:
    """``alembic upgrade REVISION`` in ``target_schema`` (created if missing, under
    ``lock_timeout``); returns the revision now in force."""
    return upgrade(dsn, target_schema, revision)


def db_current(dsn: str, target_schema: str = D.TARGET_SCHEMA) -> str | None:
    """``alembic current``: the revision of ``target_schema`` (None when never migrated).
    Reads only: a missing schema is reported as None, not created."""
    from alembic.runtime.migration import MigrationContext

    target = engine(dsn, "schema")
    try:
        with target.connect() as conn:
            context = MigrationContext.configure(conn, opts={"version_table_schema": target_schema})
            return context.get_current_revision()
    finally:
        target.dispose()


def db_history() -> list[str]:
    """``alembic history``: one line per revision, oldest first (``0001 (base): …``,
    ``0003 (head): …``)."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config())
    lines = []
    for rev in reversed(list(script.walk_revisions())):
        marks = [m for m, on in (("base", rev.is_base), ("head", rev.is_head)) if on]
        label = f"{rev.revision} ({', '.join(marks)})" if marks else rev.revision
        lines.append(f"{label}: {(rev.doc or '').strip()}")
    return lines


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


def _is_lock_timeout(exc: BaseException) -> bool:
    orig = getattr(exc, "orig", exc)
    return getattr(orig, "sqlstate", None) == "55P03"  # lock_not_available


def _quoted(conn: Any, name: str) -> str:
    return conn.dialect.identifier_preparer.quote(name)
