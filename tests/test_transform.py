"""The type rules, value by value, plus property tests: never an exception, valid rows survive."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sessionmig.rules.transform import (
    COLUMNS,
    Reject,
    Rules,
    normalise,
    parse_count,
    parse_metadata,
    parse_timestamp,
    raw_record,
    spelling,
    wall_clock_kind,
)

SEOUL = ZoneInfo("Asia/Seoul")
NEW_YORK = ZoneInfo("America/New_York")
RULES = Rules(SEOUL)


def raw(
    session_id=b"session-1",
    user_id=b"u1",
    metadata=b'{"a": 1}',
    created=b"2026-01-15 10:00:00",
    expires=b"2026-01-16 10:00:00",
    last=b"2026-01-15 11:00:00",
    count=3,
    rowid=1,
):
    """A raw row as ``source`` streams it, with storage classes inferred like SQLite's."""
    values = (session_id, user_id, metadata, created, expires, last, count)

    def storage(v):
        return {type(None): "null", bytes: "text", int: "integer", float: "real"}[type(v)]

    return (rowid, *values, *map(storage, values))


def as_blob(row: tuple, column: str) -> tuple:
    i = COLUMNS.index(column)
    out = list(row)
    out[1 + len(COLUMNS) + i] = "blob"
    return tuple(out)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-01-15 10:00:00", datetime(2026, 1, 15, 1, 0, tzinfo=UTC)),
        ("2026-01-15T10:00:00", datetime(2026, 1, 15, 1, 0, tzinfo=UTC)),
        ("2026-01-15 10:00", datetime(2026, 1, 15, 1, 0, tzinfo=UTC)),
        ("2026-01-15 10:00:00.5", datetime(2026, 1, 15, 1, 0, 0, 500000, tzinfo=UTC)),
        ("2026-01-15 10:00:00.123456", datetime(2026, 1, 15, 1, 0, 0, 123456, tzinfo=UTC)),
        ("2026-01-15T10:00:00Z", datetime(2026, 1, 15, 10, 0, tzinfo=UTC)),
        ("2026-01-15 10:00:00+00:00", datetime(2026, 1, 15, 10, 0, tzinfo=UTC)),
        ("2026-01-15 10:00:00-0500", datetime(2026, 1, 15, 15, 0, tzinfo=UTC)),
        (" 2026-01-15 10:00:00 ", datetime(2026, 1, 15, 1, 0, tzinfo=UTC)),
    ],
)
def test_timestamp_spellings_name_the_same_instant(text: str, expected: datetime) -> None:
    got = parse_timestamp(text.encode(), "text", "created_at", SEOUL)
    assert got == expected
    assert got.tzinfo is UTC


@pytest.mark.parametrize(
    ("value", "storage", "reason"),
    [
        (b"yesterday", "text", "timestamp_unparseable"),
        (b"2026-01-15", "text", "timestamp_unparseable"),
        (b"15/01/2026 10:00", "text", "timestamp_unparseable"),
        (b"2025-02-30 10:00:00", "text", "timestamp_impossible"),
        (b"2026-01-15 24:00:00", "text", "timestamp_impossible"),
        (b"2026-01-15 10:00:61", "text", "timestamp_impossible"),
        (1767225600, "integer", "timestamp_type"),
        (1767225600.5, "real", "timestamp_type"),
        (b"2026-01-15 \xff10:00:00", "text", "invalid_utf8"),
        (b"2026-01-15 10:00:00", "blob", "unexpected_blob"),
    ],
)
def test_bad_timestamps_are_rejected_with_their_reason(value, storage, reason) -> None:
    row = list(raw())
    row[4], row[11] = value, storage
    result = normalise(tuple(row), RULES)
    assert isinstance(result, Reject)
    assert result.reason == reason
    assert result.session_id == "session-1"


