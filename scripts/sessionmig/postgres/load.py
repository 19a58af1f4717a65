"""Load a backup into PostgreSQL in one transaction.

Into an empty target, rows are COPYed straight into ``sessions`` with its keys and indexes
dropped and rebuilt afterwards; into one that has rows, they are COPYed to a temporary staging
table and merged in one statement. Everything a run writes — sessions, rejects and its audit
row — commits together or not at all.
:func:`migration_lock` (an advisory lock) keeps two migrations off the same target schema;
the second fails fast. Rows already in the target are classified (inserted / unchanged /
conflicting) so a rerun over the same backup changes nothing and says so; conflicts follow
``on_conflict``.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql

from sessionmig import defaults as D
from sessionmig.errors import (
    LockHeld,
    MigrationConflict,
    TargetError,
    TransientTargetError,
    is_connection_loss,
)
from sessionmig.postgres.audit import COMMITTED, NOT_COMMITTED, RunRow, commit_outcome, write_run
from sessionmig.postgres.connect import connect
from sessionmig.postgres.copyin import stream_backup
from sessionmig.postgres.replication import AfterCommit, after_commit, wal_lsn
from sessionmig.rules.mask import redact
from sessionmig.rules.transform import Reject, Rules
from sessionmig.sqlite.keys import duplicate_rejects
from sessionmig.sqlite.source import Backup

REJECT_TYPES = ["int8", "text", "text", "text", "text"]
EXAMPLES_PER_REASON = 3
LOCK_TIMEOUT = D.LOCK_TIMEOUT
"""How long the load waits for a table lock before giving up. The target may be live: a
migration that queued behind the app's transactions would queue every later request of the
app behind itself, so it fails fast and says so instead."""


@dataclass(frozen=True)
class AuditInfo:
    """What the audit row records about where the rows came from and who moved them."""

    run_id: str
    source_path: str
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
    spans_redone: int = 0  # spans PostgreSQL refused a value in, redone by the rules
    # The WAL written and what each standby did with the commit (None: dry run, nothing to say).
    replication: AfterCommit | None = None

    @property
    def rows_per_second(self) -> float:
        return self.rows_read / self.seconds if self.seconds else 0.0


def _table(schema: str, name: str) -> sql.Identifier:
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
    conn = connect(dsn, "lock", autocommit=True, connect_timeout=15)
    held = False
    try:
        got = conn.execute(
            "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (lock_key(schema),)
        ).fetchone()
        if not got or not got[0]:
            raise LockHeld(
                f"another sessionmig migration holds the lock on schema {schema!r} of this "
                "target; wait for it to finish (see session_migration_runs) and run again"
            )
        held = True
        yield
    finally:
        if held:
            # Released here, not by the close: a backend ends its session (and drops its
            # locks) after the client has gone, so the next step could find it still held.
            with contextlib.suppress(psycopg.Error):
                conn.execute(
                    "SELECT pg_catalog.pg_advisory_unlock(pg_catalog.hashtextextended(%s, 0))",
                    (lock_key(schema),),
                )
        conn.close()


def _create_staging(conn: psycopg.Connection, sessions: bool) -> None:
    if sessions:
        conn.execute(
            """CREATE TEMP TABLE sessionmig_staging (
                   session_id text, user_id text, metadata jsonb, created_at timestamptz,
                   expires_at timestamptz, last_activity timestamptz, request_count int4
               ) ON COMMIT DROP"""
        )
    conn.execute(
        """CREATE TEMP TABLE sessionmig_staging_rejects (
               source_rowid int8, session_id text, reason text, message text, raw text
           ) ON COMMIT DROP"""
    )


class _RejectSink:
    """Counts rejects, keeps a few examples per reason, and COPYs them all to staging."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn
        self.reasons: Counter[str] = Counter()
        self.examples: dict[str, list[Reject]] = {}
        self.pending: list[tuple] = []

    def __call__(self, reject: Reject) -> None:
        self.reasons[reject.reason] += 1
        kept = self.examples.setdefault(reject.reason, [])
        if len(kept) < EXAMPLES_PER_REASON:
            kept.append(reject)
        self.pending.append(
            (reject.rowid, reject.session_id, reject.reason, reject.message, json.dumps(reject.raw))
        )
        if len(self.pending) >= 1000:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        with (
            self.conn.cursor() as cur,
            cur.copy("COPY sessionmig_staging_rejects FROM STDIN (FORMAT BINARY)") as copy,
        ):
            copy.set_types(REJECT_TYPES)
            for row in self.pending:
                copy.write_row(row)
        self.pending.clear()


