"""Every connection the session store and sessionmig make to PostgreSQL: how it is opened,
named, timed out, and how its failure is told.

One door for psycopg (:func:`connect`, :func:`aconnect`, and :func:`conninfo` for a pool) and
one for SQLAlchemy (:func:`engine`, :func:`sqlalchemy_url`). Each accepts every DSN form libpq
accepts — a ``postgresql://`` or ``postgres://`` URL, SQLAlchemy's ``postgresql+psycopg://``
spelling, a ``key=value`` string, and the empty string, which leaves everything to libpq's
environment (``PGHOST``, ``PGPORT``, ``PGUSER``, ``PGDATABASE``, ``PGSERVICE``, ``~/.pgpass``).

The server sees the operator's own ``application_name`` (from the DSN or ``PGAPPNAME``) with
``sessionmig-<purpose>`` appended, so a DBA reading ``pg_stat_activity`` sees both who runs it
and which step it is. Timeouts travel as startup ``options`` (merged with the DSN's own and
``PGOPTIONS``), so every connection of a pool carries them too.

What a reading depends on is fixed the same way, last, so that it overrides a database's or a
role's settings (``ALTER DATABASE … SET``, ``ALTER ROLE … SET``) and the user's options alike:
:data:`FIXED_SETTINGS`. A DBA's ``search_path`` cannot put a function or operator of theirs
before ``pg_catalog`` (every table sessionmig reads is qualified by its schema; temporary
tables are found in ``pg_temp``), and no ``DateStyle``, ``TimeZone``, ``IntervalStyle`` … can
change how a value is printed to or parsed by us.

A connection that cannot be made raises :class:`~sessionstore.errors.TargetUnreachable` (worth
trying again) or :class:`~sessionstore.errors.TargetRefused` (it is not), saying what failed,
where (host, port, database, user — never the password) and what to do; the text goes through
:func:`sessionstore.redact.redact`, the one redaction path, which learns this DSN's secrets here.

Connections are named ``sessionmig-<purpose>`` whichever distribution makes them (the store's
pool: ``sessionmig-store``), as DBAs already filter on. The runbook's session defaults
(:data:`DEFAULT_SETTINGS`, ``runbook_defaults=True``) are for sessionmig's own connections;
the store asks for none.
"""

from __future__ import annotations

import getpass
import os
import re
from collections.abc import Iterable
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from . import redact as mask
from .errors import TargetError, TargetRefused, TargetUnreachable

PREFIX = "sessionmig-"
# The server keeps the first NAMEDATALEN-1 bytes of application_name: the user's part is cut
# so that ours always survives.
APPLICATION_NAME_BYTES = 63
# Keyword arguments psycopg keeps for itself; every other keyword is a libpq parameter.
_PSYCOPG_KWARGS = frozenset({"prepare_threshold", "context", "row_factory", "cursor_factory"})
# Session settings that change what a read returns or how its text is parsed, each fixed on
# every connection (see the module docstring). Only settings any user may set at startup.
FIXED_SETTINGS: tuple[tuple[str, str], ...] = (
    ("search_path", "pg_catalog, pg_temp"),
    ("DateStyle", "ISO, MDY"),
    ("IntervalStyle", "postgres"),
    ("TimeZone", "UTC"),
    ("extra_float_digits", "1"),
    ("bytea_output", "hex"),
    ("client_encoding", "UTF8"),
    ("standard_conforming_strings", "on"),
    ("lc_monetary", "C"),
    ("lc_numeric", "C"),
    ("lc_time", "C"),
    # Each step names the isolation it needs where it needs more (reconcile's one snapshot);
    # everything else is written for read committed, which a database's default must not change
    # (under repeatable read, catch-up's row locks would fail on every write the app made since
    # the pass's first read).
    ("default_transaction_isolation", "read committed"),
    # A value PostgreSQL refuses is rolled back to a savepoint and redone by the rules; a
    # database that ends the session on any error would turn that into a lost connection.
    ("exit_on_error", "off"),
)
# A database's or role's timeouts are meant for its app: a step of the runbook (a COPY of
# millions of rows, a transaction that waits on the backup between statements) must not be cut
# off by them. First, so that the operator's own options (DSN, PGOPTIONS) and each caller's
# timeouts still decide. Runbook connections only: the app's store keeps the DBA's settings.
# (``idle_session_timeout``, PostgreSQL 14+, and a ``synchronous_commit`` weaker than "on" are
# set once connected: see :func:`_after_connect`.)
DEFAULT_SETTINGS: tuple[tuple[str, str], ...] = (
    ("statement_timeout", "0"),
    ("lock_timeout", "0"),
    ("idle_in_transaction_session_timeout", "0"),
)
_DEFAULT_OPTIONS = " ".join(f"-c {name}={value}" for name, value in DEFAULT_SETTINGS)
# libpq splits options at spaces: lists lose theirs, other spaces are escaped ("read committed").
_FIXED_OPTIONS = " ".join(
    f"-c {name}={value.replace(', ', ',').replace(' ', chr(92) + ' ')}"
    for name, value in FIXED_SETTINGS
)
_SCHEME = re.compile(r"^\s*postgres(?:ql)?(?:\+\w+)?://", re.IGNORECASE)