def test_dst_gap_and_overlap_follow_one_rule() -> None:
    rules = Rules(NEW_YORK)
    # 2026-03-08 02:30 does not exist in New York: read with the offset before the gap (EST).
    gap = parse_timestamp(b"2026-03-08 02:30:00", "text", "c", rules.zone)
    assert gap == datetime(2026, 3, 8, 7, 30, tzinfo=UTC)
    # 2026-11-01 01:30 happens twice: the first occurrence (EDT) is taken.
    overlap = parse_timestamp(b"2026-11-01 01:30:00", "text", "c", rules.zone)
    assert overlap == datetime(2026, 11, 1, 5, 30, tzinfo=UTC)
    assert wall_clock_kind(datetime(2026, 3, 8, 2, 30), NEW_YORK) == "nonexistent"
    assert wall_clock_kind(datetime(2026, 11, 1, 1, 30), NEW_YORK) == "ambiguous"
    assert wall_clock_kind(datetime(2026, 6, 1, 1, 30), NEW_YORK) == "ok"


@pytest.mark.parametrize(
    "text",
    [
        '{"a": {"b": [1, 2]}}',
        "[1, 2]",
        '"just a string"',
        "42",
        "true",
        "null",
        '{"k": "서울"}',
        '{"big": 1e400}',
    ],
)
def test_any_json_value_is_kept_verbatim(text: str) -> None:
    assert parse_metadata(text.encode(), "text", "reject") == text


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('{"a": 1', "invalid_json"),
        ("", "invalid_json"),
        ("NaN", "invalid_json"),
        ('{"a": Infinity}', "invalid_json"),
        ('{"a": "\\u0000"}', "json_not_storable"),
        ('{"a": "\\ud800"}', "json_not_storable"),
    ],
)
def test_metadata_jsonb_cannot_hold_is_rejected(text: str, reason: str) -> None:
    result = normalise(raw(metadata=text.encode()), RULES)
    assert isinstance(result, Reject)
    assert result.reason == reason


def test_invalid_metadata_can_be_kept_as_a_json_string() -> None:
    result = normalise(raw(metadata=b"{not json"), Rules(SEOUL, "keep_as_json_string"))
    assert not isinstance(result, Reject)
    assert json.loads(result[2]) == "{not json"


def test_null_metadata_stays_null() -> None:
    assert normalise(raw(metadata=None), RULES)[2] is None


@pytest.mark.parametrize(
    ("value", "storage", "expected"),
    [
        (None, "null", 0),
        (7, "integer", 7),
        (-3, "integer", -3),
        (7.0, "real", 7),
        (b" 12 ", "text", 12),
        (b"+5", "text", 5),
        (2**31 - 1, "integer", 2**31 - 1),
    ],
)
def test_integral_counts_are_accepted(value, storage, expected) -> None:
    assert parse_count(value, storage) == expected


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (12.5, "count_not_integral"),
        (b"twelve", "count_not_integral"),
        (b"1e3", "count_not_integral"),
        (2**31, "count_out_of_range"),
        (float("inf"), "count_not_integral"),
        (-(2**31) - 1, "count_out_of_range"),
    ],
)
def test_other_counts_are_rejected_never_rounded(value, reason) -> None:
    result = normalise(raw(count=value), RULES)
    assert isinstance(result, Reject)
    assert result.reason == reason


def test_text_that_is_not_utf8_keeps_its_bytes_in_hex() -> None:
    result = normalise(raw(user_id=b"user-\xff\xfe"), RULES)
    assert isinstance(result, Reject)
    assert result.reason == "invalid_utf8"
    assert result.raw["user_id"] == {"type": "text", "hex": "757365722dfffe"}
    assert result.raw["session_id"] == {"type": "text", "value": "session-1"}
    assert result.raw["request_count"] == {"type": "integer", "value": 3}