_SAME = """t.user_id IS NOT DISTINCT FROM s.user_id
       AND t.metadata IS NOT DISTINCT FROM s.metadata
       AND t.created_at = s.created_at AND t.expires_at = s.expires_at
       AND t.last_activity = s.last_activity AND t.request_count = s.request_count"""


def _is_empty(conn: psycopg.Connection, target: sql.Identifier) -> bool:
    row = conn.execute(sql.SQL("SELECT NOT EXISTS (SELECT 1 FROM {})").format(target)).fetchone()
    return bool(row and row[0])


def _classify(conn: psycopg.Connection, target: sql.Identifier) -> tuple[int, int, int]:
    """(new, unchanged, conflicting) staged rows against what the target already holds."""
    query = sql.SQL(
        """SELECT count(*) FILTER (WHERE t.session_id IS NULL),
                  count(*) FILTER (WHERE t.session_id IS NOT NULL AND ({same})),
                  count(*) FILTER (WHERE t.session_id IS NOT NULL AND NOT ({same}))
           FROM sessionmig_staging s LEFT JOIN {target} t USING (session_id)"""
    ).format(same=sql.SQL(_SAME), target=target)
    new, same, conflicting = conn.execute(query).fetchone()  # type: ignore[misc]
    return new, same, conflicting


def _drop_indexes(conn: psycopg.Connection, schema: str) -> Callable[[], None]:
    """Drop an empty ``sessions``' keys and indexes; return what rebuilds them.

    COPY straight into the bare table, then sorted index builds, instead of millions of random
    inserts into a primary key larger than shared_buffers. All inside the run's transaction:
    a kill rolls the DDL back with the rows.
    """
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

    def rebuild() -> None:
        for name, definition in constraints:
            conn.execute(
                sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                    table, sql.Identifier(name), sql.SQL(definition)
                )
            )
        for _, definition in indexes:
            conn.execute(sql.SQL(definition))  # as pg_get_indexdef printed it

    return rebuild


def _merge(conn: psycopg.Connection, target: sql.Identifier, on_conflict: str) -> tuple[int, int]:
    inserted = conn.execute(
        sql.SQL(
            """INSERT INTO {target} (session_id, user_id, metadata, created_at, expires_at,
                                     last_activity, request_count)
               SELECT s.session_id, s.user_id, s.metadata, s.created_at, s.expires_at,
                      s.last_activity, s.request_count
               FROM sessionmig_staging s
               ON CONFLICT (session_id) DO NOTHING"""
        ).format(target=target)
    ).rowcount
    updated = 0
    if on_conflict == "keep_newer":
        updated = conn.execute(
            sql.SQL(
                """UPDATE {target} t SET user_id = s.user_id, metadata = s.metadata,
                          created_at = s.created_at, expires_at = s.expires_at,
                          last_activity = s.last_activity, request_count = s.request_count
                   FROM sessionmig_staging s
                   WHERE t.session_id = s.session_id AND s.last_activity > t.last_activity
                     AND NOT ({same})"""
            ).format(target=target, same=sql.SQL(_SAME))
        ).rowcount
    return inserted, updated


