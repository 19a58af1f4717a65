"""Roll back to the SQLite store without logging anyone out, and finalize once it is safe.

Rollback restores the reviewed backup (its sha256 must be the one the migrate run recorded) to a
new file, then carries back what PostgreSQL learned since the migration — sessions created,
changed (validated, extended) or ended (logout, cleanup) — in the legacy format (naive wall-clock
times in ``source_timezone``). Rejected rows stay as they were. The file appears at its target
path only when complete. Finalize archives the live SQLite file (moved, hashed, never deleted)
only after a reconcile PASS and a soak period.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from . import params as P
from .audit import RunRow, write_run
from .connect import connect
from .errors import ParameterError, SourceError, VerdictFailed
from .manifest import verify
from .reconcile import field_diff, latest_migrate_run, rejects_of_run
from .source import Backup, hash_files, open_backup, sha256_file
from .transform import Reject, Rules, normalise
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
