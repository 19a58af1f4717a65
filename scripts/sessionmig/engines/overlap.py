"""Roll back during a live cutover's overlap: carry what PostgreSQL learned since the last
carried base into the SQLite file the old colour still serves from, exactly once.

Two systems, one decision. The rollback writes SQLite (the live file) and PostgreSQL (the audit
row that refuses every later catch-up pass). Neither can commit with the other, so the decision
is taken in PostgreSQL first and completed afterwards:

1. **intent**: the rollback's audit row is committed in PostgreSQL, ``state = 'intent'``,
   *before* SQLite is touched. From that commit on, no catch-up pass and no second rollback may
   start (:func:`sessionmig.engines.catchup.refuse_after_rollback` reads it).
2. **merge**: one SQLite transaction writes the merged rows and the marker
   (:data:`MARKER_TABLE`, keyed by the base's sha256). SQLite commits both or neither.
3. **done**: a second audit row (``state = 'done'``) records the counts.

Every crash point is safe: before 1, nothing was written (run again); between 1 and 2 the
target refuses catch-up and a re-run of the same command sees its intent, finds no marker in the
live file and does the merge; between 2 and 3 the re-run finds the marker and only writes the
done row. Catch-up also refuses a live file that carries a marker, whatever the target says.
"""

from __future__ import annotations

import contextlib
import functools
import json
import socket
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from sessionmig import defaults as D
from sessionmig.engines.catchup import (
    ROLLBACK_MARKER,
    SNAPSHOT_NAME,
    chain_of,
    commit_lock,
    refuse_after_rollback,
    refuse_partial_pass,
)
from sessionmig.engines.reconcile import rejects_of_run
from sessionmig.engines.rollback import legacy_row
from sessionmig.errors import (
    ParameterError,
    SourceError,
    TargetError,
    TransientTargetError,
    VerdictFailed,
)
from sessionmig.postgres.audit import RunRow, write_run
from sessionmig.postgres.connect import connect
from sessionmig.postgres.copyin import stream_backup
from sessionmig.postgres.load import migration_lock
from sessionmig.rules import merge as M
from sessionmig.rules.jsonb import metadata_text
from sessionmig.rules.mask import mask_id, redact
from sessionmig.rules.transform import COLUMNS, Reject, Rules, normalise
from sessionmig.sqlite.expected import ExpectedPath
from sessionmig.sqlite.source import Backup, open_backup, shaped

# --- rollback during a live cutover's overlap --------------------------------------------------

MARKER_TABLE = ROLLBACK_MARKER
"""Kept in the SQLite file the merge wrote to, in the same SQLite transaction as the merge: the
base whose PostgreSQL changes it carried, so they are never carried twice."""
BUSY_TIMEOUT_S = 30.0  # the legacy manager's own sqlite3 timeout: the app waits as long for us
_BASE_TABLE = "sessionmig_rollback_base"


@dataclass(frozen=True)
class LiveRollbackResult:
    """What a rollback during the overlap carried from PostgreSQL into the live SQLite file."""

    live_sqlite_path: str
    migrate_run_id: str
    catchup_pass: int  # the catch-up pass whose snapshot was the base (0: the migrated backup)
    base_path: str
    base_sha256: str
    inserted: int  # created in PostgreSQL since the base
    changed: int  # PostgreSQL's changes applied on top of the SQLite row
    ended: int  # ended in PostgreSQL: ended in SQLite
    stays_ended: int  # changed in PostgreSQL, already ended in SQLite
    conflicts: int  # user_id/metadata/created_at changed on both: newer last_activity won
    left_rejected: int  # SQLite rows the migration's rules refuse: left exactly as they are
    unchanged: int  # the same in the base and PostgreSQL: not touched
    examples: dict[str, tuple[str, ...]]
    locked_seconds: float  # how long the app's SQLite writes waited for the merge at most
    seconds: float
    completed_earlier: bool = False  # an earlier run wrote the file; this one only the record

    @property
    def counts(self) -> dict[str, int]:
        return {
            "inserted": self.inserted,
            "changed": self.changed,
            "ended": self.ended,
            "stays_ended": self.stays_ended,
            "conflicts": self.conflicts,
            "left_rejected": self.left_rejected,
            "unchanged": self.unchanged,
        }


