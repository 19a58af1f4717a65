"""Migrate into a real server: nothing lost, atomic, idempotent, conflicts, lock, dry run."""

from __future__ import annotations

import sqlite3
import threading
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest
from conftest import rows_of

from sessionmig.errors import LockHeld, MigrationConflict, SourceError
from sessionmig.rules.transform import Reject, Rules, normalise
from sessionmig.runbook import steps
from sessionmig.runbook.params import zone
from sessionmig.sqlite.source import sha256_file


@pytest.fixture
def configure(target):
    # An odd batch size, so batches never line up with the sample's row count.
    def make(path: Path, **overrides) -> steps.Settings:
        return target(path, **{"batch_rows": 97, **overrides})

    return make


def expected_rows(path: Path) -> tuple[dict[str, tuple], dict[int, str]]:
    """What the target must hold, computed independently row by row from the raw file."""
    conn = sqlite3.connect(path)
    conn.text_factory = bytes
    cols = "session_id, user_id, metadata, created_at, expires_at, last_activity, request_count"
    types = ", ".join(f"typeof({c})" for c in cols.split(", "))
    good, bad = {}, {}
    for row in conn.execute(f"SELECT rowid, {cols}, {types} FROM sessions"):
        row = row[:8] + tuple(t.decode() for t in row[8:])
        result = normalise(row, Rules(zone("Asia/Seoul")))
        if isinstance(result, Reject):
            bad[row[0]] = result.reason
        else:
            good[result[0]] = result
    return good, bad


def test_every_row_lands_or_is_rejected_with_raw_values(small_backup, configure, dsn) -> None:
    before = sha256_file(small_backup)
    result = steps.migrate(configure(small_backup), progress=False)
    good, bad = expected_rows(small_backup)
    assert (result.outcome.inserted, result.outcome.rejected) == (393, 7) == (len(good), len(bad))
    # Bad bytes and bad JSON went to the server as they were; it refused, the span was redone.
    assert result.outcome.spans_redone == 1
    stored = {
        r[0]: r
        for r in rows_of(
            dsn,
            "SELECT session_id, user_id, metadata::text, "
            "created_at, expires_at, last_activity, request_count FROM sessions",
        )
    }
    assert set(stored) == set(good)
    for sid, row in good.items():
        got = stored[sid]
        assert got[1] == row[1] and got[6] == row[6]
        assert got[3:6] == row[3:6]  # the same instants
        assert (got[2] is None) == (row[2] is None)
    rejects = rows_of(
        dsn, "SELECT source_rowid, reason, raw, run_id FROM session_migration_rejects"
    )
    assert {r[0]: r[1] for r in rejects} == bad
    assert all(
        set(r[2])
        == {
            "session_id",
            "user_id",
            "metadata",
            "created_at",
            "expires_at",
            "last_activity",
            "request_count",
        }
        for r in rejects
    )
    assert {r[3] for r in rejects} == {result.outcome.run_id}
    assert sha256_file(small_backup) == before == result.hashes_after[0].sha256


def test_first_load_rebuilds_the_same_indexes(clean_backup, configure, dsn) -> None:
    steps.migrate(configure(clean_backup), progress=False)
    indexes = rows_of(
        dsn, "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'sessions' ORDER BY 1"
    )
    assert [name for name, _ in indexes] == ["idx_expires_at", "sessions_pkey"]
    assert "UNIQUE" in indexes[1][1] and "(session_id)" in indexes[1][1]
    with psycopg.connect(dsn) as conn, pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute("INSERT INTO sessions SELECT * FROM sessions LIMIT 1")


def test_naive_times_are_seoul_wall_clock(clean_backup, configure, dsn) -> None:
    steps.migrate(configure(clean_backup), progress=False)
    conn = sqlite3.connect(clean_backup)
    sid, created = conn.execute("SELECT session_id, created_at FROM sessions LIMIT 1").fetchone()
    (stored,) = rows_of(dsn, "SELECT created_at FROM sessions WHERE session_id = %s", (sid,))[0]
    naive = datetime.fromisoformat(created)
    # Seoul is UTC+9 all year: the wall-clock time is 9 hours ahead of the stored instant.
    assert stored == naive.replace(tzinfo=timezone(timedelta(hours=9)))
    assert stored.astimezone(UTC).replace(tzinfo=None) == naive - timedelta(hours=9)


def test_second_run_changes_nothing_and_says_so(clean_backup, configure, dsn) -> None:
    first = steps.migrate(configure(clean_backup), progress=False).outcome
    snapshot = rows_of(dsn, "SELECT * FROM sessions ORDER BY session_id")
    second = steps.migrate(configure(clean_backup), progress=False).outcome
    assert (first.inserted, first.unchanged) == (300, 0)
    assert (second.inserted, second.unchanged, second.conflicting) == (0, 300, 0)
    assert rows_of(dsn, "SELECT * FROM sessions ORDER BY session_id") == snapshot
    audit = rows_of(
        dsn, "SELECT inserted, unchanged, rejected FROM session_migration_runs ORDER BY started_at"
    )
    assert audit == [(300, 0, 0), (0, 300, 0)]


