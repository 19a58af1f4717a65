"""The application's view of the migrated sessions: ask the new ``SessionManager`` which
sessions it would accept at ``as_of``, without changing any of them.

Every source row that normalises is expected active in PostgreSQL exactly when its
``expires_at`` is after ``as_of``; the manager answers with the same predicate
``validate_session`` uses, read only, so no ``request_count`` or ``last_activity`` moves.

In ``after_cutover`` mode (the re-check once the app serves from PostgreSQL) a session the app
treats differently from the backup is *explained* when PostgreSQL's own row says why: the
session is gone (logout, cleanup) or its ``expires_at`` moved later (extend); those are counted,
not failed. Whether such a change itself is one the app can make is reconcile's question.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

from psycopg import sql

from . import params as P
from .connect import connect
from .keys import duplicate_rejects
from .mask import mask_id
from .reconcile import latest_migrate_run
from .source import Backup
from .store import SessionManager
from .transform import ROWID, Reject, Rules, normalise
from .verdict import Verdict

EXAMPLES = 10


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


async def _check(
    dsn: str,
    backup: Backup,
    rules: Rules,
    schema: str,
    as_of: datetime,
    batch_rows: int,
    mask: Callable[[str | None], str],
    mode: str = "strict",
) -> AppCheck:
    manager = SessionManager(dsn, schema=schema, pool_size=1)
    checked = expected = accepted = rejected_wrongly = accepted_wrongly = explained = 0
    examples: list[str] = []
    try:
        repeated = duplicate_rejects(backup, rules)  # later copies of a session_id never land
        # Rows the rules accept but PostgreSQL refused never landed either: the app cannot know
        # them. (Whether each such reject is true, reconcile checks by offering it again.)
        refused = _refused_by_postgresql(dsn, schema)
        for batch in backup.rows(batch_rows, extra=rules.extra_columns):
            rows = [
                r
                for r in (
                    normalise(raw, rules)
                    for raw in batch
                    if raw[ROWID] not in repeated and raw[ROWID] not in refused
                )
                if not isinstance(r, Reject)
            ]
            active = await manager.active_among([r.session_id for r in rows], as_of)
            by_app: set[str] = set()
            if mode == "after_cutover":
                differ = [r for r in rows if (r.expires_at > as_of) != (r.session_id in active)]
                now_expires = _expires_now(dsn, schema, [r.session_id for r in differ])
                for row in differ:
                    # Gone: the app ended it. Later: the app extended it past as_of.
                    gone = row.session_id not in now_expires
                    if gone or now_expires[row.session_id] > max(row.expires_at, as_of):
                        by_app.add(row.session_id)
                explained += len(by_app)
            for row in rows:
                if row.session_id in by_app:
                    checked += 1
                    continue
                checked += 1
                should = row.expires_at > as_of
                does = row.session_id in active
                expected += should
                accepted += does
                if should != does:
                    if should:
                        rejected_wrongly += 1
                    else:
                        accepted_wrongly += 1
                    if len(examples) < EXAMPLES:
                        examples.append(
                            f"{mask(row.session_id)}: source says "
                            f"{'active' if should else 'expired'}, the app says "
                            f"{'active' if does else 'not active'}"
                        )
    finally:
        await manager.close()
    return AppCheck(
        checked, expected, accepted, rejected_wrongly, accepted_wrongly, examples, explained
    )


def _refused_by_postgresql(dsn: str, schema: str) -> set[int]:
    """The source rowids the latest migrate run kept as ``refused_by_postgresql`` rejects."""
    rejects = sql.Identifier(schema, "session_migration_rejects")
    with connect(dsn, "appcheck", read_only=True) as conn:
        run = latest_migrate_run(conn, schema)
        if run is None:
            return set()
        rows = conn.execute(
            sql.SQL(
                "SELECT source_rowid FROM {} WHERE run_id = %s AND reason = 'refused_by_postgresql'"
            ).format(rejects),
            (run,),
        ).fetchall()
    return {r[0] for r in rows}


def _expires_now(dsn: str, schema: str, ids: list[str]) -> dict[str, datetime]:
    """PostgreSQL's ``expires_at`` of those of ``ids`` it still holds (few: only the sessions
    whose answer differs from the backup's)."""
    if not ids:
        return {}
    query = sql.SQL("SELECT session_id, expires_at FROM {} WHERE session_id = ANY(%s)").format(
        sql.Identifier(schema, "sessions")
    )
    with connect(dsn, "appcheck", read_only=True) as conn:
        return dict(conn.execute(query, (ids,)).fetchall())


def check_with_manager(
    dsn: str,
    backup: Backup,
    rules: Rules,
    *,
    schema: str,
    as_of: datetime,
    batch_rows: int = P.default("batch_rows"),
    mask: Callable[[str | None], str] = mask_id,
    mode: str = "strict",
) -> AppCheck:
    """Run the check (see the module docstring); ``mode`` as reconcile's."""
    work = _check(dsn, backup, rules, schema, as_of, batch_rows, mask, mode)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(work)
    # Inside Jupyter an event loop is already running: give the check a loop of its own.
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, work).result()