def _pg_delta(
    conn: psycopg.Connection, base: Backup, rules: Rules, schema: str, rejects: dict[int, dict]
) -> tuple[list[tuple[str, M.Row | None, M.Row | None]], int]:
    """The sessions whose row differs between the base and PostgreSQL now, as
    ``(session_id, base row, PostgreSQL row)`` (None: absent), and how many are the same.

    The base is normalised by the migration's rules into a temporary table and compared in
    PostgreSQL, so only the differing rows come back; a base row the rules refuse never landed
    and counts as absent. Both sides come out of PostgreSQL, so metadata is spelled alike."""
    conn.execute(
        sql.SQL(
            """CREATE TEMP TABLE {} (
                   session_id text, user_id text, metadata jsonb, created_at timestamptz,
                   expires_at timestamptz, last_activity timestamptz, request_count int4
               ) ON COMMIT DROP"""
        ).format(sql.Identifier(_BASE_TABLE))
    )
    stream_backup(
        conn,
        base,
        rules,
        sql.Identifier(_BASE_TABLE),
        on_reject=lambda _reject: None,
        divert=rejects,
        on_diverted=lambda _raw: None,
        fast=ExpectedPath(rules.zone),
    )
    conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(_BASE_TABLE)))
    cols = "{p}.session_id, {p}.user_id, {p}.metadata::text, {p}.created_at, {p}.expires_at, "
    cols += "{p}.last_activity, {p}.request_count"
    query = sql.SQL(
        """SELECT {b_cols}, {p_cols}, count(*) OVER ()
           FROM {base} b FULL JOIN {sessions} p ON p.session_id = b.session_id
           WHERE (b.session_id, b.user_id, b.metadata, b.created_at, b.expires_at,
                  b.last_activity, b.request_count)
                 IS DISTINCT FROM
                 (p.session_id, p.user_id, p.metadata, p.created_at, p.expires_at,
                  p.last_activity, p.request_count)
           ORDER BY coalesce(b.session_id, p.session_id) COLLATE "C" """
    ).format(
        b_cols=sql.SQL(cols).format(p=sql.Identifier("b")),
        p_cols=sql.SQL(cols).format(p=sql.Identifier("p")),
        base=sql.Identifier(_BASE_TABLE),
        sessions=sql.Identifier(schema, "sessions"),
    )
    delta = []
    for row in conn.execute(query):
        b, p = row[:7], row[7:14]
        delta.append(
            (
                b[0] if b[0] is not None else p[0],
                b if b[0] is not None else None,
                p if p[0] is not None else None,
            )
        )
    (same,) = conn.execute(
        sql.SQL("SELECT count(*) FROM {} b JOIN {} p USING (session_id)").format(
            sql.Identifier(_BASE_TABLE), sql.Identifier(schema, "sessions")
        )
    ).fetchone() or (0,)
    changed_in_both = sum(1 for _, b, p in delta if b is not None and p is not None)
    return delta, same - changed_in_both  # type: ignore[return-value]


def _canonical(row: M.Row) -> M.Row:
    meta = row[2]
    if meta is not None:
        with contextlib.suppress(ValueError, RecursionError):
            meta = metadata_text(meta)
    return (row[0], row[1], meta, row[3], row[4], row[5], row[6])


