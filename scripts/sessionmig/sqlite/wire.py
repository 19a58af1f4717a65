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

import json
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta, tzinfo
from itertools import repeat
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np

from sessionmig import defaults as D
from sessionmig.rules.transform import MAX_SESSION_ID_BYTES, Rules, Session
from sessionmig.sqlite.source import Backup

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


def plain_rows(backup: Backup, batch: int = D.BATCH_ROWS) -> Iterator[list[tuple]]:
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


# --- the rules' outcome in bulk, for inspect and the app check ------------------------------

SURE_COLUMNS = (
    "session_id, user_id, metadata, created_at, expires_at, last_activity, "
    "coalesce(request_count, 0), request_count IS NULL"
)


class Sure:
    """One batch of the backup, with the rows the rules would land *as they are* picked out in
    bulk (see :class:`RulesPath`); every other row is named in ``exact`` for the rules.

    The columns hold the plain rows only (``rowids`` order); ``sure`` marks those the checks
    proved. ``created``, ``expires`` and ``last`` are ``timestamptz``'s binary values
    (meaningful where ``sure``); ``repeats`` marks rows whose metadata *may* name a key twice.
    """

    __slots__ = (
        "rowids",
        "exact",
        "sure",
        "session_ids",
        "user_ids",
        "metadata",
        "texts",
        "created",
        "expires",
        "last",
        "counts",
        "count_null",
        "repeats",
    )

    rowids: list[int]
    exact: list[int]
    sure: np.ndarray
    session_ids: list[bytes]
    user_ids: list[bytes | None]
    metadata: list[bytes | None]
    texts: tuple[list[bytes], list[bytes], list[bytes]]  # created_at, expires_at, last_activity
    created: np.ndarray
    expires: np.ndarray
    last: np.ndarray
    counts: np.ndarray
    count_null: np.ndarray
    repeats: np.ndarray


def _bad_texts(values: Sequence[bytes | None]) -> list[int]:
    """Indexes of the values that are not UTF-8 without NUL (None is fine): one decode for all,
    row by row only when that finds something."""
    given = [v for v in values if v is not None]
    joined = b"\x00".join(given)
    if joined.count(b"\x00") == max(len(given) - 1, 0):
        try:
            joined.decode("utf-8")
            return []
        except UnicodeDecodeError:
            pass
    bad = []
    for i, value in enumerate(values):
        if value is None:
            continue
        try:
            if b"\x00" in value:
                raise ValueError
            value.decode("utf-8")
        except ValueError:  # UnicodeDecodeError is one
            bad.append(i)
    return bad


def decoded_texts(values: Sequence[bytes]) -> list[str]:
    """UTF-8 texts without NUL (as :func:`_bad_texts` proved them) decoded in one call."""
    if not values:
        return []
    return b"\x00".join(values).decode("utf-8").split("\x00")


JSON_SLICE = 2_000
"""Metadata texts checked at once (their parsed objects are held until then)."""


