"""The fault matrix for finalize and the rollback from the backup (restore_path).

For each point a fault can land on (before the move, between two files, between the move and the
audit row, at the audit row's commit, after it), the same command is run again. Afterwards the
files and PostgreSQL equal the ledger of acknowledged operations: the live file (and its side
files) in the archive once with their sha256, or the restored file at restore_path; exactly one
audit row naming that very file and sha256; nothing stuck; and the failed run's one-line message
said truthfully whether the file was moved or written and whether the audit row was written.
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from conftest import rows_of

from sessionmig.engines import rollback
from sessionmig.errors import ParameterError, TargetError, TargetUnreachable
from sessionmig.postgres import schema
from sessionmig.runbook import manifest, steps
from sessionmig.sqlite.sample import generate
from sessionmig.sqlite.source import sha256_file

FAULT = "server closed the connection unexpectedly"


def sealed_run(run: Path, dsn: str, step: dict, **data) -> Path:
    """A run folder sealed as a run seals it (``write_index``, ``write_manifest``) with its
    digest recorded in the target, as test_evidence's sealed folders are: a folder ``read_trusted``
    accepts, without running a notebook."""
    run.mkdir(parents=True)
    (run / f"{step['name']}.html").write_text(f"<html>{step['name']}</html>")
    with psycopg.connect(dsn, autocommit=True) as conn:
        body = {
            "run_id": run.name,
            "environment": "env",
            "verdict": step["verdict"],
            "started_at": (datetime.now(UTC) - timedelta(hours=2)).isoformat(),
            "finished_at": (datetime.now(UTC) - timedelta(hours=1)).isoformat(),
            "target_database": manifest.target_identity(conn),
            "steps": [{"status": "passed", "outputs": [], **step}],
            **data,
        }
        manifest.write_index(run, body)
        manifest.write_manifest(run, body)
        sealed = json.loads((run / "manifest.json").read_text())
        with conn.transaction():
            manifest.record_digest(
                conn, "public", run.name, sealed[manifest.DIGEST_FIELD], "env", step["verdict"]
            )
    return run


def runs_of(dsn: str, step: str) -> list[tuple]:
    return rows_of(
        dsn,
        "SELECT run_id, source_path, source_sha256 FROM session_migration_runs WHERE step = %s",
        (step,),
    )


class Faults:
    """Where a fault lands: each patch raises once, at its point, then gets out of the way."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.mp = monkeypatch

    def on_move(self, live: Path, nth: int) -> None:
        """Ctrl-C (SIGTERM, the machine going down) as the ``nth`` file of ``live`` is renamed
        into the archive: at the rename itself, whichever code does it."""
        real, calls = os.rename, []

        def rename(source, destination, *args, **kwargs):
            if Path(source).parent == live.parent:
                calls.append(source)
                if len(calls) == nth:
                    raise KeyboardInterrupt
            return real(source, destination, *args, **kwargs)

        self.mp.setattr(os, "rename", rename)

    def before_appearing(self, restore: Path) -> None:
        """Ctrl-C just before the restored file is renamed into place at ``restore``."""
        real = os.replace

        def replace_(source, destination, *args, **kwargs):
            if Path(destination).resolve() == restore.resolve():
                raise KeyboardInterrupt
            return real(source, destination, *args, **kwargs)

        self.mp.setattr(os, "replace", replace_)

    def on_record(self, before: BaseException | None, after: BaseException | None) -> None:
        """The audit row's write (``rollback.record``, however the step reaches it) fails
        before it is sent, or after it was committed (the reply lost, or Ctrl-C)."""
        real = rollback.record

        def record(*args, **kwargs):
            if before is not None:
                raise before
            real(*args, **kwargs)
            if after is not None:
                raise after

        self.mp.setattr(rollback, "record", record)
        self.mp.setattr(steps, "record", record, raising=False)

    def terminate_at_record(self) -> None:
        """The server ends the audit row's backend (pg_terminate_backend) before its insert."""
        real = rollback.write_run

        def write_run(conn, *args, **kwargs):
            conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")
            real(conn, *args, **kwargs)

        self.mp.setattr(rollback, "write_run", write_run)

    def server_down_at_record(self) -> None:
        """The audit row's connection is cut, and from then on the server cannot be reached
        (not even to ask whether the row was written)."""
        real_connect, down = rollback.connect, []

        def record(*args, **kwargs):
            down.append(True)
            raise psycopg.OperationalError(FAULT)

        def connect(*args, **kwargs):
            if down:
                raise TargetUnreachable("cannot connect to PostgreSQL: connection refused")
            return real_connect(*args, **kwargs)

        self.mp.setattr(rollback, "record", record)
        self.mp.setattr(steps, "record", record, raising=False)
        self.mp.setattr(rollback, "connect", connect)


