"""Run an analyst's own SQL so that it can only read, on PostgreSQL and on the SQLite analysis
copy, and show no session id (a bearer token) whatever the result calls it.

PostgreSQL — the server, not a parser of ours, decides what the text is:

* The text is sent inside ``PREPARE sessionmig_free AS <text>`` over the extended query
  protocol. The protocol refuses more than one statement (comments, strings and dollar quotes
  are the server's own lexer's business), and ``PREPARE`` accepts only a plannable query
  (``SELECT``, ``WITH``, ``VALUES``, ``TABLE``; DML, which the read-only transaction then
  refuses). ``SET``, ``RESET``, ``SET ROLE``, ``BEGIN``, ``COMMIT``, ``ROLLBACK``, ``DO``,
  ``CALL``, ``COPY`` and every other utility statement are syntax errors there.
* It runs in a transaction we open ``READ ONLY`` and in which we take the first snapshot, so
  neither ``SET TRANSACTION READ WRITE`` nor ``set_config('transaction_read_only', 'off', …)``
  can reopen writes; the session default is read-only too. The transaction is always rolled
  back (never ``with conn:``, which commits), so even a write PostgreSQL lets through in a
  read-only transaction (``lo_from_bytea``) is undone, and the connection is closed after it.
* The time limit is set for the transaction and enforced from outside as well: a timer cancels
  the statement from the client, whatever the statement did to ``statement_timeout``.
* ``TimeZone`` is UTC for the transaction, so an answer (``date_trunc('day', created_at)``, a
  timestamptz printed as text) does not depend on the client's zone.
* A superuser (or a member of ``pg_read_server_files``, ``pg_write_server_files``,
  ``pg_execute_server_program``, or of any superuser role) cannot be held by ``SET ROLE`` or
  ``SET SESSION AUTHORIZATION``: inside one statement it takes its powers back with
  ``set_config('session_authorization', …)`` and then reads server files through
  ``query_to_xml``. Such a DSN therefore runs free SQL as a transient login of its own: created
  for the call (``sessionmig_ro_<random>``, a random password of which the server sees only the
  SCRAM verifier, valid for minutes), a member of ``pg_read_all_data`` (PostgreSQL 14+: reads,
  and touches no table's ACL; before 14, ``USAGE`` on the schema and ``SELECT`` on ``sessions``,
  which leaves that table's ACL spelled out), ``CONNECT`` granted only if ``PUBLIC`` lacks it,
  dropped with ``DROP OWNED``/``DROP ROLE`` afterwards; expired ones left by a killed run are
  dropped by the next call. Where that login cannot be created or cannot log in (no
  ``CREATEROLE``, ``pg_hba.conf``), free SQL is refused with the reason.

Not covered: a non-superuser DSN keeps what
its own role may do outside transactions, e.g. ``pg_cancel_backend``/``pg_terminate_backend``
of the role's own sessions and session advisory locks (the connection closes at once); give
free SQL a role of its own for that.

SQLite: :func:`guard_sqlite` installs an authorizer that allows reading and nothing else
(no ``ATTACH``/``DETACH`` — which also blocks ``VACUUM INTO`` — no write, no DDL, no
transaction control, only pragmas that read), the attached-database limit 0, and
``SQLITE_DBCONFIG_DEFENSIVE`` where Python offers it (3.12+); the file is opened
``mode=ro&immutable=1`` with ``query_only`` on, ``execute`` runs one statement only, and a
progress handler stops it at the deadline.

Masking: every string in the result (also inside JSON values) that equals a session id present
in the data is replaced by its :func:`~sessionmig.rules.mask.mask_id`, whatever the column is
called; ``session-<uuid>`` tokens inside longer strings too. A statement that transforms ids
(``reverse(session_id)``) is not caught: the point is that no report shows a token by accident.
"""

from __future__ import annotations

import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing, contextmanager, suppress
from typing import Any

import psycopg
from psycopg import sql

from sessionmig.errors import ParameterError, TargetError
from sessionmig.postgres.connect import connect
from sessionmig.rules.mask import mask_id, redact

# The legacy SessionManager's ids: masked wherever they appear inside a longer text.
SESSION_TOKEN = re.compile(
    r"session-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE
)
STATEMENT = sql.Identifier("sessionmig_free")
READER_PREFIX = "sessionmig_ro_"
# How long the transient login may log in; it is dropped as soon as the call ends.
READER_VALID_S = 600
LOOKUP_CHUNK = 500
Lookup = Callable[[set[str]], set[str]]


# ---------------------------------------------------------------------------------- masking