def test_nul_and_blob_and_missing_id_are_rejected() -> None:
    assert normalise(raw(user_id=b"a\x00b"), RULES).reason == "nul_character"
    assert normalise(as_blob(raw(), "user_id"), RULES).reason == "unexpected_blob"
    missing = normalise(raw(session_id=None), RULES)
    assert missing.reason == "missing_session_id"
    assert missing.session_id is None
    assert missing.raw["session_id"] == {"type": "null", "value": None}


def test_valid_row_normalises_to_instants_and_values() -> None:
    result = normalise(raw(user_id=None), RULES)
    assert result == (
        "session-1",
        None,
        '{"a": 1}',
        datetime(2026, 1, 15, 1, tzinfo=UTC),
        datetime(2026, 1, 16, 1, tzinfo=UTC),
        datetime(2026, 1, 15, 2, tzinfo=UTC),
        3,
    )


def test_empty_user_id_is_not_null() -> None:
    assert normalise(raw(user_id=b""), RULES)[1] == ""


def test_spelling_census_shape() -> None:
    assert spelling("2026-01-15 10:00:00.123") == "9999-99-99 99:99:99.999"


sqlite_value = st.one_of(
    st.none(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
    st.binary(max_size=40),
    st.text(max_size=40).map(lambda s: s.encode("utf-8", "surrogatepass")),
)


def _storage(value) -> str:
    return {type(None): "null", int: "integer", float: "real", bytes: "text"}[type(value)]


@settings(max_examples=400, deadline=None)
@given(
    st.lists(sqlite_value, min_size=7, max_size=7),
    st.lists(st.booleans(), min_size=7, max_size=7),
    st.sampled_from(["Asia/Seoul", "America/New_York", "UTC"]),
)
def test_any_input_normalises_or_is_rejected_never_raises(values, blobs, zone) -> None:
    storages = [
        ("blob" if b and isinstance(v, bytes) else _storage(v))
        for v, b in zip(values, blobs, strict=True)
    ]
    result = normalise((1, *values, *storages), Rules(ZoneInfo(zone)))
    if isinstance(result, Reject):
        assert result.reason and result.message
        json.dumps(result.raw)  # the raw record is always storable JSON
        assert set(result.raw) == set(COLUMNS)
    else:
        assert len(result) == 7


@settings(max_examples=300, deadline=None)
@given(
    st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2200, 1, 1)),
    st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=30)),
    st.one_of(st.none(), st.text(max_size=20).filter(lambda s: "\x00" not in s)),
    st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=10)),
        lambda c: st.one_of(
            st.lists(c, max_size=3), st.dictionaries(st.text(max_size=5), c, max_size=3)
        ),
        max_leaves=10,
    ),
    st.integers(min_value=-(2**31), max_value=2**31 - 1),
)
def test_valid_rows_round_trip_to_the_same_meaning(moment, ttl, user, meta, count) -> None:
    user = None if user is None or any(0xD800 <= ord(c) <= 0xDFFF for c in user) else user
    text = json.dumps(meta, ensure_ascii=False)
    if "\\u0000" in text or any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        return
    created = moment.isoformat(" ").encode()
    expires = (moment + ttl).isoformat(" ").encode()
    row = raw(
        user_id=None if user is None else user.encode(),
        metadata=text.encode(),
        created=created,
        expires=expires,
        last=created,
        count=count,
    )
    result = normalise(row, RULES)
    assert not isinstance(result, Reject), result
    assert result[1] == user
    assert json.loads(result[2]) == meta
    assert result[3] == moment.replace(tzinfo=SEOUL).astimezone(UTC)
    assert result[4] == (moment + ttl).replace(tzinfo=SEOUL).astimezone(UTC)
    assert result[6] == count


def test_raw_record_keeps_floats_exactly() -> None:
    row = raw(count=0.1)
    assert raw_record(row)["request_count"] == {"type": "real", "value": "0.1"}


def test_json_nested_deeper_than_python_parses_is_left_to_postgresql() -> None:
    deep = "[" * 100_000 + "]" * 100_000
    assert parse_metadata(deep.encode(), "text", "reject") == deep
