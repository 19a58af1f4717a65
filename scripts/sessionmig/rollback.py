"""Roll back to the SQLite store without logging anyone out, and finalize once it is safe.

Rollback restores the reviewed backup (its sha256 must be the one the migrate run recorded) to a
new file, then carries back what PostgreSQL learned since the migration — sessions created,
changed (validated, extended) or ended (logout, cleanup) — in the legacy format (naive wall-clock
times in ``source_timezone``). Rejected rows stay as they were. The file appears at its target
path only when complete. Finalize archives the live SQLite file (moved, hashed, never deleted)
only after a reconcile PASS and a soak period.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from . import merge as M
from . import params as P
from .audit import RunRow, write_run
from .connect import connect
from .copyin import stream_backup
from .errors import ParameterError, SourceError, VerdictFailed
from .expected import ExpectedPath
from .jsonb import metadata_text
from .load import migration_lock
from .manifest import verify
from .mask import mask_id
from .reconcile import field_diff, latest_migrate_run, rejects_of_run
from .source import Backup, hash_files, open_backup, sha256_file, shaped
from .transform import COLUMNS, Reject, Rules, normalise
from .verdict import Verdict

OK_VERDICTS = (Verdict.PASS, Verdict.PASS_WITH_WARNINGS)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """A run's manifest (the file or its run directory), checked against tampering first."""
    file = Path(path)
    if file.is_dir():
        file = file / "manifest.json"
    if not file.exists():
        raise ParameterError(f"{file}: no manifest here; give the run folder of the step's run")
    result = verify(file.parent)
    if not result.ok:
        raise VerdictFailed(
            f"{file.parent}: the reports were altered: {'; '.join(result.problems)}"
        )
    return json.loads(file.read_text(encoding="utf-8"))


def migrated_sha256(manifest: dict[str, Any]) -> str:
    """The backup's sha256 as the run that migrated it recorded."""
    steps = {s["name"]: s for s in manifest.get("steps", [])}
    if steps.get("migrate", {}).get("status") != "passed":
        raise ParameterError("the manifest given as migrate_manifest has no passed migrate step")
    return manifest["source"]["sha256_before"]


@dataclass(frozen=True)
class RollbackResult:
    """What the rollback did to the restored file."""

    restore_path: str
    backup_sha256: str
    restored_sha256: str
    carried_new: int
    carried_changed: int
    carried_ended: int
    kept: int


def _legacy_text(moment: datetime, zone: tzinfo) -> str:
    return moment.astimezone(zone).replace(tzinfo=None).isoformat(" ")


def legacy_row(row: tuple, zone: tzinfo) -> tuple:
    """A PostgreSQL row as the legacy app would have written it."""
    sid, user, meta, created, expires, last, count = row
    return (
        sid,
        user,
        meta,
        _legacy_text(created, zone),
        _legacy_text(expires, zone),
        _legacy_text(last, zone),
        count,
    )


def _target_rows(conn: psycopg.Connection, schema: str, batch: int) -> Iterator[tuple]:
    query = sql.SQL(
        """SELECT session_id, user_id, metadata::text, created_at, expires_at, last_activity,
                  request_count FROM {} ORDER BY session_id COLLATE "C" """
    ).format(sql.Identifier(schema, "sessions"))
    with conn.cursor(name="sessionmig_rollback") as cur:
        cur.itersize = batch
        cur.execute(query)
        yield from cur


def _carry_back(
    conn: psycopg.Connection,
    backup: Backup,
    restored: sqlite3.Connection,
    rules: Rules,
    schema: str,
    batch: int,
) -> tuple[int, int, int, int]:
    """Merge-join the backup and PostgreSQL in key order; write PostgreSQL's truth back."""
    rejects = rejects_of_run(conn, schema, latest_migrate_run(conn, schema))
    target_iter = _target_rows(conn, schema, batch)
    target = next(target_iter, None)
    new = changed = ended = kept = 0
    insert = "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?)"
    update = (
        "UPDATE sessions SET user_id = ?, metadata = ?, created_at = ?, expires_at = ?, "
        "last_activity = ?, request_count = ? WHERE session_id = ?"
    )
    for rows in backup.rows(batch, order="session_id", extra=rules.extra_columns):
        for raw in rows:
            if raw[0] in rejects:
                kept += 1
                continue
            result = normalise(raw, rules)
            if isinstance(result, Reject):
                kept += 1
                continue
            key = result.session_id
            while target is not None and target[0] < key:
                restored.execute(insert, legacy_row(target, rules.zone))
                new += 1
                target = next(target_iter, None)
            if target is not None and target[0] == key:
                if field_diff(result, target):
                    legacy = legacy_row(target, rules.zone)
                    restored.execute(update, (*legacy[1:], key))
                    changed += 1
                else:
                    kept += 1
                target = next(target_iter, None)
            else:
                restored.execute("DELETE FROM sessions WHERE rowid = ?", (raw[0],))
                ended += 1
    while target is not None:
        restored.execute(insert, legacy_row(target, rules.zone))
        new += 1
        target = next(target_iter, None)
    return new, changed, ended, kept