def _sqlite_row(live: sqlite3.Connection, sid: str, rules: Rules) -> tuple[M.Row | None, bool]:
    """The live file's session ``sid`` normalised by the rules (None: absent), and whether a
    row the rules refuse holds that key (then it is left exactly as it is)."""
    names = (*COLUMNS, *rules.extra_columns)
    values = ", ".join(_quoted(c) for c in names)
    types = ", ".join(f"typeof({_quoted(c)})" for c in names)
    found = live.execute(
        f"SELECT rowid, {values}, {types} FROM sessions WHERE session_id = ?", (sid,)
    ).fetchall()
    if not found:
        return None, False
    rows = [normalise(shaped(r, len(rules.extra_columns)), rules) for r in found]
    if len(rows) != 1 or isinstance(rows[0], Reject):
        return None, True
    return _canonical(tuple(rows[0])), False  # type: ignore[arg-type]


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _write(
    live: sqlite3.Connection, outcome: M.Outcome, before: M.Row | None, sid: str, zone: tzinfo
) -> None:
    """Make the live file hold ``outcome`` for ``sid``: only the columns that differ from the
    row it holds are written, so what only SQLite changed keeps its very spelling."""
    if outcome.kind == M.INSERTED:
        assert outcome.row is not None
        live.execute(
            "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?)", legacy_row(outcome.row, zone)
        )
    elif outcome.kind == M.ENDED:
        live.execute("DELETE FROM sessions WHERE session_id = ?", (sid,))
    elif outcome.kind == M.RECREATED:
        assert outcome.row is not None
        live.execute("DELETE FROM sessions WHERE session_id = ?", (sid,))
        live.execute(
            "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?)", legacy_row(outcome.row, zone)
        )
    elif outcome.kind == M.CHANGED:
        assert outcome.row is not None and before is not None
        legacy = legacy_row(outcome.row, zone)
        names = COLUMNS[1:]
        changed = [i for i in range(1, len(COLUMNS)) if outcome.row[i] != before[i]]
        if changed:
            sets = ", ".join(f"{names[i - 1]} = ?" for i in changed)
            live.execute(
                f"UPDATE sessions SET {sets} WHERE session_id = ?",
                (*(legacy[i] for i in changed), sid),
            )


def _already_carried(live: sqlite3.Connection, base_sha256: str) -> bool:
    exists = live.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (MARKER_TABLE,)
    ).fetchone()
    if not exists:
        return False
    return bool(
        live.execute(
            f"SELECT 1 FROM {MARKER_TABLE} WHERE base_sha256 = ?", (base_sha256,)
        ).fetchone()
    )