MALFORMED_DSN_HINT = (
    "the connection string is malformed: percent-encode the password's special characters "
    "(@ as %40, / as %2F, % as %25, space as %20) or keep the password in ~/.pgpass"
)
_LOGIN = re.compile(
    r"password authentication failed|no password supplied|authentication failed"
    r"|role \S+ does not exist|not permitted to log in|pg_hba\.conf|require_auth"
    r"|authentication method requirement|permission denied for database|ssl|certificate"
    r"|fe_sendauth",
    re.IGNORECASE,
)
_NO_DATABASE = re.compile(r"database \S+ does not exist", re.IGNORECASE)
# A connection pooler's own refusals (PgBouncer's wording): the same on every attempt.
_POOLER_OPTIONS = re.compile(r"unsupported startup parameter", re.IGNORECASE)
_POOLER_DATABASE = re.compile(r"no such database", re.IGNORECASE)
_BUSY = re.compile(
    r"starting up|shutting down|too many clients|remaining connection slots|in recovery mode",
    re.IGNORECASE,
)


def libpq_dsn(dsn: str | None) -> str:
    """``dsn`` as libpq reads it: SQLAlchemy's ``postgresql+driver://`` spelling without the
    driver; ``None`` is the empty DSN (libpq's environment)."""
    return _SCHEME.sub("postgresql://", dsn or "", count=1)


def parse(dsn: str | None) -> dict[str, str]:
    """The parameters written in ``dsn`` (any form), as libpq parses them (no environment).
    Raises ``psycopg.ProgrammingError`` when libpq cannot parse it."""
    return {k: str(v) for k, v in conninfo_to_dict(libpq_dsn(dsn)).items() if v is not None}


def application_name(dsn: str, purpose: str, own: str | None = None) -> str:
    """The user's application name (``own``, else the DSN's, else ``PGAPPNAME``) followed by
    ``sessionmig-<purpose>``; ours alone when the user named none."""
    ours = PREFIX + purpose
    if own is None:
        try:
            own = parse(dsn).get("application_name")
        except psycopg.ProgrammingError:
            own = None
        own = own or os.environ.get("PGAPPNAME")
    own = (own or "").strip()
    if not own or own.endswith(ours):
        return own or ours
    room = APPLICATION_NAME_BYTES - len(ours.encode()) - 1
    cut = own.encode()[: max(room, 0)].decode(errors="ignore").rstrip()
    return f"{cut}/{ours}" if cut else ours


def _options(
    parsed: dict[str, Any],
    given: str | None,
    read_only: bool,
    statement_timeout_ms: int | None,
    lock_timeout_ms: int | None,
    defaults: bool = True,
) -> str:
    """The startup options: :data:`DEFAULT_SETTINGS` (unless ``defaults`` is False: the app's
    store), the user's (DSN or ``PGOPTIONS``), the caller's, ours, and last
    :data:`FIXED_SETTINGS` (the last of a setting given twice wins; all of them win over a
    database's or role's settings)."""
    base = parsed.get("options") or os.environ.get("PGOPTIONS")
    extra = [given] if given else []
    if read_only:
        extra.append("-c default_transaction_read_only=on")
    if statement_timeout_ms is not None:
        extra.append(f"-c statement_timeout={int(statement_timeout_ms)}")
    if lock_timeout_ms is not None:
        extra.append(f"-c lock_timeout={int(lock_timeout_ms)}")
    extra.append(_FIXED_OPTIONS)
    first = _DEFAULT_OPTIONS if defaults else ""
    return " ".join(part for part in (first, base or "", *extra) if part)


