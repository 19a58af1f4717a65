"""Reconcile's own reading of plain rows: what each should be in PostgreSQL, derived without
migrate's fast path, so that a fault there cannot agree with itself.

Migrate picks plain rows by SQLite's sort order, has SQLite print metadata, and converts
timestamps with ``wire.WallClock`` (bytes checked and computed in NumPy integers, offsets
probed four ways per hour). Here every choice is made another way:

* which rows are plain: storage classes by ``typeof()``, timestamp spellings byte by byte;
* metadata: SQLite's stored text bytes, wrapped into jsonb's binary form here;
* timestamps: parsed by NumPy's own ISO-8601 reader, and each local hour's offset read from the
  rules themselves (:func:`transform.parse_timestamp` at the hour's first and last
  microsecond): an hour the rules map linearly takes that offset, any other hour (a transition
  inside it) is left to the rules row by row.

Everything that is not plain goes through the rules (:func:`transform.normalise`), the
specification both engines answer to.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta, tzinfo

import numpy as np

from .source import Backup
from .transform import INT4_MAX, INT4_MIN, MAX_SESSION_ID_BYTES, RowProblem, parse_timestamp

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


class ExpectedPath:
    """The fast path of reconcile (``copyin.FastPath``), as the module docstring says."""

    def __init__(self, zone: tzinfo) -> None:
        self.zone = zone
        self._offsets: dict[int, int | None] = {}

    def rows(self, backup: Backup, batch_rows: int) -> Iterator[list[tuple]]:
        return backup.batches(backup.query(_QUERY), batch_rows)

    def write_plain(self, write: Callable[[tuple], None], rows: list[tuple]) -> list[int]:
        rowids, sids, uids, metas, created, expires, last, counts, _ = zip(*rows, strict=True)
        c, c_ok = self.instants(created)
        e, e_ok = self.instants(expires)
        la, la_ok = self.instants(last)
        sure = (c_ok & e_ok & la_ok).tolist()
        jsonb = [None if m is None else b"\x01" + m for m in metas]
        doubtful = []
        for row in zip(rowids, sids, uids, jsonb, c, e, la, counts, sure, strict=True):
            if row[8]:
                write(row[1:8])
            else:
                doubtful.append(row[0])
        return doubtful

    def instants(self, texts: Sequence[bytes]) -> tuple[list[int], np.ndarray]:
        """Each wall-clock text as ``timestamptz``'s binary value, and a mask of those that
        are sure; where the mask is False the value is meaningless."""
        local, ok = _parse(texts)
        hours = local // _US_PER_HOUR
        found, where = np.unique(hours, return_inverse=True)
        offsets = [self._offset(int(hour)) for hour in found]
        known = np.array([o is not None for o in offsets], dtype=bool)
        shift = np.array([o or 0 for o in offsets], dtype=np.int64)
        ok &= known[where]
        return (local - shift[where] - _UNIX_TO_PG).tolist(), ok

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


def _parse(texts: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Microseconds since 1970 of each text by NumPy's ISO reader, and which it could read.

    Only ``YYYY-MM-DD HH:MM:SS`` and ``YYYY-MM-DD HH:MM:SS.ffffff`` count (NumPy would also take
    other spellings, offsets among them, which the rules read differently); year 0 is ISO's, not
    the rules'. NumPy refuses a whole array for one impossible date, so then each text is read
    alone.
    """
    n = len(texts)
    sizes = np.fromiter(map(len, texts), dtype=np.int64, count=n)
    table = np.array(texts, dtype="S26")
    u = table.view(np.uint8).reshape(n, 26)
    long = sizes == 26
    digits = u[:, _DIGIT_AT]
    ok = (sizes == 19) | long
    ok &= ((digits[:, :14] >= 48) & (digits[:, :14] <= 57)).all(axis=1)
    ok &= ~long | ((digits[:, 14:] >= 48) & (digits[:, 14:] <= 57)).all(axis=1)
    for position, byte in _SEPARATORS.items():
        ok &= (u[:, position] == byte) | ((position == 19) & ~long)
    ok &= table >= b"0001"
    table = np.where(ok, table, b"2000-01-01 00:00:00")  # others are left to the rules
    try:
        return table.astype("datetime64[us]").astype(np.int64), ok
    except ValueError:
        pass
    values = np.zeros(n, dtype=np.int64)
    for i, text in enumerate(table):
        if not ok[i]:
            continue
        try:
            values[i] = np.datetime64(text.decode(), "us").astype(np.int64)
        except ValueError:
            ok[i] = False
    return values, ok