# What separates an id from its neighbours in a longer text (a sentence, a URL, a CSV line).
_SEPARATORS = re.compile(r"""([\s,;:=\"'()\[\]{}<>|&?/]+)""")


def _strings(value: Any) -> Iterator[str]:
    """Every string in a cell, and every word of it: the candidates to look up as ids."""
    if isinstance(value, str):
        yield value
        yield from _SEPARATORS.split(value)[::2]
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings(v)


def _mask_string(value: str, ids: set[str]) -> str:
    if value in ids:
        return mask_id(value)
    parts = _SEPARATORS.split(value)
    parts[::2] = [mask_id(p) if p in ids else p for p in parts[::2]]
    return SESSION_TOKEN.sub(lambda m: mask_id(m.group()), "".join(parts))


def _mask_value(value: Any, ids: set[str]) -> Any:
    if isinstance(value, str):
        return _mask_string(value, ids)
    if isinstance(value, dict):
        return {_mask_value(k, ids): _mask_value(v, ids) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_mask_value(v, ids) for v in value)
    return value


def _mask_named(value: Any) -> str:
    """A column called ``session_id`` is masked whole, as the named queries do."""
    return mask_id(None if value is None else str(value))


def mask_rows(columns: list[str], rows: list[tuple], lookup: Lookup, show_ids: bool) -> list[tuple]:
    """``rows`` with every session id masked, whatever its column is called."""
    if show_ids:
        return rows
    named = [c == "session_id" for c in columns]
    candidates = {
        s for row in rows for v, n in zip(row, named, strict=True) if not n for s in _strings(v)
    }
    ids = lookup(candidates) if candidates else set()
    return [
        tuple(_mask_named(v) if n else _mask_value(v, ids) for v, n in zip(row, named, strict=True))
        for row in rows
    ]


def mask_text(text: str, lookup: Lookup | None) -> str:
    """An error message with the ids it quotes masked (PostgreSQL and SQLite quote the value
    that failed: ``invalid input syntax for type integer: "session-…"``)."""
    if lookup is not None:
        quoted = re.findall(r'"([^"]+)"|\(([^()]+)\)|\'([^\']+)\'', text)
        candidates = {p for group in quoted for p in group if p} | set(_SEPARATORS.split(text))
        for found in sorted(lookup(candidates), key=len, reverse=True):
            text = text.replace(found, mask_id(found))
    return SESSION_TOKEN.sub(lambda m: mask_id(m.group()), text)