class RulesPath:
    """Which rows :func:`transform.normalise` would land with their values as they are, decided
    a batch at a time: SQLite picks the plain rows (:data:`PLAIN`), :class:`WallClock` their
    times, one decode per batch their text's UTF-8 and NULs, and the C JSON scanner their
    metadata (no ``\\u`` escapes, no surrounding whitespace: anything else the rules decide).
    A row is only ever *sure* when the rules would accept it; a doubt sends it to ``exact``.
    """

    def __init__(self, rules: Rules, repeated_keys: bool = True) -> None:
        self.repeated_keys = repeated_keys  # whether to look for them (``Sure.repeats``)
        self.clock = WallClock(rules.zone)
        self._objects: list[list[tuple[str, object]]] = []
        decoder = json.JSONDecoder(
            parse_constant=_no_constant, object_pairs_hook=self._objects.append
        )
        # The C scanner itself (what ``decode`` calls after skipping whitespace): one call per
        # text, ``(value, end)`` or StopIteration/ValueError, with no Python in between.
        self._scan = decoder.scan_once  # type: ignore[attr-defined]
        self._dicts: list[dict[str, object]] = []
        self._scan_dicts = json.JSONDecoder(
            parse_constant=_no_constant,
            object_hook=self._dicts.append if repeated_keys else None,
        ).scan_once  # type: ignore[attr-defined]

    def batches(
        self, backup: Backup, batch_rows: int, first: int | None = None, last: int | None = None
    ) -> Iterator[Sure]:
        """Every row of ``backup`` (with ``first <= rowid <= last``, when given) once, in rowid
        order, in batches."""
        where = ""
        params: tuple[int, ...] = ()
        if first is not None and last is not None:
            where, params = "WHERE rowid BETWEEN ? AND ? ", (first, last)
        cursor = backup.query(
            f"SELECT rowid, {PLAIN}, {SURE_COLUMNS} FROM sessions {where}ORDER BY rowid", params
        )
        for chunk in backup.batches(cursor, batch_rows):
            yield self.check(chunk)

    def check(self, chunk: list[tuple]) -> Sure:
        out = Sure()
        plain = [row for row in chunk if row[1]]
        out.exact = [row[0] for row in chunk if not row[1]] if len(plain) < len(chunk) else []
        n = len(plain)
        if not n:
            empty = np.zeros(0, dtype=np.int64)
            out.rowids, out.session_ids, out.user_ids, out.metadata = [], [], [], []
            out.texts = ([], [], [])
            out.sure = out.repeats = out.count_null = np.zeros(0, dtype=bool)
            out.created = out.expires = out.last = out.counts = empty
            return out
        rowids, _, sids, uids, metas, created, expires, last, counts, nulls = (
            list(column) for column in zip(*plain, strict=True)
        )
        c, c_ok = self.clock.utc(created)
        e, e_ok = self.clock.utc(expires)
        la, la_ok = self.clock.utc(last)
        sure = c_ok & e_ok & la_ok
        for i in _bad_texts(sids) + _bad_texts(uids):
            sure[i] = False
        repeats = np.zeros(n, dtype=bool)
        # In slices: the objects a slice's JSON makes are held until it is checked.
        for start in range(0, n, JSON_SLICE):
            part = metas[start : start + JSON_SLICE]
            if not self._json_at_once(part):
                self._json_row_by_row(
                    part, sure[start : start + JSON_SLICE], repeats[start : start + JSON_SLICE]
                )
        out.rowids, out.session_ids, out.user_ids, out.metadata = rowids, sids, uids, metas
        out.texts = (created, expires, last)
        out.sure, out.repeats = sure, repeats
        out.created, out.expires, out.last = np.array(c), np.array(e), np.array(la)
        out.counts = np.array(counts, dtype=np.int64)
        out.count_null = np.array(nulls, dtype=bool)
        return out

    def _json_at_once(self, metas: list[bytes | None]) -> bool:
        """Whether every metadata text of a batch is sure JSON naming no key twice, checked in
        a few C calls; False when any doubt (then :meth:`_json_row_by_row` says which).

        Every key of every object has one ``:`` after it outside strings, so the batch has at
        least as many colons as keys, and its objects as many keys as they hold distinct ones:
        when the colons are as many as the objects' distinct keys, no object repeats one."""
        given = [m for m in metas if m is not None]
        if not given:
            return True
        joined = b"\x00".join(given)
        if joined.count(b"\x00") != len(given) - 1 or b"\\u" in joined:
            return False
        objects = self._dicts
        objects.clear()
        try:
            texts = joined.decode("utf-8").split("\x00")
            found = list(map(self._scan_dicts, texts, repeat(0, len(texts))))
        except (ValueError, StopIteration, RecursionError):
            objects.clear()
            return False
        whole = list(map(itemgetter(1), found)) == list(map(len, texts))
        if not self.repeated_keys:
            return whole
        distinct = sum(map(len, objects))
        objects.clear()
        return whole and distinct == joined.count(b":")

    def _json_row_by_row(
        self, metas: list[bytes | None], sure: np.ndarray, repeats: np.ndarray
    ) -> None:
        """Clear ``sure`` for each metadata text that is not sure JSON, and mark in ``repeats``
        those that may name a key twice."""
        objects = self._objects
        objects.clear()
        ends = []
        scan = self._scan
        for i, meta in enumerate(metas):
            if meta is not None:
                try:
                    text = meta.decode("utf-8")
                    if "\x00" in text or "\\u" in text:
                        raise ValueError
                    if scan(text, 0)[1] != len(text):
                        raise ValueError
                except (ValueError, StopIteration, RecursionError):
                    sure[i] = False
            ends.append(len(objects))
        if objects:
            sizes = np.fromiter(map(len, objects), dtype=np.int64, count=len(objects))
            keys = np.fromiter(map(len, map(dict, objects)), dtype=np.int64, count=len(objects))
            twice = np.flatnonzero(keys != sizes)
            if len(twice):
                repeats[np.searchsorted(np.array(ends), twice, side="right")] = True
            objects.clear()


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def raw_rows(backup: Backup, rowids: list[int], extra: tuple[str, ...] = ()) -> Iterator[tuple]:
    """The raw rows of ``rowids`` (ascending), in their order: one by one when they are few,
    else by a scan of their span."""
    if len(rowids) <= 64:
        for rowid in rowids:
            yield backup.raw_row(rowid, extra)
        return
    wanted = set(rowids)
    for chunk in backup.raw_rows_between(rowids[0], rowids[-1], extra):
        for raw in chunk:
            if raw[0] in wanted:
                yield raw


