"""Issue 22: every named query answers what its description says, on PostgreSQL and on the SQLite
backup alike, checked against ``tests/oracle.py`` (plain Python over the normalised rows) — not
only against each other.

The stores are written directly: a legacy SQLite backup (read through the analysis copy, i.e.
the migration's own rules) and the same rows in a PostgreSQL table of the target's shape. The
property tests draw small stores around DST changes, month and week edges, with equal instants,
sessions that expire before (or when) they start, and empty buckets, in America/New_York,
Asia/Kolkata, Asia/Seoul and UTC.
"""

from __future__ import annotations

import itertools
import json
import os
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import oracle
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import Row

from sessionmig.engines import queries
from sessionmig.errors import ParameterError
from sessionmig.rules.transform import Rules
from sessionmig.sqlite.sample import LEGACY_SCHEMA

Q = timedelta(minutes=15)
H = timedelta(hours=1)
UTC_RULES = Rules(zone=ZoneInfo("UTC"))
ZONES = ("America/New_York", "Asia/Kolkata", "Asia/Seoul", "UTC")
# New York's fall-back and spring-forward, the turn of a month in Seoul, a Monday in Seoul.
ANCHORS = (
    datetime(2025, 11, 2, 6, tzinfo=UTC),
    datetime(2026, 3, 8, 7, tzinfo=UTC),
    datetime(2026, 1, 31, 15, tzinfo=UTC),
    datetime(2026, 1, 4, 15, tzinfo=UTC),
)
EXAMPLES = int(os.environ.get("SESSIONMIG_ORACLE_EXAMPLES", "40"))  # more for a deep run
PG_DDL = """
CREATE TABLE sessions (session_id text PRIMARY KEY, user_id text, metadata jsonb,
    created_at timestamptz NOT NULL, expires_at timestamptz NOT NULL,
    last_activity timestamptz NOT NULL, request_count integer NOT NULL DEFAULT 0);
CREATE INDEX idx_expires_at ON sessions (expires_at);
"""
_names = itertools.count()


def stamp(t: datetime, naive: bool) -> str:
    """The backup's spelling: naive UTC wall clock (migrate's fast path; the copy's rules zone is
    UTC) or with an explicit offset (the rules' path)."""
    text = t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    return text if naive else text + "+00:00"


class Stores:
    """One PostgreSQL table and a fresh analysis copy per set of rows."""

    def __init__(self, dsn: str, folder: Path) -> None:
        self.dsn, self.folder = dsn, folder
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(PG_DDL)
        self.copy: queries.AnalysisCopy | None = None

    def write(self, rows: list[Row]) -> queries.Backends:
        with psycopg.connect(self.dsn) as conn:
            conn.execute("TRUNCATE sessions")
            with conn.cursor().copy("COPY sessions FROM STDIN") as copy:
                for r in rows:
                    copy.write_row(r)
        backup = self.folder / f"backup-{next(_names)}.db"
        with sqlite3.connect(backup) as lite:
            lite.executescript(LEGACY_SCHEMA)
            lite.executemany(
                "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        r.session_id,
                        r.user_id,
                        r.metadata,
                        stamp(r.created_at, i % 2 == 0),
                        stamp(r.expires_at, i % 2 == 0),
                        stamp(r.last_activity, i % 2 == 0),
                        r.request_count,
                    )
                    for i, r in enumerate(rows)
                ],
            )
        lite.close()
        if self.copy is not None:
            self.copy.remove()
        self.copy = queries.AnalysisCopy.build(backup, UTC_RULES, cache_dir=self.folder / "cache")
        assert self.copy.rows == len(rows)
        return queries.Backends(dsn=self.dsn, analysis=self.copy)


@pytest.fixture
def stores(dsn: str, tmp_path: Path) -> Stores:
    return Stores(dsn, tmp_path)


def plain(value: Any) -> Any:
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def answers(name: str, backends: queries.Backends, values: dict) -> dict[str, list[tuple]]:
    out = {}
    for source in ("postgres", "sqlite"):
        frame = queries.run(name, source, backends, values, show_ids=True, limit=100_000)
        out[source] = [tuple(plain(v) for v in row) for row in frame.itertuples(index=False)]
    return out