def _touch_one(dsn: str, delta: str) -> str:
    with psycopg.connect(dsn) as conn:
        (sid,) = conn.execute("SELECT min(session_id) FROM sessions").fetchone()
        conn.execute(
            f"UPDATE sessions SET last_activity = last_activity + interval '{delta}', "
            "request_count = 999 WHERE session_id = %s",
            (sid,),
        )
    return sid


def test_conflicts_fail_by_default_and_nothing_is_written(clean_backup, configure, dsn) -> None:
    steps.migrate(configure(clean_backup), progress=False)
    sid = _touch_one(dsn, "1 hour")
    runs_before = rows_of(dsn, "SELECT count(*) FROM session_migration_runs")
    with pytest.raises(MigrationConflict, match="1 source rows differ"):
        steps.migrate(configure(clean_backup), progress=False)
    assert rows_of(dsn, "SELECT count(*) FROM session_migration_runs") == runs_before
    assert rows_of(dsn, "SELECT request_count FROM sessions WHERE session_id = %s", (sid,)) == [
        (999,)
    ]


def test_conflicts_skip_and_keep_newer(clean_backup, configure, dsn) -> None:
    steps.migrate(configure(clean_backup), progress=False)
    newer = _touch_one(dsn, "1 hour")  # the target's copy is newer: kept by both policies
    skipped = steps.migrate(configure(clean_backup, on_conflict="skip"), progress=False).outcome
    assert (skipped.conflicting, skipped.skipped, skipped.updated) == (1, 1, 0)
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "UPDATE sessions SET last_activity = last_activity - interval '2 hours' "
            "WHERE session_id = %s",
            (newer,),
        )  # now the source's copy is newer
    kept = steps.migrate(configure(clean_backup, on_conflict="keep_newer"), progress=False).outcome
    assert (kept.conflicting, kept.updated, kept.skipped) == (1, 1, 0)
    assert rows_of(
        dsn, "SELECT request_count <> 999 FROM sessions WHERE session_id = %s", (newer,)
    ) == [(True,)]


def test_dry_run_writes_nothing(small_backup, configure, dsn) -> None:
    result = steps.migrate(configure(small_backup, dry_run=True), progress=False)
    assert result.outcome.inserted == 393 and result.outcome.dry_run
    assert rows_of(
        dsn,
        "SELECT (SELECT count(*) FROM sessions), (SELECT count(*) FROM "
        "session_migration_rejects), (SELECT count(*) FROM session_migration_runs)",
    )[0] == (0, 0, 0)


def test_a_second_concurrent_run_fails_fast(clean_backup, configure, dsn) -> None:
    steps.migrate(configure(clean_backup), progress=False)  # creates the schema
    holder = psycopg.connect(dsn)
    holder.execute("SELECT pg_advisory_xact_lock(hashtextextended('sessionmig:public', 0))")
    try:
        with pytest.raises(LockHeld, match="another sessionmig migration holds the lock"):
            steps.migrate(configure(clean_backup), progress=False)
    finally:
        holder.rollback()
        holder.close()
    outcome = steps.migrate(configure(clean_backup), progress=False).outcome
    assert outcome.unchanged == 300


def test_expected_sha256_refuses_another_file(clean_backup, configure, dsn) -> None:
    with pytest.raises(SourceError, match="not the file that was reviewed"):
        steps.migrate(configure(clean_backup, expected_sha256="0" * 64), progress=False)
    ok = steps.migrate(
        configure(clean_backup, expected_sha256=sha256_file(clean_backup)), progress=False
    )
    assert ok.outcome.inserted == 300


def test_two_runs_at_once_never_interleave(clean_backup, configure, dsn) -> None:
    steps.migrate(configure(clean_backup, dry_run=True), progress=False)
    outcomes: list[object] = []

    def go() -> None:
        try:
            outcomes.append(steps.migrate(configure(clean_backup), progress=False).outcome)
        except LockHeld as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    inserted = [o.inserted for o in outcomes if not isinstance(o, LockHeld)]
    # Either the second failed fast on the lock, or it ran after the first and changed nothing.
    assert sorted(inserted) in ([300], [0, 300])
    assert rows_of(dsn, "SELECT count(*) FROM sessions") == [(300,)]


def test_a_clean_backup_takes_the_fast_path_only(clean_backup, configure, dsn) -> None:
    outcome = steps.migrate(configure(clean_backup), progress=False).outcome
    assert (outcome.inserted, outcome.rejected, outcome.spans_redone) == (300, 0, 0)
    assert rows_of(dsn, "SELECT count(*) FROM sessions") == [(300,)]
