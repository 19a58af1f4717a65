"""A step that acts on a run folder checks it as ``verify --env`` does.

Finalize and both rollback modes read their run folder through ``manifest.read_trusted``: its
own hashes, AND its digest equal to the one its run recorded in this target, AND the run reached
this target, AND the digest table append-only. A folder edited and re-sealed (its hashes
recomputed the way ``manifest.write_manifest`` does), one from another database, or a target
whose digests can be rewritten: refused by name, nothing touched.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import uuid
from pathlib import Path

import psycopg
import pytest
import yaml
from conftest import env_file, rows_of
from psycopg import sql
from test_evidence import run_cli
from test_rollback import migrated_run  # noqa: F401  (a fixture: a migrate + reconcile run)
from test_rollback_overlap import START, legacy

from sessionmig.engines.overlap import MARKER_TABLE
from sessionmig.errors import VerdictFailed
from sessionmig.postgres import embedded, schema
from sessionmig.runbook import manifest, orchestrate, steps
from sessionmig.runbook.steps import catchup_step
from sessionmig.sqlite.sample import generate
from sessionmig.sqlite.snapshot import snapshot
from sessionmig.sqlite.source import sha256_file

pytestmark = pytest.mark.slow


def reseal(run: Path, edit) -> None:
    """Edit ``run``'s manifest and seal it again the way ``manifest.write_manifest`` does: the
    folder's own hashes and digest hold again (that is the attack)."""
    body = json.loads((run / "manifest.json").read_text())
    edit(body)
    for key in ("files", manifest.DIGEST_FIELD, "permissions"):
        body.pop(key)
    manifest.write_manifest(run, body)
    assert manifest.verify(run).ok


def forged_copy(run: Path, where: Path, edit) -> Path:
    forged = where / "forged"
    shutil.copytree(run, forged)
    reseal(forged, edit)
    return forged


def live_file(tmp_path: Path) -> tuple[Path, str]:
    live = tmp_path / "live" / "sessions.db"
    live.parent.mkdir()
    generate(live, rows=20, seed=3)
    return live, sha256_file(live)


def assert_untouched(live: Path, sha: str, archive: Path, dsn: str) -> None:
    assert live.is_file() and sha256_file(live) == sha
    assert not archive.exists() or not any(archive.iterdir())
    assert rows_of(dsn, "SELECT count(*) FROM session_migration_runs WHERE step = 'finalize'") == [
        (0,)
    ]


def finalize(settings, live: Path, archive: Path, folder: Path):
    return steps.finalize_step(
        settings,
        live_sqlite_path=str(live),
        archive_dir=str(archive),
        reconcile_manifest=str(folder),
        soak_hours=0,
    )


# --- (a) a FAIL reconcile folder edited to say PASS and re-sealed -----------------------------


def test_finalize_refuses_a_fail_reconcile_resealed_as_pass(
    migrated_run,  # noqa: F811
    dsn: str,
    tmp_path: Path,
) -> None:
    env, _, settings = migrated_run
    with psycopg.connect(dsn) as conn:  # PostgreSQL drifts: the next reconcile FAILs
        conn.execute(
            "UPDATE sessions SET request_count = request_count + 1 "
            "WHERE session_id = (SELECT min(session_id) FROM sessions)"
        )
    failed = orchestrate.run(str(env), ["reconcile"], {}, tmp_path / "reports")
    assert failed.exit_code == 1 and failed.verdict == "FAIL", failed.message
    run = failed.run_dir

    def to_pass(body: dict) -> None:
        body["verdict"], body["exit_code"] = "PASS", 0
        step = body["steps"][0]
        step.update(status="passed", verdict="PASS", reason="every row matches", exit_code=0)

    reseal(run, to_pass)
    live, sha = live_file(tmp_path)
    archive = tmp_path / "archive"
    with pytest.raises(VerdictFailed) as refused:
        finalize(settings, live, archive, run)
    message = str(refused.value)
    assert "the folder was re-sealed after the run" in message
    assert f"sessionmig verify {run} --env env" in message and "nothing was done" in message
    assert_untouched(live, sha, archive, dsn)
    # verify --env says the same of the folder
    code, out, _ = run_cli("verify", str(run), "--env", str(env))
    assert code == 1 and "re-sealed after the run" in out


# --- (b) a re-sealed migrate folder, for the rollback from the backup and during the overlap ----


def test_restore_rollback_refuses_a_resealed_migrate_folder(
    migrated_run,  # noqa: F811
    dsn: str,
    tmp_path: Path,
) -> None:
    _, run, settings = migrated_run

    def no_rejects(body: dict) -> None:
        body["steps"][0]["reason"] = "0 rejected"

    forged = forged_copy(run, tmp_path, no_rejects)
    restore = tmp_path / "app" / "sessions.db"
    restore.parent.mkdir()
    with pytest.raises(VerdictFailed, match="re-sealed after the run") as refused:
        steps.rollback_step(settings, restore_path=str(restore), migrate_manifest=str(forged))
    assert f"run `sessionmig verify {forged} --env env`" in str(refused.value)
    assert list(restore.parent.iterdir()) == []  # no file, no partial, no mark
    assert rows_of(dsn, "SELECT count(*) FROM session_migration_runs WHERE step = 'rollback'") == [
        (0,)
    ]
    # The folder the run sealed is accepted: the refusal was the forgery's.
    restored, check = steps.rollback_step(
        settings, restore_path=str(restore), migrate_manifest=str(run)
    )
    assert restore.is_file() and check.verdict == "PASS_WITH_WARNINGS"


