"""Reconcile's own reading of plain rows: what each should be in PostgreSQL, derived without
migrate's fast path, so that a fault there cannot agree with itself.

Migrate picks plain rows by SQLite's sort order, has SQLite print metadata, and converts
timestamps with ``wire.WallClock`` (bytes checked and computed in NumPy integers, offsets
probed four ways per hour). Here every choice is made another way:

* which rows are plain: storage classes by ``typeof()``, timestamp spellings byte by byte;
* metadata: SQLite's stored text bytes, wrapped into jsonb's binary form here;
* timestamps: checked byte by byte and field by field in integers (the shape, then a real
  calendar date and time of day), and only then parsed by NumPy's own ISO-8601 reader — no
  untrusted text reaches that parser, which crashes the process on some impossible dates
  instead of refusing them; and each local hour's offset read from the rules themselves
  (:func:`transform.parse_timestamp` at the hour's first and last microsecond, once per hour):
  an hour the rules map linearly takes that offset, any other hour (a transition inside it) is
  left to the rules row by row.

Everything that is not plain goes through the rules (:func:`transform.normalise`), the
specification both engines answer to.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta, tzinfo
from itertools import compress

import numpy as np

from sessionmig.rules.transform import (
    INT4_MAX,
    INT4_MIN,
    MAX_SESSION_ID_BYTES,
    RowProblem,
    parse_timestamp,
)
from sessionmig.sqlite.source import Backup

_QUERY = f"""SELECT rowid, session_id, user_id, metadata, created_at, expires_at, last_activity,
       coalesce(request_count, 0),
       typeof(session_id) = 'text' AND length(CAST(session_id AS BLOB)) <= {MAX_SESSION_ID_BYTES}
       AND typeof(user_id) IN ('text', 'null') AND typeof(metadata) IN ('text', 'null')
       AND typeof(created_at) = 'text' AND typeof(expires_at) = 'text'
       AND typeof(last_activity) = 'text'
       AND (typeof(request_count) = 'null' OR (typeof(request_count) = 'integer'
            AND request_count BETWEEN {INT4_MIN} AND {INT4_MAX}))
