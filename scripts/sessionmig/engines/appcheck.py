"""The application's view of the migrated sessions: does the new ``SessionManager`` accept, at
``as_of``, exactly the sessions the source says are active — without changing any of them?

The manager is asked with its own statement (``validate_session``'s predicate, read only, no
``request_count`` or ``last_activity`` moved) over every session of the table, in one
snapshot; the ids it accepts are streamed into a temporary table on reconcile's connection
before reconcile takes its snapshot (:func:`ask_the_app`). Reconcile's own reading of the
backup — the rows that should have landed, normalised independently of migrate's code — is
then compared with those answers in one query (:func:`compare`): every source row that
should have landed is expected active exactly when its ``expires_at`` is after ``as_of``.
The backup is read once for reconcile and the check, and no id crosses the client twice.

In ``after_cutover`` mode (the re-check once the app serves from PostgreSQL) a session the app
treats differently from the backup is *explained* when PostgreSQL's own row says why: the
session is gone (logout, cleanup) or its ``expires_at`` moved later (extend); those are counted,
not failed. The app is asked before reconcile's snapshot, so whatever made it answer
differently is already visible to that explanation. Whether such a change itself is one the app
can make is reconcile's question.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from sessionmig.errors import TargetError
from sessionmig.rules.verdict import Verdict
from sessionstore.manager import SessionManager

EXAMPLES = 10
APP_ACTIVE = "sessionmig_app_active_"
"""The ids the app accepts at ``as_of`` go to a temporary table of this name and a random
suffix on reconcile's connection: one run's answers are never read as another's."""
POOLED = (
    "reconcile's connection reached another server session between asking the app and the "
    "proof: a transaction pooler (PgBouncer) is in between. Point database_url_env at "
    "PostgreSQL directly (as preflight requires) and run again; nothing was written"
)
STREAM_TIMEOUT_MS = 600_000
"""The manager's statement timeout for the one statement that reads the whole table (its
request-sized default would stop a large table's scan)."""


@dataclass(frozen=True)
class AppCheck:
    """Active/expired as the app sees them, against what the source says."""

    checked: int
    expected_active: int
    accepted_active: int
    wrongly_rejected: int
    wrongly_accepted: int
    examples: list[str] = field(default_factory=list)
    explained: int = 0  # after_cutover: ended or extended since the backup, per PostgreSQL

    @property
    def ok(self) -> bool:
        return not (self.wrongly_rejected or self.wrongly_accepted)


def combined_verdict(verdict: str, reason: str, app: AppCheck | None) -> tuple[str, str]:
    """The reconcile verdict, turned to FAIL when the app would treat a session differently.

    A skipped reconcile (a dry run wrote nothing) stays skipped: the app was asked nothing.
    """
    if app is None or app.ok or verdict in (Verdict.FAIL, Verdict.SKIPPED):
        return verdict, reason
    wrong = app.wrongly_rejected + app.wrongly_accepted
    return (
        Verdict.FAIL,
        f"the new SessionManager disagrees with the source on {wrong} sessions at as_of",
    )


@dataclass(frozen=True)
class Asked:
    """What the app was asked, and how its answers are to be read."""

    schema: str
    as_of: datetime
    after_cutover: bool
    mask: Callable[[str | None], str]
    accepted: int  # ids the app accepts at as_of, whether or not the backup has them
    answers: sql.Identifier  # the temporary table that holds them
    backend: int  # the server session that holds it


def ask_the_app(
    conn: psycopg.Connection,
    dsn: str,
    schema: str,
    as_of: datetime,
    after_cutover: bool,
    mask: Callable[[str | None], str],
) -> Asked:
    """Stream the ids the app's ``SessionManager`` accepts at ``as_of`` into
    :data:`APP_ACTIVE` on ``conn``, and commit: called before reconcile's transaction, so
    that its snapshot is later than the app's answers."""
    answers = sql.Identifier("pg_temp", APP_ACTIVE + secrets.token_hex(8))
    backend = conn.execute("SELECT pg_catalog.pg_backend_pid()").fetchone()[0]  # type: ignore[index]
    conn.execute(
        sql.SQL(
            'CREATE TEMP TABLE {} (session_id pg_catalog.text COLLATE pg_catalog."C" NOT NULL)'
        ).format(answers)
    )
    accepted = 0
    with conn.cursor().copy(sql.SQL("COPY {} (session_id) FROM STDIN").format(answers)) as copy:

        async def stream() -> None:
            nonlocal accepted
            manager = SessionManager(
                dsn, schema=schema, pool_size=1, statement_timeout_ms=STREAM_TIMEOUT_MS
            )
            try:
                async for ids in manager.active_ids(as_of):
                    for sid in ids:
                        copy.write_row((sid,))
                    accepted += len(ids)
            finally:
                await manager.close()

        _run(stream())
    # The planner's figures for the join (a temporary table is never analysed by autovacuum).
    conn.execute(sql.SQL("ANALYZE {}").format(answers))
    conn.commit()
    return Asked(schema, as_of, after_cutover, mask, accepted, answers, backend)


