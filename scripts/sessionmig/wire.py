"""The PostgreSQL wire format of a session, and migrate's fast path to it.

Most rows of a real backup are plain: text where text belongs and naive timestamps spelled
``YYYY-MM-DD HH:MM:SS[.ffffff]``. For those, SQLite hands over the raw bytes (:func:`plain_rows`
picks them and prints metadata as jsonb's binary form) and :class:`WallClock` converts the
timestamps a batch at a time; the text and JSON columns go to PostgreSQL as they are, and
PostgreSQL — which must parse them to store them anyway — checks their UTF-8, NULs and JSON.
A batch it refuses is redone row by row with :func:`transform.normalise`, so the rules decide
every row that is not plain, and every reject has the same reason either way (``copyin``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta, tzinfo

import numpy as np

from . import params as P
from .source import Backup
from .transform import MAX_SESSION_ID_BYTES, Rules, Session

WIRE_TYPES = ["bytea", "bytea", "bytea", "int8", "int8", "int8", "int4"]
"""The COPY types of a wire row. Text goes as its UTF-8 bytes and metadata as jsonb's binary
form (a version byte, then the text); the server checks both as it stores them. Times go as
``timestamptz``'s binary form itself: a 64-bit count of microseconds since 2000-01-01 UTC."""

WireRow = tuple[bytes, bytes | None, bytes | None, int, int, int, int]
PG_EPOCH = datetime(2000, 1, 1)
_TICK = timedelta(microseconds=1)
_US_PER_HOUR = 3_600_000_000
_UNIX_TO_PG = (PG_EPOCH - datetime(1970, 1, 1)) // _TICK
# The instants a Python datetime can hold, as timestamptz's microseconds since 2000-01-01 UTC:
# a wire value outside them could not be read back, so such a row is not plain.
_UTC_MIN = (datetime.min - PG_EPOCH) // _TICK
_UTC_MAX = (datetime.max - PG_EPOCH) // _TICK
_DIGITS = np.array([0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18])


def pg_micros(moment: datetime) -> int:
    """An aware instant as ``timestamptz``'s binary value."""
    return (moment.astimezone(UTC).replace(tzinfo=None) - PG_EPOCH) // _TICK


class WallClock:
    """Naive wall-clock timestamps of one zone, converted a batch at a time — fast where it is
    safe, and silent where it is not, so that :func:`parse_timestamp` decides those.

    Only ``YYYY-MM-DD HH:MM:SS`` and ``YYYY-MM-DD HH:MM:SS.ffffff`` are taken, checked byte by
    byte and computed in NumPy integers. The zone's offset is looked up once per local hour
    and used for every time in it, unless a transition falls inside that hour.
    """

    def __init__(self, zone: tzinfo) -> None:
        self.zone = zone
        self._offsets: dict[int, int | None] = {}

    def _offset(self, hour: int) -> int | None:
        """The zone's offset in µs for a local hour (counted from 1970), None if it changes."""
        if hour not in self._offsets:
            offset = None
            try:
                start = datetime(1970, 1, 1) + timedelta(hours=hour)
                ends = (start, start + (timedelta(hours=1) - _TICK))
            except OverflowError:
                pass
            else:
                offsets = {
                    moment.replace(tzinfo=self.zone, fold=fold).utcoffset()
                    for moment in ends
                    for fold in (0, 1)
                }
                if len(offsets) == 1:
                    only = offsets.pop()
                    offset = None if only is None else only // _TICK
            self._offsets[hour] = offset
        return self._offsets[hour]

    def utc(self, texts: Sequence[bytes]) -> tuple[list[int], np.ndarray]:
        """Each text as ``timestamptz``'s binary value, and a mask of the ones that are sure;
        the values where the mask is False are meaningless."""
        n = len(texts)
        if not n:
            return [], np.ones(0, dtype=bool)
        sizes = np.fromiter(map(len, texts), dtype=np.int64, count=n)
        table = np.array(texts, dtype="S26")  # longer texts are cut, but their size tells
        u = table.view(np.uint8).reshape(n, 26)
        ok = (sizes == 19) | ((sizes == 26) & (u[:, 19] == 46))
        ok &= (u[:, 4] == 45) & (u[:, 7] == 45) & (u[:, 10] == 32)
        ok &= (u[:, 13] == 58) & (u[:, 16] == 58)
        ok &= ((u[:, _DIGITS] - 48) < 10).all(axis=1)  # bytes below "0" wrap round, too
        ok &= (sizes == 19) | ((u[:, 20:26] - 48) < 10).all(axis=1)
        local = np.where(ok, _local_micros(u, sizes, ok), 0)
        hours = local // _US_PER_HOUR
        found, where = np.unique(hours, return_inverse=True)
        offsets = [self._offset(int(hour)) for hour in found]
        known = np.array([o is not None for o in offsets])
        shift = np.array([o or 0 for o in offsets], dtype=np.int64)
        utc = local - shift[where] - _UNIX_TO_PG
        ok &= known[where] & (utc >= _UTC_MIN) & (utc <= _UTC_MAX)
        return utc.tolist(), ok


_DAYS_IN_MONTH = np.array([0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31], dtype=np.int64)


