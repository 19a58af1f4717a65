"""Inspect's bulk census against the row-by-row one: on every backup, the same
findings, counts and examples, whichever path a row takes.

``inspect_backup(fast=False)`` takes every row through ``Census.add`` (the rules, the timestamp
classification, the repeated-key scan): the reference. The bulk path must agree with it exactly
— on the hostile rows, on samples with every oddity in several zones (DST days included), on
odd table shapes, and on raw rows hypothesis makes up.
"""

from __future__ import annotations

import sqlite3
import tempfile
from dataclasses import fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_hostile import build as build_hostile

from sessionmig.rules.transform import Rules
from sessionmig.sqlite import inspection, sample
from sessionmig.sqlite.inspection import InspectResult, inspect_backup
from sessionmig.sqlite.sample import LEGACY_SCHEMA

SEOUL = "Asia/Seoul"
NEW_YORK = "America/New_York"
LORD_HOWE = "Australia/Lord_Howe"
AS_OF = datetime(2026, 1, 15, 3, tzinfo=UTC)


def plain(value: Any) -> Any:
    """Counters and dicts as lists of their items: a key counted zero times is a difference,
    and so is the order keys were first met in (``most_common`` breaks ties by it)."""
    if isinstance(value, dict):  # Counter too
        return [(k, plain(v)) for k, v in value.items()]
    return value


def both(
    path: Path,
    zone: str = SEOUL,
    as_of: datetime = AS_OF,
    batch_rows: int = 10_000,
    parts: int = 0,
    **rules: Any,
) -> tuple[InspectResult, InspectResult]:
    """Inspect ``path`` the bulk way and the reference way; assert they agree in everything."""
    given = Rules(ZoneInfo(zone), **rules)
    slow = inspect_backup(path, given, as_of, zone, batch_rows, fast=False)
    fast = inspect_backup(path, given, as_of, zone, batch_rows, fast=True)
    ways = [fast]
    if parts:  # also as a large backup is taken: in worker processes, merged in order
        was = inspection.CENSUS_PARTS_FROM, inspection.CENSUS_PARTS
        inspection.CENSUS_PARTS_FROM, inspection.CENSUS_PARTS = 0, parts
        try:
            ways.append(inspect_backup(path, given, as_of, zone, batch_rows, fast=True))
        finally:
            inspection.CENSUS_PARTS_FROM, inspection.CENSUS_PARTS = was
    for way in ways:
        assert way.findings == slow.findings
        assert way.integrity == slow.integrity
        assert way.columns == slow.columns
        assert (way.census is None) == (slow.census is None)
        if slow.census is not None:
            for f in fields(slow.census):
                theirs = plain(getattr(slow.census, f.name))
                assert plain(getattr(way.census, f.name)) == theirs, f.name
    return fast, slow


def test_hostile_rows(tmp_path: Path) -> None:
    path = tmp_path / "hostile.db"
    build_hostile(path)
    fast, _ = both(path, parts=3)
    assert fast.census is not None and sum(fast.census.rejects.values()) >= 20
    for batch_rows in (1, 3, 16):
        both(path, batch_rows=batch_rows)


def test_hostile_rows_with_an_extra_column(tmp_path: Path) -> None:
    path = tmp_path / "extra.db"
    build_hostile(path, extra_column=True)
    both(path)  # refused: an error finding, no carrying
    both(path, extra_columns=())


@pytest.mark.parametrize(
    ("zone", "as_of"),
    [
        (SEOUL, "2026-01-15T12:00:00+09:00"),
        (NEW_YORK, "2026-03-09T12:00:00-04:00"),  # a spring-forward day within the TTL
        (NEW_YORK, "2026-11-02T12:00:00-05:00"),  # a fall-back day
        (LORD_HOWE, "2026-04-06T12:00:00+10:30"),
        ("UTC", "2026-01-15T12:00:00+00:00"),
    ],
)
def test_samples_with_every_oddity(tmp_path: Path, zone: str, as_of: str) -> None:
    path = tmp_path / "sample.db"
    sample.generate(path, rows=6000, seed=3, as_of=as_of, zone=zone)
    moment = datetime.fromisoformat(as_of).astimezone(UTC)
    fast, _ = both(path, zone, moment, parts=2)
    codes = {f.code for f in fast.findings}
    assert "reject:invalid_json" in codes and "anomaly:expires_before_created" in codes
    if zone == NEW_YORK:
        assert any(code.startswith("dst:") for code in codes)
        assert any(f.examples for f in fast.findings if f.code.startswith("dst:"))
    both(path, zone, moment, batch_rows=777)