def _usable(value: str) -> bool:
    """PostgreSQL text holds no NUL and only encodable characters: anything else is no id."""
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _chunks(values: Iterable[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    for v in values:
        batch.append(v)
        if len(batch) == LOOKUP_CHUNK:
            yield batch
            batch = []
    if batch:
        yield batch


# ------------------------------------------------------------------------------- PostgreSQL


def run_postgres(
    text: str, dsn: str, schema: str, timeout_s: float, limit: int, show_ids: bool
) -> tuple[list[str], list[tuple]]:
    """Run ``text`` read-only on the target (see the module docstring); columns and rows,
    masked unless ``show_ids``."""
    if "\x00" in text:
        raise ParameterError("free SQL cannot hold a NUL character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ParameterError("free SQL must be valid text (it holds a lone surrogate)") from None
    with closing(_connect(dsn)) as owner:
        if not _privileged(owner):
            return _run_guarded(owner, text, schema, timeout_s, limit, show_ids)
        with _transient_reader(owner, dsn, schema) as reader:
            return _run_guarded(reader, text, schema, timeout_s, limit, show_ids)


def _connect(dsn: str) -> psycopg.Connection:
    # autocommit: we open and always roll back the one transaction ourselves (psycopg's
    # ``with conn:`` would COMMIT it).
    return connect(dsn, "free-sql", autocommit=True)


def _privileged(conn: psycopg.Connection) -> bool:
    """Whether the login could take back powers no read-only transaction holds (server files,
    programs, any superuser role it is a member of) from inside a statement."""
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_roles r"
        " WHERE pg_catalog.pg_has_role(session_user, r.oid, 'MEMBER')"
        " AND (r.rolsuper OR r.rolname = ANY(%s)))",
        (["pg_read_server_files", "pg_write_server_files", "pg_execute_server_program"],),
    ).fetchone()
    return bool(row and row[0])


@contextmanager
def _transient_reader(
    owner: psycopg.Connection, dsn: str, schema: str
) -> Iterator[psycopg.Connection]:
    """A login that may only read ``schema.sessions``, for one call (see the module docstring)."""
    _drop_stale_readers(owner)
    name = READER_PREFIX + secrets.token_hex(8)
    password = secrets.token_urlsafe(32)
    role = sql.Identifier(name)
    created = False
    try:
        # The server stores (and may log) only the verifier libpq computes here.
        verifier = owner.pgconn.encrypt_password(password.encode(), name.encode()).decode()
        (until,) = owner.execute(
            "SELECT (now() + make_interval(secs => %s))::text", (READER_VALID_S,)
        ).fetchone() or (None,)
        # Never queue the application behind a catalog lock.
        owner.execute("SET lock_timeout = '5s'")
        owner.execute(
            sql.SQL(
                "CREATE ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION "
                "NOBYPASSRLS INHERIT CONNECTION LIMIT 2 PASSWORD {} VALID UNTIL {}"
            ).format(role, sql.Literal(verifier), sql.Literal(until))
        )
        created = True
        reads_all = owner.execute("SELECT to_regrole('pg_read_all_data') IS NOT NULL").fetchone()
        if reads_all and reads_all[0]:
            owner.execute(sql.SQL("GRANT pg_read_all_data TO {}").format(role))
        else:
            owner.execute(
                sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(schema), role)
            )
            owner.execute(
                sql.SQL("GRANT SELECT ON {} TO {}").format(sql.Identifier(schema, "sessions"), role)
            )
        database, connects = owner.execute(  # type: ignore[misc]  # one row, always
            "SELECT current_database(), has_database_privilege(%s, current_database(), 'CONNECT')",
            (name,),
        ).fetchone()
        if not connects:
            owner.execute(
                sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(database), role)
            )
    except psycopg.Error as exc:
        if created:
            _drop_reader(owner, name)
        raise ParameterError(
            "the target DSN is a superuser (or may read/write server files or run programs), "
            "so free SQL would run with those powers; it runs instead as a transient read-only "
            f"login, which could not be created ({exc.diag.message_primary or exc}). Give free "
            "SQL a DSN whose role may only read the sessions table"
        ) from None
    try:
        try:
            reader = connect(dsn, "free-sql", autocommit=True, user=name, password=password)
        except TargetError as exc:
            raise ParameterError(
                "the target DSN is a superuser (or may read/write server files or run "
                "programs), so free SQL runs as a transient read-only login, which could not "
                f"log in ({exc}); check pg_hba.conf, or give free SQL a DSN whose role may "
                "only read the sessions table"
            ) from None
        with closing(reader):
            yield reader
    finally:
        _drop_reader(owner, name)


def _drop_reader(owner: psycopg.Connection, name: str) -> None:
    role = sql.Identifier(name)
    try:
        if owner.pgconn.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            owner.execute("ROLLBACK")
        # DROP OWNED revokes its grants here (and on the database); then the role can go.
        owner.execute(sql.SQL("DROP OWNED BY {}").format(role))
        owner.execute(sql.SQL("DROP ROLE {}").format(role))
    except psycopg.Error:
        pass  # expired and unusable; the next call's stale sweep drops it


def _drop_stale_readers(owner: psycopg.Connection) -> None:
    """Transient logins left by a killed run, expired: dropped (those with grants in another
    database cannot be dropped from here and are left to expire harmlessly)."""
    stale = owner.execute(
        "SELECT rolname FROM pg_catalog.pg_roles WHERE rolname LIKE %s AND rolvaliduntil < now()",
        (READER_PREFIX.replace("_", r"\_") + "%",),
    ).fetchall()
    for (name,) in stale:
        _drop_reader(owner, name)


@contextmanager
def _cancel_after(conn: psycopg.Connection, seconds: float) -> Iterator[None]:
    """Cancel the running statement from the client at the deadline: no statement can lift
    this limit (``statement_timeout`` lives in the server, where the statement can reach)."""

    def cancel() -> None:
        # A timer thread has nowhere to report a failed cancel to; the server's own
        # statement_timeout still stands behind it.
        with suppress(Exception):
            conn.cancel_safe(timeout=5)

    timer = threading.Timer(seconds, cancel)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _pg_lookup(conn: psycopg.Connection, schema: str) -> Lookup:
    table = sql.Identifier(schema, "sessions")
    query = sql.SQL("SELECT session_id FROM {} WHERE session_id = ANY(%s::text[])").format(table)

    def lookup(candidates: set[str]) -> set[str]:
        found: set[str] = set()
        for batch in _chunks(sorted(c for c in candidates if _usable(c))):
            found.update(r[0] for r in conn.execute(query, (batch,)).fetchall())
        return found

    return lookup


def _identity(conn: psycopg.Connection) -> tuple[str, str, str]:
    row = conn.execute(
        "SELECT current_user::text, session_user::text, current_setting('transaction_read_only')"
    ).fetchone()
    assert row is not None
    return row[0], row[1], row[2]


