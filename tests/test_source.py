"""The backup is evidence: read only through a private copy, hashed, side files included."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from sessionmig.errors import SourceError
from sessionmig.sqlite import sample
from sessionmig.sqlite.source import hash_files, open_backup, sha256_file


def test_rows_stream_raw_with_storage_classes(small_backup: Path) -> None:
    before = sha256_file(small_backup)
    backup = open_backup(small_backup)
    try:
        rows = [r for batch in backup.rows(batch=64) for r in batch]
        assert len(rows) == 400 == backup.count()
        storages = {r[8 + 6] for r in rows}
        assert {"integer", "real"} <= storages  # request_count 12.5 oddity is REAL
        assert all(isinstance(r[1], bytes | None) for r in rows)
        assert backup.integrity_check() == ["ok"]
        backup.verify_unchanged()
    finally:
        backup.close()
    assert sha256_file(small_backup) == before
    assert backup.copy is None  # a lone file is read in place, read only


def test_side_files_are_read_through_a_private_copy(tmp_path: Path) -> None:
    path = tmp_path / "sessions.db"
    sample.generate(path, rows=50, oddities=0)
    wal = Path(str(path) + "-wal")
    wal.write_bytes(b"")
    backup = open_backup(path)
    try:
        assert backup.copy is not None and backup.copy.exists()
        assert backup.side_files == ["sessions.db-wal"]
        assert backup.count() == 50
    finally:
        backup.close()
    assert not backup.copy.exists()
    assert wal.read_bytes() == b""


def test_not_a_sqlite_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "sessions.db"
    path.write_text("id,user\n1,2\n")
    with pytest.raises(SourceError, match="not a SQLite database"):
        open_backup(path)


def test_truncated_file_is_reported_not_crashed(tmp_path: Path) -> None:
    path = tmp_path / "sessions.db"
    sample.generate(path, rows=2000, oddities=0)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(SourceError, match="damaged|truncated|integrity"):
        backup = open_backup(path)
        try:
            if backup.integrity_check() != ["ok"]:
                raise SourceError("integrity_check failed")
            for _ in backup.rows():
                pass
        finally:
            backup.close()


def test_missing_table_is_named(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    sqlite3.connect(path).execute("CREATE TABLE users (id)").connection.close()
    with pytest.raises(SourceError, match="has no table 'sessions'"):
        open_backup(path)


def test_wal_rows_are_included_and_the_wal_is_hashed(tmp_path: Path) -> None:
    path = tmp_path / "live.db"
    sample.generate(path, rows=50, oddities=0)
    writer = sqlite3.connect(path)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("PRAGMA wal_autocheckpoint=0")
    writer.execute(
        "INSERT INTO sessions VALUES ('session-wal', NULL, '{}', '2026-01-15 10:00:00',"
        " '2026-01-16 10:00:00', '2026-01-15 10:00:00', 0)"
    )
    writer.commit()
    # Copy the files as a backup of a running app would be: main file + WAL, writer still open.
    copy = tmp_path / "backup.db"
    copy.write_bytes(path.read_bytes())
    Path(str(copy) + "-wal").write_bytes(Path(str(path) + "-wal").read_bytes())
    writer.close()
    hashes = hash_files(copy)
    assert [Path(h.path).name for h in hashes] == ["backup.db", "backup.db-wal"]
    backup = open_backup(copy)
    try:
        assert backup.side_files == ["backup.db-wal"]
        assert backup.count() == 51
        backup.verify_unchanged()
    finally:
        backup.close()
    assert hash_files(copy) == hashes


def test_extra_and_missing_columns_are_visible(tmp_path: Path) -> None:
    path = tmp_path / "odd.db"
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE sessions (session_id TEXT PRIMARY KEY, user_id TEXT, "
        "created_at TIMESTAMP, ip TEXT)"
    )
    conn.close()
    backup = open_backup(path)
    try:
        assert backup.missing_columns == [
            "metadata",
            "expires_at",
            "last_activity",
            "request_count",
        ]
        assert backup.extra_columns == ["ip"]
    finally:
        backup.close()