# --- finalize ---------------------------------------------------------------------------------

# point: (how the first run ends, what its message says, whose run id the archive carries,
#         how the second run ends)
FINALIZE_POINTS = {
    "checking the folder": ("error", "nothing was moved, written or recorded", 2, "done"),
    "after the intent, before the move": ("interrupt", None, 2, "done"),
    "between the live file and its -wal": ("interrupt", None, 1, "done"),
    "between the move and the audit row": ("interrupt", None, 1, "done"),
    "audit row refused": ("error", "its audit row was NOT written", 1, "done"),
    "audit row's backend terminated": ("error", "its audit row was NOT written", 1, "done"),
    "server down at the audit row": (
        "error",
        "whether its audit row was written is unknown",
        1,
        "done",
    ),
    "reply to the audit row's commit lost": ("done", None, 1, "nothing to do"),
    "after the audit row": ("interrupt", None, 1, "nothing to do"),
}


def _arm_finalize(point: str, faults: Faults, monkeypatch: pytest.MonkeyPatch, live: Path) -> None:
    if point == "checking the folder":

        def lost(*args, **kwargs):
            raise psycopg.OperationalError(FAULT)

        monkeypatch.setattr(manifest, "check_recorded", lost)
    elif point == "after the intent, before the move":
        faults.on_move(live, 1)
    elif point == "between the live file and its -wal":
        faults.on_move(live, 2)
    elif point == "between the move and the audit row":
        faults.on_record(KeyboardInterrupt(), None)
    elif point == "audit row refused":
        faults.on_record(psycopg.OperationalError(FAULT), None)
    elif point == "audit row's backend terminated":
        faults.terminate_at_record()
    elif point == "server down at the audit row":
        faults.server_down_at_record()
    elif point == "reply to the audit row's commit lost":
        faults.on_record(None, psycopg.OperationalError(FAULT))
    elif point == "after the audit row":
        faults.on_record(None, KeyboardInterrupt())


@pytest.mark.parametrize("point", list(FINALIZE_POINTS))
def test_finalize_rerun_after_a_fault_archives_and_records_exactly_once(
    point: str, target, dsn: str, tmp_path: Path, small_backup: Path, monkeypatch
) -> None:
    ends, says, archived_by, rerun = FINALIZE_POINTS[point]
    schema.upgrade(dsn)
    folder = sealed_run(
        tmp_path / "reports" / "reconcile-1",
        dsn,
        {"name": "reconcile", "verdict": "PASS_WITH_WARNINGS"},
    )
    live = tmp_path / "live" / "sessions.db"
    live.parent.mkdir()
    generate(live, rows=20, seed=3)
    wal = Path(f"{live}-wal")
    wal.write_bytes(b"frames the app had not checkpointed")
    ledger = {"sessions.db": sha256_file(live), "sessions.db-wal": sha256_file(wal)}
    archive = tmp_path / "archive"
    settings = target(small_backup)
    first, second = replace(settings, run_id="run1"), replace(settings, run_id="run2")
    command = dict(
        live_sqlite_path=str(live),
        archive_dir=str(archive),
        reconcile_manifest=str(folder),
        soak_hours=0,
    )

    faults = Faults(monkeypatch)
    _arm_finalize(point, faults, monkeypatch, live)
    if ends == "interrupt":
        with pytest.raises(KeyboardInterrupt):
            steps.finalize_step(first, **command)
    elif ends == "error":
        with pytest.raises(TargetError) as failed:
            steps.finalize_step(first, **command)
        message = str(failed.value)
        assert says in message and "\n" not in message
        moved = "finalize moved the live file to" in message
        assert moved == (point != "checking the folder")  # it says whether the file moved
        assert moved == (not live.exists())
        assert "run the same command again" in message
    else:
        steps.finalize_step(first, **command)  # the row is there: the operation is complete
    monkeypatch.undo()
    monkeypatch.setenv("SMTEST_DSN", dsn)

    if rerun == "done":
        result = steps.finalize_step(second, **command)
        assert result.run_id == f"run{archived_by}"
        assert result.resumed == (archived_by == 1)
    else:
        for _ in range(2):  # and a third run says the same: nothing stuck, nothing doubled
            with pytest.raises(ParameterError, match="no such file: run run1 archived it") as done:
                steps.finalize_step(second, **command)
            assert "and recorded that at" in str(done.value) and "nothing to do" in str(done.value)

    # The ledger: both files in the archive once, unchanged, under the name of the run whose
    # audit row records them; that row, once; nothing left beside the live path.
    run_id = f"run{archived_by}"
    names = {f"sessions-{run_id}.db": ledger["sessions.db"]}
    names[f"sessions-{run_id}.db-wal"] = ledger["sessions.db-wal"]
    data_files = {p.name: sha256_file(p) for p in archive.iterdir() if "sessionmig" not in p.name}
    assert data_files == names
    assert sorted(p.name for p in archive.iterdir() if "sessionmig" in p.name) == [
        f"sessions-{run_id}.sessionmig-finalize.json"
    ]
    assert not live.exists() and not wal.exists()
    assert runs_of(dsn, "finalize") == [
        (f"{run_id}-finalize", str(archive / f"sessions-{run_id}.db"), ledger["sessions.db"])
    ]