def rollback(
    backup_path: str | Path,
    restore_path: str | Path,
    expected_sha256: str,
    dsn: str,
    rules: Rules,
    *,
    schema: str = P.default("target_schema"),
    confirm: bool = False,
    batch_rows: int = P.default("batch_rows"),
) -> RollbackResult:
    """Restore the backup to ``restore_path`` and carry back PostgreSQL's sessions."""
    target = Path(restore_path).resolve()
    if target == Path(backup_path).resolve():
        raise ParameterError(
            "restore_path is the backup itself; the backup is evidence and is "
            "never written: restore to the app's sessions.db path instead"
        )
    if target.exists() and not confirm:
        raise ParameterError(
            f"restore_path {target} exists; rerun with -p confirm=true to "
            "replace it (its current content is then lost)"
        )
    with open_backup(backup_path) as backup:
        if backup.sha256 != expected_sha256:
            raise SourceError(
                f"{backup_path}: sha256 is {backup.sha256}, but the migrate run recorded "
                f"{expected_sha256}; this is not the backup that was migrated"
            )
        partial = target.with_name(target.name + ".sessionmig-partial")
        partial.unlink(missing_ok=True)
        restored = sqlite3.connect(partial)
        try:
            backup.connection.backup(restored)  # one self-contained file, WAL folded in
            with connect(dsn, "rollback") as conn, restored:
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                counts = _carry_back(conn, backup, restored, rules, schema, batch_rows)
        finally:
            restored.close()
        backup.verify_unchanged()
        for side in ("-wal", "-shm", "-journal"):
            Path(str(target) + side).unlink(missing_ok=True)
        os.replace(partial, target)
    return RollbackResult(str(target), backup.sha256, sha256_file(target), *counts)


# --- rollback during a live cutover's overlap --------------------------------------------------