def rollback_live(
    dsn: str,
    *,
    sqlite_path: str | Path,
    live_sqlite_path: str | Path,
    state_dir: str | Path,
    expected_sha256: str,
    rules: Rules,
    schema: str = D.TARGET_SCHEMA,
    run_id: str | None = None,
    operator: str | None = None,
    busy_timeout_s: float = BUSY_TIMEOUT_S,
) -> LiveRollbackResult:
    """Roll back during a live cutover's overlap: carry PostgreSQL's changes since the base
    into the SQLite file the old colour still serves from, by the catch-up's merge rules
    (:func:`sessionmig.rules.merge.merge`) in the other direction — base = the snapshot last carried
    into PostgreSQL (``sqlite_path``, the migrated snapshot, before any pass; else the last
    pass's snapshot in ``state_dir``), live = PostgreSQL now, target = the live file.

    Created in PostgreSQL → inserted; changed → its changes applied on top of SQLite's row
    (``request_count`` gains PostgreSQL − base, instants take the later value, user_id and
    metadata the side that changed them); ended in PostgreSQL → ended in SQLite; what only
    SQLite changed stays. The file is written in place, in one ``BEGIN IMMEDIATE`` transaction
    (the old colour's writes wait for it, at most ``busy_timeout_s``, and then go on), proven
    before its commit: every touched session re-read equals the rules' outcome. The base is
    recorded in the file in that same transaction, and a second rollback on the same base is
    refused, so no change is carried twice. Stop the new colour's traffic first: what it
    writes after PostgreSQL is read here is not carried.
    """

    started = time.perf_counter()
    started_at = datetime.now(UTC)
    live_path = Path(live_sqlite_path).resolve()
    migrated = Path(sqlite_path).resolve()
    if live_path == migrated:
        raise ParameterError(
            "live_sqlite_path is sqlite_path: the migrated snapshot is evidence and is never "
            "written; give the file the old colour serves from"
        )
    if not live_path.is_file():
        raise ParameterError(
            f"live_sqlite_path {live_path}: no such file; during the overlap it is the file "
            "the old colour serves from (its SESSION_SQLITE_PATH). With no old colour left, "
            "roll back with restore_path instead"
        )
    with migration_lock(dsn, schema), _connect(dsn) as conn:
        chain = chain_of(conn, schema)
        begun = _begun(conn, schema, chain, live_path)
        if begun is None:
            refuse_partial_pass(conn, schema, chain, "rollback during the overlap")
        if chain.migrate_sha256 != expected_sha256:
            raise SourceError(
                f"the latest migrate run on the target ({chain.migrate_run_id}) loaded "
                f"{chain.migrate_sha256}, but migrate_manifest recorded {expected_sha256}: "
                "give the manifest of the run that migrated this cutover's snapshot"
            )
        if chain.last_pass == 0:
            base_file = migrated
        else:
            base_file = Path(state_dir) / SNAPSHOT_NAME.format(sha256=chain.base_sha256)
        carried = _marker(live_path, chain.base_sha256, busy_timeout_s)
        if carried is not None and begun is None:
            raise BaseNotCurrentError(
                f"{live_path}: a rollback already carried PostgreSQL's changes since base "
                f"{chain.base_sha256[:16]}… into this file (its table {MARKER_TABLE} says so), "
                "though the target has no record of it; carrying them again would count them "
                "twice. Nothing was changed"
            )
        parameters = {
            "mode": "overlap",
            "migrate_run_id": chain.migrate_run_id,
            "catchup_pass": chain.last_pass,
            "base_path": str(base_file),
            "base_sha256": chain.base_sha256,
            "live_sqlite_path": str(live_path),
        }
        name = f"{run_id or chain.migrate_run_id}-rollback-overlap"
        row = functools.partial(
            RunRow,
            step="rollback",
            started_at=started_at,
            source_path=str(live_path),
            source_sha256=chain.base_sha256,
            source_timezone=getattr(rules.zone, "key", str(rules.zone)),
            operator=operator,
            host=socket.gethostname(),
        )
        if carried is None:
            delta, unchanged = _delta_since_base(conn, base_file, chain, rules, schema)
            _refuse_going_back(delta, base_file, live_path)
            if begun is None:
                _record_intent(
                    conn,
                    schema,
                    chain,
                    row(run_id=f"{name}-intent", parameters={**parameters, "state": "intent"}),
                )
            merged = _merge_into_sqlite(live_path, delta, rules, chain, busy_timeout_s, unchanged)
        else:  # a re-run after the SQLite side committed: only the record is left to write
            merged = carried
        done = row(
            run_id=name,
            rows_read=merged.rows_read,
            inserted=merged.kinds[M.INSERTED],
            unchanged=merged.unchanged,
            updated=merged.kinds[M.CHANGED],
            parameters={**parameters, "state": "done", "counts": merged.counts},
        )
        _record_done(conn, dsn, schema, chain, done, live_path, merged)
    return LiveRollbackResult(
        live_sqlite_path=str(live_path),
        migrate_run_id=chain.migrate_run_id,
        catchup_pass=chain.last_pass,
        base_path=str(base_file),
        base_sha256=chain.base_sha256,
        inserted=merged.kinds[M.INSERTED],
        changed=merged.kinds[M.CHANGED],
        ended=merged.kinds[M.ENDED],
        stays_ended=merged.kinds[M.STAYS_ENDED],
        conflicts=merged.conflicts,
        left_rejected=merged.rejected,
        unchanged=merged.unchanged + merged.kinds[M.UNCHANGED] + merged.kinds[M.NOTHING],
        examples=merged.examples,
        locked_seconds=merged.locked_seconds,
        seconds=time.perf_counter() - started,
        completed_earlier=carried is not None,
    )