@contextmanager
def target_errors(schema: str) -> Iterator[None]:
    """What PostgreSQL raises during a load, as the package's exceptions: a lost connection is
    transient (the whole load may be retried), anything the server refused is not."""
    try:
        yield
    except psycopg.errors.LockNotAvailable:
        raise TargetError(
            f"{schema}.sessions is locked by another session of the target for longer than "
            f"{LOCK_TIMEOUT} (the app or a maintenance job); nothing was written. Run again when "
            "it is idle, or look at pg_locks for who holds it"
        ) from None
    except psycopg.Error as exc:
        if isinstance(exc, psycopg.OperationalError) and is_connection_loss(exc.sqlstate):
            # The transaction died with the connection, so nothing of this run was committed
            # (or, if the loss hit COMMIT itself, all of it was): a rerun is idempotent.
            raise TransientTargetError(
                f"lost the connection to the target: {exc}".strip()
            ) from None
        # The server refused the work itself: retrying would be refused again. The detail is
        # left out, since it can quote a key (a session id).
        raise TargetError(
            f"PostgreSQL refused the load (SQLSTATE {exc.sqlstate}: "
            f"{exc.diag.message_primary or type(exc).__name__}); nothing was written. Run "
            "inspect on the backup and report this"
        ) from None


def _commit(conn: psycopg.Connection, dsn: str, schema: str, run_id: str) -> None:
    """COMMIT; when its answer is lost, ask the target (the audit row is the truth) before
    anything is decided: committed is success, not committed may be retried, unknown must not
    be (a retry could load on top of a committed run)."""
    pid = conn.info.backend_pid
    try:
        conn.commit()
    except psycopg.OperationalError as exc:
        outcome = commit_outcome(dsn, schema, run_id, pid)
        if outcome == COMMITTED:
            return
        if outcome == NOT_COMMITTED:
            raise TransientTargetError(
                f"lost the connection at COMMIT ({redact(str(exc).strip())}); the target's "
                f"audit row, read on a new connection, shows run {run_id} was not committed: "
                "nothing was written"
            ) from None
        raise TargetError(
            f"lost the connection while COMMIT's answer was in flight ({redact(str(exc).strip())})"
            f" and the target cannot be asked now: whether run {run_id} committed is unknown. "
            f"Once the target answers, look for run {run_id} in {schema}.session_migration_runs "
            "(or run `sessionmig reconcile --env ENV` with this run's environment) before "
            "running migrate again"
        ) from None


def _is_first_load(conn: psycopg.Connection, target: sql.Identifier) -> bool:
    """True when the target is empty, and then locked so that it stays empty until commit.

    A target that already has rows (the app may be live on it) is merged without the lock.
    """
    if not _is_empty(conn, target):
        return False
    conn.execute(sql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(target))
    return _is_empty(conn, target)


