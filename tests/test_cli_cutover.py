"""The live-cutover verbs as an operator types them: `sessionmig snapshot` and the same
`sessionmig catchup` command pass after pass."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest
from conftest import env_file, rows_of, sessionmig_process

from sessionmig.sqlite.source import sha256_file
from sessionmig.store import LegacySQLiteSessionManager

pytestmark = pytest.mark.slow


def sessionmig(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return sessionmig_process(*args, extra_env=env, timeout=300)


def test_snapshot_then_the_same_catchup_command_pass_after_pass(
    tmp_path: Path, dsn: str, monkeypatch
) -> None:
    import os

    live = tmp_path / "app" / "sessions.db"
    live.parent.mkdir()

    async def app(n_new: int, validate: list[str]) -> list[str]:
        store = LegacySQLiteSessionManager(live, ttl_hours=24, zone="Asia/Seoul")
        made = [(await store.create_session(f"u{i}", {"i": i}))[0] for i in range(n_new)]
        for sid in validate:
            assert await store.validate_session(sid)
        await store.close()
        return made

    first = asyncio.run(app(5, []))
    snap = tmp_path / "snapshots" / "snap0.db"
    done = sessionmig("snapshot", str(live), str(snap))
    assert done.returncode == 0, done.stderr
    assert f"sha256 {sha256_file(snap)}" in done.stdout and "5 sessions" in done.stdout
    assert (snap.stat().st_mode & 0o777) == 0o600

    monkeypatch.setenv("SMTEST_DSN", dsn)
    env = env_file(tmp_path, snap)
    environ = {**os.environ, "SMTEST_DSN": dsn}
    assert sessionmig("migrate", "--env", str(env), env=environ).returncode == 0
    later = asyncio.run(app(2, first[:3]))  # the old colour keeps serving
    state = tmp_path / "state"
    args = (
        "catchup",
        "--env",
        str(env),
        "-p",
        f"live_sqlite_path={live}",
        "-p",
        f"state_dir={state}",
    )
    for expected_total in (7, 7):  # the second pass finds nothing new
        done = sessionmig(*args, env=environ)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.startswith(("PASS", "PASS_WITH_WARNINGS"))
        assert rows_of(dsn, "SELECT count(*) FROM sessions") == [(expected_total,)]
    counts = dict(rows_of(dsn, "SELECT session_id, request_count FROM sessions"))
    assert [counts[s] for s in first[:3]] == [1, 1, 1] and later[0] in counts
    assert all(s not in done.stdout + done.stderr for s in first + later)
