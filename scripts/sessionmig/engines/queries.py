"""Named, documented analysis queries with one meaning each, computed the same way on the
SQLite backup and on PostgreSQL, so a before/after comparison is one call.

**What every query means** is written once, in its :class:`Query` description (``sessionmig
query --list`` prints it), and ``tests/oracle.py`` computes exactly that in plain Python over the
normalised rows; both SQL texts are checked against it (``tests/test_query_oracle.py``), not
only against each other. The conventions they share:

* Instants are UTC. A session is **active** at instant ``t`` when ``created_at <= t <
  expires_at``; a session whose ``expires_at <= created_at`` is therefore never active (the
  ``anomalies`` query counts those that expire before they start).
* **Intervals are exact**: an hour is 3,600 s and a week 168 hours, whatever the calendar or the
  client's time zone (PostgreSQL's own ``TimeZone`` is set to UTC on the query's connection, so
  nothing depends on where the client sits).
* **Buckets** (``unit``: ``15min``, ``hour``, ``day``, ``week`` — ISO, from Monday — or
  ``month``) are the local calendar's, in ``timezone``: an instant belongs to the bucket of its
  local wall-clock time truncated to the unit; for ``15min`` and ``hour`` also to the UTC offset
  in force, so New York's repeated 01:00 on the fall-back day is two buckets, and a skipped hour
  is no bucket. A bucket is labelled by the local time of its first instant **with its UTC
  offset** (``2026-11-01 01:00-05:00``), so every label is one instant. The buckets of a window
  ``[start, end)`` are all those holding an instant of it, empty ones included; the first and
  last are counted over their part inside the window. The bucket boundaries are computed once in
  Python (:func:`buckets`) and handed to both SQL texts, so the servers' own time-zone data never
  decides a boundary.

PostgreSQL runs them on the live table in a read-only transaction with a statement timeout. The
SQLite side never queries the backup directly: the backup is normalised once by the migration's
own rules into a private *analysis copy* (instants as UTC microseconds, metadata printed as
jsonb prints it — or, nested deeper than Python prints, the rules' text of the same value — rows
that cannot land left out: exactly what migrate would load), opened read-only, with small SQL
functions for what SQLite lacks. Session ids are masked in results unless asked otherwise.
Every parameter is checked by :func:`resolve` before any query runs.

The analysis copy holds every session id in clear, so it lives in a private cache, never in a
shared temporary directory: ``$XDG_CACHE_HOME/sessionmig/analysis`` (else
``~/.cache/sessionmig/analysis``), mode 0700, one folder per backup named by the sha256 of the
backup (and of its ``-wal``/``-journal``), of the rules and of this package's code, holding
``analysis.db`` (0600). It is built once per backup — in a temporary folder inside the cache,
renamed into place when complete, the temporary folder always removed — and reused by every
later query on the same files and rules; a different backup, zone or code never reuses it.
Copies unused for :data:`KEEP_UNUSED` are removed when the next one is built;
:func:`remove_analysis_copies` removes them all, :meth:`AnalysisCopy.remove` one.

Free SQL (:func:`run_free_sql`) is read-only on both stores and masks every session id in its
result whatever the column is called: see :mod:`sessionmig.engines.readonly`.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import math
import os
import shutil
import sqlite3
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pandas as pd
from psycopg import sql

from sessionmig import defaults as D
from sessionmig.engines import readonly
from sessionmig.errors import ParameterError, SourceError
from sessionmig.postgres.connect import connect
from sessionmig.rules.instant import parse_instant
from sessionmig.rules.jsonb import metadata_text
from sessionmig.rules.mask import mask_id
from sessionmig.rules.transform import Reject, Rules, normalise
from sessionmig.sqlite.keys import duplicate_rejects
from sessionmig.sqlite.source import FileHash, hash_files, open_backup

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MICROS = timedelta(microseconds=1)
ISO_PG = """to_char({} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"""
UNITS = ("15min", "hour", "day", "week", "month")
"""Bucket sizes; the default is the analysis step's (``params``' ``unit``), one for everyone."""
SUBDAY = {"15min": timedelta(minutes=15), "hour": timedelta(hours=1)}
MAX_BUCKETS = 100_000
DEFAULT_TIMEOUT_S = 30.0
MAX_TIMEOUT_S = 3600.0
MAX_WATCH_HOURS = 24 * 366
WEEK = timedelta(hours=168)


@dataclass(frozen=True)
class Param:
    """One query parameter: its name, kind (instant, zone, int, str, unit, bool), default,
    meaning, and for ``int`` the smallest and largest value accepted."""

    name: str
    kind: str
    default: Any
    help: str
    low: int = 0
    high: int = 2**31 - 1


@dataclass(frozen=True)
class Query:
    """A named query: its meaning (``description``, the one definition both SQL texts compute
    and the oracle checks), parameters, the two SQL texts, and Python steps shared by both
    sources: ``prepare`` adds derived values (bucket edges, instants) before, ``post`` shapes
    the answer after."""

    name: str
    description: str
    params: tuple[Param, ...]
    postgres: str
    sqlite: str
    post: Callable[[pd.DataFrame, dict[str, Any]], pd.DataFrame] | None = field(
        default=None, compare=False
    )
    prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = field(default=None, compare=False)
    context: tuple[str, ...] = ()  # parameters an export of the answer carries (zone, window …)


AT = Param("at", "instant", None, "the instant (default: as_of)")
START = Param("start", "instant", None, "window start, inclusive (default: 7 days before as_of)")
END = Param("end", "instant", None, "window end, exclusive (default: as_of)")
UNIT = Param("unit", "unit", D.UNIT, "bucket size: " + ", ".join(UNITS))
ZONE = Param("timezone", "zone", None, "IANA zone of the buckets (default: source_timezone)")
TOP = Param("top_n", "int", 10, "how many rows to keep", low=1)
TIMEOUT = Param(
    "timeout_s", "seconds", None, f"statement timeout in seconds (default {DEFAULT_TIMEOUT_S:g})"
)
WINDOWED = ("timezone", "unit", "start", "end")


# --- buckets and instants, shared by both sources ---------------------------------------------


def _offset_text(offset: timedelta | None) -> str:
    seconds = int((offset or timedelta(0)).total_seconds())
    sign = "-" if seconds < 0 else "+"
    hours, rest = divmod(abs(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{sign}{hours:02d}:{minutes:02d}" + (f":{secs:02d}" if secs else "")


def bucket_label(first: datetime, zone: ZoneInfo) -> str:
    """A bucket's label: the local time of its first instant and the UTC offset there."""
    local = first.astimezone(zone)
    return local.strftime("%Y-%m-%d %H:%M") + _offset_text(local.utcoffset())


def _local_midnight(year: int, month: int, day: int, zone: ZoneInfo) -> datetime:
    """The first instant of a local date: midnight's first occurrence; when midnight falls in
    a gap, the gap's end (``fold=0`` reads it with the offset before the gap)."""
    return datetime(year, month, day, tzinfo=zone).astimezone(UTC)


