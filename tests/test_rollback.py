"""Rollback keeps everyone logged in; finalize archives only after a PASS and the soak."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from conftest import env_file, rows_of

from sessionmig.errors import ParameterError, SourceError, VerdictFailed
from sessionmig.runbook import orchestrate, steps
from sessionmig.sqlite.sample import generate
from sessionmig.sqlite.source import sha256_file
from sessionmig.store import LegacySQLiteSessionManager, SessionManager

pytestmark = pytest.mark.slow
AS_OF = datetime(2026, 1, 15, 3, tzinfo=UTC)


@pytest.fixture
def migrated_run(tmp_path: Path, small_backup: Path, dsn: str, monkeypatch: pytest.MonkeyPatch):
    """The small backup migrated and reconciled by ``sessionmig run``; returns its parts."""
    monkeypatch.setenv("SMTEST_DSN", dsn)
    env = env_file(tmp_path, small_backup)
    outcome = orchestrate.run(str(env), ["migrate", "reconcile"], {}, tmp_path / "reports")
    assert outcome.exit_code == 0, outcome.message
    settings = steps.settings(**yaml.safe_load(env.read_text()))
    return env, outcome.run_dir, settings


def _app_activity(dsn: str) -> tuple[str, str, str]:
    """After cutover: one new login, one validation, one logout — through the new app."""
    active = rows_of(dsn, "SELECT min(session_id) FROM sessions WHERE expires_at > %s", (AS_OF,))
    ended = rows_of(dsn, "SELECT max(session_id) FROM sessions WHERE expires_at > %s", (AS_OF,))

    async def act() -> str:
        manager = SessionManager(dsn, clock=lambda: AS_OF)
        new, _ = await manager.create_session("user-after-cutover", {"k": "새 세션"})
        assert await manager.validate_session(active[0][0])
        assert await manager.delete_session(ended[0][0])
        await manager.close()
        return new

    return asyncio.run(act()), active[0][0], ended[0][0]


def test_rollback_keeps_sessions_made_after_cutover(
    migrated_run, small_backup, dsn, tmp_path
) -> None:
    _, run_dir, settings = migrated_run
    before = sha256_file(small_backup)
    new, validated, ended = _app_activity(dsn)
    count_before = rows_of(
        dsn, "SELECT request_count FROM sessions WHERE session_id = %s", (validated,)
    )[0][0]
    target = tmp_path / "app" / "sessions.db"
    target.parent.mkdir()
    restored, check = steps.rollback_step(
        settings, restore_path=str(target), migrate_manifest=str(run_dir)
    )
    assert (restored.carried_new, restored.carried_changed, restored.carried_ended) == (1, 1, 1)
    assert check.verdict == "PASS_WITH_WARNINGS" and check.partition_holds
    assert check.rejected == 7 and check.counts["changed"] == 0
    assert sha256_file(small_backup) == before

    async def legacy_view():
        legacy = LegacySQLiteSessionManager(target, zone="Asia/Seoul", clock=lambda: AS_OF)
        found = (
            await legacy.get_session(new),
            await legacy.get_session(validated),
            await legacy.get_session(ended),
            await legacy.validate_session(new),
        )
        await legacy.close()
        return found

    got_new, got_validated, got_ended, still_valid = asyncio.run(legacy_view())
    assert got_new.user_id == "user-after-cutover" and got_new.metadata == {"k": "새 세션"}
    assert got_validated.request_count == count_before
    assert got_ended is None
    assert still_valid  # the legacy manager accepts a session created in PostgreSQL
    audit = rows_of(
        dsn, "SELECT step, inserted, updated FROM session_migration_runs WHERE step = 'rollback'"
    )
    assert audit == [("rollback", 1, 1)]


def test_rollback_refuses_to_overwrite_or_restore_another_file(migrated_run, dsn, tmp_path) -> None:
    _, run_dir, settings = migrated_run
    with pytest.raises(ParameterError, match="restore_path is the backup itself"):
        steps.rollback_step(
            settings, restore_path=settings.sqlite_path, migrate_manifest=str(run_dir)
        )
    target = tmp_path / "app-sessions.db"
    target.write_text("the app's current file")
    with pytest.raises(ParameterError, match="exists; rerun with -p confirm=true"):
        steps.rollback_step(settings, restore_path=str(target), migrate_manifest=str(run_dir))
    assert target.read_text() == "the app's current file"
    other = tmp_path / "other.db"
    generate(other, rows=50, seed=99)
    with pytest.raises(SourceError, match="not the backup that was migrated"):
        steps.rollback_step(
            steps.settings(**{**settings.public(), "sqlite_path": str(other)}),
            restore_path=str(tmp_path / "x.db"),
            migrate_manifest=str(run_dir),
        )
    restored, _ = steps.rollback_step(
        settings, restore_path=str(target), migrate_manifest=str(run_dir), confirm=True
    )
    assert restored.carried_new == 0 and target.read_bytes()[:15] == b"SQLite format 3"


def test_rollback_refuses_a_tampered_manifest(migrated_run, tmp_path) -> None:
    _, run_dir, settings = migrated_run
    manifest = run_dir / "manifest.json"
    manifest.write_text(manifest.read_text().replace("PASS_WITH_WARNINGS", "PASS", 1))
    with pytest.raises(VerdictFailed, match="the reports were altered"):
        steps.rollback_step(
            settings, restore_path=str(tmp_path / "r.db"), migrate_manifest=str(run_dir)
        )


def test_finalize_needs_a_reconcile_pass_and_the_soak(migrated_run, dsn, tmp_path) -> None:
    env, run_dir, settings = migrated_run
    live = tmp_path / "live" / "sessions.db"
    live.parent.mkdir()
    generate(live, rows=20, seed=3)
    live_sha = sha256_file(live)
    common = dict(live_sqlite_path=str(live), archive_dir=str(tmp_path / "archive"))
    migrate_only = orchestrate.run(str(env), ["migrate"], {}, tmp_path / "reports").run_dir
    with pytest.raises(VerdictFailed, match="needs a reconcile PASS"):
        steps.finalize_step(settings, reconcile_manifest=str(migrate_only), soak_hours=0, **common)
    with pytest.raises(VerdictFailed, match="soak period is not over"):
        steps.finalize_step(settings, reconcile_manifest=str(run_dir), soak_hours=24, **common)
    assert live.exists()
    result = steps.finalize_step(
        replace(settings, run_id="r1"), reconcile_manifest=str(run_dir), soak_hours=0, **common
    )
    assert not live.exists()
    assert result.files[0] == (str(tmp_path / "archive" / "sessions-r1.db"), live_sha)
    assert rows_of(
        dsn, "SELECT step, source_sha256 FROM session_migration_runs WHERE step = 'finalize'"
    ) == [("finalize", live_sha)]


def test_rollback_and_finalize_notebooks_run(migrated_run, dsn, tmp_path) -> None:
    env, run_dir, _ = migrated_run
    live = tmp_path / "live.db"
    generate(live, rows=20, seed=4)
    rolled = orchestrate.run(
        str(env),
        ["rollback"],
        {"restore_path": str(tmp_path / "restored.db"), "migrate_manifest": str(run_dir)},
        tmp_path / "reports",
    )
    assert rolled.exit_code == 0, rolled.message
    finalize = {
        "live_sqlite_path": str(live),
        "archive_dir": str(tmp_path / "archive"),
        "reconcile_manifest": str(run_dir),
        "soak_hours": 0,
    }
    finalized = orchestrate.run(str(env), ["finalize"], finalize, tmp_path / "reports")
    assert finalized.exit_code == 0, finalized.message
    manifest = json.loads((finalized.run_dir / "manifest.json").read_text())
    assert manifest["steps"][0]["verdict"] == "PASS"
    refused = orchestrate.run(str(env), ["finalize"], finalize, tmp_path / "reports")
    assert refused.exit_code == 2 and "no such file" in refused.message


def test_rollback_after_extra_columns_were_carried_changes_nothing(
    tmp_path: Path, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rollback builds its rules the one way every step does: with ``into_metadata`` the
    carried columns are expected in metadata, so untouched sessions are not 'changed'."""
    import sqlite3

    backup = tmp_path / "extra.db"
    generate(backup, rows=120, seed=4, oddities=0)
    conn = sqlite3.connect(backup)
    conn.execute("ALTER TABLE sessions ADD COLUMN ip TEXT")
    conn.execute("UPDATE sessions SET ip = '10.0.0.' || rowid")
    conn.commit()
    conn.close()
    monkeypatch.setenv("SMTEST_DSN", dsn)
    env = env_file(tmp_path, backup, on_extra_columns="into_metadata")
    outcome = orchestrate.run(str(env), ["migrate", "reconcile"], {}, tmp_path / "reports")
    assert outcome.exit_code == 0, outcome.message
    settings = steps.settings(**yaml.safe_load(env.read_text()))
    restored, check = steps.rollback_step(
        settings, restore_path=str(tmp_path / "app.db"), migrate_manifest=str(outcome.run_dir)
    )
    assert (restored.carried_new, restored.carried_changed, restored.carried_ended) == (0, 0, 0)
    assert check.counts["changed"] == 0