def _local_micros(u: np.ndarray, sizes: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Microseconds since 1970 of well-shaped timestamp bytes, computed in integers (NumPy's
    own text-to-datetime cast crashes on some invalid dates); clears ``ok`` for dates and
    times that do not exist. Rows already not ``ok`` get meaningless values."""
    d = u.astype(np.int64) - 48

    def number(*positions: int) -> np.ndarray:
        value = np.zeros(len(u), dtype=np.int64)
        for position in positions:
            value = value * 10 + d[:, position]
        return value

    year, month, day = number(0, 1, 2, 3), number(5, 6), number(8, 9)
    hour, minute, second = number(11, 12), number(14, 15), number(17, 18)
    fraction = np.where(sizes == 26, number(20, 21, 22, 23, 24, 25), 0)
    leap = (year % 4 == 0) & ((year % 100 != 0) | (year % 400 == 0))
    month_ok = (month >= 1) & (month <= 12)
    days = _DAYS_IN_MONTH[np.where(month_ok, month, 1)] + ((month == 2) & leap)
    ok &= (year >= 1) & month_ok & (day >= 1) & (day <= days)
    ok &= (hour <= 23) & (minute <= 59) & (second <= 59)
    # Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil).
    y = year - (month <= 2)
    era = y // 400
    yoe = y - era * 400
    doy = (153 * ((month + 9) % 12) + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    epoch_days = era * 146097 + doe - 719468
    seconds = ((epoch_days * 24 + hour) * 60 + minute) * 60 + second
    return seconds * 1_000_000 + fraction


def as_wire(session: Session) -> WireRow:
    """A session from :func:`normalise` in the form of :data:`WIRE_TYPES`."""
    sid, uid, meta, created, expires, last, count = session
    return (
        sid.encode(),
        None if uid is None else uid.encode(),
        None if meta is None else b"\x01" + meta.encode(),
        pg_micros(created),
        pg_micros(expires),
        pg_micros(last),
        count,
    )


# --- which rows are plain, as SQLite picks them --------------------------------------------

PLAIN_COLUMNS = (
    "session_id, user_id, char(1) || metadata, created_at, expires_at, last_activity, "
    "coalesce(request_count, 0)"
)
# Which rows the fast path may take: text where text belongs (in SQLite's ordering, text sorts
# after numbers and before BLOBs, which is cheaper to test than typeof()), and a request_count
# that is an integer within PostgreSQL's integer. Spellings are ``WallClock``'s to check.
# Text is ">= ''" as well: numbers sort before text, and SQLite would print a REAL with 15
# digits (0.30000000000000004 as 0.3) and hand an INTEGER over as a number.
PLAIN = " AND ".join(
    (
        "session_id >= '' AND session_id < x''",
        f"length(CAST(session_id AS BLOB)) <= {MAX_SESSION_ID_BYTES}",
        "(user_id IS NULL OR (user_id >= '' AND user_id < x''))",
        "(metadata IS NULL OR (metadata >= '' AND metadata < x''))",
        "created_at >= '' AND created_at < x''",
        "expires_at >= '' AND expires_at < x''",
        "last_activity >= '' AND last_activity < x''",
        "(request_count IS NULL OR (typeof(request_count) = 'integer' "
        "AND request_count BETWEEN -2147483648 AND 2147483647))",
    )
)


def plain_rows(backup: Backup, batch: int = P.default("batch_rows")) -> Iterator[list[tuple]]:
    """Rows for the fast path, in rowid order: ``(rowid, session_id, user_id, jsonb wire
    metadata, created_at, expires_at, last_activity, request_count or 0, plain)``.

    ``plain`` is 1 when every value has the storage class and spelling the fast path handles
    (see :class:`WallClock`); the other columns are then ready for COPY. A row that is not plain
    is fetched with ``Backup.raw_row`` and takes the rules.
    """
    cursor = backup.query(f"SELECT rowid, {PLAIN_COLUMNS}, {PLAIN} FROM sessions ORDER BY rowid")
    return backup.batches(cursor, batch)


class MigratePath:
    """Migrate's fast path (``copyin.FastPath``): :func:`plain_rows` and :class:`WallClock`."""

    def __init__(self, rules: Rules) -> None:
        self.clock = WallClock(rules.zone)

    def rows(self, backup: Backup, batch_rows: int) -> Iterator[list[tuple]]:
        return plain_rows(backup, batch_rows)

    def write_plain(self, write: Callable[[WireRow], None], rows: list[tuple]) -> list[int]:
        """Write the plain rows whose times the clock is sure of; return the others' rowids."""
        rowids, sids, uids, metas, created, expires, last, counts, _ = zip(*rows, strict=True)
        c, c_ok = self.clock.utc(created)
        e, e_ok = self.clock.utc(expires)
        la, la_ok = self.clock.utc(last)
        sure = c_ok & e_ok & la_ok
        wire = zip(sids, uids, metas, c, e, la, counts, strict=True)
        if sure.all():
            for row in wire:
                write(row)
            return []
        doubtful = []
        for row, rowid, ok in zip(wire, rowids, sure.tolist(), strict=True):
            if ok:
                write(row)
            else:
                doubtful.append(rowid)
        return doubtful
