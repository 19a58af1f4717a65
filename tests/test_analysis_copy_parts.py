"""The analysis copy's fast paths — plain rows' instants and metadata by Python's fast path, a
large backup by worker processes a span of rowids each — make row for row the copy the rules
make alone (rows kept, rows left out, every value), on the sample and on hostile backups."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from sessionmig.engines import queries
from sessionmig.rules.jsonb import metadata_text
from sessionmig.rules.transform import Rules
from sessionmig.sqlite import wire
from sessionmig.sqlite.sample import generate

RULES = Rules(zone=ZoneInfo("Asia/Seoul"))
NEW_YORK = Rules(zone=ZoneInfo("America/New_York"))
COLUMNS = "session_id, user_id, metadata, created_at, expires_at, last_activity, request_count"


def rows_of(copy: queries.AnalysisCopy) -> list[tuple]:
    with sqlite3.connect(copy.path) as conn:
        return conn.execute("SELECT * FROM sessions ORDER BY session_id").fetchall()


def indexes_of(copy: queries.AnalysisCopy) -> list[tuple]:
    with sqlite3.connect(copy.path) as conn:
        return conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' ORDER BY name"
        ).fetchall()


def by_id(copy: queries.AnalysisCopy) -> dict[str, tuple]:
    return {r[0]: r for r in rows_of(copy)}


def by_the_rules_alone(
    backup: Path, rules: Rules, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> queries.AnalysisCopy:
    """The copy with every row through :func:`transform.normalise` (no fast path of any kind)."""
    with monkeypatch.context() as m:
        m.setattr(queries, "_fill_in_parts", lambda *a: None)
        m.setattr(queries, "_plain_batches", lambda *a: None)
        return queries.AnalysisCopy.build(backup, rules, cache_dir=folder)


def test_a_copy_made_in_parts_is_the_copy_made_whole(tmp_path: Path, monkeypatch) -> None:
    backup = tmp_path / "sessions.db"
    generate(backup, rows=3000, seed=5)  # with the sample's oddities: rows that cannot land
    whole = queries.AnalysisCopy.build(backup, RULES, cache_dir=tmp_path / "whole")

    started = []
    real = wire.in_processes

    def counted(entry, works, ahead=2):
        started.append(len(works))
        return real(entry, works, ahead)

    monkeypatch.setattr(wire, "in_processes", counted)
    monkeypatch.setattr(queries, "FILL_PARTS_FROM", 100)
    parts = queries.AnalysisCopy.build(backup, RULES, cache_dir=tmp_path / "parts")
    assert started == [queries.FILL_PARTS]  # the workers made it
    assert (parts.rows, parts.left_out) == (whole.rows, whole.left_out)
    assert whole.left_out == 7  # the sample's rows that cannot land, left out alike
    assert rows_of(parts) == rows_of(whole) and len(rows_of(whole)) == whole.rows
    assert indexes_of(parts) == indexes_of(whole)
    assert sorted(p.name for p in parts.path.parent.iterdir()) == ["analysis.db", "meta.json"]
    for copy in (whole, parts):  # statistics sampled, the row count exact
        with sqlite3.connect(copy.path) as conn:
            stats = conn.execute("SELECT idx, stat FROM sqlite_stat1 ORDER BY idx").fetchall()
        assert [i for i, _ in stats] == ["idx_created_at", "idx_expires_at", "sessions_pkey"]
        assert all(stat.split()[0] == str(copy.rows) == "2993" for _, stat in stats)


def test_a_worker_that_dies_leaves_the_copy_to_the_caller(tmp_path: Path, monkeypatch) -> None:
    backup = tmp_path / "sessions.db"
    generate(backup, rows=1000, seed=6)
    whole = queries.AnalysisCopy.build(backup, RULES, cache_dir=tmp_path / "whole")

    def dies(entry, works, ahead=2):
        raise wire.WorkerDied("a worker process died (exit -9)")
        yield  # pragma: no cover

    monkeypatch.setattr(wire, "in_processes", dies)
    monkeypatch.setattr(queries, "FILL_PARTS_FROM", 100)
    again = queries.AnalysisCopy.build(backup, RULES, cache_dir=tmp_path / "again")
    assert rows_of(again) == rows_of(whole) and again.rows == whole.rows


@pytest.mark.parametrize("rows", [0, 1])
def test_a_small_backup_is_made_by_this_process(tmp_path: Path, monkeypatch, rows: int) -> None:
    backup = tmp_path / "sessions.db"
    generate(backup, rows=max(rows, 1), seed=7)
    if rows == 0:
        with sqlite3.connect(backup) as conn:
            conn.execute("DELETE FROM sessions")
    monkeypatch.setattr(wire, "in_processes", lambda *a, **k: pytest.fail("no worker needed"))
    copy = queries.AnalysisCopy.build(backup, RULES, cache_dir=tmp_path / "c")
    assert copy.rows + copy.left_out == rows


@pytest.mark.parametrize("workers", [False, True], ids=["one process", "worker processes"])
def test_rows_still_in_the_wal_are_in_the_copy(tmp_path: Path, monkeypatch, workers: bool) -> None:
    """A backup taken with its last commits in ``-wal``: the copy is made from the private copy
    the backup is read through, WAL included (by the worker processes too), and the backup's
    files stay as they were."""
    live_path = tmp_path / "live.db"
    generate(live_path, rows=500, seed=10)
    live = sqlite3.connect(live_path)
    live.execute("PRAGMA journal_mode = WAL")
    live.execute("PRAGMA wal_autocheckpoint = 0")
    live.execute("UPDATE sessions SET request_count = 100000 + rowid WHERE rowid <= 50")
    live.commit()
    folder = tmp_path / "backup"
    folder.mkdir()
    for suffix in ("", "-wal"):
        (folder / f"sessions.db{suffix}").write_bytes(Path(f"{live_path}{suffix}").read_bytes())
    live.close()
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    started = []
    real = wire.in_processes
    monkeypatch.setattr(wire, "in_processes", lambda *a: started.append(a) or real(*a))
    if workers:
        monkeypatch.setattr(queries, "FILL_PARTS_FROM", 100)
    copy = queries.AnalysisCopy.build(folder / "sessions.db", RULES, cache_dir=tmp_path / "c")
    assert len(started) == workers
    with sqlite3.connect(copy.path) as conn:
        counts = dict(conn.execute("SELECT rowid, request_count FROM sessions WHERE rowid <= 50"))
    assert counts and all(n == 100000 + r for r, n in counts.items())
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


# --- hostile backups: the fast paths make the copy the rules make ---------------------------

GOOD = ("2026-01-10 10:00:00", "2026-01-11 10:00:00", "2026-01-10 12:00:00.123456")
DEEPER = '{"a": ' + "[" * 1500 + "]" * 1500 + "}"
# (session_id, user_id, metadata, created_at, expires_at, last_activity, request_count, how)
# how: "lands" (the rules keep it), "out" (it cannot land), "blob" (stored as a BLOB where text
# belongs: it cannot land).
HOSTILE: list[tuple[Any, ...]] = [
    ("plain", "u1", '{"b": 1, "a": {"y": [1, "x"], "x": null}}', *GOOD, 3, "lands"),
    ("scalars", None, '"text"', *GOOD, None, "lands"),
    ("number", "", "7", *GOOD, 0, "lands"),
    ("null-json", "u1", "null", *GOOD, 1, "lands"),
    ("no-metadata", "u1", None, *GOOD, 1, "lands"),
    ("spaced", "u1", '{ "a" :\n 1 , "b":[ ] } \n', *GOOD, 1, "lands"),
    ("big-int", "u1", '{"n": 123456789012345678901234567890}', *GOOD, 1, "lands"),
    ("minus-zero", "u1", '{"n": -0}', *GOOD, 1, "lands"),  # the number 0, as jsonb holds it
    ("colon-key", "u1", '{":a": ":b", "a:": "x", "": ""}', *GOOD, 1, "lands"),
    ("dup", "u1", '{"a": 1, "a": 2}', *GOOD, 1, "lands"),
    ("dup-nested", "u1", '{"o": {"k": 1, "k": [2]}}', *GOOD, 1, "lands"),
    ("dup-object", "u1", '{"o": {"k": 1}, "o": {"j": 2}}', *GOOD, 1, "lands"),
    ("dotted", "u1", '{"a.b": 1, "a": {"b": 2}}', *GOOD, 1, "lands"),
    ("fraction", "u1", '{"x": 1.50, "y": -0.0}', *GOOD, 1, "lands"),
    ("exponent", "u1", '{"x": 1e2, "y": 2E-3}', *GOOD, 1, "lands"),
    ("escape-u", "u1", '{"k\\u00e9": "\\u00e9"}', *GOOD, 1, "lands"),
    ("escape-slash", "u1", '{"k": "a\\/b"}', *GOOD, 1, "lands"),
    ("escape-quote", "u1", '{"a\\"b": 1, "a\\u0022b": 2}', *GOOD, 1, "lands"),
    ("leading-space", "u1", ' {"a": 1}', *GOOD, 1, "lands"),
    ("deep", "u1", "[" * 600 + "]" * 600, *GOOD, 1, "lands"),
    ("deeper", "u1", DEEPER, *GOOD, 1, "lands"),  # deeper than Python prints
    ("deeper-spaced", "u1", " \n" + DEEPER, *GOOD, 1, "lands"),
    ("nul-escape", "u1", '{"a": "\\u0000"}', *GOOD, 1, "out"),
    ("surrogate", "u1", '{"a": "\\ud800"}', *GOOD, 1, "out"),
    ("invalid", "u1", '{"a": 1,', *GOOD, 1, "out"),
    ("json5-quote", "u1", "{'a': 1}", *GOOD, 1, "out"),
    ("json5-key", "u1", "{a: 1}", *GOOD, 1, "out"),
    ("json5-comma", "u1", "[1,]", *GOOD, 1, "out"),
    ("json5-hex", "u1", "0x10", *GOOD, 1, "out"),
    ("nan", "u1", "NaN", *GOOD, 1, "out"),
    ("infinity", "u1", '{"a": Infinity}', *GOOD, 1, "out"),
    ("empty", "u1", "", *GOOD, 1, "out"),
    ("bad-utf8-meta", "u1", b'{"a": "\xff"}', *GOOD, 1, "out"),
    ("nul-in-meta", "u1", b"{}\x00", *GOOD, 1, "out"),
    ("bad-utf8-user", b"u\xfe", None, *GOOD, 1, "out"),
    ("nul-in-user", b"u\x00", None, *GOOD, 1, "out"),
    (b"bad-\xff-id", "u1", None, *GOOD, 1, "out"),
    (b"nul-\x00-id", "u1", None, *GOOD, 1, "out"),
    ("x" * 2049, "u1", None, *GOOD, 1, "out"),
    (None, "u1", None, *GOOD, 1, "out"),
    # Times: the plain spelling and the others the rules read, a DST gap and fold in New York,
    # and what no rule reads.
    ("t-iso", "u1", None, "2026-01-10T10:00:00Z", *GOOD[1:], 1, "lands"),
    ("t-offset", "u1", None, "2026-01-10 10:00:00+05:30", *GOOD[1:], 1, "lands"),
    ("t-short", "u1", None, "2026-01-10 10:00", *GOOD[1:], 1, "lands"),
    ("t-tenth", "u1", None, "2026-01-10 10:00:00.5", *GOOD[1:], 1, "lands"),
    ("t-far", "u1", None, "1999-06-01 10:00:00", *GOOD[1:], 1, "lands"),
    ("t-gap", "u1", None, "2025-03-09 02:30:00", *GOOD[1:], 1, "lands"),
    ("t-fold", "u1", None, "2025-11-02 01:30:00", *GOOD[1:], 1, "lands"),
    ("t-fold-end", "u1", None, "2025-11-02 01:59:59.999999", *GOOD[1:], 1, "lands"),
    ("t-space", "u1", None, " 2026-01-10 10:00:00", *GOOD[1:], 1, "lands"),
    ("t-feb30", "u1", None, "2025-02-30 10:00:00", *GOOD[1:], 1, "out"),
    ("t-24h", "u1", None, "2026-01-10 24:00:00", *GOOD[1:], 1, "out"),  # hour 24
    ("t-60s", "u1", None, "2026-01-10 10:00:60", *GOOD[1:], 1, "out"),
    ("t-year0", "u1", None, "0000-01-10 10:00:00", *GOOD[1:], 1, "out"),
    ("t-nul", "u1", None, b"2026-01-10 10:00:00\x00", *GOOD[1:], 1, "out"),
    ("t-junk", "u1", None, "2026-01-10 10:00:00.12345x", *GOOD[1:], 1, "out"),
    ("t-number", "u1", None, 1767225600, *GOOD[1:], 1, "out"),
    ("t-blob", "u1", None, b"2026-01-10 10:00:00", *GOOD[1:], 1, "blob"),
    # Storage classes where text belongs, counts.
    (12345, "u1", None, *GOOD, 1, "lands"),  # an INTEGER session_id keeps its digits
    ("real-user", 1.5, None, *GOOD, 1, "lands"),
    ("int-meta", "u1", 42, *GOOD, 1, "lands"),
    ("real-meta", "u1", 0.1, *GOOD, 1, "lands"),
    ("blob-meta", "u1", b"{}", *GOOD, 1, "blob"),
    ("count-text", "u1", None, *GOOD, "12", "lands"),
    ("count-real", "u1", None, *GOOD, 5.0, "lands"),
    ("count-half", "u1", None, *GOOD, 5.5, "out"),
    ("count-big", "u1", None, *GOOD, 2**31, "out"),
    # Repeated session ids: the first the rules accept lands; '12345' is the key 12345 has.
    ("twice", "u1", '{"a": 1}', *GOOD, 1, "lands"),
    ("twice", "u2", '{"a": 2}', *GOOD, 2, "out"),
    ("12345", "u3", None, *GOOD, 3, "out"),
    ("bad-then-good", "u1", "{", *GOOD, 1, "out"),
    ("bad-then-good", "u2", '{"b": 1}', *GOOD, 2, "lands"),
]


def hostile_backup(path: Path, rows: list[tuple], extra: str = "") -> None:
    """The rows in a table without declared types, so every value keeps its storage class
    (``blob`` marks a value stored as a BLOB); ``extra`` adds columns."""
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE sessions (session_id, user_id, metadata, created_at, expires_at, "
            f"last_activity, request_count{extra})"
        )
        for row in rows:
            # Bytes stand for a text of those bytes, or for a BLOB in a row marked "blob".
            marks = ", ".join(
                "CAST(? AS TEXT)" if isinstance(v, bytes) and row[7] != "blob" else "?"
                for v in row[:7]
            )
            conn.execute(f"INSERT INTO sessions ({COLUMNS}) VALUES ({marks})", row[:7])
    conn.close()


@pytest.mark.parametrize("workers", [False, True], ids=["one process", "worker processes"])
def test_hostile_rows_make_the_copy_the_rules_make(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: bool
) -> None:
    backup = tmp_path / "hostile.db"
    hostile_backup(backup, HOSTILE)
    if workers:
        monkeypatch.setattr(queries, "FILL_PARTS_FROM", 10)
    fast = queries.AnalysisCopy.build(backup, NEW_YORK, cache_dir=tmp_path / "fast")
    exact = by_the_rules_alone(backup, NEW_YORK, tmp_path / "rules", monkeypatch)
    lands = [r for r in HOSTILE if r[7] == "lands"]
    assert (fast.rows, fast.left_out) == (exact.rows, exact.left_out)
    assert (fast.rows, fast.left_out) == (len(lands), len(HOSTILE) - len(lands))
    assert rows_of(fast) == rows_of(exact)
    got = by_id(fast)
    assert sorted(got) == sorted(str(r[0]) for r in lands)
    for sid, row in got.items():  # every text jsonb's, as the rules print it
        if row[2] is not None and not sid.startswith("deep"):  # too deep to print here
            assert row[2] == metadata_text(row[2]), sid
    assert got["plain"][2] == '{"a": {"x": null, "y": [1, "x"]}, "b": 1}'
    # Too deep for Python to print: the rules' text, the same JSON value, starting with {.
    assert got["deeper"][2] == got["deeper-spaced"][2] == DEEPER


@pytest.mark.parametrize("on_invalid", ["reject", "keep_as_json_string"])
def test_invalid_metadata_under_each_rule(tmp_path: Path, monkeypatch, on_invalid: str) -> None:
    rules = Rules(zone=ZoneInfo("UTC"), on_invalid_metadata=on_invalid)
    rows = [r for r in HOSTILE if r[7] in ("lands", "out") and not str(r[0]).startswith("t-")]
    backup = tmp_path / "invalid.db"
    hostile_backup(backup, rows)
    fast = queries.AnalysisCopy.build(backup, rules, cache_dir=tmp_path / "fast")
    exact = by_the_rules_alone(backup, rules, tmp_path / "rules", monkeypatch)
    assert (fast.rows, fast.left_out) == (exact.rows, exact.left_out)
    assert rows_of(fast) == rows_of(exact)
    if on_invalid == "keep_as_json_string":
        assert by_id(fast)["json5-quote"][2] == json.dumps("{'a': 1}")
        assert by_id(fast)["nan"][2] == '"NaN"'
    else:
        assert "json5-quote" not in by_id(fast) and "nan" not in by_id(fast)


def test_extra_and_renamed_columns_take_the_rules(tmp_path: Path, monkeypatch) -> None:
    lands = [r for r in HOSTILE if r[7] == "lands"]
    backup = tmp_path / "extra.db"
    hostile_backup(backup, lands, extra=", legacy_flag")
    with sqlite3.connect(backup) as conn:
        conn.execute("UPDATE sessions SET legacy_flag = rowid % 2")
    conn.close()
    carried = Rules(zone=ZoneInfo("UTC"), extra_columns=("legacy_flag",))
    monkeypatch.setattr(queries, "_fill_in_parts", lambda *a: pytest.fail("not a plain row"))
    monkeypatch.setattr(queries, "_plain_batches", lambda *a: pytest.fail("not a plain row"))
    copy = queries.AnalysisCopy.build(backup, carried, cache_dir=tmp_path / "c")
    exact = by_the_rules_alone(backup, carried, tmp_path / "e", monkeypatch)
    assert rows_of(copy) == rows_of(exact) and copy.rows == exact.rows
    assert "_legacy_columns" in by_id(copy)["plain"][2]

    renamed = tmp_path / "renamed.db"
    hostile_backup(renamed, lands, extra=", rowid")
    copy = queries.AnalysisCopy.build(renamed, NEW_YORK, cache_dir=tmp_path / "r")
    exact = by_the_rules_alone(renamed, NEW_YORK, tmp_path / "r2", monkeypatch)
    assert rows_of(copy) == rows_of(exact) and copy.rows == len(lands)