def conninfo(
    dsn: str | None,
    purpose: str,
    *,
    read_only: bool = False,
    connect_timeout: int = 10,
    statement_timeout_ms: int | None = None,
    lock_timeout_ms: int | None = None,
    startup_options: bool = True,
    runbook_defaults: bool = True,
    **libpq: Any,
) -> str:
    """The complete libpq connection string for ``dsn`` used for ``purpose`` (for a pool, which
    connects on its own). ``libpq`` keywords override the DSN's, except ``options``, which
    are added to the DSN's own. ``startup_options=False`` adds none (the DSN's own stay): for
    a transaction pooler, which refuses them or drops them, the caller sets what it needs per
    transaction. A malformed DSN raises :class:`TargetRefused`."""
    mask.register_dsn(dsn)
    raw = libpq_dsn(dsn)
    extra = [str(libpq["password"])] if libpq.get("password") else []
    own = libpq.pop("application_name", None)
    options = libpq.pop("options", None)
    try:
        parsed = parse(raw)
        return make_conninfo(
            raw,
            **{
                **libpq,
                "application_name": application_name(raw, purpose, own),
                "connect_timeout": libpq.get("connect_timeout", connect_timeout),
                "options": _options(
                    parsed,
                    options,
                    read_only,
                    statement_timeout_ms,
                    lock_timeout_ms,
                    runbook_defaults,
                )
                if startup_options
                else options,
            },
        )
    except psycopg.ProgrammingError as exc:
        raise _failure(exc, raw, purpose, extra) from None


