"""sessionmig's connections to PostgreSQL: the session store's one door
(``sessionstore.connect``: every DSN form, ``application_name``, the fixed session settings,
timeouts, errors mapped and redacted), re-exported for the runbook, plus what only the runbook
needs (:func:`with_database`, for the embedded server and the tests' own databases)."""

from __future__ import annotations

from psycopg.conninfo import make_conninfo

from sessionstore.connect import _SCHEME
from sessionstore.connect import DEFAULT_SETTINGS as DEFAULT_SETTINGS
from sessionstore.connect import FIXED_SETTINGS as FIXED_SETTINGS
from sessionstore.connect import MALFORMED_DSN_HINT as MALFORMED_DSN_HINT
from sessionstore.connect import PREFIX as PREFIX
from sessionstore.connect import aconnect as aconnect
from sessionstore.connect import application_name as application_name
from sessionstore.connect import connect as connect
from sessionstore.connect import conninfo as conninfo
from sessionstore.connect import engine as engine
from sessionstore.connect import failure_text as failure_text
from sessionstore.connect import libpq_dsn as libpq_dsn
from sessionstore.connect import parse as parse
from sessionstore.connect import sqlalchemy_url as sqlalchemy_url
from sessionstore.connect import where as where


def with_database(dsn: str | None, database: str) -> str:
    """The same connection string pointing at ``database`` (a URL stays a URL)."""
    raw = libpq_dsn(dsn)
    if _SCHEME.match(raw):
        from urllib.parse import urlsplit, urlunsplit

        parts = urlsplit(raw)
        return urlunsplit(parts._replace(path="/" + database))
    return make_conninfo(raw, dbname=database)