def test_finalize_rerun_never_resumes_a_move_the_app_has_written_since(
    target, dsn: str, tmp_path: Path, small_backup: Path, monkeypatch
) -> None:
    """A -wal that changed after the first run hashed it (the app still writing) is not moved
    under the old hash: the re-run stops, saying so, and the live -wal stays where it is."""
    schema.upgrade(dsn)
    folder = sealed_run(
        tmp_path / "reports" / "reconcile-1", dsn, {"name": "reconcile", "verdict": "PASS"}
    )
    live = tmp_path / "live" / "sessions.db"
    live.parent.mkdir()
    generate(live, rows=20, seed=3)
    wal = Path(f"{live}-wal")
    wal.write_bytes(b"one")
    command = dict(
        live_sqlite_path=str(live),
        archive_dir=str(tmp_path / "archive"),
        reconcile_manifest=str(folder),
        soak_hours=0,
    )
    Faults(monkeypatch).on_move(live, 2)
    with pytest.raises(KeyboardInterrupt):
        steps.finalize_step(replace(target(small_backup), run_id="run1"), **command)
    monkeypatch.undo()
    monkeypatch.setenv("SMTEST_DSN", dsn)
    wal.write_bytes(b"two")
    with pytest.raises(Exception, match="changed after finalize hashed it"):
        steps.finalize_step(replace(target(small_backup), run_id="run2"), **command)
    assert wal.read_bytes() == b"two" and runs_of(dsn, "finalize") == []


# --- the rollback from the backup (restore_path) ---------------------------------------------

RESTORE_POINTS = {
    "reading PostgreSQL (backend terminated)": ("error", "nothing was written at", 2),
    "just before the file appears": ("interrupt", None, 2),
    "between the file and the audit row": ("interrupt", None, 2),
    "audit row refused": ("error", "its audit row was NOT written", 2),
    "audit row's backend terminated": ("error", "its audit row was NOT written", 2),
    "server down at the audit row": ("error", "whether its audit row was written is unknown", 2),
    "reply to the audit row's commit lost": ("done", None, 1),
    "after the audit row": ("interrupt", None, 1),
}


def _arm_restore(
    point: str, faults: Faults, monkeypatch: pytest.MonkeyPatch, restore: Path
) -> None:
    if point == "reading PostgreSQL (backend terminated)":
        real = rollback._carry_back

        def carry_back(conn, *args, **kwargs):
            conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")
            return real(conn, *args, **kwargs)

        monkeypatch.setattr(rollback, "_carry_back", carry_back)
    elif point == "just before the file appears":
        faults.before_appearing(restore)
    elif point == "between the file and the audit row":
        faults.on_record(KeyboardInterrupt(), None)
    elif point == "audit row refused":
        faults.on_record(psycopg.OperationalError(FAULT), None)
    elif point == "audit row's backend terminated":
        faults.terminate_at_record()
    elif point == "server down at the audit row":
        faults.server_down_at_record()
    elif point == "reply to the audit row's commit lost":
        faults.on_record(None, psycopg.OperationalError(FAULT))
    elif point == "after the audit row":
        faults.on_record(None, KeyboardInterrupt())