def check(name: str, backends: queries.Backends, rows: list[Row], values: dict) -> None:
    expected = oracle.answer(name, rows, values)
    got = answers(name, backends, values)
    assert got["postgres"] == expected, f"{name} on postgres, {values}"
    assert got["sqlite"] == expected, f"{name} on sqlite, {values}"


def resolve(name: str, as_of: datetime, zone: str = "UTC", **given: Any) -> dict:
    return queries.resolve(queries.get(name), given, as_of, zone)


# --- generated stores -------------------------------------------------------------------------

JITTER = st.sampled_from(
    [timedelta(0)] * 4 + [timedelta(microseconds=1), timedelta(microseconds=-1), 7 * Q / 15, 2 * Q]
)
METADATA = st.one_of(
    st.none(),
    st.dictionaries(
        st.sampled_from(["ip", "locale", "client", "é"]),
        st.one_of(st.sampled_from(["a", "b", "B", "ko", ""]), st.integers(0, 3), st.none()),
        max_size=3,
    ).map(json.dumps),
    st.sampled_from(['["locale"]', '"text"', "7"]),
)


@st.composite
def store(draw: st.DrawFn) -> tuple[datetime, list[Row]]:
    anchor = draw(st.sampled_from(ANCHORS))
    rows = []
    for i in range(draw(st.integers(0, 12))):
        created = anchor + draw(st.integers(-48, 48)) * Q + draw(JITTER)
        if draw(st.integers(0, 5)) == 0:
            created -= 168 * H  # the cutover watch's week before
        life = draw(st.integers(-4, 72)) * Q + draw(JITTER)  # 0 and negative too
        last = created + draw(st.integers(-2, 80)) * Q + draw(JITTER)
        user = draw(st.sampled_from([None, None, "", "u1", "u2", "u10", "é"]))
        rows.append(
            Row(
                f"session-{i:03d}",
                user,
                draw(METADATA),
                created,
                created + life,
                last,
                draw(st.integers(-3, 45)),
            )
        )
    return anchor, rows


@st.composite
def window(draw: st.DrawFn, anchor: datetime) -> dict:
    unit = draw(st.sampled_from(queries.UNITS))
    start = anchor + draw(st.integers(-60, 8)) * Q + draw(JITTER)
    longest = {"15min": 160, "hour": 200, "day": 600, "week": 1500, "month": 3500}[unit]
    end = start + draw(st.integers(1, longest)) * Q + draw(JITTER)
    if end <= start:
        end = start + Q
    return {
        "start": start.isoformat(),
        "end": end.isoformat(),
        "unit": unit,
        "timezone": draw(st.sampled_from(ZONES)),
    }


PROPERTY = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@PROPERTY
@given(data=st.data())
def test_time_queries_mean_what_they_say_on_both_sources(stores: Stores, data) -> None:
    anchor, rows = data.draw(store())
    backends = stores.write(rows)
    given_window = data.draw(window(anchor))
    for name in ("active_over_time", "sessions_started"):
        check(name, backends, rows, resolve(name, anchor, **given_window))
    instants = sorted({r.created_at for r in rows} | {r.expires_at for r in rows} | {anchor})
    at = data.draw(st.sampled_from(instants))
    check("active_at", backends, rows, resolve("active_at", anchor, at=at.isoformat()))
    cutover = anchor + data.draw(st.integers(-20, 20)) * Q
    hours = data.draw(st.integers(1, 30))
    check(
        "cutover_watch",
        backends,
        rows,
        resolve("cutover_watch", anchor, cutover=cutover.isoformat(), hours=hours),
    )


@PROPERTY
@given(data=st.data())
def test_other_queries_mean_what_they_say_on_both_sources(stores: Stores, data) -> None:
    anchor, rows = data.draw(store())
    backends = stores.write(rows)
    top = data.draw(st.integers(1, 4))
    for name, given_values in (
        ("sessions_per_user", {"top_n": top}),
        ("request_count_distribution", {"width": data.draw(st.integers(1, 12))}),
        ("lifetime_hours", {}),
        ("percentiles", {}),
        ("ttl_used", {}),
        ("metadata_keys", {}),
        ("metadata_top_values", {"top_n": top}),
        ("anomalies", {}),
        ("user_sessions", {"user_id": data.draw(st.sampled_from(["", "u1", "é", "nobody"]))}),
        ("user_sessions", {"anonymous": True, "limit": data.draw(st.integers(1, 5))}),
    ):
        check(name, backends, rows, resolve(name, anchor, **given_values))