def load(
    dsn: str,
    backup: Backup,
    rules: Rules,
    audit: AuditInfo,
    *,
    schema: str = D.TARGET_SCHEMA,
    on_conflict: str = D.ON_CONFLICT,
    dry_run: bool = False,
    batch_rows: int = D.BATCH_ROWS,
    progress: Callable[[int], None] | None = None,
    before_commit: Callable[[], None] | None = None,
    phase: Callable[[str], None] | None = None,
) -> LoadOutcome:
    """Normalise and load every row of ``backup``; commit once (or roll back).

    ``before_commit`` runs last inside the transaction; whatever it raises rolls it all back.
    ``phase`` is told each stage after the rows are copied (index rebuild, merge, commit), which
    can take as long as the copy itself while no row moves.
    A lost connection raises :class:`TransientTargetError`; the target is then as it was.
    """
    say = phase or (lambda text: None)
    with target_errors(schema):
        started = datetime.now(UTC)
        clock = time.perf_counter()
        conn = connect(dsn, "migrate", connect_timeout=15)
        replicated = None
        with conn:
            wal_started = wal_lsn(conn)
            conn.execute("SELECT set_config('lock_timeout', %s, true)", (LOCK_TIMEOUT,))
            target = _table(schema, "sessions")
            # Decided before any row is copied, so which copy lands never depends on row order.
            settled = duplicate_rejects(backup, rules)
            first = _is_first_load(conn, target)
            _create_staging(conn, sessions=not first)
            rebuild = _drop_indexes(conn, schema) if first else None
            sink = _RejectSink(conn)
            streamed = stream_backup(
                conn,
                backup,
                rules,
                sql.SQL(
                    "{} (session_id, user_id, metadata, created_at, expires_at, last_activity, "
                    "request_count)"
                ).format(target if first else sql.Identifier("sessionmig_staging")),
                on_reject=sink,
                settled=settled,
                batch_rows=batch_rows,
                progress=progress,
            )
            sink.flush()
            # Every read of the source is done: hash it again while the server works, and commit
            # only if it is unchanged.
            unchanged_source = backup.verify_unchanged_later()
            if rebuild is not None:
                say("rebuilding indexes")
                rebuild()
                inserted, unchanged, conflicting, updated = streamed.copied, 0, 0, 0
            else:
                say("merging into sessions")
                new, unchanged, conflicting = _classify(conn, target)
                if conflicting and on_conflict == "fail":
                    conn.rollback()
                    raise MigrationConflict(
                        f"{conflicting} source rows differ from rows already in "
                        f"{schema}.sessions (e.g. sessions the new app wrote during cutover); "
                        "nothing was written. Rerun with on_conflict=skip (keep the target's "
                        "rows) or keep_newer (newest last_activity wins)"
                    )
                inserted, updated = _merge(conn, target, on_conflict)
                if inserted != new:
                    # Sessions the app wrote meanwhile took some keys: ON CONFLICT skipped those
                    # rows, and a skipped row must never pass unnoticed.
                    conn.rollback()
                    raise MigrationConflict(
                        f"{new - inserted} source sessions were written to {schema}.sessions by "
                        "someone else while this load ran; nothing was written. Run again"
                    )
            rejected = sum(sink.reasons.values())
            say("recording rejects and the audit row")
            conn.execute(
                sql.SQL(
                    """INSERT INTO {} (run_id, source_rowid, session_id, reason, message, raw)
                       SELECT %s, source_rowid, session_id, reason, message, raw::jsonb
                       FROM sessionmig_staging_rejects"""
                ).format(_table(schema, "session_migration_rejects")),
                (audit.run_id,),
            )
            counts: dict[str, Any] = dict(
                rows_read=streamed.read,
                inserted=inserted,
                unchanged=unchanged,
                conflicting=conflicting,
                updated=updated,
                rejected=rejected,
                dry_run=dry_run,
            )
            # The sha256 is read only now: it was computed on a worker thread beside the load.
            write_run(
                conn,
                schema,
                RunRow(
                    run_id=audit.run_id,
                    step="migrate",
                    started_at=started,
                    source_path=audit.source_path,
                    source_sha256=backup.sha256,
                    source_timezone=audit.source_timezone,
                    parameters=audit.parameters,
                    operator=audit.operator,
                    host=audit.host,
                    **counts,
                ),
            )
            say("checking the source is unchanged")
            unchanged_source.result()  # raises SourceError, which rolls everything back
            if before_commit is not None:
                before_commit()
            if dry_run:
                conn.rollback()
                say("rolled back (dry run)")
            else:
                say("committing")
                _commit(conn, dsn, schema, audit.run_id)
                replicated = after_commit(conn, wal_started)  # and the standbys' replay of it
                say("committed")
        return LoadOutcome(
            run_id=audit.run_id,
            rows_read=streamed.read,
            inserted=inserted,
            unchanged=unchanged,
            conflicting=conflicting,
            updated=updated,
            skipped=conflicting - updated,
            rejected=rejected,
            seconds=time.perf_counter() - clock,
            dry_run=dry_run,
            committed=not dry_run,
            reject_counts=dict(sink.reasons),
            reject_examples=sink.examples,
            spans_redone=streamed.spans_redone,
            replication=replicated,
        )