@pytest.fixture
def migrated(target, dsn: str, tmp_path: Path, small_backup: Path):
    """The small backup migrated, with the migrate run's folder sealed and its digest recorded."""
    settings = target(small_backup)
    assert steps.migrate(settings, progress=False).verdict == "PASS_WITH_WARNINGS"
    folder = sealed_run(
        tmp_path / "reports" / settings.run_id,  # a run folder is named by its run id
        dsn,
        {"name": "migrate", "verdict": "PASS_WITH_WARNINGS"},
        source={"path": str(small_backup), "sha256_before": sha256_file(small_backup)},
    )
    return settings, folder


@pytest.mark.parametrize("point", list(RESTORE_POINTS))
def test_restore_rerun_after_a_fault_writes_and_records_exactly_once(
    point: str, migrated, dsn: str, tmp_path: Path, monkeypatch
) -> None:
    ends, says, written_by = RESTORE_POINTS[point]
    settings, folder = migrated
    restore = tmp_path / "app" / "sessions.db"
    restore.parent.mkdir()
    command = dict(restore_path=str(restore), migrate_manifest=str(folder))
    first, second = replace(settings, run_id="run1"), replace(settings, run_id="run2")

    _arm_restore(point, Faults(monkeypatch), monkeypatch, restore)
    if ends == "interrupt":
        with pytest.raises(KeyboardInterrupt):
            steps.rollback_step(first, **command)
    elif ends == "error":
        with pytest.raises(TargetError) as failed:
            steps.rollback_step(first, **command)
        message = str(failed.value)
        assert says in message and "\n" not in message
        wrote = "rollback wrote the restored file" in message
        assert wrote == restore.exists()  # it says whether the file was written
        assert "run the same command again" in message
    else:
        steps.rollback_step(first, **command)
    monkeypatch.undo()
    monkeypatch.setenv("SMTEST_DSN", dsn)
    assert not Path(f"{restore}.sessionmig-partial").exists()  # whole, or not there at all

    # The same command again, without confirm=true: never refused for the file this command
    # wrote, never recorded twice; and once more, the same.
    for _ in range(2):
        result, check = steps.rollback_step(second, **command)
        assert check is not None and check.verdict == "PASS_WITH_WARNINGS"
        assert check.partition_holds and check.counts["changed"] == 0
        assert result.run_id == f"run{written_by}" and result.restored_sha256 == sha256_file(
            restore
        )
    assert runs_of(dsn, "rollback") == [
        (f"run{written_by}-rollback", str(restore.resolve()), sha256_file(restore))
    ]
    mark = json.loads(Path(f"{restore.resolve()}.sessionmig-rollback.json").read_text())
    assert (mark["run_id"], mark["restored_sha256"]) == (f"run{written_by}", sha256_file(restore))
    assert sorted(p.name for p in restore.parent.iterdir()) == [
        "sessions.db",
        "sessions.db.sessionmig-rollback.json",
    ]


def test_restore_rerun_refuses_a_restored_file_the_app_has_written_since(
    migrated, dsn: str, tmp_path: Path, monkeypatch
) -> None:
    """Unrecorded, but no longer the file the rollback wrote: it is the app's now, and a re-run
    without confirm=true leaves it alone."""
    settings, folder = migrated
    restore = tmp_path / "app" / "sessions.db"
    restore.parent.mkdir()
    command = dict(restore_path=str(restore), migrate_manifest=str(folder))
    Faults(monkeypatch).on_record(psycopg.OperationalError(FAULT), None)
    with pytest.raises(TargetError, match="its audit row was NOT written"):
        steps.rollback_step(replace(settings, run_id="run1"), **command)
    monkeypatch.undo()
    monkeypatch.setenv("SMTEST_DSN", dsn)
    app = sqlite3.connect(restore)
    with app:
        app.execute("DELETE FROM sessions WHERE rowid = (SELECT min(rowid) FROM sessions)")
    app.close()
    sha = sha256_file(restore)
    with pytest.raises(ParameterError, match="exists; rerun with -p confirm=true"):
        steps.rollback_step(replace(settings, run_id="run2"), **command)
    assert sha256_file(restore) == sha and runs_of(dsn, "rollback") == []
    # With confirm=true it is restored afresh and recorded once.
    result, _ = steps.rollback_step(replace(settings, run_id="run3"), **command, confirm=True)
    assert runs_of(dsn, "rollback") == [("run3-rollback", str(restore), result.restored_sha256)]
