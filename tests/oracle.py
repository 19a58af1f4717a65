"""The named queries' meanings computed the obvious way, in plain Python over normalised rows.

Nothing here reads SQL or :mod:`sessionmig.engines.queries`' code: each function is the query's
description (``sessionmig query --list``) spelled out with loops, ``zoneinfo`` and exact
``timedelta`` arithmetic, slow and small on purpose. The property tests in
``test_query_oracle.py`` check both SQL texts against it.

A row is a :class:`Row`: instants are aware UTC datetimes, metadata the JSON text as it landed.
Buckets are found by walking the window on a 15-minute UTC grid and grouping the instants by
their local bucket key — which finds every bucket edge for zones whose offsets and changes lie
on that grid (all of today's named zones; asserted).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

QUARTER = timedelta(minutes=15)
HOUR = timedelta(hours=1)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Row(NamedTuple):
    session_id: str
    user_id: str | None
    metadata: str | None
    created_at: datetime
    expires_at: datetime
    last_activity: datetime
    request_count: int


def active(rows: list[Row], t: datetime) -> int:
    """Sessions active at ``t``: created_at <= t < expires_at."""
    return sum(1 for r in rows if r.created_at <= t < r.expires_at)


def iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --- buckets ----------------------------------------------------------------------------------


def key(t: datetime, unit: str, zone: ZoneInfo) -> Any:
    """Which bucket instant ``t`` is in: its local wall clock truncated to the unit (and for
    15min/hour the UTC offset in force)."""
    local = t.astimezone(zone)
    offset = local.utcoffset()
    assert offset is not None and offset % QUARTER == timedelta(0), "oracle needs 15-min offsets"
    wall = local.replace(tzinfo=None)
    if unit == "15min":
        return (wall.replace(minute=wall.minute // 15 * 15, second=0, microsecond=0), offset)
    if unit == "hour":
        return (wall.replace(minute=0, second=0, microsecond=0), offset)
    day = wall.date()
    if unit == "day":
        return day
    if unit == "week":
        return day - timedelta(days=day.weekday())
    assert unit == "month"
    return (day.year, day.month)


def _floor_quarter(t: datetime) -> datetime:
    return EPOCH + (t - EPOCH) // QUARTER * QUARTER


def label(first: datetime, zone: ZoneInfo) -> str:
    local = first.astimezone(zone)
    offset = local.utcoffset() or timedelta(0)
    sign = "-" if offset < timedelta(0) else "+"
    minutes = abs(offset) // timedelta(minutes=1)
    return local.strftime("%Y-%m-%d %H:%M") + f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"


def window_buckets(
    start: datetime, end: datetime, unit: str, zone: ZoneInfo
) -> list[tuple[str, Any, datetime]]:
    """``(label, key, first instant inside the window)`` of every bucket holding an instant of
    ``[start, end)``, in time order."""
    points = [start]
    t = _floor_quarter(start) + QUARTER
    while t < end:
        points.append(t)
        t += QUARTER
    seen: dict[Any, datetime] = {}
    for t in points:
        seen.setdefault(key(t, unit, zone), t)
    out = []
    for i, (k, first_in) in enumerate(seen.items()):
        natural = first_in
        if i == 0:  # the window may start inside it: walk back to where it starts
            natural = (
                _floor_quarter(start) if key(_floor_quarter(start), unit, zone) == k else start
            )
            while key(natural - QUARTER, unit, zone) == k:
                natural -= QUARTER
        out.append((label(natural, zone), k, first_in))
    return out


# --- the queries ------------------------------------------------------------------------------


def active_at(rows: list[Row], at: datetime) -> list[tuple]:
    hits = [r for r in rows if r.created_at <= at < r.expires_at]
    return [(len(hits), sum(1 for r in hits if r.user_id is None))]


def active_over_time(
    rows: list[Row], start: datetime, end: datetime, unit: str, timezone: str
) -> list[tuple]:
    """The largest active count at any instant of each bucket inside the window: the count
    changes only at a start or an expiry, so it is enough to look at the bucket's first instant
    and at every start and expiry inside it."""
    zone = ZoneInfo(timezone)
    moments = {r.created_at for r in rows} | {r.expires_at for r in rows}
    out = []
    for name, k, first_in in window_buckets(start, end, unit, zone):
        candidates = [first_in] + [
            t for t in moments if start <= t < end and key(t, unit, zone) == k
        ]
        out.append((name, max(active(rows, t) for t in candidates)))
    return out


def sessions_started(
    rows: list[Row], start: datetime, end: datetime, unit: str, timezone: str
) -> list[tuple]:
    zone = ZoneInfo(timezone)
    out = []
    for name, k, _ in window_buckets(start, end, unit, zone):
        mine = [
            r for r in rows if start <= r.created_at < end and key(r.created_at, unit, zone) == k
        ]
        users = {r.user_id for r in mine if r.user_id is not None}
        out.append((name, len(mine), len(users), sum(1 for r in mine if r.user_id is None)))
    return out


def _top(counts: Counter, top_n: int) -> list[tuple[Any, int, int, bool]]:
    """(item, count, rank, tied_at_cutoff), most first then item bytewise, top_n of them."""
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    shown, hidden = ordered[:top_n], ordered[top_n:]
    hidden_counts = {n for _, n in hidden}
    return [
        (item, n, 1 + sum(1 for m in counts.values() if m > n), n in hidden_counts)
        for item, n in shown
    ]


def sessions_per_user(rows: list[Row], top_n: int) -> list[tuple]:
    import numpy as np

    counts = Counter("(anonymous)" if r.user_id is None else r.user_id for r in rows)
    total = len(rows)
    return [
        (user, n, float(np.round(100 * n / total, 2)), rank, tied)
        for user, n, rank, tied in _top(counts, top_n)
    ]


def _histogram(values: list[int]) -> list[tuple]:
    return sorted(Counter(values).items())


def request_count_distribution(rows: list[Row], width: int) -> list[tuple]:
    return _histogram([r.request_count // width * width for r in rows])


def lifetime_hours(rows: list[Row]) -> list[tuple]:
    return _histogram([(r.expires_at - r.created_at) // HOUR for r in rows])


def _nearest_rank(ordered: list[int], p: int) -> int:
    k = max(math.ceil(p * len(ordered) / 100), 1)
    return ordered[k - 1]


def percentiles(rows: list[Row]) -> list[tuple]:
    out = []
    measures = {
        "lifetime_minutes": [(r.expires_at - r.created_at) // timedelta(minutes=1) for r in rows],
        "request_count": [r.request_count for r in rows],
    }
    for name, values in sorted(measures.items()):
        if not values:
            continue
        ordered = sorted(values)
        out.append(
            (
                name,
                len(ordered),
                ordered[0],
                _nearest_rank(ordered, 50),
                _nearest_rank(ordered, 90),
                _nearest_rank(ordered, 99),
                ordered[-1],
            )
        )
    return out


def ttl_used(rows: list[Row]) -> list[tuple]:
    tenths = [
        min(10 * (r.last_activity - r.created_at) // (r.expires_at - r.created_at), 10)
        for r in rows
        if r.created_at < r.expires_at and r.created_at <= r.last_activity <= r.expires_at
    ]
    return _histogram(tenths)


def _objects(rows: list[Row]) -> list[dict]:
    found = []
    for r in rows:
        value = None if r.metadata is None else json.loads(r.metadata)
        if isinstance(value, dict):
            found.append(value)
    return found


def metadata_keys(rows: list[Row]) -> list[tuple]:
    counts = Counter(k for obj in _objects(rows) for k in obj)
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def metadata_top_values(rows: list[Row], top_n: int) -> list[tuple]:
    per_key: dict[str, Counter] = {}
    for obj in _objects(rows):
        for k, v in obj.items():
            if isinstance(v, str):
                per_key.setdefault(k, Counter())[v] += 1
    return [
        (k, value, n, rank, tied)
        for k in sorted(per_key)
        for value, n, rank, tied in _top(per_key[k], top_n)
    ]


def anomalies(rows: list[Row]) -> list[tuple]:
    return [
        (
            sum(1 for r in rows if r.expires_at < r.created_at),
            sum(
                1 for r in rows if r.last_activity < r.created_at or r.last_activity > r.expires_at
            ),
            sum(1 for r in rows if r.request_count < 0),
            len(rows),
        )
    ]


def cutover_watch(rows: list[Row], cutover: datetime, hours: int) -> list[tuple]:
    return [
        (
            h,
            iso(cutover + h * HOUR),
            active(rows, cutover + h * HOUR),
            active(rows, cutover + h * HOUR - 168 * HOUR),
        )
        for h in range(hours)
    ]


def user_sessions(rows: list[Row], user_id: str | None, anonymous: bool, limit: int) -> list[tuple]:
    mine = [r for r in rows if (r.user_id is None if anonymous else r.user_id == user_id)]
    mine.sort(key=lambda r: r.session_id)
    mine.sort(key=lambda r: r.created_at, reverse=True)
    return [
        (r.session_id, iso(r.created_at), iso(r.expires_at), iso(r.last_activity), r.request_count)
        for r in mine[:limit]
    ]


def answer(name: str, rows: list[Row], values: dict[str, Any]) -> list[tuple]:
    """The oracle's answer to query ``name`` with resolved ``values`` (timeout_s ignored)."""
    wanted = {k: v for k, v in values.items() if k != "timeout_s"}
    return globals()[name](rows, **wanted)