def test_overlap_rollback_refuses_a_resealed_migrate_folder(
    tmp_path: Path, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    live = tmp_path / "app" / "sessions.db"
    live.parent.mkdir()

    async def old_colour() -> None:
        store = legacy(live, START)
        for i in range(12):
            await store.create_session(f"u{i}", {"i": i})
        await store.close()

    asyncio.run(old_colour())
    snap0 = tmp_path / "snapshots" / "snap0.db"
    snapshot(live, snap0)
    monkeypatch.setenv("SMTEST_DSN", dsn)
    env = env_file(tmp_path, snap0)
    migrated = orchestrate.run(str(env), ["migrate"], {}, tmp_path / "reports")
    assert migrated.exit_code == 0, migrated.message
    settings = steps.settings(**yaml.safe_load(env.read_text()))
    state = tmp_path / "state"
    assert catchup_step(settings, str(live), str(state)).committed

    def edit(body: dict) -> None:
        body["steps"][0]["reason"] = "reviewed"

    forged = forged_copy(migrated.run_dir, tmp_path, edit)
    sha = sha256_file(live)
    overlap = dict(restore_path="", live_sqlite_path=str(live), state_dir=str(state))
    with pytest.raises(VerdictFailed, match="re-sealed after the run"):
        steps.rollback_step(settings, migrate_manifest=str(forged), **overlap)
    assert sha256_file(live) == sha
    assert rows_of(dsn, "SELECT count(*) FROM session_migration_runs WHERE step = 'rollback'") == [
        (0,)
    ]
    live_rolled, none = steps.rollback_step(
        settings, migrate_manifest=str(migrated.run_dir), **overlap
    )
    assert none is None and live_rolled.live_sqlite_path == str(live)
    marked = sqlite3.connect(live)  # the merge's marker is in the live file now
    try:
        found = marked.execute("SELECT count(*) FROM sqlite_master WHERE name = ?", (MARKER_TABLE,))
        assert found.fetchone() == (1,)
    finally:
        marked.close()


# --- (c) a folder from another database -------------------------------------------------------


def test_a_folder_from_another_database_is_refused(
    migrated_run,  # noqa: F811
    server_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env, run, _ = migrated_run
    sealed = json.loads((run / "manifest.json").read_text())
    other_name = f"smtest_other_{uuid.uuid4().hex[:12]}"
    embedded.ensure_database(server_url, other_name)
    other = embedded.with_database(server_url, other_name)
    try:
        schema.upgrade(other)
        # Even with the very digest recorded there, the run did not reach this database.
        with psycopg.connect(other, autocommit=True) as conn, conn.transaction():
            manifest.record_digest(
                conn, "public", sealed["run_id"], sealed[manifest.DIGEST_FIELD], "env", "PASS"
            )
        monkeypatch.setenv("SMTEST_DSN", other)
        settings = steps.settings(**yaml.safe_load(env.read_text()))
        live, sha = live_file(tmp_path)
        archive = tmp_path / "archive"
        with pytest.raises(VerdictFailed, match="the run's target was") as refused:
            finalize(settings, live, archive, run)
        assert other_name in str(refused.value)
        assert_untouched(live, sha, archive, other)
        restore = tmp_path / "restored.db"
        with pytest.raises(VerdictFailed, match="the run's target was"):
            steps.rollback_step(settings, restore_path=str(restore), migrate_manifest=str(run))
        assert not restore.exists()
        code, out, _ = run_cli("verify", str(run), "--env", str(env))
        assert code == 1 and "the run's target was" in out
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(other_name)
                )
            )


# --- (d) the recorded digests are append-only, and a target where they are not proves nothing --


DIGESTS = "session_migration_manifests"


@pytest.mark.parametrize(
    ("switch_off", "said"),
    [
        (f"ALTER TABLE {DIGESTS} DISABLE TRIGGER ALL", "switched off"),
        (
            f"ALTER TABLE {DIGESTS} DISABLE TRIGGER session_migration_manifests_no_truncate",
            "nothing refuses TRUNCATE",
        ),
        (
            f"ALTER TABLE {DIGESTS} ENABLE REPLICA TRIGGER session_migration_manifests_append_only",
            "replica only",
        ),
        (f"DROP TRIGGER session_migration_manifests_append_only ON {DIGESTS}", "missing"),
    ],
)
def test_digests_are_append_only_and_verify_and_steps_check_it(
    migrated_run,  # noqa: F811
    dsn: str,
    tmp_path: Path,
    switch_off: str,
    said: str,
) -> None:
    env, run, settings = migrated_run
    run_id = json.loads((run / "manifest.json").read_text())["run_id"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in (
            f"UPDATE {DIGESTS} SET manifest_sha256 = repeat('0', 64) WHERE run_id = %s",
            f"DELETE FROM {DIGESTS} WHERE run_id = %s",
            f"TRUNCATE {DIGESTS}",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
                conn.execute(statement, (run_id,) if "%s" in statement else None)
    assert rows_of(dsn, f"SELECT count(*) FROM {DIGESTS} WHERE run_id = %s", (run_id,)) == [(1,)]
    code, out, err = run_cli("verify", str(run), "--env", str(env))
    assert code == 0, out + err

    with psycopg.connect(dsn, autocommit=True) as owner:
        owner.execute(switch_off)
    code, out, _ = run_cli("verify", str(run), "--env", str(env))
    assert code == 1 and f"{DIGESTS} is not append-only" in out and said in out, out
    live, sha = live_file(tmp_path)
    archive = tmp_path / "archive"
    with pytest.raises(VerdictFailed, match="is not append-only"):
        finalize(settings, live, archive, run)
    assert_untouched(live, sha, archive, dsn)
    restore = tmp_path / "restored.db"
    with pytest.raises(VerdictFailed, match="is not append-only"):
        steps.rollback_step(settings, restore_path=str(restore), migrate_manifest=str(run))
    assert not restore.exists()
