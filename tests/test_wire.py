"""The wire format and migrate's fast clock: wherever the fast path answers, it answers as the
rules do."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_transform import RULES, raw

from sessionmig.rules.transform import RowProblem, normalise, parse_timestamp
from sessionmig.sqlite.wire import WallClock, as_wire, pg_micros

SEOUL = ZoneInfo("Asia/Seoul")
NEW_YORK = ZoneInfo("America/New_York")

# --- the fast path must agree with the rules wherever it answers -----------------------------

LORD_HOWE = ZoneInfo("Australia/Lord_Howe")  # a 30-minute DST shift
FAST_ZONES = st.sampled_from([SEOUL, NEW_YORK, LORD_HOWE, ZoneInfo("UTC")])


def by_the_rules(text: bytes, zone) -> int | None:
    try:
        return pg_micros(parse_timestamp(text, "text", "created_at", zone))
    except RowProblem:
        return None


def fast(clock: WallClock, text: bytes) -> int | None:
    values, sure = clock.utc([text])
    return values[0] if sure[0] else None


@pytest.mark.parametrize(
    "text",
    [
        b"2024-03-10 02:30:00",  # New York: in the spring-forward gap
        b"2024-11-03 01:30:00",  # New York: the repeated hour
        b"2024-11-03 01:00:00.000000",
        b"2026-01-15T10:00:00",  # valid, but not the fast spelling
        b"2026-01-15 10:00:00+09:00",
        b"2026-01-15 10:00:00.123+09",  # 26 bytes with an offset in the tail
        b"2026-01-15 10:00:00,123456",
        b"2026-01-15 10:00:00.12345",
        b"2026-01-15 10:00:00\x00",  # a NUL that NumPy's fixed-width strings would hide
        b"2026-02-30 10:00:00",
        b"2026-01-15 10:61:00",
        b"2026-01-15 23:59:60",
        b"2026-01-15 24:00:00",
        b"2026-01-15 1O:00:00",
        b"0000-01-01 00:00:00",
        b"20260115 10:00:00.1234",
        b" 2026-01-15 10:00:00",
    ],
)
def test_the_fast_clock_leaves_every_doubtful_text_to_the_rules(text: bytes) -> None:
    assert fast(WallClock(NEW_YORK), text) is None


def test_the_fast_clock_leaves_the_calendar_edge_to_the_rules() -> None:
    # Seoul's offset in year 1 is +08:28, so midnight of day one is before datetime.min in UTC.
    assert fast(WallClock(SEOUL), b"0001-01-01 00:00:00") is None
    assert by_the_rules(b"0001-01-01 00:00:00", SEOUL) is None


def test_the_fast_clock_converts_plain_texts_like_the_rules() -> None:
    clock = WallClock(NEW_YORK)
    texts = [b"2024-03-10 01:59:59.999999", b"2024-03-10 03:00:00", b"2024-07-01 12:00:00"]
    values, sure = clock.utc(texts)
    assert sure.all()
    assert values == [by_the_rules(t, NEW_YORK) for t in texts]
    assert values[2] == pg_micros(datetime(2024, 7, 1, 16, tzinfo=UTC))


def test_one_doubtful_text_does_not_spoil_its_batch() -> None:
    values, sure = WallClock(SEOUL).utc([b"2026-01-15 10:00:00", b"2026-02-30 10:00:00", b"x"])
    assert sure.tolist() == [True, False, False]
    assert values[0] == pg_micros(datetime(2026, 1, 15, 1, tzinfo=UTC))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.one_of(
                st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)),
                # around New York's and Lord Howe's 2024 transitions
                st.datetimes(
                    min_value=datetime(2024, 3, 9, 22), max_value=datetime(2024, 3, 10, 4)
                ),
                st.datetimes(
                    min_value=datetime(2024, 11, 2, 22), max_value=datetime(2024, 11, 3, 4)
                ),
                st.datetimes(min_value=datetime(2024, 4, 6, 22), max_value=datetime(2024, 4, 7, 4)),
                st.datetimes(
                    min_value=datetime(2024, 10, 5, 22), max_value=datetime(2024, 10, 6, 4)
                ),
            ),
            st.booleans(),
            st.integers(0, 25),
            st.sampled_from(list(b"0123456789 -:T.+Z,\x00")),
        ),
        min_size=1,
        max_size=20,
    ),
    FAST_ZONES,
)
def test_the_fast_clock_agrees_with_the_rules(cases, zone) -> None:
    texts = []
    for moment, micros, position, byte in cases:
        text = moment.isoformat(" ", "microseconds" if micros else "seconds").encode()
        texts += [text, text[:position] + bytes([byte]) + text[position + 1 :]]
    values, sure = WallClock(zone).utc(texts)
    for text, value, ok in zip(texts, values, sure.tolist(), strict=True):
        if ok:
            assert value == by_the_rules(text, zone), text


def test_wire_form_of_a_normalised_row() -> None:
    session = normalise(raw(), RULES)
    assert as_wire(session) == (
        b"session-1",
        b"u1",
        b'\x01{"a": 1}',
        pg_micros(datetime(2026, 1, 15, 1, tzinfo=UTC)),
        pg_micros(datetime(2026, 1, 16, 1, tzinfo=UTC)),
        pg_micros(datetime(2026, 1, 15, 2, tzinfo=UTC)),
        3,
    )
    assert pg_micros(datetime(2000, 1, 1, tzinfo=UTC)) == 0