def _split(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    driver = {k: v for k, v in kwargs.items() if k in _PSYCOPG_KWARGS}
    return driver, {k: v for k, v in kwargs.items() if k not in _PSYCOPG_KWARGS}


def connect(
    dsn: str | None,
    purpose: str,
    *,
    autocommit: bool = False,
    read_only: bool = False,
    connect_timeout: int = 10,
    statement_timeout_ms: int | None = None,
    lock_timeout_ms: int | None = None,
    **kwargs: Any,
) -> psycopg.Connection[Any]:
    """A psycopg connection to ``dsn`` (any libpq form) for ``purpose`` (``"migrate"``,
    ``"query"`` …, shown as ``sessionmig-<purpose>`` in ``application_name``).

    ``read_only``, ``statement_timeout_ms`` and ``lock_timeout_ms`` are session defaults set
    at startup. Other keywords go to psycopg (``row_factory``, ``prepare_threshold`` …) or to
    libpq (``user``, ``password``, ``dbname`` … overriding the DSN's). Raises
    :class:`TargetUnreachable` or :class:`TargetRefused`, redacted."""
    driver, libpq = _split(kwargs)
    info = conninfo(
        dsn,
        purpose,
        **_session(read_only, connect_timeout, statement_timeout_ms, lock_timeout_ms),
        **libpq,
    )
    try:
        conn = psycopg.connect(info, autocommit=autocommit, **driver)
        try:
            if libpq.get("runbook_defaults", True):
                _after_connect(conn)
        except BaseException:
            conn.close()
            raise
        return conn
    except psycopg.Error as exc:
        extra = [str(libpq["password"])] if libpq.get("password") else []
        raise _failure(exc, libpq_dsn(dsn), purpose, extra) from None


# A durability a database asks for beyond "on" (remote_apply …) is kept; only weaker ones are
# raised. Idle time between a runbook's statements (a catch-up pass reading SQLite for minutes)
# must not end its session.
_AFTER_CONNECT = """SELECT pg_catalog.set_config('synchronous_commit', 'on', false)
    WHERE pg_catalog.current_setting('synchronous_commit') IN ('off', 'local')"""
_IDLE_SESSION = "SELECT pg_catalog.set_config('idle_session_timeout', '0', false)"
# PostgreSQL 17's limit on a whole transaction: a proof or a load lasts as long as its data.
_TRANSACTION_TIMEOUT = "SELECT pg_catalog.set_config('transaction_timeout', '0', false)"


def _after_connect(conn: psycopg.Connection[Any]) -> None:
    """Settings a startup option cannot give safely: ``synchronous_commit`` at least "on"
    (an asynchronous commit could lose, in a server crash, a migration, pass or audit row the
    operator was told was committed), and ``idle_session_timeout`` and ``transaction_timeout``
    off where they exist."""
    conn.execute(_AFTER_CONNECT)
    if conn.info.server_version >= 140000:
        conn.execute(_IDLE_SESSION)
    if conn.info.server_version >= 170000:
        conn.execute(_TRANSACTION_TIMEOUT)
    if not conn.autocommit:
        conn.commit()  # the caller's first statement opens its own transaction


def _session(
    read_only: bool,
    connect_timeout: int,
    statement_timeout_ms: int | None,
    lock_timeout_ms: int | None,
) -> dict[str, Any]:
    """:func:`conninfo`'s session settings, as :func:`connect` and :func:`aconnect` take them."""
    return {
        "read_only": read_only,
        "connect_timeout": connect_timeout,
        "statement_timeout_ms": statement_timeout_ms,
        "lock_timeout_ms": lock_timeout_ms,
    }


async def aconnect(
    dsn: str | None,
    purpose: str,
    *,
    autocommit: bool = False,
    read_only: bool = False,
    connect_timeout: int = 10,
    statement_timeout_ms: int | None = None,
    lock_timeout_ms: int | None = None,
    **kwargs: Any,
) -> psycopg.AsyncConnection[Any]:
    """:func:`connect` for asyncio: a ``psycopg.AsyncConnection``, the same name and errors."""
    driver, libpq = _split(kwargs)
    info = conninfo(
        dsn,
        purpose,
        **_session(read_only, connect_timeout, statement_timeout_ms, lock_timeout_ms),
        **libpq,
    )
    try:
        return await psycopg.AsyncConnection.connect(info, autocommit=autocommit, **driver)
    except psycopg.Error as exc:
        extra = [str(libpq["password"])] if libpq.get("password") else []
        raise _failure(exc, libpq_dsn(dsn), purpose, extra) from None


# --- what failed, where, and what to do ------------------------------------------------------


def where(dsn: str | None) -> str:
    """Where ``dsn`` leads, for a message: host, port, database and user as libpq would use
    them (the DSN, else the PG* environment, else libpq's defaults). Never the password."""
    try:
        parsed = parse(dsn)
    except psycopg.ProgrammingError:
        return "a malformed connection string"
    return _where(parsed)


def _where(parsed: dict[str, Any]) -> str:
    env = os.environ
    user = parsed.get("user") or env.get("PGUSER") or _os_user()
    host = parsed.get("host") or parsed.get("hostaddr") or env.get("PGHOST") or "local socket"
    port = parsed.get("port") or env.get("PGPORT") or "5432"
    database = parsed.get("dbname") or env.get("PGDATABASE") or user
    service = parsed.get("service") or env.get("PGSERVICE")
    text = f"host {host} port {port} database {database!r} user {user!r}"
    return f"{text} (service {service!r})" if service else text


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "?"


def _from_pgconn(exc: psycopg.Error) -> dict[str, Any] | None:
    """What libpq itself used for the failed attempt (the DSN merged with the environment)."""
    pgconn = getattr(exc, "pgconn", None)
    if pgconn is None:
        return None
    out: dict[str, Any] = {}
    for key, attr in (("host", "host"), ("port", "port"), ("dbname", "db"), ("user", "user")):
        try:
            value = getattr(pgconn, attr)
        except Exception:  # a finished connection may refuse some attributes
            continue
        if value:
            out[key] = value.decode(errors="replace") if isinstance(value, bytes) else value
    return out or None


def _advice(message: str) -> tuple[type[TargetError], str]:
    if _POOLER_OPTIONS.search(message):
        return TargetRefused, (
            "a connection pooler (PgBouncer) in front of PostgreSQL refuses the startup "
            "parameters that fix sessionmig's session settings: give sessionmig a direct DSN "
            "to PostgreSQL (the app's session store rides a transaction pooler on its own: "
            "SESSION_DB_POOLER=transaction)"
        )
    if _POOLER_DATABASE.search(message):
        return TargetRefused, (
            "the connection pooler in front of PostgreSQL has no such database: name one of "
            "its [databases] entries in the DSN"
        )
    if _NO_DATABASE.search(message):
        return TargetRefused, "create that database, or name an existing one in the DSN"
    if _LOGIN.search(message):
        return TargetRefused, (
            "check the user and password (in the DSN, PGPASSWORD or ~/.pgpass) and that the "
            "server's pg_hba.conf lets this user in from this host"
        )
    if _BUSY.search(message):
        return TargetUnreachable, "the server is busy or restarting: run again in a moment"
    return TargetUnreachable, (
        "check that the server is running and that the host and port are right (DSN, PGHOST, "
        "PGPORT), then run again"
    )


def _failure(exc: psycopg.Error, dsn: str, purpose: str, extra: Iterable[str] = ()) -> TargetError:
    """Our exception for a connection psycopg could not make, its text redacted."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    message = message.removeprefix("connection failed: ")
    if isinstance(exc, psycopg.ProgrammingError):
        kind: type[TargetError] = TargetRefused
        place, advice = "a malformed connection string", MALFORMED_DSN_HINT
    else:
        kind, advice = _advice(message)
        known = _from_pgconn(exc)
        place = _where(known) if known else where(dsn)
    text = f"cannot connect to PostgreSQL for sessionmig-{purpose} ({place}): {message}; {advice}"
    return kind(mask.redact(text, extra))


def failure_text(exc: BaseException, extra: Iterable[str] = ()) -> str:
    """The first line of any error, redacted: for messages about a connection already made."""
    lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return mask.redact(lines[0] if lines else type(exc).__name__, extra)


# --- SQLAlchemy ------------------------------------------------------------------------------


def sqlalchemy_url(dsn: str | None) -> str:
    """``dsn`` (any libpq form) as a SQLAlchemy URL for psycopg 3, password included (give it
    to SQLAlchemy, never to a message). A ``key=value`` string becomes URL fields and query
    parameters; the empty DSN is ``postgresql+psycopg://``, which leaves all to libpq."""
    from sqlalchemy.engine import URL

    raw = libpq_dsn(dsn)
    if not raw.strip():
        return "postgresql+psycopg://"
    if _SCHEME.match(raw):
        return _SCHEME.sub("postgresql+psycopg://", raw, count=1)
    try:
        parsed = parse(raw)
    except psycopg.ProgrammingError as exc:
        raise _failure(exc, raw, "sqlalchemy") from None
    host = parsed.pop("host", None)
    port = parsed.pop("port", None)
    query = dict(parsed)
    for key in ("user", "password", "dbname"):
        query.pop(key, None)
    if host is not None and ("," in host or host.startswith("/") or port and "," in port):
        # Socket directories and several hosts: SQLAlchemy's query form, which psycopg reads.
        query["host"], host = host, None
        if port is not None:
            query["port"], port = port, None
    url = URL.create(
        "postgresql+psycopg",
        username=parsed.get("user"),
        password=parsed.get("password"),
        host=host,
        port=int(port) if port else None,
        database=parsed.get("dbname"),
        query=query,
    )
    return url.render_as_string(hide_password=False)


def engine(
    dsn: str | None, purpose: str, connect_kwargs: dict[str, Any] | None = None, **options: Any
) -> Any:
    """A SQLAlchemy engine whose connections are made by :func:`connect` (same name, same
    errors), for ``dsn`` in any libpq form. ``connect_kwargs`` go to :func:`connect`
    (``lock_timeout_ms`` …), ``options`` to ``create_engine``."""
    from sqlalchemy import create_engine

    kwargs = dict(connect_kwargs or {})

    def creator() -> psycopg.Connection[Any]:
        return connect(dsn, purpose, **kwargs)

    return create_engine("postgresql+psycopg://", creator=creator, **options)
