"""Inspect's census and findings on a known sample and on bad files."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from sessionmig.rules.transform import Rules
from sessionmig.sqlite.inspection import inspect_backup

AS_OF = datetime(2026, 1, 15, 3, tzinfo=UTC)
RULES = Rules(ZoneInfo("Asia/Seoul"))


def codes(result) -> dict[str, int]:
    return {f.code: f.count for f in result.findings}


def test_sample_findings_name_every_oddity(small_backup: Path) -> None:
    result = inspect_backup(small_backup, RULES, AS_OF, "Asia/Seoul")
    assert result.ok
    found = codes(result)
    for reason in (
        "invalid_json",
        "invalid_utf8",
        "count_not_integral",
        "timestamp_unparseable",
        "timestamp_impossible",
        "timestamp_type",
        "missing_session_id",
    ):
        assert found[f"reject:{reason}"] == 1, reason
    assert found["anomaly:expires_before_created"] == 1
    assert found["anomaly:negative_request_count"] == 1
    assert found["anomaly:last_activity_outside_lifetime"] >= 1
    census = result.census
    assert census.rows == 400
    assert census.active + census.expired + sum(census.rejects.values()) == 400
    t_and_z = {s: n for s, n in census.spellings["created_at"].items() if s.endswith("Z")}
    assert sum(t_and_z.values()) == 1 and all("T" in s for s in t_and_z)
    assert census.nulls["metadata"] == 1
    assert sum(census.created_per_day.values()) == census.active + census.expired
    assert all("session-" not in " ".join(f.examples) for f in result.findings)


def test_dst_wall_clock_times_are_counted(tmp_path: Path) -> None:
    path = tmp_path / "dst.db"
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE sessions (session_id TEXT PRIMARY KEY, user_id TEXT, metadata "
        "TEXT, created_at TIMESTAMP NOT NULL, expires_at TIMESTAMP NOT NULL, "
        "last_activity TIMESTAMP NOT NULL, request_count INTEGER DEFAULT 0)"
    )
    conn.executemany(
        "INSERT INTO sessions VALUES (?, NULL, NULL, ?, ?, ?, 0)",
        [
            ("s1", "2026-03-08 02:30:00", "2026-03-09 02:30:00", "2026-03-08 02:30:00"),
            ("s2", "2026-11-01 01:30:00", "2026-11-02 01:30:00", "2026-11-01 01:30:00"),
        ],
    )
    conn.commit()
    conn.close()
    rules = Rules(ZoneInfo("America/New_York"))
    result = inspect_backup(path, rules, AS_OF, "America/New_York")
    assert codes(result)["dst:nonexistent"] == 2  # created_at and last_activity of s1
    assert codes(result)["dst:ambiguous"] == 2


def test_corrupt_and_foreign_files_are_errors_not_crashes(tmp_path: Path, clean_backup) -> None:
    text = tmp_path / "notes.db"
    text.write_text("hello")
    result = inspect_backup(text, RULES, AS_OF, "Asia/Seoul")
    assert not result.ok and "not a SQLite database" in result.findings[0].message
    broken = tmp_path / "broken.db"
    data = bytearray(clean_backup.read_bytes())
    data[5000:9000] = b"\x00" * 4000
    broken.write_bytes(bytes(data))
    result = inspect_backup(broken, RULES, AS_OF, "Asia/Seoul")
    assert not result.ok
    assert {f.code for f in result.findings if f.severity == "error"} & {
        "integrity",
        "unreadable_rows",
        "unreadable",
    }


def test_missing_and_extra_columns_are_errors(tmp_path: Path) -> None:
    path = tmp_path / "odd.db"
    sqlite3.connect(path).execute(
        "CREATE TABLE sessions (session_id TEXT, ip TEXT)"
    ).connection.close()
    result = inspect_backup(path, RULES, AS_OF, "Asia/Seoul")
    errors = [f for f in result.findings if f.severity == "error"]
    assert {f.code for f in errors} == {"missing_column", "extra_column"}
    assert result.census is None
