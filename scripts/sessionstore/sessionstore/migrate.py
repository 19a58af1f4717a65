"""Alembic as its users know it, for the store's tables: the package ships ``alembic.ini``
(:data:`ALEMBIC_INI`) and its revisions (:data:`MIGRATIONS`), so

    alembic -c "$(python -c 'import sessionstore.migrate as m; print(m.ALEMBIC_INI)')" upgrade head

works against ``DATABASE_URL``; :func:`db_upgrade`, :func:`db_current` and :func:`db_history`
are the same three commands from Python (``sessionmig db`` calls them). :data:`HEAD` is the
revision the store's statements are written for: ``SessionManager.open()`` refuses a database
at any other.

The target may be live: every statement here that takes a lock does so under ``lock_timeout``
(:data:`LOCK_TIMEOUT`), so a migration that meets a lock the application holds gives up with a
clear message instead of queueing the application behind it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import text

from . import defaults as D
from . import model as M
from .connect import engine, failure_text
from .errors import TargetError

MIGRATIONS = Path(__file__).parent / "migrations"
# The installed Alembic configuration: ``alembic -c ALEMBIC_INI -x schema=… current`` works
# against DATABASE_URL (see the file's header).
ALEMBIC_INI = Path(__file__).parent / "alembic.ini"
# The newest revision: the one the store's statements are written for (a test checks it is the
# head of MIGRATIONS).
HEAD = "0004"
# How long any DDL waits for a lock before giving up (PostgreSQL interval syntax).
LOCK_TIMEOUT = D.LOCK_TIMEOUT
# What the history creates, named once by the model.
TABLES, VERSION_TABLE, APPEND_ONLY_FUNCTION = M.TABLES, M.VERSION_TABLE, M.APPEND_ONLY_FUNCTION


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


def _is_lock_timeout(exc: BaseException) -> bool:
    orig = getattr(exc, "orig", exc)
    return getattr(orig, "sqlstate", None) == "55P03"  # lock_not_available


def _quoted(conn: Any, name: str) -> str:
    return conn.dialect.identifier_preparer.quote(name)
