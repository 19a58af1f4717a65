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
from collections.abc import Callable, Collection, Container, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from psycopg import sql

from sessionstore.manager import SessionManager

from . import defaults as D
from .connect import connect
from .keys import duplicate_rejects
from .mask import mask_id
from .reconcile import latest_migrate_run
from .source import Backup
from .transform import ROWID, Reject, Rules, normalise
from .verdict import Verdict
from .wire import (
    PG_EPOCH,
    Landed,
    describe,
    grouped,
    in_processes,
    landed_in_bulk,
    pg_micros,
    spans,
)

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
    fast: bool = True,
) -> AppCheck:
    manager = SessionManager(dsn, schema=schema, pool_size=1)
    checked = expected = accepted = rejected_wrongly = accepted_wrongly = explained = 0
    at = pg_micros(as_of)
    loop = asyncio.get_running_loop()
    reading = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sessionmig-appcheck")
    batches: Generator[tuple[int, Landed], None, None] | None = None
    found: dict[int, list[str]] = {}
    try:
        repeated = duplicate_rejects(backup, rules)  # later copies of a session_id never land
        # Rows the rules accept but PostgreSQL refused never landed either: the app cannot know
        # them. (Whether each such reject is true, reconcile checks by offering it again.)
        refused = _refused_by_postgresql(dsn, schema)
        if fast and not rules.extra_columns:
            batches = landed_in_parts(backup, rules, batch_rows, repeated, refused)
        else:
            batches = (
                (0, b) for b in landed_by_the_rules(backup, rules, batch_rows, repeated, refused)
            )
        # The next batch is read on a thread of its own while the server answers for this one;
        # batches of several parts of the backup come in any order, each part's in rowid order.
        coming = loop.run_in_executor(reading, next, batches, None)
        while (item := await coming) is not None:
            coming = loop.run_in_executor(reading, next, batches, None)
            part, (ids, expires) = item
            examples = found.setdefault(part, [])
            active = await manager.active_among(ids, as_of)
            by_app: set[str] = set()
            if mode == "after_cutover":
                differ = [
                    (sid, _instant(e))
                    for sid, e in zip(ids, expires, strict=True)
                    if (e > at) != (sid in active)
                ]
                now_expires = _expires_now(dsn, schema, [sid for sid, _ in differ])
                for sid, expires_at in differ:
                    # Gone: the app ended it. Later: the app extended it past as_of.
                    gone = sid not in now_expires
                    if gone or now_expires[sid] > max(expires_at, as_of):
                        by_app.add(sid)
                explained += len(by_app)
            checked += len(ids)
            for sid, e in zip(ids, expires, strict=True):
                if sid in by_app:
                    continue
                should = e > at
                does = sid in active
                expected += should
                accepted += does
                if should != does:
                    if should:
                        rejected_wrongly += 1
                    else:
                        accepted_wrongly += 1
                    if len(examples) < EXAMPLES:
                        examples.append(
                            f"{mask(sid)}: source says "
                            f"{'active' if should else 'expired'}, the app says "
                            f"{'active' if does else 'not active'}"
                        )
    finally:
        reading.shutdown(wait=True, cancel_futures=True)
        if batches is not None:
            batches.close()
        await manager.close()
    examples = [text for part in sorted(found) for text in found[part]][:EXAMPLES]
    return AppCheck(
        checked, expected, accepted, rejected_wrongly, accepted_wrongly, examples, explained
    )


ASK_ROWS = 20_000
"""Sessions per question to the manager on the bulk path (one array parameter each)."""

PARTS = 2
"""Worker processes that read a large backup for the app check, each its share of rowids."""
PARTS_FROM = 200_000
"""Rowids from which a backup is read by :data:`PARTS` processes (starting them costs ~1 s)."""


def landed_in_parts(
    backup: Backup,
    rules: Rules,
    batch_rows: int,
    repeated: Collection[int],
    refused: Collection[int],
    parts: int = PARTS,
) -> Generator[tuple[int, Landed], None, None]:
    """:func:`wire.landed_in_bulk` over the whole backup, as ``(part, batch)``: a large backup
    is split into ``parts`` spans of rowids, each read by a process of its own (the rules are
    CPU work, and the GIL would serialise threads). Each part's batches come in rowid order,
    the parts' in whatever order they are ready; ``part`` numbers the spans in rowid order."""
    cut = spans(backup, parts) if parts > 1 else []
    if not cut or cut[-1][1] - cut[0][0] < PARTS_FROM:
        for batch in grouped(
            landed_in_bulk(backup, rules, batch_rows, repeated, refused), ASK_ROWS
        ):
            yield 0, batch
        return
    opened, left_out = describe(backup), (set(repeated), set(refused))
    works = [(opened, rules, batch_rows, *left_out, first, last, ASK_ROWS) for first, last in cut]
    yield from in_processes(_WORKER, works)


_WORKER = "from sessionmig.wire import landed_part, serve; serve(landed_part)"


def _instant(micros: int) -> datetime:
    return PG_EPOCH.replace(tzinfo=UTC) + timedelta(microseconds=micros)


def landed_by_the_rules(
    backup: Backup, rules: Rules, batch_rows: int, repeated: Container[int], refused: Container[int]
) -> Iterator[Landed]:
    """The sessions that landed, each row through :func:`transform.normalise` (the reference
    :func:`landed_in_bulk` is tested against)."""
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
        yield [r.session_id for r in rows], [pg_micros(r.expires_at) for r in rows]


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
    batch_rows: int = D.BATCH_ROWS,
    mask: Callable[[str | None], str] = mask_id,
    mode: str = "strict",
    fast: bool = True,
) -> AppCheck:
    """Run the check (see the module docstring); ``mode`` as reconcile's. ``fast=False``
    reads every row through the rules (the reference the bulk path is tested against)."""
    work = _check(dsn, backup, rules, schema, as_of, batch_rows, mask, mode, fast)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(work)
    # Inside Jupyter an event loop is already running: give the check a loop of its own.
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, work).result()