def _bucket_first(t: datetime, unit: str, zone: ZoneInfo) -> datetime:
    """The first instant of the bucket holding instant ``t`` (UTC)."""
    local = t.astimezone(zone)
    if unit in SUBDAY:
        step = int(SUBDAY[unit].total_seconds() // 60)
        # The wall clock truncated, with the offset in force at t (fold kept): a repeated
        # hour's second pass is a bucket of its own.
        offset = local.utcoffset() or timedelta(0)
        wall = local.replace(tzinfo=None)
        wall = wall.replace(minute=wall.minute - wall.minute % step, second=0, microsecond=0)
        return (wall - offset).replace(tzinfo=UTC)
    day = local.date()
    if unit == "week":
        day -= timedelta(days=day.weekday())
    elif unit == "month":
        day = day.replace(day=1)
    return _local_midnight(day.year, day.month, day.day, zone)


def _bucket_next(first: datetime, unit: str, zone: ZoneInfo) -> datetime:
    """The first instant of the bucket after the one starting at ``first``."""
    if unit in SUBDAY:
        return first + SUBDAY[unit]
    day = first.astimezone(zone).date()
    if unit == "month":
        year, month = divmod(day.year * 12 + day.month, 12)  # month is 0-based here
        return _local_midnight(year, month + 1, 1, zone)
    following = day + timedelta(days=7 if unit == "week" else 1)
    return _local_midnight(following.year, following.month, following.day, zone)


def buckets(
    start: datetime, end: datetime, unit: str, zone: str | ZoneInfo
) -> list[tuple[str, datetime]]:
    """The buckets of the window ``[start, end)``: ``(label, lower edge)`` in time order, the
    first edge clipped to ``start`` (see the module docstring)."""
    tz = zone if isinstance(zone, ZoneInfo) else ZoneInfo(zone)
    out: list[tuple[str, datetime]] = []
    first = _bucket_first(start, unit, tz)
    while first < end:
        out.append((bucket_label(first, tz), max(first, start)))
        following = _bucket_next(first, unit, tz)
        if following <= first:  # an offset change no unit boundary lines up with
            following = _bucket_first(first + SUBDAY.get(unit, timedelta(days=1)), unit, tz)
        first = following
        if len(out) > MAX_BUCKETS:
            raise ParameterError(
                f"the window holds more than {MAX_BUCKETS:,} {unit} buckets; choose a larger "
                "unit or a shorter window"
            )
    return out


def _window_buckets(values: dict[str, Any]) -> dict[str, Any]:
    found = buckets(values["start"], values["end"], values["unit"], values["timezone"])
    return {**values, "labels": [b[0] for b in found], "edges": [b[1] for b in found]}


def _watch_instants(values: dict[str, Any]) -> dict[str, Any]:
    cutover, hours = values["cutover"], values["hours"]
    at = [cutover + h * timedelta(hours=1) for h in range(hours)]
    grid = sorted({*at, *(t - WEEK for t in at)})
    return {**values, "at": at, "edges": grid, "last": at[-1]}


def _by_bucket(frame: pd.DataFrame, values: dict[str, Any]) -> pd.DataFrame:
    """Bucket numbers (1-based) replaced by their labels."""
    labels = values["labels"]
    out = frame.copy()
    out.insert(0, "bucket", [labels[int(k) - 1] for k in out.pop("k")])
    for column in out.columns[1:]:
        out[column] = pd.Series([int(v) for v in out[column]], index=out.index, dtype="int64")
    return out


def _watch(frame: pd.DataFrame, values: dict[str, Any]) -> pd.DataFrame:
    """Active sessions at each watched instant and 168 hours before it, from the counts at
    the distinct instants."""
    active = dict(
        zip(
            (values["edges"][int(k) - 1] for k in frame["k"]),
            (int(n) for n in frame["active"]),
            strict=True,
        )
    )
    return pd.DataFrame(
        {
            "hour": list(range(len(values["at"]))),
            "at": [t.strftime("%Y-%m-%dT%H:%M:%S.%fZ") for t in values["at"]],
            "active": [active[t] for t in values["at"]],
            "week_before": [active[t - WEEK] for t in values["at"]],
        },
        columns=["hour", "at", "active", "week_before"],
    )


def _share(frame: pd.DataFrame, values: dict[str, Any]) -> pd.DataFrame:
    frame["share_pct"] = (100 * frame["sessions"] / frame.pop("total")).round(2)
    frame["tied_at_cutoff"] = frame.pop("tied_at_cutoff").astype(bool)
    return frame[["user_id", "sessions", "share_pct", "rank", "tied_at_cutoff"]]


def _tied(frame: pd.DataFrame, values: dict[str, Any]) -> pd.DataFrame:
    frame["tied_at_cutoff"] = frame["tied_at_cutoff"].astype(bool)
    return frame


# --- the queries ------------------------------------------------------------------------------

# Peaks: the running sum of +1 (a start) and -1 (an expiry) in time order, with the default
# window frame (RANGE … CURRENT ROW), so every event at one instant is applied together: a
# row's n is the count just after its instant, equal instants share it (no GROUP BY t needed);
# the bucket number k grows with t, so ordering by (k, t) is ordering by t and hands the rows
# to the per-bucket grouping already sorted.
# Counting at instants: each session active at some of the sorted instants E_1 < … < E_m is
# active exactly at E_i for lo < i <= hi, where lo (hi) is how many instants lie before its
# created_at (expires_at); so the count at E_i is #(lo < i) - #(hi < i), one pass over the table.
_PG_EDGES = "%(edges)s::timestamptz[]"
_PG_BEFORE = "width_bucket({} - interval '1 microsecond', " + _PG_EDGES + ")"

QUERIES: tuple[Query, ...] = (
    Query(
        "active_at",
        "sessions active at instant `at` (created_at <= at < expires_at), and how many of them "
        "are anonymous (user_id NULL)",
        (AT,),
        "SELECT count(*) AS active, count(*) FILTER (WHERE user_id IS NULL) AS anonymous "
        "FROM {sessions} WHERE created_at <= %(at)s AND expires_at > %(at)s",
        "SELECT count(*) AS active, coalesce(sum(user_id IS NULL), 0) AS anonymous "
        "FROM sessions WHERE created_at <= :at AND expires_at > :at",
    ),
    Query(
        "active_over_time",
        "peak concurrency per bucket of the window: for every bucket (local `unit` in "
        "`timezone`, empty ones included), the largest number of sessions active at one "
        "instant of the bucket inside [start, end) — active as in active_at, so sessions "
        "carried in from before the bucket count, every start and expiry at one instant is "
        "applied together, and a session with expires_at <= created_at never counts",
        (START, END, UNIT, ZONE),
        """WITH base AS (SELECT count(*) AS n FROM {sessions}
                         WHERE created_at <= %(start)s AND expires_at > %(start)s),
                ev AS (SELECT t, d, width_bucket(t, %(edges)s::timestamptz[]) AS k FROM (
                           SELECT created_at AS t, 1 AS d FROM {sessions}
                           WHERE created_at > %(start)s AND created_at < %(end)s
                             AND expires_at > created_at
                           UNION ALL
                           SELECT expires_at, -1 FROM {sessions}
                           WHERE expires_at > %(start)s AND expires_at < %(end)s
                             AND expires_at > created_at) AS x),
                run AS (SELECT t, d, k, sum(d) OVER (ORDER BY k, t) AS n FROM ev),
                per AS (SELECT k, sum(d) AS d, max(n) AS top,
                               sum(d) FILTER (WHERE t = (%(edges)s::timestamptz[])[k]) AS at_edge
                        FROM run GROUP BY k),
                b AS (SELECT k, base.n + coalesce(sum(per.d) OVER (ORDER BY k ROWS BETWEEN
                              UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS carried,
                             per.at_edge, base.n + per.top AS top
                      FROM generate_series(1, cardinality(%(edges)s::timestamptz[])) AS k
                      CROSS JOIN base LEFT JOIN per USING (k))
           SELECT k, greatest(carried + coalesce(at_edge, 0), top) AS peak FROM b ORDER BY k""",
        """WITH base AS (SELECT count(*) AS n FROM sessions
                         WHERE created_at <= :start AND expires_at > :start),
                ev AS (SELECT t, d, edge_index(t) AS k FROM (
                           SELECT created_at AS t, 1 AS d FROM sessions
                           WHERE created_at > :start AND created_at < :end
                             AND expires_at > created_at
                           UNION ALL
                           SELECT expires_at, -1 FROM sessions
                           WHERE expires_at > :start AND expires_at < :end
                             AND expires_at > created_at)),
                run AS (SELECT t, d, k, sum(d) OVER (ORDER BY k, t) AS n FROM ev),
                per AS (SELECT k, sum(d) AS d, max(n) AS top,
                               sum(CASE WHEN t = edge_at(k) THEN d END) AS at_edge
                        FROM run GROUP BY k),
                ks(k) AS (SELECT 1 UNION ALL SELECT k + 1 FROM ks WHERE k < edge_count()),
                b AS (SELECT ks.k, base.n + coalesce(sum(per.d) OVER (ORDER BY ks.k ROWS BETWEEN
                              UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS carried,
                             per.at_edge, base.n + per.top AS top
                      FROM ks CROSS JOIN base LEFT JOIN per ON per.k = ks.k)
           SELECT k, max(carried + coalesce(at_edge, 0), coalesce(top, 0)) AS peak
           FROM b ORDER BY k""",
        _by_bucket,
        _window_buckets,
        WINDOWED,
    ),
    Query(
        "sessions_started",
        "sessions started per bucket of the window (created_at in the bucket and in [start, "
        "end); buckets as in active_over_time, empty ones included), the distinct users who "
        "started them (user_id not NULL; '' is a user id like any other) and the anonymous ones",
        (START, END, UNIT, ZONE),
        """WITH x AS (SELECT width_bucket(created_at, %(edges)s::timestamptz[]) AS k, user_id
                      FROM {sessions} WHERE created_at >= %(start)s AND created_at < %(end)s),
                per AS (SELECT k, count(*) AS sessions, count(DISTINCT user_id) AS users,
                               count(*) FILTER (WHERE user_id IS NULL) AS anonymous
                        FROM x GROUP BY k)
           SELECT k, coalesce(sessions, 0) AS sessions, coalesce(users, 0) AS users,
                  coalesce(anonymous, 0) AS anonymous
           FROM generate_series(1, cardinality(%(edges)s::timestamptz[])) AS k
           LEFT JOIN per USING (k) ORDER BY k""",
        """WITH x AS (SELECT edge_index(created_at) AS k, user_id FROM sessions
                      WHERE created_at >= :start AND created_at < :end),
                per AS (SELECT k, count(*) AS sessions, count(DISTINCT user_id) AS users,
                               sum(user_id IS NULL) AS anonymous FROM x GROUP BY k),
                ks(k) AS (SELECT 1 UNION ALL SELECT k + 1 FROM ks WHERE k < edge_count())
           SELECT ks.k AS k, coalesce(sessions, 0) AS sessions, coalesce(users, 0) AS users,
                  coalesce(anonymous, 0) AS anonymous
           FROM ks LEFT JOIN per ON per.k = ks.k ORDER BY ks.k""",
        _by_bucket,
        _window_buckets,
        WINDOWED,
    ),
    Query(
        "sessions_per_user",
        "the top_n users by number of sessions (all anonymous sessions as one row, "
        "'(anonymous)'), with each one's share of all sessions in percent (2 decimals), its "
        "rank (1 + rows with more sessions) and tied_at_cutoff: true when a row not shown has "
        "as many sessions; ties are ordered by user id, bytewise",
        (TOP,),
        """WITH g AS (SELECT coalesce(user_id, '(anonymous)') AS user_id, count(*) AS sessions
                      FROM {sessions} GROUP BY {sessions}.user_id),
                r AS (SELECT user_id, sessions, sum(sessions) OVER ()::bigint AS total,
                             rank() OVER (ORDER BY sessions DESC) AS rank,
                             count(*) OVER (PARTITION BY sessions) AS same
                      FROM g)
           SELECT user_id, sessions, total, rank,
                  (rank + same - 1 > %(top_n)s) AS tied_at_cutoff
           FROM r ORDER BY sessions DESC, user_id COLLATE "C" LIMIT %(top_n)s""",
        """WITH g AS (SELECT coalesce(user_id, '(anonymous)') AS user_id, count(*) AS sessions
                      FROM sessions GROUP BY sessions.user_id),
                r AS (SELECT user_id, sessions, sum(sessions) OVER () AS total,
                             rank() OVER (ORDER BY sessions DESC) AS rank,
                             count(*) OVER (PARTITION BY sessions) AS same
                      FROM g)
           SELECT user_id, sessions, total, rank,
                  (rank + same - 1 > :top_n) AS tied_at_cutoff
           FROM r ORDER BY sessions DESC, user_id LIMIT :top_n""",
        _share,
    ),
    Query(
        "request_count_distribution",
        "sessions per request-count bucket: from_count = floor(request_count / width) * width, "
        "every non-empty bucket, ascending",
        (Param("width", "int", 10, "bucket width in requests", low=1),),
        """SELECT (floor(request_count::numeric / %(width)s) * %(width)s)::bigint AS from_count,
                  count(*) AS sessions FROM {sessions} GROUP BY 1 ORDER BY 1""",
        """SELECT floordiv(request_count, :width) * :width AS from_count, count(*) AS sessions
           FROM sessions GROUP BY 1 ORDER BY 1""",
    ),
    Query(
        "lifetime_hours",
        "sessions per lifetime in whole hours: floor((expires_at - created_at) / 3600 s), "
        "negative for a session that expires before it starts; every non-empty value, ascending",
        (),
        """SELECT floor(extract(epoch FROM expires_at - created_at) / 3600)::bigint AS hours,
                  count(*) AS sessions FROM {sessions} GROUP BY 1 ORDER BY 1""",
        """SELECT floordiv(expires_at - created_at, 3600000000) AS hours, count(*) AS sessions
           FROM sessions GROUP BY 1 ORDER BY 1""",
    ),
    Query(
        "percentiles",
        "nearest-rank percentiles (the smallest value at or below which at least p% of the "
        "sessions lie) of request_count and of the lifetime in whole minutes "
        "(floor((expires_at - created_at) / 60 s)): sessions, min, p50, p90, p99, max",
        (),
        """WITH v AS (SELECT 'lifetime_minutes' AS measure,
                             floor(extract(epoch FROM expires_at - created_at) / 60)::bigint AS x
                      FROM {sessions}
                      UNION ALL SELECT 'request_count', request_count::bigint FROM {sessions}),
                c AS (SELECT measure, x, count(*) AS n FROM v GROUP BY 1, 2),
                r AS (SELECT measure, x, sum(n) OVER (PARTITION BY measure ORDER BY x) AS cum,
                             sum(n) OVER (PARTITION BY measure) AS total FROM c)
           SELECT measure, max(total)::bigint AS sessions, min(x) AS min,
                  min(x) FILTER (WHERE 100 * cum >= 50 * total) AS p50,
                  min(x) FILTER (WHERE 100 * cum >= 90 * total) AS p90,
                  min(x) FILTER (WHERE 100 * cum >= 99 * total) AS p99, max(x) AS max
           FROM r GROUP BY measure ORDER BY measure""",
        """WITH v AS (SELECT 'lifetime_minutes' AS measure,
                             floordiv(expires_at - created_at, 60000000) AS x FROM sessions
                      UNION ALL SELECT 'request_count', request_count FROM sessions),
                c AS (SELECT measure, x, count(*) AS n FROM v GROUP BY 1, 2),
                r AS (SELECT measure, x, sum(n) OVER (PARTITION BY measure ORDER BY x) AS cum,
                             sum(n) OVER (PARTITION BY measure) AS total FROM c)
           SELECT measure, max(total) AS sessions, min(x) AS min,
                  min(x) FILTER (WHERE 100 * cum >= 50 * total) AS p50,
                  min(x) FILTER (WHERE 100 * cum >= 90 * total) AS p90,
                  min(x) FILTER (WHERE 100 * cum >= 99 * total) AS p99, max(x) AS max
           FROM r GROUP BY measure ORDER BY measure""",
    ),
    Query(
        "ttl_used",
        "share of the lifetime used before the last activity, in whole tenths: "
        "min(floor(10 * (last_activity - created_at) / (expires_at - created_at)), 10), over "
        "the sessions with created_at < expires_at and last_activity within [created_at, "
        "expires_at]; every non-empty value, ascending",
        (),
        """SELECT least(10 * (extract(epoch FROM last_activity - created_at) * 1000000)::bigint
                        / (extract(epoch FROM expires_at - created_at) * 1000000)::bigint, 10)
                  AS tenths_used, count(*) AS sessions
           FROM {sessions}
           WHERE expires_at > created_at AND last_activity >= created_at
             AND last_activity <= expires_at
           GROUP BY 1 ORDER BY 1""",
        """SELECT min(10 * (last_activity - created_at) / (expires_at - created_at), 10)
                  AS tenths_used, count(*) AS sessions
           FROM sessions
           WHERE expires_at > created_at AND last_activity >= created_at
             AND last_activity <= expires_at
           GROUP BY 1 ORDER BY 1""",
    ),
    Query(
        "metadata_keys",
        "top-level keys of the metadata objects (metadata that is not a JSON object has none) "
        "and how many sessions carry each; most sessions first, then the key bytewise",
        (),
        """SELECT k AS key, count(*) AS sessions FROM {sessions},
                  jsonb_object_keys(CASE WHEN jsonb_typeof(metadata) = 'object'
                                         THEN metadata END) AS k
           GROUP BY 1 ORDER BY 2 DESC, k COLLATE "C" """,
        # The copy's metadata is printed as jsonb prints it: an object's text starts with {.
        """SELECT j.key AS key, count(*) AS sessions FROM sessions, json_each(sessions.metadata) j
           WHERE sessions.metadata LIKE '{%' GROUP BY 1 ORDER BY 2 DESC, 1""",
    ),
    Query(
        "metadata_top_values",
        "for each top-level metadata key, its top_n most frequent string values (other JSON "
        "types are left out) and how many sessions carry each, with rank within the key and "
        "tied_at_cutoff: true when a value not shown is as frequent; key and ties bytewise",
        (Param("top_n", "int", 3, "values kept per key", low=1),),
        # One pass over the table; then, from the counts per (key, value), the counts per
        # (key, count) say which counts reach the top_n of each key (with their rank and
        # whether the cut-off splits them), and only the values holding those counts are
        # sorted — never all the distinct values of a key such as an IP address.
        """WITH c AS MATERIALIZED (
                    SELECT k AS key, metadata ->> k AS value, count(*) AS sessions
                    FROM {sessions},
                         jsonb_object_keys(CASE WHEN jsonb_typeof(metadata) = 'object'
                                                THEN metadata END) AS k
                    WHERE jsonb_typeof(metadata -> k) = 'string' GROUP BY 1, 2),
                g AS (SELECT key, sessions, count(*) AS n FROM c GROUP BY 1, 2),
                h AS (SELECT key, sessions, n,
                             sum(n) OVER (PARTITION BY key ORDER BY sessions DESC) AS last
                      FROM g),
                cut AS MATERIALIZED (SELECT key, sessions, last - n + 1 AS rank,
                                            last > %(top_n)s AS tied
                                     FROM h WHERE last - n < %(top_n)s),
                least AS (SELECT jsonb_object_agg(key, s) AS at
                          FROM (SELECT key, min(sessions) AS s FROM cut GROUP BY key) AS m),
                r AS (SELECT c.key, c.value, c.sessions,
                             row_number() OVER (PARTITION BY c.key ORDER BY c.sessions DESC,
                                                c.value COLLATE "C") AS pos
                      FROM c, least WHERE c.sessions >= (least.at ->> c.key)::bigint)
           SELECT r.key, r.value, r.sessions, cut.rank::bigint AS rank,
                  cut.tied AS tied_at_cutoff
           FROM r JOIN cut ON cut.key = r.key AND cut.sessions = r.sessions
           WHERE r.pos <= %(top_n)s
           ORDER BY r.key COLLATE "C", r.sessions DESC, r.value COLLATE "C" """,
        # The copy's metadata is printed as jsonb prints it: an object's text starts with {.
        """WITH c AS MATERIALIZED (
                    SELECT j.key AS key, j.value AS value, count(*) AS sessions
                    FROM sessions, json_each(sessions.metadata) j
                    WHERE sessions.metadata LIKE '{%' AND j.type = 'text' GROUP BY 1, 2),
                g AS (SELECT key, sessions, count(*) AS n FROM c GROUP BY 1, 2),
                h AS (SELECT key, sessions, n,
                             sum(n) OVER (PARTITION BY key ORDER BY sessions DESC) AS last
                      FROM g),
                cut AS MATERIALIZED (SELECT key, sessions, last - n + 1 AS rank,
                                            last > :top_n AS tied
                                     FROM h WHERE last - n < :top_n),
                r AS (SELECT c.key, c.value, c.sessions, cut.rank, cut.tied,
                             row_number() OVER (PARTITION BY c.key ORDER BY c.sessions DESC,
                                                c.value) AS pos
                      FROM c JOIN cut ON cut.key = c.key AND cut.sessions = c.sessions)
           SELECT key, value, sessions, rank, tied AS tied_at_cutoff FROM r
           WHERE pos <= :top_n ORDER BY key, sessions DESC, value""",
        _tied,
    ),
    Query(
        "anomalies",
        "the inspect rules on the live table: rows whose expires_at < created_at, whose "
        "last_activity is outside [created_at, expires_at], whose request_count < 0; all rows",
        (),
        """SELECT count(*) FILTER (WHERE expires_at < created_at) AS expires_before_created,
                  count(*) FILTER (WHERE last_activity < created_at OR last_activity > expires_at)
                      AS last_activity_outside_lifetime,
                  count(*) FILTER (WHERE request_count < 0) AS negative_request_count,
                  count(*) AS rows FROM {sessions}""",
        """SELECT coalesce(sum(expires_at < created_at), 0) AS expires_before_created,
                  coalesce(sum(last_activity < created_at OR last_activity > expires_at), 0)
                      AS last_activity_outside_lifetime,
                  coalesce(sum(request_count < 0), 0) AS negative_request_count,
                  count(*) AS rows FROM sessions""",
    ),
    Query(
        "cutover_watch",
        "sessions active (as in active_at) at cutover + h hours for h = 0 … hours-1 (`at`, UTC), "
        "beside those active exactly 168 hours earlier (week_before): exact UTC arithmetic, the "
        "same across a DST change and wherever the client sits (the digest's 24 h watch)",
        (
            Param("cutover", "instant", None, "the cutover instant (default: as_of)"),
            Param("hours", "int", 24, "how many hours to watch", low=1, high=MAX_WATCH_HOURS),
        ),
        f"""WITH s AS (SELECT {_PG_BEFORE.format("created_at")} AS lo,
                              {_PG_BEFORE.format("expires_at")} AS hi
                       FROM {{sessions}}
                       WHERE expires_at > created_at
                         AND expires_at > (%(edges)s::timestamptz[])[1]
                         AND created_at <= %(last)s),
                 d AS (SELECT k, sum(n) AS n FROM (SELECT lo AS k, count(*) AS n FROM s GROUP BY lo
                       UNION ALL SELECT hi, -count(*) FROM s GROUP BY hi) AS x GROUP BY k)
            SELECT k + 1 AS k, (sum(coalesce(n, 0)) OVER (ORDER BY k))::bigint AS active
            FROM generate_series(0, cardinality(%(edges)s::timestamptz[]) - 1) AS k
            LEFT JOIN d USING (k) ORDER BY k""",
        """WITH s AS (SELECT edge_index(created_at - 1) AS lo, edge_index(expires_at - 1) AS hi
                      FROM sessions
                      WHERE expires_at > created_at AND expires_at > edge_at(1)
                        AND created_at <= :last),
                d AS (SELECT k, sum(n) AS n FROM (SELECT lo AS k, count(*) AS n FROM s GROUP BY lo
                      UNION ALL SELECT hi, -count(*) FROM s GROUP BY hi) GROUP BY k),
                ks(k) AS (SELECT 0 UNION ALL SELECT k + 1 FROM ks WHERE k + 1 < edge_count())
           SELECT ks.k + 1 AS k, sum(coalesce(d.n, 0)) OVER (ORDER BY ks.k) AS active
           FROM ks LEFT JOIN d ON d.k = ks.k ORDER BY ks.k""",
        _watch,
        _watch_instants,
        ("cutover", "hours"),
    ),
    Query(
        "user_sessions",
        "one user's sessions (user_id equal to the text given, '' included — or, with "
        "anonymous=true, those whose user_id is NULL), newest created_at first, then session "
        "id bytewise; at most `limit` (ids hashed unless shown)",
        (
            Param("user_id", "str", None, "the user to list ('' is the empty user id)"),
            Param("anonymous", "bool", False, "list the sessions without a user (user_id NULL)"),
            Param("limit", "int", 50, "rows", low=1),
        ),
        f"""SELECT session_id, {ISO_PG.format("created_at")} AS created_at,
                   {ISO_PG.format("expires_at")} AS expires_at,
                   {ISO_PG.format("last_activity")} AS last_activity, request_count
            FROM {{sessions}}
            WHERE CASE WHEN %(anonymous)s THEN user_id IS NULL ELSE user_id = %(user_id)s END
            ORDER BY {{sessions}}.created_at DESC, session_id COLLATE "C" LIMIT %(limit)s""",
        """SELECT session_id, iso(created_at) AS created_at, iso(expires_at) AS expires_at,
                  iso(last_activity) AS last_activity, request_count
           FROM sessions
           WHERE CASE WHEN :anonymous THEN user_id IS NULL ELSE user_id = :user_id END
           ORDER BY sessions.created_at DESC, session_id LIMIT :limit""",
    ),
)
BY_NAME = {q.name: q for q in QUERIES}


def get(name: str) -> Query:
    if name not in BY_NAME:
        raise ParameterError(
            f"no query named {name!r}; `sessionmig query --list` shows them: {', '.join(BY_NAME)}"
        )
    return BY_NAME[name]


def listing() -> list[str]:
    """One line per query: its name first, then what it answers and its parameters."""
    lines = []
    for q in QUERIES:
        args = ", ".join(f"{p.name}: {p.kind} = {p.default!r}" for p in (*q.params, TIMEOUT))
        lines.append(f"{q.name} — {q.description} ({args})")
    return lines


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0", "")


def _check(query: Query, p: Param, value: Any, zone: str) -> Any:
    """One parameter's value typed and checked, or a ParameterError naming it."""
    where = f"query {query.name}: {p.name}={value!r}"
    if p.kind == "zone":
        value = str(value or zone)
        try:
            ZoneInfo(value)
        except (ValueError, OSError, KeyError):  # ZoneInfoNotFoundError is a KeyError
            raise ParameterError(
                f"query {query.name}: {p.name}={value!r} is not an IANA zone name; use e.g. "
                "Asia/Seoul or UTC"
            ) from None
        return value
    if p.kind == "int":
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            value = int(value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParameterError(f"{where} must be a whole number")
        if not p.low <= value <= p.high:
            raise ParameterError(f"{where} must be between {p.low} and {p.high:,}")
        return value
    if p.kind == "unit":
        if value not in UNITS:
            raise ParameterError(f"{where}: choose one of {', '.join(UNITS)}")
        return value
    if p.kind == "bool":
        if isinstance(value, str) and value.strip().lower() in (*_TRUE, *_FALSE):
            return value.strip().lower() in _TRUE
        if not isinstance(value, bool):
            raise ParameterError(f"{where} must be true or false")
        return value
    if p.kind == "seconds":
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            raise ParameterError(f"{where} must be a number of seconds") from None
        if isinstance(value, bool) or not 0 < seconds <= MAX_TIMEOUT_S or math.isnan(seconds):
            raise ParameterError(f"{where} must be more than 0 and at most {MAX_TIMEOUT_S:g} s")
        return seconds
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or "\x00" in value:
        raise ParameterError(f"{where} must be text without NUL characters")
    return value


def resolve(query: Query, given: dict[str, Any], as_of: datetime, zone: str) -> dict[str, Any]:
    """Typed, checked parameter values with defaults — every one checked here, before any
    query runs; unknown names are refused. ``timeout_s`` is accepted by every query."""
    known = {p.name for p in query.params} | {TIMEOUT.name}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ParameterError(
            f"query {query.name} has no parameter {unknown}; it takes "
            f"{', '.join(p.name for p in query.params) or 'none'} (and timeout_s)"
        )
    out: dict[str, Any] = {}
    for p in query.params:
        value = given.get(p.name, p.default)
        if p.kind == "instant":
            default = as_of - timedelta(days=7) if p.name == "start" else as_of
            try:
                value = parse_instant(value, p.name) or default
            except ParameterError as exc:
                raise ParameterError(f"query {query.name}: {exc}") from None
        else:
            value = _check(query, p, value, zone)
        out[p.name] = value
    if TIMEOUT.name in given and given[TIMEOUT.name] not in (None, ""):
        out[TIMEOUT.name] = _check(query, TIMEOUT, given[TIMEOUT.name], zone)
    if "start" in out and "end" in out:
        if not out["start"] < out["end"]:
            raise ParameterError(
                f"query {query.name}: start={out['start'].isoformat()} must be before "
                f"end={out['end'].isoformat()} (the window is [start, end))"
            )
        shortest = SUBDAY.get(out["unit"], timedelta(hours=23))
        try:
            if (out["end"] - out["start"]) / shortest > MAX_BUCKETS + 2:
                raise ParameterError(
                    f"the window holds more than {MAX_BUCKETS:,} {out['unit']} buckets; choose a "
                    "larger unit or a shorter window"
                )
            buckets(out["start"], out["end"], out["unit"], out["timezone"])
        except ParameterError as exc:
            raise ParameterError(f"query {query.name}: start/end/unit: {exc}") from None
    if query.name == "user_sessions":
        if out["anonymous"] and out["user_id"] is not None:
            raise ParameterError("query user_sessions: give user_id or anonymous=true, not both")
        if not out["anonymous"] and out["user_id"] is None:
            raise ParameterError(
                "query user_sessions: user_id is required (user_id='' lists the sessions whose "
                "user id is the empty text); anonymous=true lists those without a user"
            )
    return out


def _micros(moment: datetime) -> int:
    return (moment - EPOCH) // MICROS


def _iso(micros: int | None) -> str | None:
    if micros is None:
        return None
    return (EPOCH + micros * MICROS).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _floordiv(a: int | None, b: int | None) -> int | None:
    return None if a is None or not b else a // b


COPY_NAME = "analysis.db"
META_NAME = "meta.json"
BUILD_PREFIX = ".build-"
# Long enough for a migration weekend's before/after queries; a copy holds raw tokens, so not
# longer.
KEEP_UNUSED = timedelta(days=3)
# A build folder this old was left by a killed process (a build takes minutes at most).
STALE_BUILD = timedelta(hours=6)


def analysis_cache_dir() -> Path:
    """Where analysis copies live: the user's cache (XDG), never a shared /tmp."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"
    return root / "sessionmig" / "analysis"


def _private_dir(path: Path) -> Path:
    """``path`` created 0700, owned by this user and not a symlink, or an error."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise SourceError(
            f"{path}: not a directory of this user; the analysis copy holds session tokens, so "
            "it is kept only in a private folder. Remove it or set XDG_CACHE_HOME"
        )
    if info.st_mode & 0o077:
        path.chmod(0o700)
    return path


def _code_fingerprint() -> str:
    """The package's code: a copy made by other rules' code is never reused."""
    package = Path(__file__).resolve().parents[1]  # sessionmig/, every layer of it
    digest = hashlib.sha256()
    for module in sorted(package.rglob("*.py")):
        digest.update(str(module.relative_to(package)).encode() + b"\0" + module.read_bytes())
    return digest.hexdigest()


def _copy_key(hashes: tuple[FileHash, ...], rules: Rules) -> str:
    main = hashes[0]
    digest = hashlib.sha256()
    for side in hashes[1:]:  # a -wal or -journal holds rows too
        digest.update(f"{side.path[len(main.path) :]}={side.sha256}\n".encode())
    digest.update(repr(rules).encode() + b"\n" + _code_fingerprint().encode())
    return f"{main.sha256}-{digest.hexdigest()[:16]}"


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _age(path: Path) -> timedelta:
    return timedelta(seconds=max(0.0, time.time() - path.stat().st_mtime))


def prune_analysis_copies(
    older_than: timedelta = KEEP_UNUSED, cache_dir: str | Path | None = None
) -> int:
    """Remove the copies not used for ``older_than`` (and builds left by killed processes);
    how many folders went."""
    root = Path(cache_dir) if cache_dir else analysis_cache_dir()
    if not root.is_dir():
        return 0
    removed = 0
    for entry in root.iterdir():
        try:
            limit = STALE_BUILD if entry.name.startswith(BUILD_PREFIX) else older_than
            if _age(entry) < limit:
                continue
        except FileNotFoundError:
            continue  # another process removed it meanwhile
        shutil.rmtree(entry, ignore_errors=True)
        removed += 1
    return removed


def remove_analysis_copies(cache_dir: str | Path | None = None) -> int:
    """Remove every analysis copy (the next query on a backup builds it again); how many."""
    return prune_analysis_copies(timedelta(0), cache_dir)


@dataclass
class AnalysisCopy:
    """The backup normalised for analysis (see the module docstring); a private file."""

    path: Path
    rows: int
    left_out: int
    built: bool = False  # whether this call built it (False: reused from the cache)

    @classmethod
    def build(
        cls,
        sqlite_path: str | Path,
        rules: Rules,
        batch_rows: int = D.BATCH_ROWS,
        cache_dir: str | Path | None = None,
    ) -> AnalysisCopy:
        """The analysis copy of ``sqlite_path`` under ``rules``: the cached one when this
        backup was already normalised by these rules and this code, else built now."""
        root = _private_dir(Path(cache_dir) if cache_dir else analysis_cache_dir())
        prune_analysis_copies(cache_dir=root)
        original = Path(sqlite_path)
        if not original.is_file():
            raise SourceError(f"{original}: no such file; check sqlite_path")
        hashes = hash_files(original)
        entry = root / _copy_key(hashes, rules)
        found = cls._cached(entry)
        if found is not None:
            return found
        work = Path(tempfile.mkdtemp(prefix=BUILD_PREFIX, dir=root))
        try:
            kept, left_out = _fill(work / COPY_NAME, original, hashes, rules, batch_rows)
            meta = {"rows": kept, "left_out": left_out, "backup": [h.sha256 for h in hashes]}
            _write_private(work / META_NAME, json.dumps(meta).encode())
            try:
                # Atomic: a folder under the final name is always complete.
                os.rename(work, entry)
            except OSError:
                found = cls._cached(entry)  # another process finished the same copy first
                if found is None:
                    raise
                return found
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return cls(entry / COPY_NAME, kept, left_out, built=True)

    @classmethod
    def _cached(cls, entry: Path) -> AnalysisCopy | None:
        try:
            meta = json.loads((entry / META_NAME).read_text())
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (OSError, ValueError):
            shutil.rmtree(entry, ignore_errors=True)  # damaged: built again
            return None
        path = entry / COPY_NAME
        if not path.is_file():
            shutil.rmtree(entry, ignore_errors=True)
            return None
        os.utime(entry)  # its last use, for pruning
        return cls(path, meta["rows"], meta["left_out"])

    def remove(self) -> None:
        """Remove this copy (its folder in the cache)."""
        if (self.path.parent / META_NAME).exists():
            shutil.rmtree(self.path.parent, ignore_errors=True)

    def connect(self, timeout_s: float) -> sqlite3.Connection:
        return self.open(timeout_s)[0]

    def open(self, timeout_s: float) -> tuple[sqlite3.Connection, readonly.SqliteGuard]:
        """A connection that can only read the copy (see :func:`readonly.guard_sqlite`)."""
        # immutable: SQLite never writes, locks or creates a side file for this file.
        uri = self.path.resolve().as_uri() + "?mode=ro&immutable=1"
        conn = sqlite3.connect(uri, uri=True)
        conn.create_function("iso", 1, _iso, deterministic=True)
        conn.create_function("floordiv", 2, _floordiv, deterministic=True)
        return conn, readonly.guard_sqlite(conn, timeout_s)


FILL_PARTS = 2
"""Processes that normalise a large backup into the analysis copy, each a span of rowids."""
FILL_PARTS_FROM = 200_000
"""Rowids from which the copy is made by :data:`FILL_PARTS` processes (each costs about a
second to start)."""
_FILL_WORKER = (
    "from sessionmig.engines.queries import fill_part; "
    "from sessionmig.sqlite.wire import serve; serve(fill_part)"
)
_INSERT = "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?)"


def _new_table(out: sqlite3.Connection) -> None:
    out.execute("PRAGMA journal_mode = OFF")
    out.execute("PRAGMA synchronous = OFF")
    out.execute("PRAGMA cache_size = -131072")  # 128 MiB while the indexes are sorted
    out.execute(
        "CREATE TABLE sessions (session_id TEXT NOT NULL, user_id TEXT, "
        "metadata TEXT, created_at INTEGER, expires_at INTEGER, "
        "last_activity INTEGER, request_count INTEGER)"
    )


def _insert(
    out: sqlite3.Connection,
    batches: Iterator[list[tuple[int, CopyRow | None]]],
    repeated: set[int] | dict[int, Any],
) -> tuple[int, int]:
    kept = left_out = 0
    for batch in batches:
        rows = [r for rowid, r in batch if rowid not in repeated and r is not None]
        left_out += len(batch) - len(rows)
        out.executemany(_INSERT, rows)
        kept += len(rows)
    return kept, left_out


def fill_part(
    opened: dict[str, Any],
    rules: Rules,
    batch_rows: int,
    repeated: set[int],
    first: int,
    last: int,
    path: str,
) -> Iterator[tuple[int, int]]:
    """A worker's share of :func:`_fill`: the plain path's rows ``first..last`` into a private
    file of its own at ``path``; yields ``(kept, left out)`` once, when the file is complete."""
    from sessionmig.sqlite.wire import opened_again

    backup = opened_again(opened)
    try:
        _write_private(Path(path), b"")
        with contextlib.closing(sqlite3.connect(path)) as out:
            _new_table(out)
            counts = _insert(out, _plain_batches(backup, rules, batch_rows, first, last), repeated)
            out.commit()
        yield counts
    finally:
        backup.connection.close()


def _fill_in_parts(
    out: sqlite3.Connection, backup: Any, rules: Rules, batch_rows: int, repeated: set[int]
) -> tuple[int, int] | None:
    """A large backup normalised by :data:`FILL_PARTS` processes, each a span of rowids into a
    file of its own beside the copy, then copied in rowid order into ``out``; None for a small
    backup or when a worker died (the caller then makes the copy itself)."""
    from sessionmig.sqlite.wire import WorkerDied, describe, in_processes, spans

    cut = spans(backup, FILL_PARTS)
    if not cut or cut[-1][1] - cut[0][0] < FILL_PARTS_FROM:
        return None
    folder = Path(out.execute("PRAGMA database_list").fetchone()[2]).parent
    parts = [folder / f"part-{i}.db" for i in range(len(cut))]
    opened = describe(backup)
    works = [
        (opened, rules, batch_rows, repeated, first, last, str(part))
        for (first, last), part in zip(cut, parts, strict=True)
    ]
    try:
        counts = dict(in_processes(_FILL_WORKER, works))
        for part in parts:
            out.execute("ATTACH DATABASE ? AS part", (str(part),))
            out.execute("INSERT INTO sessions SELECT * FROM part.sessions")
            out.commit()
            out.execute("DETACH DATABASE part")
    except WorkerDied:
        return None
    finally:
        for part in parts:
            part.unlink(missing_ok=True)
    return sum(k for k, _ in counts.values()), sum(n for _, n in counts.values())


ANALYSIS_ROWS = 1000
"""Index entries ANALYZE samples per index for the copy's statistics."""


def _fill(
    path: Path, original: Path, hashes: tuple[FileHash, ...], rules: Rules, batch_rows: int
) -> tuple[int, int]:
    """Normalise the backup into a new file at ``path``; rows kept and left out.

    Plain rows (text where text belongs, timestamps spelled ``YYYY-MM-DD HH:MM:SS[.ffffff]``)
    take migrate's own fast path for their instants (:class:`~sessionmig.sqlite.wire.WallClock`, a
    batch at a time); their text and metadata are checked by the same rules as every other row,
    which :func:`~sessionmig.rules.transform.normalise` decides whole. A large backup is cut into
    :data:`FILL_PARTS` spans of rowids made by as many processes. The file is private and
    renamed into place only when complete, so it is written without a journal, and its indexes
    are built once the rows are in."""
    _write_private(path, b"")  # created 0600 before SQLite writes a byte into it
    # Any private copy open_backup makes of a backup with side files goes into our folder.
    with (
        open_backup(original, workdir=path.parent) as backup,
        contextlib.closing(sqlite3.connect(path)) as out,
    ):
        if backup.hashes_before != hashes:
            raise SourceError(
                f"{original}: changed while the analysis copy was being made; is the app still "
                "writing to it? Stop it, take a new backup and start again"
            )
        _new_table(out)
        # Exactly what migrate lands: a repeated session_id only once, by the same rule.
        repeated = duplicate_rejects(backup, rules)
        fast = not rules.extra_columns and not getattr(backup, "renamed", None)
        counts = _fill_in_parts(out, backup, rules, batch_rows, set(repeated)) if fast else None
        if counts is None:
            batches = _plain_batches(backup, rules, batch_rows) if fast else None
            counts = _insert(out, batches or _rule_batches(backup, rules, batch_rows), repeated)
        # Every read of the backup is done: its hash after is taken meanwhile (hashlib
        # releases the GIL), and waited for before the copy is declared complete.
        unchanged = backup.verify_unchanged_later()
        out.execute("PRAGMA threads = 2")  # the index sorts may use a helper thread
        out.execute("CREATE UNIQUE INDEX sessions_pkey ON sessions(session_id)")
        # Covering indexes: the time and count queries read these, never the wide rows.
        out.execute("CREATE INDEX idx_expires_at ON sessions(expires_at, created_at)")
        out.execute(
            "CREATE INDEX idx_created_at ON sessions(created_at, expires_at, user_id, "
            "request_count, last_activity)"
        )
        # The planner's statistics from a sample of each index (analysis_limit: a full ANALYZE
        # reads every index, ~0.5 s on 1M rows), with the row count itself exact: on the 1M
        # sample they are the full ANALYZE's, and so is every named query's plan.
        out.execute(f"PRAGMA analysis_limit = {ANALYSIS_ROWS}")
        out.execute("ANALYZE")
        out.execute(
            "UPDATE sqlite_stat1 SET stat = ? || substr(stat, instr(stat, ' ')) "
            "WHERE tbl = 'sessions' AND instr(stat, ' ') > 0",
            (counts[0],),
        )
        out.commit()
        unchanged.result()
    return counts


CopyRow = tuple[str, str | None, str | None, int, int, int, int]


def _by_the_rules(raw: tuple, rules: Rules) -> CopyRow | None:
    result = normalise(raw, rules)
    if isinstance(result, Reject):
        return None
    sid, user, meta, created, expires, last, count = result
    text = None if meta is None else _copy_text(meta)
    return (sid, user, text, _micros(created), _micros(expires), _micros(last), count)


def _copy_text(text: str) -> str:
    """Metadata the rules accepted as the copy holds it: as jsonb prints it, or, when it is
    nested deeper than Python prints (~900 levels), the rules' text without leading whitespace."""
    try:
        return metadata_text(text)
    except RecursionError:
        # The rules kept it for PostgreSQL to judge (see parse_metadata), which stores it: the
        # copy keeps the same JSON value rather than fail the whole build. Leading whitespace
        # goes so that an object's text still starts with {, as the metadata queries expect.
        return text.lstrip(" \t\n\r")


def _rule_batches(
    backup: Any, rules: Rules, batch_rows: int
) -> Iterator[list[tuple[int, CopyRow | None]]]:
    for batch in backup.rows(batch_rows, extra=rules.extra_columns):
        yield [(raw[0], _by_the_rules(raw, rules)) for raw in batch]


class _NotPlain(Exception):
    pass


def _no_constant(name: str) -> Any:
    raise _NotPlain(name)


def _jsonb_order(found: dict[str, Any]) -> dict[str, Any]:
    """A JSON object as ``jsonb`` keeps it: the last of a repeated key (the C scanner's dict
    keeps the last value), keys in byte length then byte order (for ASCII keys the same as
    length then text order)."""
    if len(found) < 2:
        return found
    if "".join(found).isascii():
        keys = sorted(found)
        keys.sort(key=len)
    else:
        keys = sorted(found, key=lambda k: (len(k.encode()), k.encode()))
    return {k: found[k] for k in keys}


def _no_fraction(text: str) -> Any:
    raise _NotPlain(text)  # 1.0, 1e3 …: jsonb's numeric spelling is the rules' to decide


# One decoder and one encoder for every row (building them per call cost more than parsing):
# the C scanner builds each object, _jsonb_order puts its keys in jsonb's order.
_PLAIN_JSON = json.JSONDecoder(
    parse_float=_no_fraction, parse_constant=_no_constant, object_hook=_jsonb_order
)
_JSONB_TEXT = json.JSONEncoder(ensure_ascii=False, separators=(", ", ": "))


def _plain_metadata(raw: bytes, rules: Rules) -> str:
    """A plain row's metadata as ``_copy_text(parse_metadata(…))`` makes it, in one parse when
    the text holds no fraction, exponent, escape or constant; otherwise by those rules."""
    from sessionmig.rules.transform import decode_text, parse_metadata

    text = decode_text(raw, "text", "metadata")
    if "\\u" not in text:
        try:
            value = _PLAIN_JSON.decode(text)
        except (ValueError, RecursionError, _NotPlain):
            pass
        else:
            return _JSONB_TEXT.encode(value)
    checked = parse_metadata(raw, "text", rules.on_invalid_metadata)
    assert checked is not None  # metadata that is not NULL stays text
    return _copy_text(checked)


def _plain_batches(
    backup: Any, rules: Rules, batch_rows: int, low: int | None = None, high: int | None = None
) -> Iterator[list[tuple[int, CopyRow | None]]]:
    """Rows as :func:`_rule_batches` makes them, with plain rows' instants from the fast path
    (those with ``low <= rowid <= high``, when given)."""
    from sessionmig.rules.transform import RowProblem, decode_text
    from sessionmig.sqlite.wire import _UNIX_TO_PG, PLAIN, PLAIN_COLUMNS, WallClock, plain_rows

    clock = WallClock(rules.zone)
    if low is None or high is None:
        source = plain_rows(backup, batch_rows)
    else:
        cursor = backup.query(
            f"SELECT rowid, {PLAIN_COLUMNS}, {PLAIN} FROM sessions "
            "WHERE rowid BETWEEN ? AND ? ORDER BY rowid",
            (low, high),
        )
        source = backup.batches(cursor, batch_rows)
    for batch in source:
        rowids, sids, uids, metas, created, expires, last, counts, plain = zip(*batch, strict=True)
        # Only plain rows' timestamps are texts for the clock; the others take the rules.
        ok = [i for i, p in enumerate(plain) if p]
        c, c_ok = clock.utc([created[i] for i in ok])
        e, e_ok = clock.utc([expires[i] for i in ok])
        la, la_ok = clock.utc([last[i] for i in ok])
        sure = dict(zip(ok, (c_ok & e_ok & la_ok).tolist(), strict=True))
        at = {i: n for n, i in enumerate(ok)}
        out: list[tuple[int, CopyRow | None]] = []
        for i, rowid in enumerate(rowids):
            row: CopyRow | None = None
            if sure.get(i):
                n = at[i]
                try:
                    sid = decode_text(sids[i], "text", "session_id")
                    uid = None if uids[i] is None else decode_text(uids[i], "text", "user_id")
                    meta = None if metas[i] is None else _plain_metadata(metas[i][1:], rules)
                except RowProblem:
                    pass  # the rules decide it whole, below
                else:
                    row = (
                        sid,
                        uid,
                        meta,
                        c[n] + _UNIX_TO_PG,
                        e[n] + _UNIX_TO_PG,
                        la[n] + _UNIX_TO_PG,
                        counts[i],
                    )
            if row is None:
                row = _by_the_rules(backup.raw_row(rowid, ()), rules)
            out.append((rowid, row))
        yield out


@dataclass(frozen=True)
class Backends:
    """Where queries run: a PostgreSQL DSN and schema, and/or an analysis copy of the backup,
    and the statement timeout (a query's own ``timeout_s`` parameter overrides it)."""

    dsn: str | None = None
    schema: str = D.TARGET_SCHEMA
    analysis: AnalysisCopy | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S


def _frame(columns: list[str], rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=columns)


def run_sql_postgres(
    statement: Any, values: dict[str, Any], dsn: str, timeout_s: float, limit: int
) -> pd.DataFrame:
    conn = connect(dsn, "query", read_only=True, statement_timeout_ms=int(timeout_s * 1000))
    with conn:
        # The answer never depends on the client's zone (PGTZ, the role's default): every
        # instant the queries compute with is UTC.
        conn.execute("SET TIME ZONE 'UTC'")
        # Analysis queries scan the table once: compiling them (JIT) costs more than it saves,
        # and a grouping of every distinct metadata value should stay in memory.
        conn.execute("SET jit = off")
        conn.execute("SET work_mem = '128MB'")
        cur = conn.execute(statement, values)
        rows = cur.fetchmany(limit) if cur.description else []
        columns = [c.name for c in cur.description or []]
    return _frame(columns, rows)


def _edge_functions(conn: sqlite3.Connection, edges: list[int]) -> None:
    """``edge_index(t)``: how many of the sorted ``edges`` are <= t (PostgreSQL's
    ``width_bucket`` over an array); ``edge_at(k)``: the k-th (1-based); ``edge_count()``."""

    def index(t: int | None) -> int | None:
        return None if t is None else bisect.bisect_right(edges, t)

    def at(k: int | None) -> int | None:
        return edges[k - 1] if k is not None and 1 <= k <= len(edges) else None

    conn.create_function("edge_index", 1, index, deterministic=True)
    conn.create_function("edge_at", 1, at, deterministic=True)
    conn.create_function("edge_count", 0, lambda: len(edges), deterministic=True)


def run_sql_sqlite(
    statement: str,
    values: dict[str, Any],
    analysis: AnalysisCopy,
    timeout_s: float,
    limit: int,
    edges: list[int] | None = None,
) -> pd.DataFrame:
    conn, guard = analysis.open(timeout_s)
    try:
        _edge_functions(conn, edges or [])
        cur = conn.execute(statement, values)
        rows = cur.fetchmany(limit) if cur.description else []
        columns = [c[0] for c in cur.description or []]
    except sqlite3.Error as exc:
        raise ParameterError(readonly.sqlite_message(exc, guard, timeout_s)) from None
    finally:
        conn.close()
    return _frame(columns, rows)


def mask_ids(frame: pd.DataFrame, show_ids: bool) -> pd.DataFrame:
    """Session ids are bearer tokens: hashed unless ``show_ids`` was asked for explicitly."""
    if not show_ids and "session_id" in frame.columns:
        frame["session_id"] = frame["session_id"].map(mask_id)
    return frame


def _context(query: Query, values: dict[str, Any]) -> dict[str, Any]:
    """What an export of the answer carries so it can be read alone: its zone, unit, window."""
    out: dict[str, Any] = {}
    for name in query.context:
        value = values[name]
        out[name] = (
            value.strftime("%Y-%m-%dT%H:%M:%S.%fZ") if isinstance(value, datetime) else value
        )
    return out


def analysis_window(given: dict[str, Any], as_of: datetime, zone: str) -> dict[str, Any]:
    """The zone, unit and window the windowed queries of an analysis use, defaults filled in
    (``given`` as the analysis step takes it: ``timezone``, ``unit``, ``start``, ``end``, empty
    meaning the default), checked as :func:`resolve` checks them: ``timezone`` and ``unit`` as
    given, ``start``/``end`` as UTC instants, ``window`` as ``[start, end)`` in the zone's local
    time with its UTC offsets, and ``words``, one sentence for the top of a page."""
    query = get("active_over_time")
    values = resolve(
        query, {k: given[k] for k in WINDOWED if given.get(k) not in (None, "")}, as_of, zone
    )
    tz = ZoneInfo(values["timezone"])

    def local(t: datetime) -> str:
        return t.astimezone(tz).strftime("%Y-%m-%d %H:%M") + _offset_text(
            t.astimezone(tz).utcoffset()
        )

    window = f"[{local(values['start'])}, {local(values['end'])})"
    words = (
        f"Buckets of one {values['unit']} in {values['timezone']}, over the window "
        f"{window} — each bucket labelled by its local "
        "start with its UTC offset (a repeated hour on a fall-back day is two buckets, one per "
        "offset). Queries without buckets count every session."
    )
    return {**_context(query, values), "window": window, "words": words}


def run(
    name: str,
    source: str,
    backends: Backends,
    values: dict[str, Any],
    *,
    show_ids: bool = False,
    limit: int = 1000,
) -> pd.DataFrame:
    """Run a named query on ``source`` (``postgres`` or ``sqlite``) with values from
    :func:`resolve`. The frame's ``attrs["context"]`` holds the zone, unit and window (or
    cutover) the answer is about; :func:`to_text` writes them into CSV and JSON."""
    query = get(name)
    timeout_s = float(values.get(TIMEOUT.name) or backends.timeout_s)
    prepared = query.prepare(values) if query.prepare else dict(values)
    # Bucket edges are computed rows, not rows of the answer: never cut by the display limit.
    fetch = max(limit, len(prepared.get("edges", ())) + 1)
    if source == "postgres":
        if not backends.dsn:
            raise ParameterError("no PostgreSQL target configured for --source postgres")
        statement = sql.SQL(query.postgres).format(
            sessions=sql.Identifier(backends.schema, "sessions")
        )  # type: ignore[arg-type]
        bound = {k: v for k, v in prepared.items() if f"%({k})s" in query.postgres}
        frame = run_sql_postgres(statement, bound, backends.dsn, timeout_s, fetch)
    elif source == "sqlite":
        if backends.analysis is None:
            raise ParameterError("no SQLite backup configured for --source sqlite")
        lite = {
            k: _micros(v) if isinstance(v, datetime) else v
            for k, v in prepared.items()
            if f":{k}" in query.sqlite
        }
        edges = [_micros(t) for t in prepared.get("edges", ())]
        frame = run_sql_sqlite(query.sqlite, lite, backends.analysis, timeout_s, fetch, edges)
    else:
        raise ParameterError(f"--source {source!r}: choose sqlite or postgres")
    if query.post:
        frame = query.post(frame, prepared)
    frame = mask_ids(frame.head(limit).reset_index(drop=True), show_ids)
    frame.attrs["context"] = _context(query, values)
    return frame


def run_free_sql(
    text: str, source: str, backends: Backends, *, show_ids: bool = False, limit: int = 1000
) -> pd.DataFrame:
    """An analyst's own SQL: one read-only statement over the table ``sessions`` (on
    PostgreSQL in ``target_schema``, with ``TimeZone`` UTC), stopped at the timeout, with every
    session id in the result masked unless ``show_ids`` (see :mod:`sessionmig.engines.readonly`)."""
    if source == "postgres":
        if not backends.dsn:
            raise ParameterError("no PostgreSQL target configured")
        columns, rows = readonly.run_postgres(
            text, backends.dsn, backends.schema, backends.timeout_s, limit, show_ids
        )
        return _frame(columns, rows)
    if source != "sqlite":
        raise ParameterError(f"--source {source!r}: choose sqlite or postgres")
    if backends.analysis is None:
        raise ParameterError("no SQLite backup configured")
    conn, guard = backends.analysis.open(backends.timeout_s)
    lookup = readonly.sqlite_lookup(conn)
    try:
        cur = conn.execute(text)  # sqlite3 refuses a text holding more than one statement
        rows = cur.fetchmany(limit) if cur.description else []
        columns = [c[0] for c in cur.description or []]
        return _frame(columns, readonly.mask_rows(columns, rows, lookup, show_ids))
    except (sqlite3.Error, ValueError) as exc:
        error = exc if isinstance(exc, sqlite3.Error) else sqlite3.ProgrammingError(str(exc))
        message = readonly.sqlite_message(error, guard, backends.timeout_s)
        raise ParameterError(message if show_ids else readonly.mask_text(message, None)) from None
    finally:
        conn.close()


def to_text(frame: pd.DataFrame, fmt: str) -> str:
    """A result as a terminal table, CSV or JSON lines (one object a row; ``[]`` when there
    is none, so a script reading it always gets JSON). CSV and JSON carry the answer's context
    (zone, unit, window; see :func:`run`) as columns, so an exported file says what it is."""
    context = frame.attrs.get("context") or {}
    if fmt in ("csv", "json") and context and len(frame):
        frame = frame.assign(**{k: v for k, v in context.items() if k not in frame.columns})
    if fmt == "csv":
        return frame.to_csv(index=False)
    if fmt == "json":
        if not len(frame):
            return "[]"
        return "\n".join(
            json.dumps(r, default=str, ensure_ascii=False) for r in frame.to_dict(orient="records")
        )
    if not len(frame):
        return "(no rows)"
    about = ", ".join(f"{k}={v}" for k, v in context.items())
    return frame.to_string(index=False) + (f"\n({about})" if about else "")


def backends_for(
    settings: Any, sources: tuple[str, ...], timeout_s: float | None = None
) -> Backends:
    """Backends for a step's settings: the target (``postgres``) and/or the analysis copy of
    the backup (``sqlite``); the timeout is ``timeout_s``, else the settings'
    ``query_timeout_s`` when they have one, else :data:`DEFAULT_TIMEOUT_S`."""
    analysis = (
        AnalysisCopy.build(settings.sqlite_path, settings.rules) if "sqlite" in sources else None
    )
    dsn = settings.dsn() if "postgres" in sources else None
    timeout = timeout_s or getattr(settings, "query_timeout_s", None) or DEFAULT_TIMEOUT_S
    return Backends(
        dsn=dsn, schema=settings.target_schema, analysis=analysis, timeout_s=float(timeout)
    )


def run_many(
    names: list[str],
    sources: tuple[str, ...],
    backends: Backends,
    settings: Any,
    common: dict[str, Any],
    show_ids: bool = False,
) -> dict[str, pd.DataFrame]:
    """Run several named queries with the parameters each declares, taken from ``common``
    (empty values mean the query's default); every query's parameters are checked before the
    first one runs. With two sources, the results sit side by side."""
    resolved = {}
    for name in names:
        query = get(name)
        given = {
            p.name: common[p.name]
            for p in (*query.params, TIMEOUT)
            if common.get(p.name) not in (None, "")
        }
        resolved[name] = resolve(query, given, settings.as_of, settings.source_timezone)
    out: dict[str, pd.DataFrame] = {}
    for name, values in resolved.items():
        frames = [
            run(name, s, backends, values, show_ids=show_ids).assign(source=s) for s in sources
        ]
        frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
        frame.attrs["context"] = frames[0].attrs.get("context", {})
        out[name] = frame
    return out
