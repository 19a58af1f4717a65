"""A hostile backup, built here value by value, through a real migrate and reconcile:
every row lands with its meaning or is rejected with the expected reason, never a crash."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import rows_of

from sessionmig.errors import SourceError
from sessionmig.runbook import steps
from sessionmig.sqlite.sample import LEGACY_SCHEMA

GOOD = ("2026-01-15 10:00:00", "2026-01-16 10:00:00", "2026-01-15 11:00:00")
T = "CAST(? AS TEXT)"
# (id, user_id SQL, metadata SQL, created_at SQL, request_count SQL, values, expected)
# expected: ("lands", checks) or ("reject", reason)
CASES: list[tuple] = [
    ("ok-plain", "?", "?", "?", "?", ("u", '{"a": 1}', GOOD[0], 5), ("lands", {"request_count": 5})),
    ("ok-T", "?", "?", "?", "?", (None, None, "2026-01-15T10:00:00", 0), ("lands", {"created_at": datetime(2026, 1, 15, 1, tzinfo=UTC)})),
    ("ok-Z", "?", "?", "?", "?", (None, None, "2026-01-15 10:00:00Z", 0), ("lands", {"created_at": datetime(2026, 1, 15, 10, tzinfo=UTC)})),
    ("ok-offset", "?", "?", "?", "?", (None, None, "2026-01-15T10:00:00.250+05:30", 0), ("lands", {"created_at": datetime(2026, 1, 15, 4, 30, 0, 250000, tzinfo=UTC)})),
    ("ok-minutes", "?", "?", "?", "?", (None, None, "2026-01-15 10:00", 0), ("lands", {"created_at": datetime(2026, 1, 15, 1, tzinfo=UTC)})),
    ("ok-array-meta", "?", "?", "?", "?", (None, "[1, 2, 3]", GOOD[0], 0), ("lands", {"metadata": [1, 2, 3]})),
    ("ok-string-meta", "?", "?", "?", "?", (None, '"hello"', GOOD[0], 0), ("lands", {"metadata": "hello"})),
    ("ok-unicode", "?", "?", "?", "?", ("사용자", '{"지역": "서울", "emoji": "🙂"}', GOOD[0], 0), ("lands", {"user_id": "사용자", "metadata": {"지역": "서울", "emoji": "🙂"}})),
    ("ok-empty-user", "?", "?", "?", "?", ("", None, GOOD[0], 0), ("lands", {"user_id": ""})),
    ("ok-count-text", "?", "?", "?", "?", (None, None, GOOD[0], " 42 "), ("lands", {"request_count": 42})),
    ("ok-count-real", "?", "?", "?", "?", (None, None, GOOD[0], 7.0), ("lands", {"request_count": 7})),
    ("ok-count-null", "?", "?", "?", "?", (None, None, GOOD[0], None), ("lands", {"request_count": 0})),
    ("ok-count-max", "?", "?", "?", "?", (None, None, GOOD[0], 2**31 - 1), ("lands", {"request_count": 2**31 - 1})),
    ("ok-long-user", "?", "?", "?", "?", ("x" * 5000, None, GOOD[0], 0), ("lands", {"user_id": "x" * 5000})),
    ("ok-big-number", "?", "?", "?", "?", (None, '{"n": 123456789012345678901234567890}', GOOD[0], 0), ("lands", {})),
    ("ok-millis", "?", "?", "?", "?", (None, None, "2026-01-15 10:00:00.250", 0), ("lands", {"created_at": datetime(2026, 1, 15, 1, 0, 0, 250000, tzinfo=UTC)})),
    ("ok-deep-json", "?", "?", "?", "?", (None, "[" * 500 + "]" * 500, GOOD[0], 0), ("lands", {})),
    ("bad-json-deeper-than-postgres", "?", "?", "?", "?", (None, "[" * 100_000 + "]" * 100_000, GOOD[0], 0), ("reject", "refused_by_postgresql")),
    ("bad-json-overflow", "?", "?", "?", "?", (None, '{"n": 1e1000000}', GOOD[0], 0), ("reject", "refused_by_postgresql")),
    ("bad-json-surrogate", "?", "?", "?", "?", (None, '{"x": "\\ud800"}', GOOD[0], 0), ("reject", "json_not_storable")),
    ("bad-json", "?", "?", "?", "?", (None, "{'single': 'quotes'}", GOOD[0], 0), ("reject", "invalid_json")),
    ("bad-json-empty", "?", "?", "?", "?", (None, "", GOOD[0], 0), ("reject", "invalid_json")),
    ("bad-json-nan", "?", "?", "?", "?", (None, '{"x": NaN}', GOOD[0], 0), ("reject", "invalid_json")),
    ("bad-json-nul", "?", "?", "?", "?", (None, '{"x": "a\\u0000b"}', GOOD[0], 0), ("reject", "json_not_storable")),
    ("bad-utf8-user", T, "?", "?", "?", (b"caf\xe9", None, GOOD[0], 0), ("reject", "invalid_utf8")),
    ("bad-utf8-meta", "?", T, "?", "?", (None, b'{"a": "\xff"}', GOOD[0], 0), ("reject", "invalid_utf8")),
    ("bad-nul-user", "?", "?", "?", "?", ("a\x00b", None, GOOD[0], 0), ("reject", "nul_character")),
    ("bad-nul-meta", "?", "?", "?", "?", (None, '{"a": 1}\x00{"b": 2}', GOOD[0], 0), ("reject", "nul_character")),
    ("bad-blob-user", "?", "?", "?", "?", (b"\x01\x02", None, GOOD[0], 0), ("reject", "unexpected_blob")),
    ("bad-ts-words", "?", "?", "?", "?", (None, None, "last tuesday", 0), ("reject", "timestamp_unparseable")),
    ("bad-ts-date-only", "?", "?", "?", "?", (None, None, "2026-01-15", 0), ("reject", "timestamp_unparseable")),
    ("bad-ts-feb30", "?", "?", "?", "?", (None, None, "2026-02-30 10:00:00", 0), ("reject", "timestamp_impossible")),
    ("bad-ts-epoch", "?", "?", "?", "?", (None, None, 1767225600, 0), ("reject", "timestamp_type")),
    ("bad-ts-real", "?", "?", "?", "?", (None, None, 1767225600.5, 0), ("reject", "timestamp_type")),
    ("bad-count-frac", "?", "?", "?", "?", (None, None, GOOD[0], 1.5), ("reject", "count_not_integral")),
    ("bad-count-word", "?", "?", "?", "?", (None, None, GOOD[0], "many"), ("reject", "count_not_integral")),
    ("bad-count-big", "?", "?", "?", "?", (None, None, GOOD[0], 2**31), ("reject", "count_out_of_range")),
    ("bad-count-neg-big", "?", "?", "?", "?", (None, None, GOOD[0], -(2**40)), ("reject", "count_out_of_range")),
]  # fmt: skip


def build(path: Path, extra_column: bool = False) -> None:
    conn = sqlite3.connect(path)
    conn.executescript(LEGACY_SCHEMA)
    if extra_column:
        conn.execute("ALTER TABLE sessions ADD COLUMN ip TEXT")
    for sid, u, m, c, n, (uv, mv, cv, nv), _ in CASES:
        conn.execute(
            "INSERT INTO sessions (session_id, user_id, metadata, created_at, expires_at, "
            f"last_activity, request_count) VALUES (?, {u}, {m}, {c}, ?, ?, {n})",
            (sid, uv, mv, cv, GOOD[1], GOOD[2], nv),
        )
    conn.execute("INSERT INTO sessions (session_id, created_at, expires_at, last_activity) "
                 "VALUES (NULL, ?, ?, ?)", GOOD)  # fmt: skip
    if extra_column:
        conn.execute("UPDATE sessions SET ip = '10.0.0.' || rowid")
    conn.commit()
    conn.close()


@pytest.fixture
def hostile(tmp_path: Path, target):
    def make(extra_column: bool = False, **overrides) -> steps.Settings:
        path = tmp_path / ("extra.db" if extra_column else "hostile.db")
        if not path.exists():
            build(path, extra_column)
        return target(path, **overrides)

    return make


def test_every_hostile_row_lands_or_is_rejected_as_expected(hostile, dsn) -> None:
    s = hostile()
    outcome = steps.migrate(s, progress=False).outcome
    rejects = dict(rows_of(dsn, "SELECT coalesce(session_id, '<null>'), reason FROM "
                             "session_migration_rejects"))  # fmt: skip
    landed = {r[0]: r for r in rows_of(dsn, "SELECT session_id, user_id, metadata, created_at, "
                                            "request_count FROM sessions")}  # fmt: skip
    columns = {"user_id": 1, "metadata": 2, "created_at": 3, "request_count": 4}
    for sid, *_, (kind, expected) in CASES:
        if kind == "reject":
            assert rejects.get(sid) == expected, sid
            assert sid not in landed
        else:
            assert sid in landed, (sid, rejects.get(sid))
            for column, value in expected.items():
                assert landed[sid][columns[column]] == value, (sid, column)
    assert rejects["<null>"] == "missing_session_id"
    assert outcome.rows_read == len(CASES) + 1 == len(landed) + len(rejects)
    result = steps.reconcile_step(s)
    assert result.verdict == "PASS_WITH_WARNINGS"
    assert result.counts["changed"] == 0  # the rules agree with the server on every shape


def test_a_value_postgresql_refuses_is_rejected_with_its_message(hostile, dsn) -> None:
    steps.migrate(hostile(), progress=False)
    ((message, raw),) = rows_of(
        dsn,
        "SELECT message, raw FROM session_migration_rejects WHERE session_id = 'bad-json-overflow'",
    )
    assert "overflows numeric format" in message
    assert raw["metadata"] == {"type": "text", "value": '{"n": 1e1000000}'}


def test_bytes_that_are_not_utf8_are_kept_in_hex(hostile, dsn) -> None:
    steps.migrate(hostile(), progress=False)
    (raw,) = rows_of(dsn, "SELECT raw FROM session_migration_rejects WHERE session_id = "
                          "'bad-utf8-user'")[0]  # fmt: skip
    assert raw["user_id"] == {"type": "text", "hex": b"caf\xe9".hex()}


def test_extra_columns_fail_by_default_with_the_fix(hostile) -> None:
    with pytest.raises(
        SourceError, match="extra columns \\['ip'\\].*on_extra_columns=into_metadata"
    ):
        steps.migrate(hostile(extra_column=True), progress=False)


def test_extra_columns_can_be_carried_into_metadata(hostile, dsn) -> None:
    s = hostile(extra_column=True, on_extra_columns="into_metadata")
    steps.migrate(s, progress=False)
    meta = dict(rows_of(dsn, "SELECT session_id, metadata FROM sessions"))
    assert meta["ok-plain"] == {"a": 1, "_legacy_columns": {"ip": "10.0.0.1"}}
    assert meta["ok-T"] == {"_legacy_columns": {"ip": "10.0.0.2"}}  # NULL metadata
    reasons = dict(rows_of(dsn, "SELECT session_id, reason FROM session_migration_rejects"))
    assert reasons["ok-array-meta"] == "extra_columns_unplaceable"
    raw = rows_of(dsn, "SELECT raw FROM session_migration_rejects WHERE session_id = "
                       "'ok-array-meta'")[0][0]  # fmt: skip
    assert raw["ip"] == {"type": "text", "value": "10.0.0.6"}
    assert steps.reconcile_step(s).verdict == "PASS_WITH_WARNINGS"