def test_every_query_is_checked_against_the_oracle() -> None:
    import inspect

    source = inspect.getsource(test_time_queries_mean_what_they_say_on_both_sources)
    source += inspect.getsource(test_other_queries_mean_what_they_say_on_both_sources)
    assert {n for n in queries.BY_NAME if f'"{n}"' in source} == set(queries.BY_NAME)


# --- item 1: the peak per bucket is the true maximum -------------------------------------------

DAY = datetime(2026, 1, 10, tzinfo=UTC)


def six_sessions() -> list[Row]:
    """The issue's counter-example: at 10:00 two are active; the next day one is active until
    09:30 and nothing starts or ends before that."""
    at = lambda h, m=0, d=0: DAY + timedelta(days=d, hours=h, minutes=m)  # noqa: E731
    return [
        Row("session-a", "u1", None, at(8), at(10), at(8), 1),  # ends exactly at 10:00
        Row("session-b", "u1", None, at(9), at(11), at(9), 1),
        Row("session-c", None, None, at(9, 30), at(10), at(9, 30), 1),  # ends at 10:00 too
        Row("session-d", "u2", None, at(10), at(12), at(10), 1),  # starts at 10:00
        Row("session-e", "u3", None, at(23), at(9, 30, 1), at(23), 1),  # into the next day
        Row("session-f", "u4", None, at(10, 30), at(9, 45), at(10, 30), 1),  # expires first
    ]


def frames(name: str, backends: queries.Backends, values: dict) -> dict[str, Any]:
    return {
        s: queries.run(name, s, backends, values, show_ids=True) for s in ("postgres", "sqlite")
    }


def test_item1_peak_counts_carried_sessions_and_every_bucket(stores: Stores) -> None:
    rows = six_sessions()
    backends = stores.write(rows)
    window = {"start": DAY.isoformat(), "end": (DAY + 48 * H).isoformat(), "timezone": "UTC"}
    hourly = resolve("active_over_time", DAY, unit="hour", **window)
    for source, frame in frames("active_over_time", backends, hourly).items():
        peaks = [int(p) for p in frame["peak"]]
        # every hour of the window, empty ones with their carried count
        assert len(peaks) == 48, source
        assert peaks[10] == 2, source  # b and d: a and c end at 10:00 when d starts
        assert peaks[24 + 5] == 1, source  # no event in the hour: e carried through
        assert peaks[16] == 0, source
        # The tool's own active_at agrees with every hour that has no event inside.
        for h, peak in enumerate(peaks):
            start = DAY + h * H
            if not any(start < t < start + H for r in rows for t in (r.created_at, r.expires_at)):
                at = resolve("active_at", DAY, at=start.isoformat())
                assert int(queries.run("active_at", source, backends, at).loc[0, "active"]) == peak
    daily = resolve("active_over_time", DAY, unit="day", **window)
    for source, frame in frames("active_over_time", backends, daily).items():
        # a, b and c at 09:30; e the next day until 09:30 (the old query said 0)
        assert [int(p) for p in frame["peak"]] == [3, 1], source
    check("active_over_time", backends, rows, hourly)
    check("active_over_time", backends, rows, daily)


def test_item1_a_session_that_expires_before_it_starts_is_never_active(stores: Stores) -> None:
    rows = [
        Row("session-1", "u1", None, DAY + 8 * H, DAY + 12 * H, DAY, 0),
        Row("session-2", "u1", None, DAY + 11 * H, DAY + 9 * H, DAY, 0),  # expires first
        Row("session-3", "u1", None, DAY + 10 * H, DAY + 10 * H, DAY, 0),  # zero lifetime
    ]
    backends = stores.write(rows)
    values = resolve(
        "active_over_time",
        DAY,
        start=DAY.isoformat(),
        end=(DAY + 24 * H).isoformat(),
        unit="hour",
        timezone="UTC",
    )
    for source, frame in frames("active_over_time", backends, values).items():
        assert [int(p) for p in frame["peak"][7:14]] == [0, 1, 1, 1, 1, 0, 0], source
    check("active_over_time", backends, rows, values)