@dataclass
class Merged:
    """What the SQLite side did (also kept in the live file's marker, for a re-run that only
    has the record left to write)."""

    kinds: Counter[str]
    conflicts: int
    rejected: int
    unchanged: int
    rows_read: int
    examples: dict[str, tuple[str, ...]] = field(default_factory=dict)
    locked_seconds: float = 0.0

    @property
    def counts(self) -> dict[str, int]:
        return {
            **{k: self.kinds[k] for k in (M.INSERTED, M.CHANGED, M.ENDED, M.STAYS_ENDED)},
            "conflicts": self.conflicts,
            "left_rejected": self.rejected,
            "unchanged": self.unchanged,
            "rows_read": self.rows_read,
        }


def _begun(
    conn: psycopg.Connection, schema: str, chain: Any, live_path: Path
) -> dict[str, Any] | None:
    """The intent of a rollback begun on this chain and not finished (None: none). Refused:
    a finished rollback (a second would carry the changes twice) and one begun into another
    file (finish that one first)."""
    rows = conn.execute(
        sql.SQL(
            "SELECT run_id, parameters FROM {} WHERE step = 'rollback' "
            "AND parameters->>'mode' = 'overlap' AND parameters->>'migrate_run_id' = %s"
        ).format(sql.Identifier(schema, "session_migration_runs")),
        (chain.migrate_run_id,),
    ).fetchall()
    intent = None
    for run, params in rows:
        if params.get("state") != "intent":  # "done", or a row from before intents existed
            raise BaseNotCurrentError(
                f"a rollback already carried PostgreSQL's changes into the live file: run {run} "
                f"rolled the target back after migrate run {chain.migrate_run_id}; no second "
                "rollback may follow it (its changes would count twice). Nothing was changed"
            )
        intent = (run, params)
    if intent is None:
        return None
    run, params = intent
    if params.get("live_sqlite_path") != str(live_path):
        raise ParameterError(
            f"run {run} began a rollback into {params.get('live_sqlite_path')} and did not "
            f"finish it; finish that one first: run the same command with live_sqlite_path="
            f"{params.get('live_sqlite_path')}. Nothing was changed"
        )
    return dict(params)


def _delta_since_base(
    conn: psycopg.Connection, base_file: Path, chain: Any, rules: Rules, schema: str
) -> tuple[list[tuple[str, M.Row | None, M.Row | None]], int]:
    if not base_file.is_file():
        raise ParameterError(
            f"{base_file}: the snapshot catch-up pass {chain.last_pass} carried (sha256 "
            f"{chain.base_sha256}) is not there; give the state_dir the passes used"
        )
    with open_backup(base_file) as base:
        if base.sha256 != chain.base_sha256:
            raise SourceError(
                f"{base_file}: sha256 {base.sha256}, but the last pass recorded "
                f"{chain.base_sha256}; it is not the base PostgreSQL holds"
            )
        rejects = rejects_of_run(conn, schema, chain.migrate_run_id) if chain.last_pass == 0 else {}
        with conn.transaction():
            # One snapshot of PostgreSQL; only a temporary table is written.
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            delta, unchanged = _pg_delta(conn, base, rules, schema, rejects)
        base.verify_unchanged()
    return delta, unchanged


def _refuse_going_back(
    delta: list[tuple[str, M.Row | None, M.Row | None]], base_file: Path, live_path: Path
) -> None:
    back = M.going_back(delta)
    if back:
        raise SourceError(
            f"PostgreSQL is not a later state of the base {base_file}: "
            f"{M.describe_going_back(back)}. The app only counts requests up and never "
            "changes created_at, so PostgreSQL was changed by hand or is another database; "
            f"carrying it into {live_path} would count requests back down. Nothing was "
            "changed; find out what changed PostgreSQL first"
        )