def opened_again(opened: dict[str, Any]) -> Backup:
    """In a worker process: the backup a parent opened, described by :func:`describe` (the
    parent keeps it, and any private copy, until its workers are done)."""
    connection = sqlite3.connect(opened["uri"], uri=True, check_same_thread=False)
    connection.text_factory = bytes
    return Backup(
        Path(opened["original"]),
        None,
        (),
        connection,
        opened["uri"],
        columns=opened["columns"],
        rowids_by_key=opened["rowids_by_key"],
        renamed=opened["renamed"],
    )


def describe(backup: Backup) -> dict[str, Any]:
    """What a worker process needs to read ``backup`` (see :func:`opened_again`)."""
    return {
        "original": str(backup.original),
        "uri": backup.uri,
        "columns": dict(backup.columns),
        "rowids_by_key": backup.rowids_by_key,
        "renamed": dict(backup.renamed),
    }


def spans(backup: Backup, parts: int) -> list[tuple[int, int]]:
    """The rowids of ``backup`` cut into ``parts`` spans ``(first, last)``, in order (empty for
    an empty table)."""
    low, high = backup.query("SELECT min(rowid), max(rowid) FROM sessions").fetchone()
    if low is None:
        return []
    step = (high - low + parts) // parts
    return [(low + i * step, min(low + (i + 1) * step - 1, high)) for i in range(parts)]


def serve(produce: Callable[..., Iterator[Any]]) -> None:
    """The body of a worker process of :func:`in_processes`: reads one pickled tuple of
    arguments from stdin and writes each item of ``produce(*arguments)`` to stdout, pickled
    after its length (8 bytes), then ``None``; an error as the exception itself."""
    import pickle
    import struct
    import sys

    out = sys.stdout.buffer

    def send(item: Any) -> None:
        data = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
        out.write(struct.pack("<Q", len(data)) + data)
        out.flush()

    try:
        for item in produce(*pickle.load(sys.stdin.buffer)):
            send(item)
        send(None)
    except Exception as exc:  # handed to the parent, which raises it
        send(exc)


def in_processes(entry: str, works: list[tuple], ahead: int = 2) -> Iterator[tuple[int, Any]]:
    """Run ``entry`` (Python code calling :func:`serve`) in one process per tuple of arguments
    in ``works``, all at once; yield ``(index of the work, item)`` as the items arrive (each
    work's in order). A worker may run ``ahead`` items ahead of the caller, then waits; a
    worker's error is raised here. Plain processes (``python -c``), not multiprocessing,
    whose spawn would import the caller's main script again in every child."""
    import os
    import pickle
    import subprocess
    import sys
    import threading
    from queue import Queue

    arrivals: Queue[tuple[int, Any]] = Queue(maxsize=ahead * max(len(works), 1))
    workers: list[subprocess.Popen[bytes]] = []
    readers: list[threading.Thread] = []
    stop = threading.Event()
    try:
        for index, work in enumerate(works):
            worker = subprocess.Popen(
                [sys.executable, "-c", entry],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
            )
            workers.append(worker)
            assert worker.stdin is not None
            pickle.dump(work, worker.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            worker.stdin.close()
            reader = threading.Thread(
                target=_read_worker, args=(worker, index, arrivals, stop), daemon=True
            )
            reader.start()
            readers.append(reader)
        done = 0
        while done < len(works):
            index, item = arrivals.get()
            if item is None:
                done += 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        stop.set()
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
        for reader in readers:
            reader.join()
        for worker in workers:
            worker.wait()


class WorkerDied(RuntimeError):
    """A worker process of :func:`in_processes` ended without finishing its work."""


def _read_worker(worker: Any, index: int, arrivals: Any, stop: Any) -> None:
    """Hand a worker's items to ``arrivals`` as ``(index, item)``: ``None`` at its end, an
    exception when it failed or died. Gives up once ``stop`` is set."""
    import pickle
    import struct
    from queue import Full

    stream = worker.stdout

    def put(entry: tuple[int, Any]) -> None:
        while not stop.is_set():
            try:
                arrivals.put(entry, timeout=0.1)
                return
            except Full:
                continue

    try:
        while not stop.is_set():
            head = stream.read(8)
            if len(head) < 8:
                raise WorkerDied(f"a worker process died (exit {worker.wait()})")
            item = pickle.loads(stream.read(struct.unpack("<Q", head)[0]))
            put((index, item))
            if item is None or isinstance(item, BaseException):
                return
    except Exception as exc:
        put((index, exc))