def test_item1_new_york_fall_back_hour_is_two_buckets_with_offsets(stores: Stores) -> None:
    fall_back = datetime(2025, 11, 2, 6, tzinfo=UTC)  # 01:00 EST, after 01:00-01:59 EDT
    rows = [Row("session-1", None, None, fall_back - 2 * H, fall_back + 3 * H, fall_back, 0)]
    backends = stores.write(rows)
    values = resolve(
        "active_over_time",
        fall_back,
        start=(fall_back - 3 * H).isoformat(),
        end=(fall_back + 3 * H).isoformat(),
        unit="hour",
        timezone="America/New_York",
    )
    got = answers("active_over_time", backends, values)
    labels = [label for label, _ in got["postgres"]]
    assert labels == [
        "2025-11-01 23:00-04:00",
        "2025-11-02 00:00-04:00",
        "2025-11-02 01:00-04:00",
        "2025-11-02 01:00-05:00",
        "2025-11-02 02:00-05:00",
        "2025-11-02 03:00-05:00",
    ]
    assert got["sqlite"] == got["postgres"]
    check("active_over_time", backends, rows, values)
    exported = queries.to_text(
        queries.run("active_over_time", "sqlite", backends, values), "csv"
    ).splitlines()
    assert exported[0] == "bucket,peak,timezone,unit,start,end"
    assert exported[4] == (
        "2025-11-02 01:00-05:00,1,America/New_York,hour,"
        "2025-11-02T03:00:00.000000Z,2025-11-02T09:00:00.000000Z"
    )


# --- item 2: cutover_watch does not depend on the client's zone --------------------------------


