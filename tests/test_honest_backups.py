"""Honest backups that must be able to pass: every row of a backup the tool
treats correctly — rejected with a reason, or landed — leaves a run that can PASS, with a
finding wherever the landed value is not all the backup said."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import psycopg
import pytest
from conftest import rows_of

from sessionmig.engines.appcheck import combined_verdict
from sessionmig.runbook import steps
from sessionmig.sqlite.source import sha256_file

pytestmark = pytest.mark.slow

ACTIVE = ("2026-01-15 10:00:00", "2026-01-16 10:00:00", "2026-01-15 11:00:00")  # as_of 12:00


def add_row(backup: Path, sid: str, user: str | None, metadata: str | None) -> None:
    with sqlite3.connect(backup) as conn:
        conn.execute(
            "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, 1)", (sid, user, metadata, *ACTIVE)
        )
    conn.close()


def test_an_active_row_postgresql_refuses_does_not_fail_the_app_check(
    clean_backup: Path, target, dsn: str
) -> None:
    """A row the rules accept but PostgreSQL refuses is kept as refused_by_postgresql; still
    active at as_of, it must not make the app check say the app wrongly rejects it."""
    add_row(clean_backup, "session-refused-active", "u1", '{"n": 1e1000000}')
    s = target(clean_backup)
    assert steps.migrate(s, progress=False).outcome.committed
    assert rows_of(dsn, "SELECT reason FROM session_migration_rejects") == [
        ("refused_by_postgresql",)
    ]
    result = steps.reconcile_step(s, progress=False)
    app = result.app
    assert app is not None
    assert (app.wrongly_rejected, app.wrongly_accepted) == (0, 0), app.examples
    verdict, _ = combined_verdict(result.verdict, result.reason, app)
    assert verdict == "PASS_WITH_WARNINGS"


def rebuilt(clean: Path, out: Path, columns: str, select: str) -> Path:
    """``clean``'s rows in a sessions table of another shape (``columns``), filled by
    ``select`` over the original table (aliased ``o``), rowids kept."""
    conn = sqlite3.connect(out)
    try:
        conn.execute("ATTACH DATABASE ? AS o", (str(clean),))
        conn.execute(f"CREATE TABLE sessions ({columns})")
        conn.execute(f"INSERT INTO sessions SELECT {select} FROM o.sessions ORDER BY rowid")
        conn.commit()
        conn.execute("DETACH DATABASE o")
    finally:
        conn.close()
    return out


LEGACY_COLUMNS = (
    "session_id TEXT PRIMARY KEY, user_id TEXT, metadata TEXT, created_at TIMESTAMP NOT NULL, "
    "expires_at TIMESTAMP NOT NULL, last_activity TIMESTAMP NOT NULL"
)
LEGACY_SELECT = "session_id, user_id, metadata, created_at, expires_at, last_activity"


def passes(s) -> str:
    """Migrate then reconcile (with the app check), as the runbook does: the combined verdict."""
    assert steps.migrate(s, progress=False).outcome.committed
    result = steps.reconcile_step(s, progress=False)
    verdict, reason = combined_verdict(result.verdict, result.reason, result.app)
    assert verdict in ("PASS", "PASS_WITH_WARNINGS"), reason
    return verdict


def test_a_real_column_named_rowid_is_carried_into_metadata_and_passes(
    clean_backup: Path, tmp_path: Path, target, dsn: str
) -> None:
    """A column named rowid hides SQLite's rowid (which the tool addresses rows by); its values
    all alike made migrate's key build fail. It is read from a private copy now: every row lands,
    its rowid value kept under metadata._legacy_columns, the backup untouched."""
    backup = rebuilt(
        clean_backup,
        tmp_path / "rowid.db",
        f"{LEGACY_COLUMNS}, request_count INTEGER DEFAULT 0, rowid TEXT",
        f"{LEGACY_SELECT}, request_count, 'same for every row'",
    )
    before = sha256_file(backup)
    s = target(backup, on_extra_columns="into_metadata")
    inspected = steps.inspect(s, progress=False)
    assert inspected.ok, inspected.findings
    passes(s)
    assert rows_of(dsn, "SELECT count(*) FROM sessions") == [(300,)]
    kept = rows_of(dsn, "SELECT DISTINCT metadata->'_legacy_columns'->>'rowid' FROM sessions")
    assert kept == [("same for every row",)]
    assert sha256_file(backup) == before


def test_generated_columns_are_seen_and_read(
    clean_backup: Path, tmp_path: Path, target, dsn: str
) -> None:
    """PRAGMA table_info leaves generated columns out: a generated request_count was reported
    missing. They are columns like any other to a reader."""
    backup = rebuilt(
        clean_backup,
        tmp_path / "generated.db",
        f"{LEGACY_COLUMNS}, request_count INTEGER GENERATED ALWAYS AS (length(session_id)) VIRTUAL",
        LEGACY_SELECT,
    )
    s = target(backup)
    inspected = steps.inspect(s, progress=False)
    assert "request_count" in inspected.columns
    assert not [f for f in inspected.findings if "missing" in f.code or "missing" in f.message]
    passes(s)
    assert rows_of(
        dsn, "SELECT count(*) FROM sessions WHERE request_count <> length(session_id)"
    ) == [(0,)]


def test_a_json_object_naming_a_key_twice_is_a_finding(clean_backup: Path, target) -> None:
    """jsonb keeps the last of a repeated key: the earlier value is dropped, and inspect says so
    (it said nothing)."""
    add_row(clean_backup, "session-repeated-key", "u2", '{"a": 1, "b": {"c": 2}, "a": 2}')
    add_row(
        clean_backup, "session-nested-alike", "u3", '{"a": {"a": 1}, "l": [{"a": 1}, {"a": 2}]}'
    )
    s = target(clean_backup)
    found = {f.code: f for f in steps.inspect(s, progress=False).findings}
    assert found["anomaly:json_repeated_key"].count == 1
    assert "keeps only the last value" in found["anomaly:json_repeated_key"].message


def test_a_changed_row_whose_metadata_nests_deeper_than_python_parses_is_named(
    clean_backup: Path, target, dsn: str
) -> None:
    """jsonb keeps 5,000 levels of nesting that Python's parser refuses (RecursionError):
    naming a difference in such a row says what changed, and never crashes the proof."""
    deep = "[" * 5000 + "1" + "]" * 5000
    add_row(clean_backup, "session-deep", "u1", deep)
    s = target(clean_backup)
    assert steps.migrate(s, progress=False).outcome.committed
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE sessions SET request_count = 7 WHERE session_id = 'session-deep'")
    result = steps.reconcile_step(s, progress=False)
    assert result.verdict == "FAIL" and result.counts["changed"] == 1
    (named,) = [d for d in result.differences if d.kind == "changed"]
    assert named.detail == "request_count: source 1 vs target 7"
