"""Load normalised rows into PostgreSQL in one transaction: COPY to staging, then one merge.

Everything a run writes — sessions, rejects and its audit row — commits together or not at all.
:func:`migration_lock` (an advisory lock) keeps two migrations off the same target schema;
the second fails fast. Rows already in the target are classified (inserted / unchanged /
conflicting) so a rerun over the same backup changes nothing and says so; conflicts follow
``on_conflict``.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from .errors import LockHeld, MigrationConflict, TransientTargetError
from .transform import Reject, Rules, normalise

SESSION_TYPES = ["text", "text", "text", "timestamptz", "timestamptz", "timestamptz", "int4"]
REJECT_TYPES = ["int8", "text", "text", "text", "text"]
EXAMPLES_PER_REASON = 3


@dataclass(frozen=True)
class AuditInfo:
    """What the audit row records about where the rows came from and who moved them."""

    run_id: str
    source_path: str
    source_sha256: str
    source_timezone: str
    parameters: dict[str, Any]
    operator: str | None = None
    host: str | None = None


@dataclass(frozen=True)
class LoadOutcome:
    """The pgloader-style summary of one load: read / imported / rejected / time."""

    run_id: str
    rows_read: int
    inserted: int
    unchanged: int
    conflicting: int
    updated: int
    skipped: int
    rejected: int
    seconds: float
    dry_run: bool
    committed: bool
    reject_counts: dict[str, int] = field(default_factory=dict)
    reject_examples: dict[str, list[Reject]] = field(default_factory=dict)

    @property
    def rows_per_second(self) -> float:
        return self.rows_read / self.seconds if self.seconds else 0.0


def _table(schema: str, name: str) -> sql.Composed:
    return sql.Identifier(schema, name)


def lock_key(schema: str) -> str:
    """The advisory-lock key of migrations into ``schema`` (hashed server-side)."""
    return f"sessionmig:{schema}"


@contextmanager
def migration_lock(dsn: str, schema: str) -> Iterator[None]:
    """Hold the target's migration lock for a whole step (schema creation and load).

    A session-level advisory lock on its own connection: released when the step ends or when
    the process dies, so a killed run never leaves the target locked.
    """
    try:
        conn = psycopg.connect(
            dsn, autocommit=True, application_name="sessionmig-lock", connect_timeout=15
        )
    except psycopg.OperationalError as exc:
        raise TransientTargetError(f"cannot connect to the target: {exc}".strip()) from None
    try:
        got = conn.execute(
            "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (lock_key(schema),)
        ).fetchone()
        if not got or not got[0]:
            raise LockHeld(
                f"another sessionmig migration holds the lock on schema {schema!r} of this "
                "target; wait for it to finish (see session_migration_runs) and run again"
            )
        yield
    finally:
        conn.close()


def _create_staging(conn: psycopg.Connection) -> None:
    conn.execute(
        """CREATE TEMP TABLE sessionmig_staging (
               session_id text, user_id text, metadata text, created_at timestamptz,
               expires_at timestamptz, last_activity timestamptz, request_count int4
           ) ON COMMIT DROP"""
    )
    conn.execute(
        """CREATE TEMP TABLE sessionmig_staging_rejects (
               source_rowid int8, session_id text, reason text, message text, raw text
           ) ON COMMIT DROP"""
    )


def _copy(conn: psycopg.Connection, table: str, types: list[str], rows: list[tuple]) -> None:
    with (
        conn.cursor() as cur,
        cur.copy(
            sql.SQL("COPY {} FROM STDIN (FORMAT BINARY)").format(sql.Identifier(table))
        ) as copy,
    ):
        copy.set_types(types)
        for row in rows:
            copy.write_row(row)


_SAME = """t.user_id IS NOT DISTINCT FROM s.user_id
       AND t.metadata IS NOT DISTINCT FROM s.metadata::jsonb
       AND t.created_at = s.created_at AND t.expires_at = s.expires_at
       AND t.last_activity = s.last_activity AND t.request_count = s.request_count"""


def _is_empty(conn: psycopg.Connection, target: sql.Composed) -> bool:
    row = conn.execute(sql.SQL("SELECT NOT EXISTS (SELECT 1 FROM {})").format(target)).fetchone()
    return bool(row and row[0])


def _classify(conn: psycopg.Connection, target: sql.Composed) -> tuple[int, int, int]:
    """(new, unchanged, conflicting) staged rows against what the target already holds."""
    query = sql.SQL(
        """SELECT count(*) FILTER (WHERE t.session_id IS NULL),
                  count(*) FILTER (WHERE t.session_id IS NOT NULL AND ({same})),
                  count(*) FILTER (WHERE t.session_id IS NOT NULL AND NOT ({same}))
           FROM sessionmig_staging s LEFT JOIN {target} t USING (session_id)"""
    ).format(same=sql.SQL(_SAME), target=target)
    new, same, conflicting = conn.execute(query).fetchone()  # type: ignore[misc]
    return new, same, conflicting


def _first_load(conn: psycopg.Connection, schema: str) -> int:
    """Fill an empty ``sessions`` with its indexes dropped and rebuilt afterwards — sorted
    index builds instead of 10M random inserts into a primary key larger than shared_buffers.
    All inside the run's transaction: a kill rolls the DDL back with the rows."""
    table = _table(schema, "sessions")
    regclass = f'"{schema}"."sessions"'
    constraints = conn.execute(
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conrelid = %s::regclass AND contype IN ('p', 'u')",
        (regclass,),
    ).fetchall()
    indexes = conn.execute(
        "SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid) FROM pg_index i "
        "WHERE i.indrelid = %s::regclass AND NOT EXISTS (SELECT 1 FROM pg_constraint c "
        "WHERE c.conindid = i.indexrelid)",
        (regclass,),
    ).fetchall()
    for name, _ in constraints:
        conn.execute(
            sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(table, sql.Identifier(name))
        )
    for name, _ in indexes:
        conn.execute(sql.SQL("DROP INDEX {}").format(sql.SQL(name)))  # regclass text, quoted
    inserted = conn.execute(
        sql.SQL(
            """INSERT INTO {} (session_id, user_id, metadata, created_at, expires_at,
                               last_activity, request_count)
               SELECT session_id, user_id, metadata::jsonb, created_at, expires_at,
                      last_activity, request_count FROM sessionmig_staging"""
        ).format(table)
    ).rowcount
    for name, definition in constraints:
        conn.execute(
            sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                table, sql.Identifier(name), sql.SQL(definition)
            )
        )
    for _, definition in indexes:
        conn.execute(sql.SQL(definition))  # as pg_get_indexdef printed it
    return inserted