def _record_intent(conn: psycopg.Connection, schema: str, chain: Any, row: RunRow) -> None:
    """Step 1 of the protocol: the intent, committed before the live file is touched, under the
    commit lock and with the chain read again (a catch-up pass whose migration lock was lost
    may have committed meanwhile). From its commit on, no catch-up pass can commit."""
    try:
        with conn.transaction():
            conn.execute("SELECT pg_catalog.set_config('lock_timeout', %s, true)", ("30s",))
            commit_lock(conn, schema)
            if chain_of(conn, schema) != chain:
                raise BaseNotCurrentError(
                    "a catch-up pass committed since this rollback read PostgreSQL; nothing was "
                    "changed — run the same command again"
                )
            refuse_after_rollback(conn, schema, chain, what="second rollback")
            refuse_partial_pass(conn, schema, chain, "rollback during the overlap")
            write_run(conn, schema, row)
    except psycopg.errors.UniqueViolation:
        raise BaseNotCurrentError(
            "another rollback during the overlap of this cutover was begun meanwhile; nothing "
            "was changed in the live file — run the same command again to finish it"
        ) from None
    except psycopg.Error as exc:
        raise TransientTargetError(
            f"the rollback's intent could not be recorded in PostgreSQL ({_first_line(exc)}); "
            "the live SQLite file was not touched — run the same command again"
        ) from None


def _recorded(dsn: str, schema: str, run_id: str) -> bool:
    """Whether audit row ``run_id`` is in the target, asked on a new connection (False when
    the target cannot be asked: the caller then says the record is missing, and a re-run
    settles it)."""
    try:
        with _connect(dsn) as conn:
            return (
                conn.execute(
                    sql.SQL("SELECT 1 FROM {} WHERE run_id = %s").format(
                        sql.Identifier(schema, "session_migration_runs")
                    ),
                    (run_id,),
                ).fetchone()
                is not None
            )
    except (psycopg.Error, OSError, TargetError):
        return False


def _record_done(
    conn: psycopg.Connection,
    dsn: str,
    schema: str,
    chain: Any,
    row: RunRow,
    live_path: Path,
    merged: Merged,
) -> None:
    """Step 3: the rollback's record, once (a re-run that finds it written says so)."""
    try:
        with conn.transaction():
            write_run(conn, schema, row)
    except (psycopg.Error, OSError) as exc:
        if _recorded(dsn, schema, row.run_id):
            return  # the COMMIT went through; only its answer was lost
        counts = ", ".join(f"{v} {k}" for k, v in merged.counts.items() if v)
        raise TransientTargetError(
            f"the live SQLite file {live_path} WAS changed ({counts or 'no session differed'}; "
            f"its table {MARKER_TABLE} records base {chain.base_sha256[:16]}…), but PostgreSQL's "
            f"record of the rollback could not be written ({_first_line(exc)}). No catch-up "
            "pass can run meanwhile (the recorded intent and the file's marker refuse it). Run "
            "the same command again: it finds the marker and completes the record"
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return redact(text.splitlines()[0]) if text else type(exc).__name__


def _marker(live_path: Path, base_sha256: str, busy_timeout_s: float) -> Merged | None:
    """What a rollback on ``base_sha256`` recorded in the live file's marker (None: not
    carried). Read-only; waits for the old colour's write like any reader."""
    uri = live_path.resolve().as_uri() + "?mode=ro"
    try:
        live = sqlite3.connect(uri, uri=True, timeout=busy_timeout_s)
    except sqlite3.Error as exc:
        raise SourceError(f"{live_path}: cannot be opened ({exc})") from None
    try:
        if not live.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (MARKER_TABLE,)
        ).fetchone():
            return None
        columns = {r[1] for r in live.execute(f"PRAGMA table_info({MARKER_TABLE})")}
        counts = "counts" if "counts" in columns else "NULL"
        found = live.execute(
            f"SELECT {counts} FROM {MARKER_TABLE} WHERE base_sha256 = ?", (base_sha256,)
        ).fetchone()
    except sqlite3.Error as exc:
        raise SourceError(f"{live_path}: its rollback marker cannot be read ({exc})") from None
    finally:
        live.close()
    if found is None:
        return None
    kept = json.loads(found[0]) if found[0] else {}
    kinds = Counter(
        {k: int(kept.get(k, 0)) for k in (M.INSERTED, M.CHANGED, M.ENDED, M.STAYS_ENDED)}
    )
    return Merged(
        kinds,
        int(kept.get("conflicts", 0)),
        int(kept.get("left_rejected", 0)),
        int(kept.get("unchanged", 0)),
        int(kept.get("rows_read", 0)),
    )


