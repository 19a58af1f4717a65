"""The sample generator: the exact legacy schema, deterministic, realistic, with oddities."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sessionmig.sqlite import sample
from sessionmig.sqlite.source import sha256_file


def test_same_seed_same_file_different_seed_different_file(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.db", tmp_path / "b.db", tmp_path / "c.db"
    sample.generate(a, rows=300, seed=1)
    sample.generate(b, rows=300, seed=1)
    sample.generate(c, rows=300, seed=2)
    assert sha256_file(a) == sha256_file(b) != sha256_file(c)


def test_schema_is_exactly_the_legacy_one(clean_backup: Path) -> None:
    conn = sqlite3.connect(clean_backup)
    table_sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'sessions'").fetchone()[0]
    index = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'idx_expires_at'").fetchone()
    assert "session_id TEXT PRIMARY KEY" in table_sql
    assert "request_count INTEGER DEFAULT 0" in table_sql
    assert index[0] == "CREATE INDEX idx_expires_at ON sessions(expires_at)"


def test_rows_look_like_the_legacy_app_wrote_them(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    sample.generate(path, rows=4000, seed=3, oddities=0)
    conn = sqlite3.connect(path)
    ids = [r[0] for r in conn.execute("SELECT session_id FROM sessions")]
    assert all(i.startswith("session-") and len(i) == 44 for i in ids)
    anonymous = conn.execute("SELECT avg(user_id IS NULL) FROM sessions").fetchone()[0]
    assert 0.22 < anonymous < 0.28
    stamps = [r[0] for r in conn.execute("SELECT created_at FROM sessions LIMIT 200")]
    assert all(len(s) in (19, 26) and s[10] == " " for s in stamps)
    local_as_of = "2026-01-15 12:00:00"
    active = conn.execute(
        "SELECT count(*) FROM sessions WHERE expires_at > ?", (local_as_of,)
    ).fetchone()[0]
    assert 0 < active < 4000 * 0.2
    size = conn.execute("SELECT avg(length(metadata)) FROM sessions").fetchone()[0]
    assert 150 < size < 300


def test_oddities_are_applied_and_reported(tmp_path: Path) -> None:
    applied = sample.generate(tmp_path / "s.db", rows=100, oddities=len(sample.ODDITIES))
    assert [o.name for _, o in applied] == [o.name for o in sample.ODDITIES]
    assert len({rowid for rowid, _ in applied}) == len(sample.ODDITIES)
    assert sum(not o.lands for _, o in applied) == 7