def _begin(conn: psycopg.Connection, schema: str, timeout_s: float) -> tuple[str, str, str]:
    conn.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
    conn.execute("BEGIN READ ONLY")
    conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(schema)))
    conn.execute("SELECT set_config('statement_timeout', %s, true)", (str(int(timeout_s * 1000)),))
    # Instants read and truncated in UTC, wherever the client sits (PGTZ, the role's default).
    conn.execute("SET LOCAL TimeZone TO 'UTC'")
    # A query: this takes the transaction's first snapshot, after which PostgreSQL refuses to
    # make it read-write again.
    who = _identity(conn)
    if who[2] != "on":
        raise TargetError("the free-SQL transaction is not read-only; refusing to run")
    return who


def _run_guarded(
    conn: psycopg.Connection, text: str, schema: str, timeout_s: float, limit: int, show_ids: bool
) -> tuple[list[str], list[tuple]]:
    """One statement, prepared and executed in our read-only transaction, always rolled back."""
    lookup = _pg_lookup(conn, schema)
    try:
        before = _begin(conn, schema, timeout_s)
        cur = conn.cursor()
        # binary=True makes psycopg use the extended protocol even without parameters: one
        # statement, or the server refuses the whole text.
        cur.execute(
            sql.SQL("PREPARE {} AS ").format(STATEMENT).as_bytes(conn) + text.encode(), binary=True
        )
        with _cancel_after(conn, timeout_s + 0.5):
            cur.execute(sql.SQL("EXECUTE {}").format(STATEMENT))
            rows = cur.fetchmany(limit) if cur.description else []
        columns = [c.name for c in cur.description or []]
        after = _identity(conn)
        if after != before:
            raise ParameterError(
                f"the statement changed who it runs as ({before[:2]} -> {after[:2]}); its "
                "result is not shown"
            )
        conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(schema)))
        return columns, mask_rows(columns, rows, lookup, show_ids)
    except psycopg.Error as exc:
        # QueryCanceled is an OperationalError to psycopg, but the connection is fine.
        if isinstance(exc, psycopg.OperationalError) and not isinstance(
            exc, psycopg.errors.QueryCanceled
        ):
            raise TargetError(f"the target connection failed: {redact(str(exc))}") from None
        raise ParameterError(_pg_message(conn, exc, schema, timeout_s, show_ids)) from None
    finally:
        _rollback(conn)


def _rollback(conn: psycopg.Connection) -> None:
    if conn.closed:
        return
    try:
        if conn.pgconn.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.execute("ROLLBACK")
    except psycopg.Error:
        conn.close()  # the server rolls back what a closed connection left open


def _pg_message(
    conn: psycopg.Connection, exc: psycopg.Error, schema: str, timeout_s: float, show_ids: bool
) -> str:
    if isinstance(exc, psycopg.errors.QueryCanceled):
        return f"the query ran longer than {timeout_s:g} s and was stopped"
    message = (exc.diag.message_primary or str(exc)).strip()
    detail = exc.diag.message_detail
    if detail:
        message += f" ({detail})"
    if not show_ids:
        # The value a statement failed on is quoted in the message: look it up afterwards, in a
        # transaction of the same kind (the failed one is aborted).
        _rollback(conn)
        try:
            _begin(conn, schema, timeout_s)
            message = mask_text(message, _pg_lookup(conn, schema))
        except psycopg.Error:
            message = mask_text(message, None)
        finally:
            _rollback(conn)
    if "multiple commands" in message:
        return f"free SQL runs exactly one statement; PostgreSQL refused the text: {message}"
    hint = ""
    if isinstance(exc, psycopg.errors.SyntaxError):
        hint = " (free SQL is one read-only query: SELECT, WITH, VALUES or TABLE)"
    return f"the query failed on PostgreSQL: {message}{hint}"


# ----------------------------------------------------------------------------------- SQLite

