"""Roll back to the SQLite store without logging anyone out, and finalize once it is safe.

Rollback restores the reviewed backup (its sha256 must be the one the migrate run recorded) to a
new file, then carries back what PostgreSQL learned since the migration — sessions created,
changed (validated, extended) or ended (logout, cleanup) — in the legacy format (naive wall-clock
times in ``source_timezone``). Rejected rows stay as they were. The file appears at its target
path only when complete. Finalize archives the live SQLite file (moved, hashed, never deleted)
only after a reconcile PASS and a soak period.

Both act on a run folder given by the operator; the steps read it only through
:func:`sessionmig.runbook.manifest.read_trusted` (its digest must be the one the run recorded in the
target), never through :func:`sessionmig.runbook.manifest.read_manifest`, which checks the folder's
own hashes alone.

Both are re-runnable after a fault at any point. Each write is recorded in PostgreSQL by one
audit row (``run_id`` is its primary key, so it exists at most once), after the files:

- **finalize** writes its intent beside the archive (``<stem>-<run_id>.sessionmig-finalize.json``:
  the live file's path, each file's sha256 and destination) before it moves anything. A re-run
  that finds an intent without its audit row completes that move and records it under the
  intent's run id; one whose audit row exists says the file is archived and recorded already.
- **rollback** (restore) writes ``<restore_path>.sessionmig-rollback.json`` (its run, the
  restored file's sha256, its counts) before the restored file appears. A re-run that finds
  that very file there, unrecorded, restores afresh and records once; recorded, it reconciles
  it again without a second restore or a second row.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import sqlite3
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from sessionmig import defaults as D
from sessionmig.engines.reconcile import field_diff, latest_migrate_run, rejects_of_run
from sessionmig.errors import (
    ParameterError,
    SessionmigError,
    SourceError,
    TargetError,
    VerdictFailed,
)
from sessionmig.postgres.audit import RunRow, write_run
from sessionmig.postgres.connect import connect, failure_text
from sessionmig.rules.transform import Reject, Rules, normalise
from sessionmig.rules.verdict import Verdict
from sessionmig.sqlite.source import Backup, hash_files, open_backup, sha256_file

log = logging.getLogger(__name__)

OK_VERDICTS = (Verdict.PASS, Verdict.PASS_WITH_WARNINGS)
FINALIZE_INTENT = ".sessionmig-finalize.json"
RESTORE_MARK = ".sessionmig-rollback.json"
PARTIAL = ".sessionmig-partial"


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
    run_id: str = ""  # the run that wrote the restored file
    recorded_at: str | None = None  # set when an earlier run's recorded restore was re-checked


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


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """``data`` at ``path``, whole or not at all (written beside it, synced, renamed)."""
    partial = path.with_name(path.name + PARTIAL)
    with partial.open("w", encoding="utf-8") as out:
        json.dump(data, out, indent=2, default=str)
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, path)
    _fsync_dir(path.parent)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def restore_mark(restore_path: str | Path) -> Path:
    """Where a rollback says which run wrote the file at ``restore_path``."""
    target = Path(restore_path).resolve()
    return target.with_name(target.name + RESTORE_MARK)


def earlier_restore(restore_path: str | Path) -> dict[str, Any] | None:
    """What the rollback that wrote ``restore_path`` said of it, when the file there is still
    exactly that file (its sha256); None when there is no such file, no mark, or it changed."""
    target = Path(restore_path).resolve()
    mark = _read_json(restore_mark(target))
    if not mark or not mark.get("run_id") or mark.get("restore_path") != str(target):
        return None
    if not target.is_file():
        return None
    return mark if sha256_file(target) == mark.get("restored_sha256") else None


def rollback(
    backup_path: str | Path,
    restore_path: str | Path,
    expected_sha256: str,
    dsn: str,
    rules: Rules,
    *,
    schema: str = D.TARGET_SCHEMA,
    confirm: bool = False,
    batch_rows: int = D.BATCH_ROWS,
    run_id: str = "",
    replaceable: bool = False,
) -> RollbackResult:
    """Restore the backup to ``restore_path`` and carry back PostgreSQL's sessions.

    ``replaceable``: the file at ``restore_path`` is an earlier rollback's, unrecorded and
    untouched since (:func:`earlier_restore`); it is replaced without ``confirm``. Before the
    restored file appears, :func:`restore_mark` names this run and the file's sha256."""
    target = Path(restore_path).resolve()
    if target == Path(backup_path).resolve():
        raise ParameterError(
            "restore_path is the backup itself; the backup is evidence and is "
            "never written: restore to the app's sessions.db path instead"
        )
    if target.exists() and not confirm and not replaceable:
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
        partial = target.with_name(target.name + PARTIAL)
        partial.unlink(missing_ok=True)
        try:
            counts, sha = _restore_into(partial, backup, dsn, rules, schema, batch_rows)
            backup.verify_unchanged()
            _write_json(
                restore_mark(target),
                {
                    "run_id": run_id,
                    "restore_path": str(target),
                    "backup_sha256": backup.sha256,
                    "restored_sha256": sha,
                    "counts": dict(zip(("new", "changed", "ended", "kept"), counts, strict=True)),
                    "written_at": datetime.now(UTC).isoformat(),
                },
            )
            for side in ("-wal", "-shm", "-journal"):
                Path(str(target) + side).unlink(missing_ok=True)
            os.replace(partial, target)
        except BaseException:
            partial.unlink(missing_ok=True)  # whatever stopped it: no half-made file is left
            raise
        _fsync_dir(target.parent)
    return RollbackResult(str(target), backup.sha256, sha, *counts, run_id=run_id)