def test_dst_rows_plain_and_odd(tmp_path: Path) -> None:
    path = tmp_path / "dst.db"
    conn = sqlite3.connect(path)
    conn.executescript(LEGACY_SCHEMA)
    rows = []
    for i, (c, e, la) in enumerate(
        [
            ("2026-03-08 02:30:00", "2026-03-09 02:30:00", "2026-03-08 02:30:00"),
            ("2026-11-01 01:30:00", "2026-11-02 01:30:00", "2026-11-01 01:30:00.500000"),
            ("2026-03-08 01:59:59", "2026-03-08 03:00:00", "2026-03-08 03:00:00"),
            ("2026-11-01 00:59:59.999999", "2026-11-01 02:00:00", "2026-11-01 01:00:00"),
            ("2026-03-08T02:30:00", "2026-03-09 02:30:00", "2026-03-08 02:31"),
        ]
        * 30
    ):
        rows.append((f"s{i}", None, '{"a": 1}', c, e, la, i % 3))
    conn.executemany("INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    conn.commit()
    conn.close()
    fast, _ = both(path, NEW_YORK, parts=3)
    codes = {f.code: f.count for f in fast.findings}
    assert codes["dst:nonexistent"] >= 60 and codes["dst:ambiguous"] >= 60
    both(path, NEW_YORK, batch_rows=7)


def test_repeated_keys_and_json_the_scanner_doubts(tmp_path: Path) -> None:
    path = tmp_path / "json.db"
    sample.generate(path, rows=500, seed=9, oddities=0)
    texts = [
        '{"a": 1, "b": {"c": 2}, "a": 2}',
        '{"a": {"a": 1}, "l": [{"a": 1}, {"a": 2}]}',
        '{"a": 1, "\\u0061": 2}',
        '{"url": "https://example.com:8443/a", "t": "12:30"}',
        '{"url": "https://example.com:8443/a", "url": "b"}',
        '{"k\\"": 1, "k\\"": 2}',
        '{"k\\\\": 1, "x": "\\\\":1}',
        ' {"a": 1}',
        '{"a": 1} ',
        "[1, 2, 3]",
        '"just a string"',
        "12.5",
        '{"x": NaN}',
        '{"n": 1e1000000}',
        '{"n": ' + "1" * 5000 + "}",
        "[" * 3000 + "]" * 3000,
        '{"a": "\\ud800"}',
        '{"a": "x\\u0000y"}',
        "{bad",
        "",
    ]
    with sqlite3.connect(path) as conn:
        for i, text in enumerate(texts):
            conn.execute("UPDATE sessions SET metadata = ? WHERE rowid = ?", (text, 10 + 7 * i))
        # a whole batch of repeated keys, beyond the three examples kept
        conn.execute(
            'UPDATE sessions SET metadata = \'{"z": 1, "z": 1}\' WHERE rowid BETWEEN 300 AND 420'
        )
    conn.close()
    fast, _ = both(path, parts=4)
    found = {f.code: f for f in fast.findings}
    assert found["anomaly:json_repeated_key"].count >= 120
    both(path, batch_rows=50)
    both(path, on_invalid_metadata="keep_as_json_string")


def rebuilt(clean: Path, out: Path, columns: str, select: str, without_rowid: bool = False) -> Path:
    conn = sqlite3.connect(out)
    try:
        conn.execute("ATTACH DATABASE ? AS o", (str(clean),))
        tail = " WITHOUT ROWID" if without_rowid else ""
        conn.execute(f"CREATE TABLE sessions ({columns}){tail}")
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


@pytest.mark.parametrize(
    ("shape", "columns", "select", "without_rowid"),
    [
        ("without-rowid", f"{LEGACY_COLUMNS}, request_count INTEGER", "*", True),
        (
            "column-named-rowid",
            f"{LEGACY_COLUMNS}, request_count INTEGER, rowid TEXT",
            f"{LEGACY_SELECT}, request_count, 'r' || rowid",
            False,
        ),
        (
            "generated",
            f"{LEGACY_COLUMNS}, request_count INTEGER GENERATED ALWAYS AS "
            "(length(session_id) - 40) VIRTUAL",
            LEGACY_SELECT,
            False,
        ),
        (
            "no-types-no-key",
            "session_id, user_id, metadata, created_at, expires_at, last_activity, request_count",
            "*",
            False,
        ),
    ],
)
def test_odd_table_shapes(
    tmp_path: Path, shape: str, columns: str, select: str, without_rowid: bool
) -> None:
    clean = tmp_path / "clean.db"
    sample.generate(clean, rows=800, seed=4)
    with sqlite3.connect(clean) as conn:  # null session ids cannot be in a WITHOUT ROWID key
        conn.execute("DELETE FROM sessions WHERE session_id IS NULL")
    conn.close()
    path = rebuilt(clean, tmp_path / f"{shape}.db", columns, select, without_rowid)
    fast, _ = both(path, parts=2)
    assert fast.census is not None and fast.census.rows == 799
    both(path, batch_rows=64)
    if shape == "column-named-rowid":
        both(path, extra_columns=("rowid",))


def test_many_rows_for_the_rules_in_one_batch(tmp_path: Path) -> None:
    """Over 64 rows of one batch that the rules must take are read by a scan of their span."""
    path = tmp_path / "t.db"
    sample.generate(path, rows=3000, seed=2)
    with sqlite3.connect(path) as conn:
        conn.execute(
            "UPDATE sessions SET created_at = replace(created_at, ' ', 'T') WHERE rowid % 3 = 0"
        )
    conn.close()
    both(path)
    both(path, batch_rows=100)


# --- raw rows hypothesis makes up --------------------------------------------------------------

DST_TEXTS = [
    "2026-03-08 02:30:00",
    "2026-11-01 01:30:00",
    "2026-11-01 01:00:00.000001",
    "2026-04-05 01:45:00",  # Lord Howe: its half-hour overlap
    "2026-10-04 02:15:00",  # Lord Howe: its half-hour gap
]
ODD_TIMES: list[Any] = [
    *DST_TEXTS,
    "2026-01-15T10:00:00",
    "2026-01-15 10:00:00Z",
    "2026-01-15 10:00:00+05:30",
    "2026-01-15 10:00",
    "2026-02-30 10:00:00",
    "2026-01-15 24:00:00",
    " 2026-01-15 10:00:00",
    "2026-01-15 10:00:00 ",
    "0001-01-01 00:00:00",
    "9999-12-31 23:59:59.999999",
    "yesterday",
    "",
    "2026-01-15 1O:00:00",
    "２０２６-01-15 10:00:00",
    1767225600,
    1767225600.5,
    None,
    b"2026-01-15 10:00:00",
    ("text", b"2026-01-15 10:00:\xff0"),
    ("text", b"2026-01-15 10:00:00\x00"),
]


@st.composite
def wall_clock(draw: st.DrawFn) -> str:
    moment = draw(st.datetimes(min_value=datetime(1960, 1, 1), max_value=datetime(2040, 12, 31)))
    if draw(st.booleans()):
        moment = moment.replace(microsecond=0)
    return moment.isoformat(" ")


TIMES = st.one_of(wall_clock(), wall_clock(), st.sampled_from(ODD_TIMES))
JSON_KEYS = st.sampled_from(["a", "b", "ip", "url", "k:v", 'q"', "한"])
JSON_VALUES = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(10**20), 10**20),
        st.sampled_from(["x", "http://h:1/", "12:30", "서울", ""]),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(st.tuples(JSON_KEYS, inner), max_size=4),  # objects, keys maybe repeated
    ),
    max_leaves=8,
)


