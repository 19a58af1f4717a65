"""The store the environment asks for: the digest's rollback switch (``SESSION_DB_TYPE``)."""

from __future__ import annotations

import os

from .errors import StoreUnavailable
from .legacy import LegacySQLiteSessionManager
from .manager import DEFAULT_POOL_SIZE, POOLER_MODES, PREPARE_SETTINGS, SessionManager
from .record import SessionStore


def get_session_manager(environ: dict[str, str] | None = None) -> SessionStore:
    """The store the environment asks for: ``SESSION_DB_TYPE`` = ``postgres`` (default, with
    ``DATABASE_URL``, and ``SESSION_POOL_SIZE``, default :data:`DEFAULT_POOL_SIZE`) or
    ``sqlite`` (the rollback switch, with ``SESSION_SQLITE_PATH`` and ``SESSION_TIMEZONE``);
    ``SESSION_TTL_HOURS`` (default 24) for both.

    Behind a connection pooler: ``SESSION_DB_POOLER`` = ``auto`` (default: detected when the
    pool opens), ``transaction`` (PgBouncer in transaction mode is in front) or ``none``;
    ``SESSION_PREPARE`` = ``auto`` (default: on directly, off behind a pooler), ``on`` or
    ``off``. See :class:`SessionManager`."""
    env = os.environ if environ is None else environ
    kind = env.get("SESSION_DB_TYPE", "postgres").strip().lower()
    ttl = float(env.get("SESSION_TTL_HOURS", "24"))
    if kind == "postgres":
        url = env.get("DATABASE_URL")
        if not url:
            raise StoreUnavailable("SESSION_DB_TYPE=postgres needs DATABASE_URL to be set")
        pool_size = int(env.get("SESSION_POOL_SIZE", str(DEFAULT_POOL_SIZE)))
        pooler = env.get("SESSION_DB_POOLER", "auto").strip().lower()
        if pooler not in POOLER_MODES:
            raise StoreUnavailable(
                f"SESSION_DB_POOLER={pooler!r}: use auto (detect a pooler), transaction "
                "(PgBouncer in transaction mode in front of PostgreSQL) or none"
            )
        prepare = env.get("SESSION_PREPARE", "auto").strip().lower()
        if prepare not in PREPARE_SETTINGS:
            raise StoreUnavailable(
                f"SESSION_PREPARE={prepare!r}: use auto (on directly, off behind a pooler), "
                "on or off"
            )
        return SessionManager(
            url,
            ttl_hours=ttl,
            pool_size=pool_size,
            pooler=pooler,
            prepare=PREPARE_SETTINGS[prepare],
        )
    if kind == "sqlite":
        path = env.get("SESSION_SQLITE_PATH", "backend/data/system/sessions/sessions.db")
        return LegacySQLiteSessionManager(
            path, ttl_hours=ttl, zone=env.get("SESSION_TIMEZONE", "UTC")
        )
    raise StoreUnavailable(f"SESSION_DB_TYPE={kind!r}: use postgres or sqlite")
