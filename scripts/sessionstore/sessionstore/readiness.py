"""Whether a database is ready for the store, asked once at start-up
(``SessionManager.open()``): the sessions table exists and the schema's Alembic revision is
:data:`~sessionstore.migrate.HEAD`, the one the store's statements are written for. Anything
else is one :class:`~sessionstore.errors.StoreNotReady` that says what is wrong, where, and the
command that fixes it — not a raw ``UndefinedTable`` on the first request.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from .errors import StoreNotReady
from .migrate import HEAD, VERSION_TABLE

SESSIONS_TABLE = "sessions"
# How to bring a database to the store's revision, for the message.
UPGRADE_HINT = (
    "run the store's migrations: alembic -c \"$(python -c 'import sessionstore.migrate as m; "
    "print(m.ALEMBIC_INI)')\" -x schema={schema} upgrade head (DATABASE_URL names the "
    "database), or sessionmig db upgrade; then start the app again"
)


def _place(conn: psycopg.AsyncConnection[Any], schema: str) -> str:
    info = conn.info
    return (
        f"schema {schema!r} of database {info.dbname!r} on host {info.host} port {info.port} "
        f"(user {info.user!r})"
    )


async def _exists(conn: psycopg.AsyncConnection[Any], schema: str, table: str) -> bool:
    name = sql.Identifier(schema, table).as_string(conn)
    cur = await conn.execute(
        "SELECT pg_catalog.to_regclass(%s) IS NOT NULL", (name,), prepare=False
    )
    row = await cur.fetchone()
    return bool(row and row[0])


async def _revisions(conn: psycopg.AsyncConnection[Any], schema: str) -> list[str]:
    query = sql.SQL("SELECT version_num FROM {}").format(sql.Identifier(schema, VERSION_TABLE))
    cur = await conn.execute(query, prepare=False)
    return [row[0] for row in await cur.fetchall()]


async def check_ready(conn: psycopg.AsyncConnection[Any], schema: str) -> str:
    """Raise :class:`StoreNotReady` unless ``schema`` holds the sessions table at revision
    :data:`HEAD`; return that revision. Reads only (two catalog lookups, one row)."""
    place = _place(conn, schema)
    fix = UPGRADE_HINT.format(schema=schema)
    if not await _exists(conn, schema, SESSIONS_TABLE):
        raise StoreNotReady(
            f"the session store is not ready: there is no table {SESSIONS_TABLE!r} in {place} "
            f"(the database was never migrated, or DATABASE_URL / the schema name another one); "
            f"{fix}"
        )
    if not await _exists(conn, schema, VERSION_TABLE):
        raise StoreNotReady(
            f"the session store is not ready: table {SESSIONS_TABLE!r} in {place} has no "
            f"Alembic revision ({VERSION_TABLE} is missing: made outside the store's "
            f"migrations?); the store expects revision {HEAD}: {fix}"
        )
    found = await _revisions(conn, schema)
    if found == [HEAD]:
        return HEAD
    if len(found) == 1 and found[0] < HEAD:
        raise StoreNotReady(
            f"the session store is not ready: {place} is at Alembic revision {found[0]}, "
            f"older than the {HEAD} this store is written for; {fix}"
        )
    shown = ", ".join(found) or "none"
    raise StoreNotReady(
        f"the session store is not ready: {place} is at Alembic revision {shown}, which this "
        f"sessionstore (written for {HEAD}) does not know: install the sessionstore release "
        "that migrated it, or bring the database to a revision this one knows"
    )