# Pragmas that only report, allowed without an argument; those below also take a table name.
READ_PRAGMAS = frozenset(
    {
        "application_id",
        "collation_list",
        "compile_options",
        "data_version",
        "database_list",
        "encoding",
        "freelist_count",
        "function_list",
        "module_list",
        "page_count",
        "page_size",
        "pragma_list",
        "query_only",
        "schema_version",
        "user_version",
    }
)
TABLE_PRAGMAS = frozenset(
    {"foreign_key_list", "index_info", "index_list", "index_xinfo", "table_info", "table_xinfo"}
)
DENIED_FUNCTIONS = frozenset({"load_extension", "fts3_tokenizer", "readfile", "writefile", "edit"})
SCHEMA_TABLES = frozenset({"sqlite_master", "sqlite_temp_master", "sqlite_schema"})
_ACTIONS = {
    getattr(sqlite3, n): n.removeprefix("SQLITE_").replace("_", " ")
    for n in dir(sqlite3)
    if n.startswith("SQLITE_")
    and n[7:]
    in {
        "ALTER_TABLE",
        "ANALYZE",
        "ATTACH",
        "CREATE_INDEX",
        "CREATE_TABLE",
        "CREATE_TEMP_INDEX",
        "CREATE_TEMP_TABLE",
        "CREATE_TEMP_TRIGGER",
        "CREATE_TEMP_VIEW",
        "CREATE_TRIGGER",
        "CREATE_VIEW",
        "CREATE_VTABLE",
        "DELETE",
        "DETACH",
        "DROP_INDEX",
        "DROP_TABLE",
        "DROP_TEMP_INDEX",
        "DROP_TEMP_TABLE",
        "DROP_TEMP_TRIGGER",
        "DROP_TEMP_VIEW",
        "DROP_TRIGGER",
        "DROP_VIEW",
        "DROP_VTABLE",
        "INSERT",
        "PRAGMA",
        "REINDEX",
        "SAVEPOINT",
        "TRANSACTION",
        "UPDATE",
    }
}


class SqliteGuard:
    """The authorizer of one connection; remembers what it refused, for the message."""

    def __init__(self) -> None:
        self.refused: list[str] = []

    def __call__(
        self, action: int, arg1: str | None, arg2: str | None, db: str | None, source: str | None
    ) -> int:
        if action in (sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_RECURSIVE):
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_FUNCTION:
            if (arg2 or "").lower() in DENIED_FUNCTIONS:
                return self._deny(f"function {arg2}")
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_PRAGMA:
            name = (arg1 or "").lower()
            if name in TABLE_PRAGMAS or (name in READ_PRAGMAS and arg2 is None):
                return sqlite3.SQLITE_OK
            return self._deny(f"PRAGMA {arg1}" + ("" if arg2 is None else f" = {arg2}"))
        if action == sqlite3.SQLITE_UPDATE and arg1 in SCHEMA_TABLES and source is None:
            # SQLite asks this itself when it builds a table-valued function (json_each,
            # pragma_table_info); the schema cannot change here: read-only, immutable file,
            # query_only, and writable_schema is one of the pragmas refused above.
            return sqlite3.SQLITE_OK
        what = _ACTIONS.get(action, f"action {action}")
        return self._deny(what + (f" {arg1}" if arg1 else ""))

    def _deny(self, what: str) -> int:
        self.refused.append(what)
        return sqlite3.SQLITE_DENY


def guard_sqlite(conn: sqlite3.Connection, timeout_s: float) -> SqliteGuard:
    """Make ``conn`` able to read and nothing else, for at most ``timeout_s`` per statement."""
    conn.execute("PRAGMA query_only = ON")
    setconfig = getattr(conn, "setconfig", None)  # Python 3.12+
    defensive = getattr(sqlite3, "SQLITE_DBCONFIG_DEFENSIVE", None)
    if setconfig is not None and defensive is not None:
        setconfig(defensive, True)
    # No database but the analysis copy can ever be opened, whatever the authorizer says.
    conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
    guard = SqliteGuard()
    conn.set_authorizer(guard)
    deadline = time.monotonic() + timeout_s
    conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
    return guard


def sqlite_lookup(conn: sqlite3.Connection) -> Lookup:
    def lookup(candidates: set[str]) -> set[str]:
        found: set[str] = set()
        for batch in _chunks(sorted(candidates)):
            marks = ", ".join("?" * len(batch))
            query = f"SELECT session_id FROM sessions WHERE session_id IN ({marks})"
            found.update(r[0] for r in conn.execute(query, batch).fetchall())
        return found

    return lookup


def sqlite_message(exc: sqlite3.Error, guard: SqliteGuard | None, timeout_s: float) -> str:
    """What to tell the analyst about a refused or failed statement."""
    text = str(exc)
    if "interrupted" in text:
        return f"the query ran longer than {timeout_s:g} s and was stopped"
    if isinstance(exc, sqlite3.ProgrammingError) and "one statement" in text:
        return "free SQL runs exactly one statement; SQLite refused the text: " + text
    if guard is not None and guard.refused:
        return (
            f"free SQL is read-only: SQLite refused {', '.join(dict.fromkeys(guard.refused))} "
            f"({text})"
        )
    if "readonly" in text or "read-only" in text:
        return f"free SQL is read-only: {text}"
    return f"the query failed on SQLite: {text}"