def _restore_into(
    partial: Path, backup: Backup, dsn: str, rules: Rules, schema: str, batch_rows: int
) -> tuple[tuple[int, int, int, int], str]:
    """The backup with PostgreSQL's sessions carried back, written to ``partial``: the counts
    and the file's sha256. A failure to read PostgreSQL says nothing was written or recorded."""
    restored = sqlite3.connect(partial)
    try:
        backup.connection.backup(restored)  # one self-contained file, WAL folded in
        with connect(dsn, "rollback") as conn, restored:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            counts = _carry_back(conn, backup, restored, rules, schema, batch_rows)
    except psycopg.Error as exc:
        raise TargetError(
            f"rollback stopped while reading PostgreSQL ({failure_text(exc)}): nothing was "
            f"written at {partial.with_name(partial.name.removesuffix(PARTIAL))} and nothing "
            "was recorded; run the same command again"
        ) from None
    finally:
        restored.close()
    return counts, sha256_file(partial)


def earlier_result(mark: dict[str, Any], recorded_at: str) -> RollbackResult:
    """The restore an earlier run wrote and recorded, as that run described it."""
    counts = mark.get("counts") or {}
    return RollbackResult(
        mark["restore_path"],
        mark["backup_sha256"],
        mark["restored_sha256"],
        int(counts.get("new", 0)),
        int(counts.get("changed", 0)),
        int(counts.get("ended", 0)),
        int(counts.get("kept", 0)),
        run_id=str(mark.get("run_id", "")),
        recorded_at=recorded_at,
    )


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


def recorded_at(conn: psycopg.Connection, schema: str, step: str, run_id: str) -> str | None:
    """When the audit row of ``run_id``'s ``step`` (as :func:`record` writes it) was written;
    None when the target has none."""
    exists = conn.execute(
        "SELECT to_regclass(format('%%I.%%I', %s::text, 'session_migration_runs')) IS NOT NULL",
        (schema,),
    ).fetchone()
    if not exists or not exists[0]:
        return None
    row = conn.execute(
        sql.SQL("SELECT finished_at FROM {} WHERE run_id = %s").format(
            sql.Identifier(schema, "session_migration_runs")
        ),
        (f"{run_id}-{step}",),
    ).fetchone()
    return row[0].isoformat() if row else None


def _asked(dsn: str, schema: str, step: str, run_id: str) -> str | None | bool:
    """:func:`recorded_at` on a connection of its own; False when the target cannot be asked."""
    try:
        with connect(dsn, "rollback", autocommit=True, connect_timeout=5) as conn:
            return recorded_at(conn, schema, step, run_id)
    except (psycopg.Error, SessionmigError):
        return False


def record_once(
    dsn: str, schema: str, step: str, run_id: str, done: str, again: str, **row: Any
) -> None:
    """:func:`record`, saying truthfully what is left when it fails.

    ``done`` says what was already written to disk. When the write fails, the target is asked
    again on a new connection: a row that is there (its commit's reply was lost) is the record,
    never written twice (``run_id`` is the primary key); otherwise the error says whether the
    row was written, or that nobody can tell, and ``again`` what to do."""
    try:
        record(dsn, schema, step, run_id, **row)
        return
    except (psycopg.Error, SessionmigError) as exc:  # a unique violation too: asked below
        reason = failure_text(exc)
    when = _asked(dsn, schema, step, run_id)
    if isinstance(when, str):
        log.warning("%s; its audit row was written at %s (the reply was lost)", done, when)
        return
    state = (
        "its audit row was NOT written"
        if when is None
        else "whether its audit row was written is unknown (the target cannot be asked)"
    )
    raise TargetError(f"{done}, but {state}: {reason}; {again}")


@dataclass(frozen=True)
class FinalizeResult:
    archived_to: str
    files: tuple[tuple[str, str], ...]  # (archived path, sha256)
    run_id: str = ""  # the run whose name the archived files carry; its audit row records them
    resumed: bool = False  # an earlier run's move, completed by this one


def finalize_intent(archive_dir: str | Path, live: Path, run_id: str) -> Path:
    """Where finalize writes what it is about to move, before it moves anything."""
    return Path(archive_dir) / f"{live.stem}-{run_id}{FINALIZE_INTENT}"


def finalize_intents(archive_dir: str | Path, live_path: str | Path) -> list[dict[str, Any]]:
    """The finalize intents in ``archive_dir`` for this live file, oldest first."""
    archive, live = Path(archive_dir), Path(live_path).resolve()
    if not archive.is_dir():
        return []
    found = []
    for path in sorted(archive.glob(f"*{FINALIZE_INTENT}")):
        data = _read_json(path)
        if data and data.get("live_path") == str(live) and data.get("files"):
            found.append({**data, "intent": str(path)})
    return sorted(found, key=lambda d: str(d.get("written_at")))