def _merge(conn: psycopg.Connection, target: sql.Composed, on_conflict: str) -> tuple[int, int]:
    inserted = conn.execute(
        sql.SQL(
            """INSERT INTO {target} (session_id, user_id, metadata, created_at, expires_at,
                                     last_activity, request_count)
               SELECT s.session_id, s.user_id, s.metadata::jsonb, s.created_at, s.expires_at,
                      s.last_activity, s.request_count
               FROM sessionmig_staging s
               ON CONFLICT (session_id) DO NOTHING"""
        ).format(target=target)
    ).rowcount
    updated = 0
    if on_conflict == "keep_newer":
        updated = conn.execute(
            sql.SQL(
                """UPDATE {target} t SET user_id = s.user_id, metadata = s.metadata::jsonb,
                          created_at = s.created_at, expires_at = s.expires_at,
                          last_activity = s.last_activity, request_count = s.request_count
                   FROM sessionmig_staging s
                   WHERE t.session_id = s.session_id AND s.last_activity > t.last_activity
                     AND NOT ({same})"""
            ).format(target=target, same=sql.SQL(_SAME))
        ).rowcount
    return inserted, updated


def _audit(
    conn: psycopg.Connection, schema: str, info: AuditInfo, started: datetime, counts: dict
) -> None:
    conn.execute(
        sql.SQL(
            """INSERT INTO {} (run_id, step, started_at, finished_at, dry_run, source_path,
                   source_sha256, source_timezone, rows_read, inserted, unchanged, conflicting,
                   updated, rejected, parameters, operator, host)
               VALUES (%s, 'migrate', %s, now(), %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s,
                       %s, %s)"""
        ).format(_table(schema, "session_migration_runs")),
        (
            info.run_id,
            started,
            counts["dry_run"],
            info.source_path,
            info.source_sha256,
            info.source_timezone,
            counts["rows_read"],
            counts["inserted"],
            counts["unchanged"],
            counts["conflicting"],
            counts["updated"],
            counts["rejected"],
            Jsonb(info.parameters),
            info.operator,
            info.host,
        ),
    )


