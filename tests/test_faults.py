"""Faults with a real server: a killed migration or a killed connection leaves the target exactly
as it was, and a rerun (or the built-in retry) completes."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest
import yaml
from conftest import ROOT, TEST_ENV, rows_of, sessionmig_tables

from sessionmig.errors import SourceError, TransientTargetError
from sessionmig.runbook import steps
from sessionmig.sqlite import sample

pytestmark = pytest.mark.slow


def snapshot(dsn: str) -> tuple:
    return (
        rows_of(dsn, "SELECT * FROM sessions ORDER BY session_id"),
        rows_of(
            dsn, "SELECT run_id, source_rowid, reason FROM session_migration_rejects ORDER BY 1, 2"
        ),
        rows_of(dsn, "SELECT run_id, inserted FROM session_migration_runs ORDER BY 1"),
    )


def wait_for(dsn: str, query: str, timeout: float = 60.0) -> tuple | None:
    """Poll ``query`` until it returns a row (or time out)."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute(query).fetchone()
            if row:
                return row
            time.sleep(0.005)
    return None


LOADER = "SELECT pid FROM pg_stat_activity WHERE application_name = 'sessionmig-migrate' "
NO_MIGRATION_LEFT = (
    "SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE application_name "
    "LIKE 'sessionmig-%')"
)


@pytest.fixture
def prepared(tmp_path: Path, target):
    """A target already holding a migrated backup, and a second, larger backup to load."""
    first = tmp_path / "first.db"
    sample.generate(first, rows=300, seed=21)
    base = dict(TEST_ENV)
    steps.migrate(target(first), progress=False)
    big = tmp_path / "big.db"
    sample.generate(big, rows=60_000, seed=22)
    return big, base


def test_sigkill_mid_copy_leaves_the_target_unchanged(prepared, dsn, tmp_path) -> None:
    big, base = prepared
    prior = snapshot(dsn)
    env = tmp_path / "env.yaml"
    env.write_text(yaml.safe_dump({**base, "sqlite_path": str(big), "batch_rows": 500}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "sessionmig.cli", "migrate", "--env", str(env)],
        cwd=ROOT,
        env={**os.environ, "SMTEST_DSN": dsn},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_for(dsn, LOADER + "AND query LIKE 'COPY%'"), "the COPY never started"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert wait_for(dsn, NO_MIGRATION_LEFT), "the server kept the dead client's session"
    assert snapshot(dsn) == prior
    rerun = steps.migrate(steps.settings(sqlite_path=str(big), **base), progress=False)
    assert rerun.outcome.inserted + rerun.outcome.rejected == 60_000


def _migrate_while_blocked(dsn: str, settings: steps.Settings) -> tuple[list, list]:
    """Run migrate in a thread with ``sessions`` locked against inserts; kill the loader's
    backend once its merge waits on that lock (so it dies mid-merge)."""
    results: list = []
    errors: list = []

    def go() -> None:
        try:
            results.append(steps.migrate(settings, progress=False))
        except Exception as exc:  # the test inspects it
            errors.append(exc)

    blocker = psycopg.connect(dsn)
    blocker.execute("LOCK TABLE sessions IN EXCLUSIVE MODE")  # SELECT passes, INSERT waits
    thread = threading.Thread(target=go)
    thread.start()
    try:
        row = wait_for(dsn, LOADER + "AND wait_event_type = 'Lock'")
        assert row, "the merge never reached the insert"
        with psycopg.connect(dsn, autocommit=True) as admin:
            assert admin.execute("SELECT pg_terminate_backend(%s)", (row[0],)).fetchone()[0]
    finally:
        blocker.rollback()
        blocker.close()
        thread.join(timeout=120)
    assert not thread.is_alive(), "migrate did not end once its backend was terminated"
    return results, errors


def test_connection_killed_mid_merge_without_retries(prepared, dsn) -> None:
    big, base = prepared
    prior = snapshot(dsn)
    results, errors = _migrate_while_blocked(
        dsn, steps.settings(sqlite_path=str(big), max_retries=0, **base)
    )
    assert not results and len(errors) == 1
    assert isinstance(errors[0], TransientTargetError)
    assert "gave up after 1 attempt" in str(errors[0])
    assert snapshot(dsn) == prior
    rerun = steps.migrate(steps.settings(sqlite_path=str(big), **base), progress=False)
    assert rerun.outcome.inserted + rerun.outcome.rejected == 60_000


def test_connection_killed_mid_merge_is_retried(prepared, dsn) -> None:
    big, base = prepared
    prior_rows = len(snapshot(dsn)[0])
    results, errors = _migrate_while_blocked(
        dsn, steps.settings(sqlite_path=str(big), max_retries=2, **base)
    )
    assert not errors and len(results) == 1
    outcome = results[0].outcome
    assert outcome.inserted + outcome.rejected == 60_000
    assert rows_of(dsn, "SELECT count(*) FROM sessions") == [(prior_rows + outcome.inserted,)]
    assert rows_of(dsn, "SELECT count(*) FROM session_migration_runs") == [(2,)]


def damage_index_page(path: Path) -> None:
    """Overwrite the root page of the primary-key index, which the table scan never reads."""
    conn = sqlite3.connect(path)
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    (root,) = conn.execute(
        "SELECT rootpage FROM sqlite_master WHERE name = 'sqlite_autoindex_sessions_1'"
    )
    conn.close()
    with open(path, "r+b") as handle:
        handle.seek(page_size * (root[0] - 1))
        handle.write(b"\xee" * 64)


def test_a_damaged_file_is_caught_before_the_commit(tmp_path, target, dsn) -> None:
    path = tmp_path / "damaged.db"
    sample.generate(path, rows=3000, seed=3, oddities=0)
    damage_index_page(path)
    # Caught by quick_check beside the load, or already by the look-up of repeated keys.
    with pytest.raises(SourceError, match="quick_check failed.*Nothing was written|damaged"):
        steps.migrate(target(path), progress=False)
    assert sessionmig_tables(dsn) == []  # a failed first run leaves the target as it was