def test_item2_cutover_watch_is_exact_168_hours_whatever_pgtz(
    stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cutover a week after New York's fall-back: 7 calendar days in New York are 169 hours."""
    cutover = datetime(2025, 11, 8, 12, tzinfo=UTC)
    week_before = cutover - 168 * H
    rows = [
        # active exactly 168 h before the cutover's first hours, not 169 h before
        Row("session-1", "u1", None, week_before, week_before + 30 * Q, week_before, 0),
        Row("session-2", "u2", None, week_before + 3 * Q, week_before + H + Q, week_before, 0),
    ]
    backends = stores.write(rows)
    monkeypatch.setenv("PGTZ", "America/New_York")
    values = resolve("cutover_watch", cutover, hours=3)
    got = frames("cutover_watch", backends, values)
    for source, frame in got.items():
        assert [int(n) for n in frame["week_before"]] == [1, 2, 1], source  # 169 h: 0, 1, 2
    check("cutover_watch", backends, rows, values)
    monkeypatch.setenv("PGTZ", "Asia/Kolkata")
    again = frames("cutover_watch", backends, values)["postgres"]
    assert list(again["week_before"]) == list(got["postgres"]["week_before"])


def test_item2_free_sql_on_postgres_reads_instants_in_utc(
    stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = [Row("session-1", None, None, DAY, DAY + H, DAY, 0)]
    backends = stores.write(rows)
    text = "SELECT date_trunc('day', created_at)::text AS day FROM sessions"
    monkeypatch.setenv("PGTZ", "America/New_York")
    frame = queries.run_free_sql(text, "postgres", backends)
    assert list(frame["day"]) == ["2026-01-10 00:00:00+00"]


# --- item 5: anonymous sessions, ties -----------------------------------------------------------


def test_item5_user_sessions_lists_anonymous_ones_and_keeps_empty_text_apart(
    stores: Stores,
) -> None:
    rows = [
        Row("session-1", None, None, DAY, DAY + H, DAY, 1),
        Row("session-2", "", None, DAY + H, DAY + 2 * H, DAY, 2),
        Row("session-3", "u1", None, DAY + H, DAY + 2 * H, DAY, 3),
    ]
    backends = stores.write(rows)
    for given_values, expected in (
        ({"anonymous": True}, ["session-1"]),
        ({"anonymous": "true"}, ["session-1"]),
        ({"user_id": ""}, ["session-2"]),
        ({"user_id": "u1"}, ["session-3"]),
    ):
        values = resolve("user_sessions", DAY, **given_values)
        got = answers("user_sessions", backends, values)
        assert [r[0] for r in got["postgres"]] == [r[0] for r in got["sqlite"]] == expected
    with pytest.raises(ParameterError, match="user_sessions: user_id is required"):
        resolve("user_sessions", DAY)
    with pytest.raises(ParameterError, match="not both"):
        resolve("user_sessions", DAY, user_id="u1", anonymous=True)


def test_item5_top_n_marks_ties_at_the_cutoff(stores: Stores) -> None:
    rows = [
        Row(f"session-{i}", user, None, DAY, DAY + H, DAY, 0)
        for i, user in enumerate(["u1", "u1", "u1", "u2", "u2", "u3", "u3", "u4", None])
    ]
    backends = stores.write(rows)
    top2 = resolve("sessions_per_user", DAY, top_n=2)
    for source, frame in frames("sessions_per_user", backends, top2).items():
        assert list(frame["user_id"]) == ["u1", "u2"], source
        # u3 has as many sessions as u2 and is not shown: said, not dropped silently
        assert list(frame["tied_at_cutoff"]) == [False, True], source
        assert list(frame["rank"]) == [1, 2], source
    check("sessions_per_user", backends, rows, top2)
    got = answers("sessions_per_user", backends, resolve("sessions_per_user", DAY, top_n=3))
    assert got["postgres"][-1] == ("u3", 2, 22.22, 2, False)


# --- the analysis copy's fast path prints metadata exactly as the rules do ---------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**30), 10**30) | st.text(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(value=JSON, spacing=st.sampled_from([None, 2]))
def test_plain_metadata_is_printed_as_the_rules_print_it(value: Any, spacing: int | None) -> None:
    from sessionmig.rules.jsonb import metadata_text
    from sessionmig.rules.transform import RowProblem, parse_metadata

    text = json.dumps(value, ensure_ascii=spacing is None, indent=spacing)
    try:
        expected = metadata_text(parse_metadata(text.encode(), "text", "reject") or "")
    except RowProblem:
        with pytest.raises(RowProblem):
            queries._plain_metadata(text.encode(), UTC_RULES)
        return
    assert queries._plain_metadata(text.encode(), UTC_RULES) == expected


# --- metadata the copy prints as jsonb does, whoever decided it ----------------------------------

HOSTILE_METADATA = [
    '{"b": "x", "a": "y", "c": {"a": "z"}}',  # keys not in jsonb's order
    '{"a": "1", "a": "2"}',  # a repeated key: jsonb keeps the last
    '{"o": {"k": "1", "k": "2"}, "a": "v"}',
    '{"o": {"k": "1"}, "o": "flat"}',
    '{"a": "x", "b": 1.50, "c": 1e2, "d": -0, "e": 12345678901234567890123}',
    '{"k\\u00e9": "\\u00e9", "a": "\\/", "é": "é"}',
    '{"a\\"b": "q", "a\\u0022b": "r"}',
    ' {"a": "lead"}',
    '{ "a" : "spaced" ,"b":"x" } ',
    '{":a": ":b", "": "", "a:": "a"}',
    '{"a.b": "1", "a": {"b": "2"}}',
    '["a", "b"]',
    '"a"',
    "7",
    "null",
    "{}",
    None,
]


def test_metadata_queries_read_what_jsonb_holds_on_both_sources(stores: Stores) -> None:
    """Each metadata twice: in a plain row (naive times: Python's fast path prints it) and in
    one the rules decide (times with an offset); jsonb holds the same value either way, and the
    copy prints it as jsonb does."""
    rows = [
        Row(f"session-{i:03d}", None, meta, DAY, DAY + H, DAY, 0)
        for i, meta in enumerate(m for m in HOSTILE_METADATA for _ in (0, 1))
    ]
    backends = stores.write(rows)
    for top in (1, 2, 5):
        check("metadata_top_values", backends, rows, resolve("metadata_top_values", DAY, top_n=top))
    check("metadata_keys", backends, rows, resolve("metadata_keys", DAY))
    keys = {k for k, _ in oracle.answer("metadata_keys", rows, {})}
    assert {"a", 'a"b', "ké", "", ":a", "a.b", "o"} <= keys
    with sqlite3.connect(stores.copy.path) as lite:  # type: ignore[union-attr]
        texts = dict(lite.execute("SELECT session_id, metadata FROM sessions"))
    printed = '{"a": "y", "b": "x", "c": {"a": "z"}}'  # jsonb's printing
    assert texts["session-000"] == texts["session-001"] == printed
    assert texts["session-002"] == texts["session-003"] == '{"a": "2"}'