def load(
    dsn: str,
    batches: Iterable[list[tuple]],
    rules: Rules,
    audit: AuditInfo,
    *,
    schema: str = "public",
    on_conflict: str = "fail",
    dry_run: bool = False,
    progress: Callable[[int], None] | None = None,
) -> LoadOutcome:
    """Normalise and load every raw row from ``batches``; commit once (or roll back).

    A lost connection raises :class:`TransientTargetError`; the target is then as it was.
    """
    try:
        return _load(dsn, batches, rules, audit, schema, on_conflict, dry_run, progress)
    except psycopg.OperationalError as exc:
        # The transaction died with the connection, so nothing of this run was committed (or,
        # if the loss hit COMMIT itself, all of it was): a rerun is idempotent either way.
        raise TransientTargetError(f"lost the connection to the target: {exc}".strip()) from None


def _load(
    dsn: str,
    batches: Iterable[list[tuple]],
    rules: Rules,
    audit: AuditInfo,
    schema: str,
    on_conflict: str,
    dry_run: bool,
    progress: Callable[[int], None] | None,
) -> LoadOutcome:
    started = datetime.now(UTC)
    clock = time.perf_counter()
    reasons: Counter[str] = Counter()
    examples: dict[str, list[Reject]] = {}
    read = 0
    conn = psycopg.connect(dsn, application_name="sessionmig-migrate", connect_timeout=15)
    with conn:
        _create_staging(conn)
        for batch in batches:
            good: list[tuple] = []
            bad: list[tuple] = []
            for raw in batch:
                result = normalise(raw, rules)
                if isinstance(result, Reject):
                    reasons[result.reason] += 1
                    kept = examples.setdefault(result.reason, [])
                    if len(kept) < EXAMPLES_PER_REASON:
                        kept.append(result)
                    bad.append(
                        (
                            result.rowid,
                            result.session_id,
                            result.reason,
                            result.message,
                            json.dumps(result.raw),
                        )
                    )
                else:
                    good.append(result)
            _copy(conn, "sessionmig_staging", SESSION_TYPES, good)
            if bad:
                _copy(conn, "sessionmig_staging_rejects", REJECT_TYPES, bad)
            read += len(batch)
            if progress:
                progress(len(batch))
        target = _table(schema, "sessions")
        first = _is_empty(conn, target)
        if first:
            # Keep "empty" true until commit (the app may already be live); a table that has
            # rows is merged without blocking the app's writes.
            conn.execute(sql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(target))
            first = _is_empty(conn, target)
        if first:
            inserted = _first_load(conn, schema)
            unchanged = conflicting = updated = 0
        else:
            _, unchanged, conflicting = _classify(conn, target)
            if conflicting and on_conflict == "fail":
                conn.rollback()
                raise MigrationConflict(
                    f"{conflicting} source rows differ from rows already in {schema}.sessions "
                    f"(e.g. sessions the new app wrote during cutover); nothing was written. "
                    "Rerun with on_conflict=skip (keep the target's rows) or keep_newer (newest "
                    "last_activity wins)"
                )
            inserted, updated = _merge(conn, target, on_conflict)
        rejected = sum(reasons.values())
        conn.execute(
            sql.SQL(
                """INSERT INTO {} (run_id, source_rowid, session_id, reason, message, raw)
                   SELECT %s, source_rowid, session_id, reason, message, raw::jsonb
                   FROM sessionmig_staging_rejects"""
            ).format(_table(schema, "session_migration_rejects")),
            (audit.run_id,),
        )
        counts = dict(
            rows_read=read,
            inserted=inserted,
            unchanged=unchanged,
            conflicting=conflicting,
            updated=updated,
            rejected=rejected,
            dry_run=dry_run,
        )
        _audit(conn, schema, audit, started, counts)
        if dry_run:
            conn.rollback()
        else:
            conn.commit()
    return LoadOutcome(
        run_id=audit.run_id,
        rows_read=read,
        inserted=inserted,
        unchanged=unchanged,
        conflicting=conflicting,
        updated=updated,
        skipped=conflicting - updated,
        rejected=rejected,
        seconds=time.perf_counter() - clock,
        dry_run=dry_run,
        committed=not dry_run,
        reject_counts=dict(reasons),
        reject_examples=examples,
    )
