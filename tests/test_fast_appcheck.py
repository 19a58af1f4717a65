"""The app check's bulk path against the row-by-row one: the same sessions asked
about, in the same order, with the same ``expires_at``, so the same counts and examples.

``check_with_manager(fast=False)`` reads every row through the rules (the reference); both ask
the application's own predicate (``SessionManager.active_among``) about every session.
"""

from __future__ import annotations

import sqlite3
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import rows_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_fast_census import ROW, SCHEMAS, write_rows
from test_hostile import build as build_hostile

from sessionmig import appcheck, sample, steps
from sessionmig.appcheck import (
    AppCheck,
    check_with_manager,
    landed_by_the_rules,
    landed_in_bulk,
    landed_in_parts,
)
from sessionmig.sample import LEGACY_SCHEMA
from sessionmig.source import open_backup
from sessionmig.transform import Rules
from sessionmig.wire import WorkerDied

ZONES = ["Asia/Seoul", "America/New_York", "Australia/Lord_Howe", "UTC"]


def flat(batches) -> tuple[list[str], list[int]]:
    ids: list[str] = []
    expires: list[int] = []
    for more_ids, more_expires in batches:
        ids += more_ids
        expires += more_expires
    return ids, expires


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    rows=st.lists(ROW, min_size=1, max_size=40),
    schema=st.sampled_from(SCHEMAS),
    zone=st.sampled_from(ZONES),
    batch_rows=st.sampled_from([1, 3, 10_000]),
    left_out=st.sets(st.integers(1, 40), max_size=6),
)
def test_made_up_rows_land_alike(
    rows: list[tuple], schema: str, zone: str, batch_rows: int, left_out: set[int]
) -> None:
    from zoneinfo import ZoneInfo

    rules = Rules(ZoneInfo(zone))
    repeated = {r for r in left_out if r % 2}
    refused = left_out - repeated
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "made-up.db"
        write_rows(path, schema, rows)
        with open_backup(path) as backup:
            slow = flat(landed_by_the_rules(backup, rules, batch_rows, repeated, refused))
            fast = flat(landed_in_bulk(backup, rules, batch_rows, repeated, refused))
    assert fast == slow


@pytest.fixture
def in_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read even a small backup by worker processes, as a large one is."""
    monkeypatch.setattr(appcheck, "PARTS_FROM", 0)
    monkeypatch.setattr(appcheck, "ASK_ROWS", 50)


def test_parts_land_alike(tmp_path: Path, in_parts: None) -> None:
    path = tmp_path / "hostile.db"
    build_hostile(path)
    rules = Rules(__import__("zoneinfo").ZoneInfo("Asia/Seoul"))
    with open_backup(path) as backup:
        slow = flat(landed_by_the_rules(backup, rules, 5, {3}, {7}))
        for parts in (2, 3):
            got = sorted(landed_in_parts(backup, rules, 5, {3}, {7}, parts), key=lambda b: b[0])
            assert flat(batch for _, batch in got) == slow


def test_a_worker_that_dies_is_an_error_not_a_hang(
    tmp_path: Path, in_parts: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "hostile.db"
    build_hostile(path)
    monkeypatch.setattr(appcheck, "_WORKER", "import os; os._exit(3)")
    rules = Rules(__import__("zoneinfo").ZoneInfo("Asia/Seoul"))
    with open_backup(path) as backup, pytest.raises(WorkerDied):
        list(landed_in_parts(backup, rules, 5, set(), set()))


def both(s: steps.Settings, batch_rows: int = 10_000) -> dict[str, AppCheck]:
    """The app check both ways, in both modes; assert each pair agrees."""
    out = {}
    for mode in ("strict", "after_cutover"):
        with open_backup(s.sqlite_path) as backup:
            checks = [
                check_with_manager(
                    s.dsn(),
                    backup,
                    s.rules,
                    schema=s.target_schema,
                    as_of=s.as_of,
                    batch_rows=batch_rows,
                    mode=mode,
                    fast=fast,
                )
                for fast in (True, False)
            ]
        assert checks[0] == checks[1], mode
        out[mode] = checks[0]
    return out


def disturb(dsn: str) -> None:
    """Make the app disagree with the backup here and there: end, extend and cut sessions."""
    with __import__("psycopg").connect(dsn) as conn:
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


def test_hostile_backup(tmp_path: Path, target, dsn: str, in_parts: None) -> None:
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
    found = both(s, batch_rows=4)
    assert found["strict"].examples and not found["strict"].ok
    assert found["after_cutover"].explained


@pytest.mark.parametrize("parts", ["one", "parts"])
def test_sample_with_oddities_and_repeated_ids(
    tmp_path: Path, target, dsn: str, parts: str, monkeypatch: pytest.MonkeyPatch
) -> None:
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
    if parts == "parts":  # read by worker processes, in small batches, as a large backup is
        monkeypatch.setattr(appcheck, "PARTS_FROM", 0)
        monkeypatch.setattr(appcheck, "ASK_ROWS", 100)
    assert steps.migrate(s, progress=False).outcome.committed
    assert rows_of(
        dsn, "SELECT count(*) FROM session_migration_rejects WHERE reason = "
        "'duplicate_session_id'"
    )[0][0] > 25  # fmt: skip
    both(s, batch_rows=500)
    disturb(dsn)
    found = both(s, batch_rows=777)
    assert found["strict"].examples


@pytest.mark.parametrize("zone", ["America/New_York"])
def test_dst_days(tmp_path: Path, target, dsn: str, zone: str) -> None:
    path = tmp_path / "dst.db"
    sample.generate(path, rows=2000, seed=5, as_of="2026-03-09T12:00:00-04:00", zone=zone)
    s = target(path, source_timezone=zone, as_of="2026-03-09T12:00:00-04:00")
    assert steps.migrate(s, progress=False).outcome.committed
    both(s)
    disturb(dsn)
    assert both(s, batch_rows=300)["strict"].examples
    assert s.as_of == datetime(2026, 3, 9, 16, tzinfo=UTC)