def _move_one(source: Path, destination: Path, sha256: str) -> None:
    """Move one file into the archive, or finish moving it: the destination appears only
    whole (a rename, or a copy beside it renamed into place) and is checked by its sha256."""
    partial = destination.with_name(destination.name + PARTIAL)
    if destination.exists():
        if sha256_file(destination) != sha256:
            raise SourceError(
                f"{destination} is in the archive, but its sha256 is not the live file's "
                f"({sha256}); check the archive disk before anything else"
            )
        if source.exists() and sha256_file(source) == sha256:
            source.unlink()  # copied across file systems, not yet removed
        return
    if not source.exists():
        if partial.exists() and sha256_file(partial) == sha256:
            os.replace(partial, destination)
            _fsync_dir(destination.parent)
            return
        raise SourceError(
            f"{source} is gone and {destination} is not in the archive: look for the file "
            "before anything else"
        )
    if sha256_file(source) != sha256:
        raise SourceError(
            f"{source} changed after finalize hashed it ({sha256}): is the app still "
            "writing to it? Nothing more was moved"
        )
    partial.unlink(missing_ok=True)
    try:
        os.rename(source, destination)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        _copy_across(source, partial, sha256)
        os.replace(partial, destination)
        source.unlink()
    _fsync_dir(destination.parent)


def _copy_across(source: Path, partial: Path, sha256: str) -> None:
    """Copy ``source`` to another file system as ``partial``, synced and checked."""
    shutil.copy2(source, partial)
    with partial.open("rb") as copied:
        os.fsync(copied.fileno())
    if sha256_file(partial) != sha256:
        raise SourceError(
            f"the archive's copy of {source} does not have its sha256 ({sha256}); check "
            "the archive disk before anything else (the live file is still there)"
        )


def _complete(intent: dict[str, Any]) -> FinalizeResult:
    """Finish the move an earlier run's intent describes."""
    for item in intent["files"]:
        _move_one(Path(item["source"]), Path(item["destination"]), item["sha256"])
    files = tuple((item["destination"], item["sha256"]) for item in intent["files"])
    return FinalizeResult(files[0][0], files, str(intent["run_id"]), resumed=True)


def _started(intent: dict[str, Any]) -> bool:
    """Whether anything of the intent's move happened (a file, or a copy, in the archive)."""
    for item in intent["files"]:
        destination = Path(item["destination"])
        if destination.exists() or destination.with_name(destination.name + PARTIAL).exists():
            return True
    return False


def finalize(
    live_path: str | Path,
    archive_dir: str | Path,
    reconcile_manifest: dict[str, Any],
    soak_hours: float,
    now: datetime,
    run_id: str,
    *,
    recorded: Mapping[str, str] | None = None,
) -> FinalizeResult:
    """Archive the live SQLite file after a reconcile PASS and the soak period.

    ``recorded`` maps the run id of each earlier intent for this live file in ``archive_dir``
    (:func:`finalize_intents`) to when its audit row was written; an intent not in it is
    unrecorded. An unrecorded intent whose move began is completed (the result names its run,
    ``resumed``); one whose move never began is dropped. Otherwise the intent is written before
    the first file moves."""
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
    archive = Path(archive_dir)
    known = recorded or {}
    for intent in reversed(finalize_intents(archive, live)):
        when = known.get(str(intent["run_id"]))
        if when is None:
            if _started(intent):
                return _complete(intent)
            Path(intent["intent"]).unlink(missing_ok=True)  # written, nothing moved: start again
        elif not live.exists():
            first = intent["files"][0]
            raise ParameterError(
                f"live_sqlite_path {live}: no such file: run {intent['run_id']} archived it to "
                f"{first['destination']} (sha256 {first['sha256']}) and recorded that at "
                f"{when}; nothing to do"
            )
    if not live.is_file():
        raise ParameterError(f"live_sqlite_path {live}: no such file (already archived?)")
    archive.mkdir(parents=True, exist_ok=True)
    planned = []
    for item in hash_files(live):
        source = Path(item.path)
        destination = archive / f"{live.stem}-{run_id}{source.name[len(live.stem) :]}"
        if destination.exists():
            raise ParameterError(f"{destination} exists; nothing was moved")
        planned.append((source, destination, item.sha256))
    _write_json(
        finalize_intent(archive, live, run_id),
        {
            "run_id": run_id,
            "live_path": str(live.resolve()),
            "reconcile_run_id": reconcile_manifest.get("run_id"),
            "written_at": datetime.now(UTC).isoformat(),
            "files": [
                {"source": os.path.abspath(s), "destination": os.path.abspath(d), "sha256": h}
                for s, d, h in planned
            ],
        },
    )
    for source, destination, sha in planned:
        _move_one(source, destination, sha)
    files = tuple((str(d), h) for _, d, h in planned)
    return FinalizeResult(files[0][0], files, run_id)