def _merge_into_sqlite(
    live_path: Path,
    delta: list[tuple[str, M.Row | None, M.Row | None]],
    rules: Rules,
    chain: Any,
    busy_timeout_s: float,
    unchanged: int,
) -> Merged:
    """Step 2, the SQLite side: one IMMEDIATE transaction that reads each touched session as
    the old colour left it, merges, writes, proves and records the base (with its counts, for a
    re-run that only has the record left to write); rolled back on any mismatch."""
    live = sqlite3.connect(live_path, timeout=busy_timeout_s, isolation_level=None)
    live.text_factory = bytes
    kinds: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}
    conflicts = rejected = 0
    try:
        live.execute("BEGIN IMMEDIATE")  # waits for the old colour's write, as it waits for ours
        locked = time.perf_counter()
        try:
            if _already_carried(live, chain.base_sha256):
                raise BaseNotCurrentError(
                    f"{live_path}: a rollback already carried PostgreSQL's changes since base "
                    f"{chain.base_sha256[:16]}… into this file; carrying them again would count "
                    "them twice. Nothing was changed"
                )
            expected: list[tuple[str, M.Row | None]] = []
            for sid, base_row, pg_row in delta:
                target, refused = _sqlite_row(live, sid, rules)
                if refused:
                    rejected += 1
                    continue
                outcome = M.merge(base_row, pg_row, target)
                kinds[outcome.kind] += 1
                conflicts += bool(outcome.conflicts)
                shown = examples.setdefault(outcome.kind, [])
                if len(shown) < 3:
                    shown.append(mask_id(sid))
                _write(live, outcome, target, sid, rules.zone)
                expected.append((sid, outcome.row))
            problems = [
                mask_id(sid) for sid, row in expected if _sqlite_row(live, sid, rules)[0] != row
            ]
            if problems:
                raise VerdictFailed(
                    f"the merged rows of {len(problems)} sessions ({', '.join(problems[:5])}) "
                    "differ from the rules' outcome when read back; nothing was changed"
                )
            merged = Merged(kinds, conflicts, rejected, unchanged, len(delta))
            live.execute(
                f"CREATE TABLE IF NOT EXISTS {MARKER_TABLE} (base_sha256 TEXT PRIMARY KEY, "
                "migrate_run_id TEXT NOT NULL, catchup_pass INTEGER NOT NULL, "
                "carried_at TEXT NOT NULL, counts TEXT)"
            )
            live.execute(
                f"INSERT INTO {MARKER_TABLE} (base_sha256, migrate_run_id, catchup_pass, "
                "carried_at, counts) VALUES (?, ?, ?, ?, ?)",
                (
                    chain.base_sha256,
                    chain.migrate_run_id,
                    chain.last_pass,
                    datetime.now(UTC).isoformat(),
                    json.dumps(merged.counts),
                ),
            )
            live.execute("COMMIT")
        except BaseException:
            live.execute("ROLLBACK")
            raise
        merged.examples = {k: tuple(v) for k, v in examples.items()}
        merged.locked_seconds = time.perf_counter() - locked
        return merged
    except sqlite3.OperationalError as exc:
        raise SourceError(
            f"{live_path}: the merge could not write ({exc}); nothing was changed — if the old "
            f"colour held its write lock longer than {busy_timeout_s:.0f} s, run again"
        ) from None
    finally:
        live.close()


class BaseNotCurrentError(ParameterError):
    """A rollback on a base whose PostgreSQL changes this file already holds: refused."""


def _connect(dsn: str) -> psycopg.Connection:
    # autocommit: ``conn.transaction()`` is then a real BEGIN, whose isolation level we set.
    return connect(dsn, "rollback", autocommit=True, connect_timeout=15)