def to_json(value: Any) -> str:
    """JSON text of ``value``, a list of pairs being an object that may name a key twice."""
    import json

    if isinstance(value, list) and value and all(isinstance(v, tuple) for v in value):
        inner = ", ".join(f"{json.dumps(k, ensure_ascii=False)}: {to_json(v)}" for k, v in value)
        return "{" + inner + "}"
    if isinstance(value, list):
        return "[" + ", ".join(to_json(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


METADATA = st.one_of(
    JSON_VALUES.map(to_json),
    JSON_VALUES.map(to_json),
    st.sampled_from(
        [
            None,
            '{"a": 1, "a": 2}',
            '{"a": 1, "\\u0061": 2}',
            '{"x": NaN}',
            "{bad",
            "",
            " {}",
            "{} ",
            '{"n": 1e999}',
            ("text", b'{"a": "\xff"}'),
            ("text", b'{"a": 1}\x00'),
            b'{"a": 1}',
            12.5,
            7,
        ]
    ),
    st.text(max_size=12),
)
SESSION_IDS = st.one_of(
    st.sampled_from(["s1", "s2", "s3", "", "123", "세션"]),
    st.text(min_size=1, max_size=8),
    st.sampled_from(
        [None, 123, 1.5, b"\x01\x02", ("text", b"caf\xe9"), "a\x00b", "x" * 2049, "é" * 1025]
    ),
)
USER_IDS = st.one_of(st.none(), st.sampled_from(["u1", "", ("text", b"\xff"), b"\x00", 5, "a\x00"]))
COUNTS = st.one_of(
    st.integers(-5, 500),
    st.sampled_from([None, 2**31 - 1, 2**31, -(2**31) - 1, 7.0, 1.5, " 42 ", "many", b"\x01"]),
)
ODD_ROW = st.tuples(SESSION_IDS, USER_IDS, METADATA, TIMES, TIMES, TIMES, COUNTS)
PLAIN_ROW = st.tuples(  # rows the bulk path may take, near enough to each other to repeat ids
    st.sampled_from(["s1", "s2", "s3", "s4", "", "세션"]),
    st.sampled_from([None, "u1", ""]),
    st.one_of(st.none(), JSON_VALUES.map(to_json)),
    wall_clock(),
    wall_clock(),
    wall_clock(),
    st.one_of(st.none(), st.integers(-3, 300)),
)
ROW = st.one_of(ODD_ROW, PLAIN_ROW)
SCHEMAS = [
    LEGACY_SCHEMA,
    "CREATE TABLE sessions (session_id, user_id, metadata, created_at, expires_at, "
    "last_activity, request_count)",
]


def write_rows(path: Path, schema: str, rows: list[tuple]) -> None:
    """``rows`` into a new backup; a ``("text", bytes)`` value is stored as text as it is."""
    conn = sqlite3.connect(path)
    loose = schema.replace("session_id TEXT PRIMARY KEY", "session_id TEXT")
    conn.executescript(loose.replace(" NOT NULL", ""))
    for row in rows:
        marks, values = [], []
        for value in row:
            if isinstance(value, tuple):
                marks.append("CAST(? AS TEXT)")
                values.append(value[1])
            else:
                marks.append("?")
                values.append(value)
        conn.execute(f"INSERT INTO sessions VALUES ({', '.join(marks)})", values)
    conn.commit()
    conn.close()


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    rows=st.lists(ROW, min_size=1, max_size=40),
    schema=st.sampled_from(SCHEMAS),
    zone=st.sampled_from([SEOUL, NEW_YORK, LORD_HOWE, "UTC"]),
    as_of=st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2040, 1, 1), timezones=st.just(UTC)
    ),
    batch_rows=st.sampled_from([1, 4, 10_000]),
)
def test_made_up_rows(
    rows: list[tuple], schema: str, zone: str, as_of: datetime, batch_rows: int
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "made-up.db"
        write_rows(path, schema, rows)
        both(path, zone, as_of, batch_rows)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    times=st.lists(st.tuples(wall_clock(), st.integers(0, 3 * 86_400)), min_size=1, max_size=60),
    zone=st.sampled_from([NEW_YORK, LORD_HOWE]),
)
def test_made_up_plain_rows_around_transitions(times: list[tuple[str, int]], zone: str) -> None:
    """Plain rows only, their times near the zone's transitions: the per-hour classification
    must name every DST row the per-row one does, with the same examples."""
    rows = []
    base = [datetime(2026, 3, 8, 1), datetime(2026, 11, 1, 0), datetime(2026, 4, 5, 1)]
    for i, (text, seconds) in enumerate(times):
        near = base[i % 3] + timedelta(seconds=seconds % 14_400)
        created = near.isoformat(" ") if i % 2 else text
        rows.append((f"s{i}", "u", '{"a": 1}', created, near.isoformat(" "), created, 1))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "plain.db"
        write_rows(path, LEGACY_SCHEMA, rows)
        both(path, zone, datetime(2026, 3, 8, 12, tzinfo=UTC), 16)