def _run(work: Coroutine[Any, Any, None]) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(work)
        return
    # Inside Jupyter an event loop is already running: give the manager a loop of its own.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, work).result()


# Per source row s (left-joined to the app's answers a and, after the cutover, to the target's
# row t): what the source says, what the app says, and whether PostgreSQL explains a difference.
_SHOULD = "s.expires_at OPERATOR(pg_catalog.>) %(at)s"
_DOES = "a.session_id IS NOT NULL"
_EXPLAINED = """({should}) IS DISTINCT FROM ({does})
                AND (t.session_id IS NULL
                     OR t.expires_at OPERATOR(pg_catalog.>)
                        pg_catalog.timestamptz_larger(s.expires_at, %(at)s))"""
_JUDGED = """SELECT s.session_id, {should} AS should, {does} AS does, {explained} AS explained
             FROM ({source}) s
             LEFT JOIN {answers} a ON a.session_id OPERATOR(pg_catalog.=) s.session_id
             {target}"""
_TALLY = """SELECT pg_catalog.count(*),
                   pg_catalog.count(*) FILTER (WHERE NOT explained AND should),
                   pg_catalog.count(*) FILTER (WHERE NOT explained AND does),
                   pg_catalog.count(*) FILTER (WHERE NOT explained AND should AND NOT does),
                   pg_catalog.count(*) FILTER (WHERE NOT explained AND does AND NOT should),
                   pg_catalog.count(*) FILTER (WHERE explained)
            FROM ({judged}) j"""
_EXAMPLES = """SELECT session_id, should FROM ({judged}) j
               WHERE NOT explained AND should IS DISTINCT FROM does
               ORDER BY session_id LIMIT %(examples)s"""


def same_session(conn: psycopg.Connection, asked: Asked) -> None:
    """Raise :class:`TargetError` unless ``conn`` is still the server session that holds the
    app's answers (a transaction pooler may hand each transaction another)."""
    backend = conn.execute("SELECT pg_catalog.pg_backend_pid()").fetchone()[0]  # type: ignore[index]
    if backend != asked.backend:
        raise TargetError(POOLED)


def compare(conn: psycopg.Connection, source: sql.Composable, asked: Asked) -> AppCheck:
    """The app's answers against ``source``: reconcile's rows that should have landed
    (``session_id``, ``expires_at``), read in reconcile's transaction while they exist. The
    answers' table is dropped with that transaction."""
    same_session(conn, asked)
    judged = sql.SQL(_JUDGED).format(
        should=sql.SQL(_SHOULD),
        does=sql.SQL(_DOES),
        explained=sql.SQL(_EXPLAINED if asked.after_cutover else "false").format(
            should=sql.SQL(_SHOULD), does=sql.SQL(_DOES)
        ),
        source=source,
        answers=asked.answers,
        target=sql.SQL(
            "LEFT JOIN {} t ON t.session_id OPERATOR(pg_catalog.=) s.session_id "
            'COLLATE pg_catalog."C"'
        ).format(sql.Identifier(asked.schema, "sessions"))
        if asked.after_cutover
        else sql.SQL(""),
    )
    values = {"at": asked.as_of, "examples": EXAMPLES}
    row = conn.execute(sql.SQL(_TALLY).format(judged=judged), values).fetchone()
    checked, expected, accepted, rejected, wrongly_accepted, explained = row  # type: ignore[misc]
    examples = []
    if rejected or wrongly_accepted:
        for sid, should in conn.execute(sql.SQL(_EXAMPLES).format(judged=judged), values):
            examples.append(
                f"{asked.mask(sid)}: source says {'active' if should else 'expired'}, the app "
                f"says {'not active' if should else 'active'}"
            )
    conn.execute(sql.SQL("DROP TABLE {}").format(asked.answers))
    return AppCheck(checked, expected, accepted, rejected, wrongly_accepted, examples, explained)
