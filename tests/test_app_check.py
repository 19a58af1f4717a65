"""The application check against an obvious computation of it (``appcheck_reference``): the
same sessions checked, the same counts, the same explanations, examples among the reference's,
on hostile and generated backups, repeated ids, DST days, and a target the app disagrees with.

The runbook's check asks the ``SessionManager`` once over the whole table and compares in SQL
with reconcile's reading of the backup; the reference reads every row through the rules and
asks the manager about each id. Both ask the application's own predicate.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from appcheck_reference import reference_app_check
from conftest import rows_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_fast_census import ROW, SCHEMAS, write_rows
from test_hostile import build as build_hostile

from sessionmig.engines.appcheck import EXAMPLES, AppCheck
from sessionmig.runbook import steps
from sessionmig.sqlite import sample
from sessionmig.sqlite.sample import LEGACY_SCHEMA
from sessionmig.sqlite.source import open_backup


def both(s: steps.Settings) -> dict[str, AppCheck]:
    """The app check both ways, in both modes; assert each pair agrees."""
    out = {}
    for mode in ("strict", "after_cutover"):
        app = steps.reconcile_step(dataclasses.replace(s, reconcile_mode=mode), progress=False).app
        assert app is not None
        with open_backup(s.sqlite_path) as backup:
            ref = reference_app_check(
                s.dsn(), backup, s.rules, schema=s.target_schema, as_of=s.as_of, mode=mode
            )
        counts = ("checked", "expected_active", "accepted_active", "wrongly_rejected")
        counts += ("wrongly_accepted", "explained")
        assert [getattr(app, c) for c in counts] == [getattr(ref, c) for c in counts], mode
        assert len(app.examples) == min(EXAMPLES, len(ref.examples))
        assert set(app.examples) <= set(ref.examples)
        out[mode] = app
    return out


def disturb(dsn: str) -> None:
    """Make the app disagree with the backup here and there: end, extend and cut sessions."""
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "UPDATE sessions SET expires_at = expires_at - interval '30 days' "
            "WHERE session_id IN (SELECT session_id FROM sessions ORDER BY session_id LIMIT 15)"
        )
        conn.execute(
            "UPDATE sessions SET expires_at = expires_at + interval '60 days' WHERE session_id IN "
            "(SELECT session_id FROM sessions ORDER BY session_id DESC LIMIT 15)"
        )
        conn.execute(
            "DELETE FROM sessions WHERE session_id IN (SELECT session_id FROM sessions "
            "WHERE expires_at > now() - interval '3650 days' ORDER BY md5(session_id) LIMIT 5)"
        )


def test_hostile_backup(tmp_path: Path, target, dsn: str) -> None:
    path = tmp_path / "hostile.db"
    build_hostile(path)
    s = target(path)
    assert steps.migrate(s, progress=False).outcome.committed
    assert rows_of(
        dsn, "SELECT count(*) FROM session_migration_rejects WHERE reason = 'refused_by_postgresql'"
    ) == [(2,)]
    clean = both(s)["strict"]
    assert clean.ok and clean.checked > 15
    disturb(dsn)
    found = both(s)
    assert found["strict"].examples and not found["strict"].ok
    assert found["after_cutover"].explained


def test_sample_with_oddities_and_repeated_ids(tmp_path: Path, target, dsn: str) -> None:
    """A table that does not keep session_id unique: later copies never land (and a first
    copy the rules reject leaves the second to land)."""
    plain = tmp_path / "sample.db"
    sample.generate(plain, rows=3000, seed=8)
    path = tmp_path / "repeated.db"
    conn = sqlite3.connect(path)
    conn.executescript(LEGACY_SCHEMA.replace("session_id TEXT PRIMARY KEY", "session_id"))
    conn.execute("ATTACH DATABASE ? AS o", (str(plain),))
    conn.execute("INSERT INTO sessions SELECT * FROM o.sessions ORDER BY rowid")
    conn.execute(
        "INSERT INTO sessions SELECT * FROM o.sessions WHERE rowid % 97 = 0 ORDER BY rowid"
    )
    conn.execute(
        "INSERT INTO sessions (session_id, metadata, created_at, expires_at, last_activity) "
        "VALUES (123, '{}', '2026-01-15 10:00:00', '2026-01-16 10:00:00', "
        "'2026-01-15 11:00:00'), ('123', '{}', '2026-01-15 10:00:00', '2026-01-15 11:00:00', "
        "'2026-01-15 11:00:00'), ('twice', '{bad', '2026-01-15 10:00:00', "
        "'2026-01-16 10:00:00', '2026-01-15 11:00:00'), ('twice', '{}', "
        "'2026-01-15 10:00:00', '2026-01-16 10:00:00', '2026-01-15 11:00:00')"
    )
    conn.commit()
    conn.close()
    s = target(path)
    assert steps.migrate(s, progress=False).outcome.committed
    assert rows_of(
        dsn, "SELECT count(*) FROM session_migration_rejects WHERE reason = "
        "'duplicate_session_id'"
    )[0][0] > 25  # fmt: skip
    both(s)
    disturb(dsn)
    found = both(s)
    assert found["strict"].wrongly_rejected + found["strict"].wrongly_accepted > EXAMPLES
    assert len(found["strict"].examples) == EXAMPLES


def test_dst_days(tmp_path: Path, target, dsn: str) -> None:
    zone = "America/New_York"
    path = tmp_path / "dst.db"
    sample.generate(path, rows=2000, seed=5, as_of="2026-03-09T12:00:00-04:00", zone=zone)
    s = target(path, source_timezone=zone, as_of="2026-03-09T12:00:00-04:00")
    assert steps.migrate(s, progress=False).outcome.committed
    both(s)
    disturb(dsn)
    assert both(s)["strict"].examples
    assert s.as_of == datetime(2026, 3, 9, 16, tzinfo=UTC)


def _empty(dsn: str) -> None:
    """A new target for the next example (the runbook's tables are append-only)."""
    with psycopg.connect(dsn) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
@given(
    rows=st.lists(ROW, min_size=1, max_size=30),
    schema=st.sampled_from(SCHEMAS),
    zone=st.sampled_from(["Asia/Seoul", "America/New_York", "Australia/Lord_Howe"]),
    hours=st.integers(-48, 48),
)
def test_made_up_backups_agree(target, dsn: str, rows, schema, zone, hours) -> None:
    """Odd rows of every kind, an as_of anywhere around them, a target disturbed or not."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "made-up.db"
        write_rows(path, schema, rows)
        at = datetime(2026, 1, 15, 12, tzinfo=UTC).timestamp() + hours * 3600
        s = target(path, source_timezone=zone, as_of=datetime.fromtimestamp(at, UTC).isoformat())
        s = dataclasses.replace(s, on_extra_columns="into_metadata")
        migrated = steps.migrate(s, progress=False)
        try:
            if migrated.outcome.committed:
                both(s)
                disturb(dsn)
                both(s)
        finally:
            _empty(dsn)