def test_worker_processes_mask_ids_with_the_run_salt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Examples a worker process makes show ids masked as the rest of the run masks them."""
    path = tmp_path / "sample.db"
    sample.generate(path, rows=400, seed=11)
    monkeypatch.delenv("SESSIONMIG_ID_SALT", raising=False)
    monkeypatch.setattr(inspection, "CENSUS_PARTS_FROM", 0)
    rules = Rules(ZoneInfo(SEOUL))
    fast = inspect_backup(path, rules, AS_OF, SEOUL, fast=True)  # the first to need the salt
    slow = inspect_backup(path, rules, AS_OF, SEOUL, fast=False)
    assert any(f.examples for f in slow.findings)
    assert fast.findings == slow.findings


def test_a_worker_that_dies_leaves_the_census_to_this_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "sample.db"
    sample.generate(path, rows=300, seed=12)
    monkeypatch.setattr(inspection, "CENSUS_PARTS_FROM", 0)
    monkeypatch.setattr(inspection, "_CENSUS_WORKER", "import os; os._exit(3)")
    both(path)
    rules = Rules(ZoneInfo(SEOUL))
    died = inspect_backup(path, rules, AS_OF, SEOUL, fast=True)
    assert died.findings == inspect_backup(path, rules, AS_OF, SEOUL, fast=False).findings