FROM sessions ORDER BY rowid"""
"""Every row, with whether its storage classes are the plain ones; the timestamps' spelling is
checked by :func:`_parse`."""

_HOUR = timedelta(hours=1)
_US = timedelta(microseconds=1)
_US_PER_HOUR = 3_600_000_000
_UNIX = datetime(1970, 1, 1)
_UNIX_TO_PG = (datetime(2000, 1, 1) - _UNIX) // _US
# The dense cache of hour offsets: not yet read, and an hour the rules do not map linearly
# (real offsets are within a day's microseconds, far from both).
_UNREAD = np.iinfo(np.int64).min
_NOT_LINEAR = _UNREAD + 1
_MAX_SPAN = 1 << 20  # hours the dense cache may cover (8 MiB, about 120 years)
_SLACK = 4096  # hours added on each side when the cache grows


class ExpectedPath:
    """The fast path of reconcile (``copyin.FastPath``), as the module docstring says."""

    def __init__(self, zone: tzinfo) -> None:
        self.zone = zone
        self._offsets: dict[int, int | None] = {}
        self._base = 0  # the hour (counted from 1970) of self._dense[0]
        self._dense = np.zeros(0, dtype=np.int64)

    def rows(self, backup: Backup, batch_rows: int) -> Iterator[list[tuple]]:
        return backup.batches(backup.query(_QUERY), batch_rows)

    def write_plain(self, write: Callable[[tuple], None], rows: list[tuple]) -> list[int]:
        rowids, sids, uids, metas, created, expires, last, counts, _ = zip(*rows, strict=True)
        c, c_ok = self.instants(created)
        e, e_ok = self.instants(expires)
        la, la_ok = self.instants(last)
        sure = c_ok & e_ok & la_ok
        jsonb = [None if m is None else b"\x01" + m for m in metas]
        plain = zip(sids, uids, jsonb, c, e, la, counts, strict=True)
        deque(map(write, compress(plain, sure.tolist())), maxlen=0)
        return list(compress(rowids, (~sure).tolist()))

    def instants(self, texts: Sequence[bytes]) -> tuple[list[int], np.ndarray]:
        """Each wall-clock text as ``timestamptz``'s binary value, and a mask of those that
        are sure; where the mask is False the value is meaningless."""
        local, ok = _parse(texts)
        hours = local // _US_PER_HOUR
        if ok.any():
            hours[~ok] = hours[ok.argmax()]  # the placeholders of texts left to the rules
        shift = self._shifts(hours)
        ok &= shift != _NOT_LINEAR
        return (local - np.where(ok, shift, 0) - _UNIX_TO_PG).tolist(), ok

    def _shifts(self, hours: np.ndarray) -> np.ndarray:
        """:meth:`_offset` of each hour, ``_NOT_LINEAR`` where it is None: from a dense array
        over the hours seen so far, each hour read from the rules once."""
        if not self._cover(int(hours.min()), int(hours.max())):
            found, where = np.unique(hours, return_inverse=True)
            offsets = [self._offset(int(hour)) for hour in found]
            read = [_NOT_LINEAR if o is None else o for o in offsets]
            return np.array(read, dtype=np.int64)[where]
        index = hours - self._base
        shift = self._dense[index]
        unread = shift == _UNREAD
        if unread.any():
            for hour in np.unique(hours[unread]).tolist():
                offset = self._offset(hour)
                self._dense[hour - self._base] = _NOT_LINEAR if offset is None else offset
            shift = self._dense[index]
        return shift

    def _cover(self, low: int, high: int) -> bool:
        """Make the dense array cover the hours ``low``..``high``; False when that would span
        more than :data:`_MAX_SPAN` hours (then the caller reads the hours one by one)."""
        size = self._dense.size
        if size and self._base <= low and high < self._base + size:
            return True
        first = min(low, self._base) if size else low
        end = max(high + 1, self._base + size) if size else high + 1
        if end - first > _MAX_SPAN:
            return False
        first = max(first - _SLACK, end - _MAX_SPAN)
        end = min(end + _SLACK, first + _MAX_SPAN)
        dense = np.full(end - first, _UNREAD, dtype=np.int64)
        if size:
            dense[self._base - first : self._base - first + size] = self._dense
        self._base, self._dense = first, dense
        return True

    def _offset(self, hour: int) -> int | None:
        """The µs to subtract from every wall-clock time of a local hour (counted from 1970) to
        get its instant, as the rules read the hour's first and last microsecond; None when
        the rules do not map the hour linearly."""
        if hour not in self._offsets:
            offset = None
            try:
                start = _UNIX + hour * _HOUR
                prefix = start.isoformat(" ")[:13]  # isoformat pads years to four digits
                first = parse_timestamp(prefix + ":00:00", "text", "t", self.zone)
                last = parse_timestamp(prefix + ":59:59.999999", "text", "t", self.zone)
            except (OverflowError, ValueError, RowProblem):
                pass
            else:
                if last - first == _HOUR - _US:
                    offset = (start - first.astimezone(UTC).replace(tzinfo=None)) // _US
            self._offsets[hour] = offset
        return self._offsets[hour]


_SHAPE = b"0000-00-00 00:00:00.000000"
_DIGIT_AT = np.array([i for i, c in enumerate(_SHAPE) if c == ord("0")])
_SEPARATORS = {i: c for i, c in enumerate(_SHAPE) if c != ord("0")}
# Days in each month of a common year, by month number; 0 for every number that is no month.
_MONTH_DAYS = np.zeros(100, dtype=np.int16)
_MONTH_DAYS[1:13] = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _real(digits: np.ndarray) -> np.ndarray:
    """Which rows of 14 digit values ``YYYYMMDDhhmmss`` (each 0-9) name a real
    proleptic-Gregorian date, year 1 or later, and a time of day (no 24:00, no leap second):
    integer arithmetic only."""
    month, day, hour, minute, second = (digits[:, 4::2].astype(np.int16) * 10 + digits[:, 5::2]).T
    year = digits[:, :4].astype(np.int32) @ np.array([1000, 100, 10, 1], dtype=np.int32)
    leap = (year % 4 == 0) & ((year % 100 != 0) | (year % 400 == 0))
    last_day = _MONTH_DAYS.take(month, mode="clip") + (leap & (month == 2))
    return (
        (year >= 1)
        & (day >= 1)
        & (day <= last_day)
        & (hour <= 23)
        & (minute <= 59)
        & (second <= 59)
    )


def _parse(texts: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Microseconds since 1970 of each text by NumPy's ISO reader, and which it could read.

    Only ``YYYY-MM-DD HH:MM:SS`` and ``YYYY-MM-DD HH:MM:SS.ffffff`` naming a real date and time
    count (NumPy would also take other spellings, offsets among them, which the rules read
    differently; year 0 is ISO's, not the rules'). Each text is checked first, byte by byte and
    then field by field in integers, and only texts that pass reach NumPy's parser: given an
    impossible date among many texts, the pinned NumPy does not raise ``ValueError`` but
    crashes the process. Every other text is left to the rules.
    """
    n = len(texts)
    sizes = np.fromiter(map(len, texts), dtype=np.int64, count=n)
    table = np.array(texts, dtype="S26")
    u = table.view(np.uint8).reshape(n, 26)
    long = sizes == 26
    digits = u[:, _DIGIT_AT] - np.uint8(48)  # a byte that is no digit wraps above 9
    ok = (sizes == 19) | long
    ok &= (digits[:, :14] <= 9).all(axis=1)
    ok &= ~long | (digits[:, 14:] <= 9).all(axis=1)
    for position, byte in _SEPARATORS.items():
        ok &= (u[:, position] == byte) | ((position == 19) & ~long)
    ok &= _real(digits[:, :14])
    table = np.where(ok, table, b"2000-01-01 00:00:00")  # others are left to the rules
    try:
        return table.astype("datetime64[us]").astype(np.int64), ok
    except ValueError:
        # Not expected after the checks above; then the rules read every text of the batch.
        return np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool)
