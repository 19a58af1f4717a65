"""A rollback during the overlap as an operator runs it: `sessionmig run --steps rollback` with
the old colour's live file, through the 05 notebook, leaving a report that says what it carried."""

from __future__ import annotations

import asyncio
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import env_file, sessionmig_process

from sessionmig.sqlite.snapshot import snapshot
from sessionmig.store import LegacySQLiteSessionManager, SessionManager

pytestmark = pytest.mark.slow
START = datetime(2026, 1, 15, 3, tzinfo=UTC)  # TEST_ENV's as_of: every session active
ZONE = "Asia/Seoul"


def _run(tmp_path: Path, environ: dict, *args: str):
    done = sessionmig_process(
        "run", *args, "--reports-dir", str(tmp_path / "reports"), extra_env=environ, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def _run_dir(tmp_path: Path, step: str) -> Path:
    for manifest in sorted((tmp_path / "reports").rglob("manifest.json")):
        data = json.loads(manifest.read_text())
        if [s["name"] for s in data["steps"]] == [step]:
            return manifest.parent
    raise AssertionError(f"no run folder of step {step}")


def test_the_rollback_notebook_merges_postgresql_into_the_live_file(
    tmp_path: Path, dsn: str
) -> None:
    live = tmp_path / "app" / "sessions.db"
    live.parent.mkdir()

    async def old_colour() -> list[str]:
        store = LegacySQLiteSessionManager(live, ttl_hours=24, zone=ZONE, clock=lambda: START)
        made = [(await store.create_session(f"u{i}", {"i": i}))[0] for i in range(6)]
        await store.close()
        return made

    ids = asyncio.run(old_colour())
    snap = tmp_path / "snapshots" / "snap0.db"
    snapshot(live, snap)
    environ = {**os.environ, "SMTEST_DSN": dsn}
    env = env_file(tmp_path, snap)
    _run(tmp_path, environ, "--env", str(env), "--steps", "migrate")
    migrated = _run_dir(tmp_path, "migrate")
    state = tmp_path / "state"
    catchup = ("-p", f"live_sqlite_path={live}", "-p", f"state_dir={state}")
    _run(tmp_path, environ, "--env", str(env), "--steps", "catchup", *catchup)

    now = START + timedelta(minutes=10)

    async def new_colour() -> str:
        manager = SessionManager(dsn, clock=lambda: now)
        try:
            created, _ = await manager.create_session("after-cutover", None)
            for _ in range(3):
                assert await manager.validate_session(ids[0])
            assert await manager.delete_session(ids[1])
            return created
        finally:
            await manager.close()

    created = asyncio.run(new_colour())
    done = _run(
        tmp_path,
        environ,
        "--env",
        str(env),
        "--steps",
        "rollback",
        *catchup,
        "-p",
        f"migrate_manifest={migrated}",
    )

    async def view() -> dict:
        store = LegacySQLiteSessionManager(live, ttl_hours=24, zone=ZONE, clock=lambda: now)
        try:
            return {sid: await store.get_session(sid) for sid in (ids[0], ids[1], created)}
        finally:
            await store.close()

    seen = asyncio.run(view())
    assert seen[ids[0]].request_count == 3  # the new colour's validations, carried back
    assert seen[ids[1]] is None  # ended in PostgreSQL: ended in the old colour's file
    assert seen[created].user_id == "after-cutover"

    run_dir = _run_dir(tmp_path, "rollback")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [s["verdict"] for s in manifest["steps"]] == ["PASS"], manifest["steps"]
    page = next(run_dir.glob("*rollback*.html")).read_text()
    assert "merged in (1 new, 1 changed, 1 ended" in page
    for sid in (*ids, created):  # bearer tokens never in a report
        assert sid not in page and sid not in done.stdout + done.stderr