MARKER_TABLE = "sessionmig_rollback_passes"
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
    schema: str = P.default("target_schema"),
    run_id: str | None = None,
    operator: str | None = None,
    busy_timeout_s: float = BUSY_TIMEOUT_S,
) -> LiveRollbackResult:
    """Roll back during a live cutover's overlap: carry PostgreSQL's changes since the base
    into the SQLite file the old colour still serves from, by the catch-up's merge rules
    (:func:`sessionmig.merge.merge`) in the other direction — base = the snapshot last carried
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
    from .catchup import _SNAPSHOT_NAME, chain_of, refuse_after_rollback

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
        # The live file's own marker can be lost (a file restored from before, a table
        # dropped): the target's audit row of a committed rollback is the record that holds.
        try:
            refuse_after_rollback(conn, schema, chain, what="second rollback")
        except ParameterError as exc:
            raise BaseNotCurrentError(
                f"a rollback already carried PostgreSQL's changes into the live file: {exc}. "
                "Nothing was changed"
            ) from None
        if chain.migrate_sha256 != expected_sha256:
            raise SourceError(
                f"the latest migrate run on the target ({chain.migrate_run_id}) loaded "
                f"{chain.migrate_sha256}, but migrate_manifest recorded {expected_sha256}: "
                "give the manifest of the run that migrated this cutover's snapshot"
            )
        if chain.last_pass == 0:
            base_file = migrated
        else:
            base_file = Path(state_dir) / _SNAPSHOT_NAME.format(sha256=chain.base_sha256)
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
            rejects = (
                rejects_of_run(conn, schema, chain.migrate_run_id) if chain.last_pass == 0 else {}
            )
            with conn.transaction():
                # One snapshot of PostgreSQL; only a temporary table is written.
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                delta, unchanged = _pg_delta(conn, base, rules, schema, rejects)
            base.verify_unchanged()
        back = M.going_back(delta)
        if back:
            raise SourceError(
                f"PostgreSQL is not a later state of the base {base_file}: "
                f"{M.describe_going_back(back)}. The app only counts requests up and never "
                "changes created_at, so PostgreSQL was changed by hand or is another database; "
                f"carrying it into {live_path} would count requests back down. Nothing was "
                "changed; find out what changed PostgreSQL first"
            )
        result = _merge_into_sqlite(live_path, delta, rules, chain, busy_timeout_s)
        kinds, conflicts, rejected, examples, locked = result
        record_row = RunRow(
            run_id=f"{run_id or chain.migrate_run_id}-rollback-overlap",
            step="rollback",
            started_at=started_at,
            source_path=str(live_path),
            source_sha256=chain.base_sha256,
            source_timezone=getattr(rules.zone, "key", str(rules.zone)),
            rows_read=len(delta),
            inserted=kinds[M.INSERTED],
            unchanged=unchanged,
            updated=kinds[M.CHANGED],
            parameters={
                "mode": "overlap",
                "migrate_run_id": chain.migrate_run_id,
                "catchup_pass": chain.last_pass,
                "base_path": str(base_file),
                "base_sha256": chain.base_sha256,
                "live_sqlite_path": str(live_path),
                "counts": {k: kinds[k] for k in (M.INSERTED, M.CHANGED, M.ENDED, M.STAYS_ENDED)},
            },
            operator=operator,
            host=socket.gethostname(),
        )
        with conn.transaction():
            write_run(conn, schema, record_row)
    return LiveRollbackResult(
        live_sqlite_path=str(live_path),
        migrate_run_id=chain.migrate_run_id,
        catchup_pass=chain.last_pass,
        base_path=str(base_file),
        base_sha256=chain.base_sha256,
        inserted=kinds[M.INSERTED],
        changed=kinds[M.CHANGED],
        ended=kinds[M.ENDED],
        stays_ended=kinds[M.STAYS_ENDED],
        conflicts=conflicts,
        left_rejected=rejected,
        unchanged=unchanged + kinds[M.UNCHANGED] + kinds[M.NOTHING],
        examples=examples,
        locked_seconds=locked,
        seconds=time.perf_counter() - started,
    )


def _merge_into_sqlite(
    live_path: Path,
    delta: list[tuple[str, M.Row | None, M.Row | None]],
    rules: Rules,
    chain: Any,
    busy_timeout_s: float,
) -> tuple[Counter[str], int, int, dict[str, tuple[str, ...]], float]:
    """The SQLite side: one IMMEDIATE transaction that reads each touched session as the old
    colour left it, merges, writes, proves and records the base; rolled back on any mismatch."""
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
            live.execute(
                f"CREATE TABLE IF NOT EXISTS {MARKER_TABLE} (base_sha256 TEXT PRIMARY KEY, "
                "migrate_run_id TEXT NOT NULL, catchup_pass INTEGER NOT NULL, "
                "carried_at TEXT NOT NULL)"
            )
            live.execute(
                f"INSERT INTO {MARKER_TABLE} VALUES (?, ?, ?, ?)",
                (
                    chain.base_sha256,
                    chain.migrate_run_id,
                    chain.last_pass,
                    datetime.now(UTC).isoformat(),
                ),
            )
            live.execute("COMMIT")
        except BaseException:
            live.execute("ROLLBACK")
            raise
        return (
            kinds,
            conflicts,
            rejected,
            {k: tuple(v) for k, v in examples.items()},
            time.perf_counter() - locked,
        )
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


def record(
    dsn: str,
    schema: str,
    step: str,
    run_id: str,
    path: str,
    sha256: str,
    zone: str,
    counts: dict[str, int],
    parameters: dict[str, Any],
    operator: str | None,
    host: str | None,
    started: datetime,
) -> None:
    """One audit row in ``session_migration_runs`` for a rollback or finalize."""
    row = RunRow(
        run_id=f"{run_id}-{step}",
        step=step,
        started_at=started,
        source_path=path,
        source_sha256=sha256,
        source_timezone=zone,
        rows_read=counts.get("rows", 0),
        inserted=counts.get("inserted", 0),
        unchanged=counts.get("unchanged", 0),
        updated=counts.get("updated", 0),
        parameters=parameters,
        operator=operator,
        host=host,
    )
    with connect(dsn, "rollback") as conn:
        write_run(conn, schema, row)


@dataclass(frozen=True)
class FinalizeResult:
    archived_to: str
    files: tuple[tuple[str, str], ...]  # (archived path, sha256)


def finalize(
    live_path: str | Path,
    archive_dir: str | Path,
    reconcile_manifest: dict[str, Any],
    soak_hours: float,
    now: datetime,
    run_id: str,
) -> FinalizeResult:
    """Archive the live SQLite file after a reconcile PASS and the soak period."""
    steps = {s["name"]: s for s in reconcile_manifest.get("steps", [])}
    step = steps.get("reconcile")
    if not step or step.get("status") != "passed" or step.get("verdict") not in OK_VERDICTS:
        raise VerdictFailed(
            "finalize needs a reconcile PASS: the manifest given as "
            "reconcile_manifest has none; reconcile first"
        )
    finished = datetime.fromisoformat(reconcile_manifest["finished_at"])
    ready = finished + timedelta(hours=soak_hours)
    if now < ready:
        left = (ready - now) / timedelta(hours=1)
        raise VerdictFailed(
            f"the soak period is not over: {left:.1f} h left (until "
            f"{ready.astimezone(UTC).isoformat()}); watch the app until then"
        )
    live = Path(live_path)
    if not live.is_file():
        raise ParameterError(f"live_sqlite_path {live}: no such file (already archived?)")
    archive = Path(archive_dir)
    archive.mkdir(parents=True, exist_ok=True)
    before = hash_files(live)
    moved = []
    for item in before:
        source = Path(item.path)
        destination = archive / f"{live.stem}-{run_id}{source.name[len(live.stem) :]}"
        if destination.exists():
            raise ParameterError(f"{destination} exists; nothing was moved")
        moved.append((source, destination, item.sha256))
    for source, destination, _ in moved:
        shutil.move(source, destination)
    files = tuple((str(d), sha256_file(d)) for _, d, _ in moved)
    if any(h != d[1] for (_, _, h), d in zip(moved, files, strict=True)):
        raise SourceError(
            "the archived copy's sha256 differs from the live file's; check the "
            "archive disk before anything else"
        )
    return FinalizeResult(files[0][0], files)
