"""Pure rules that turn one raw source row into a normalised session or a reject.

Nothing here does I/O or imports the rest of the package. A raw row is what ``source`` streams:
``(rowid, 7 column values, 7 SQLite storage classes)``, text columns as undecoded ``bytes`` so
that bytes which are not UTF-8 can be kept verbatim in a reject. The rules (documented for
operators in ``runbook/RUNBOOK.md``) are:

* timestamps: text ``YYYY-MM-DD[T ]HH:MM[:SS[.ffffff]]`` with optional ``Z``/``±HH:MM``; naive
  values are wall-clock times in ``source_timezone``; an offset keeps its instant. DST: a
  wall-clock time that occurs twice means its *first* occurrence, one that does not exist is
  read with the offset in force just before the gap (so it lands as far after the gap's start
  as it claimed to be) — Python's ``fold=0``, deterministic.
* metadata: NULL stays NULL; text must be JSON that ``jsonb`` can hold (no NaN/Infinity, no
  ``\\u0000``, no lone surrogates), else reject (or keep it as a JSON string on request).
* text (session_id, user_id): UTF-8 without NUL; a BLOB, bytes that are not UTF-8 or a NUL are
  rejected with the raw bytes in hex. session_id NULL is rejected; an INTEGER session_id keeps
  its digits; a session_id over :data:`MAX_SESSION_ID_BYTES` is rejected (no real token is that
  long, and PostgreSQL's primary key cannot index one much longer).
* metadata numbers keep every digit: a REAL (a ``JSON``-declared column has numeric affinity)
  is printed in the shortest form that round-trips the double, and JSON text is never
  re-serialised through Python floats or ints.
* request_count: an integral value in any storage class, within PostgreSQL ``integer``;
  text must be ASCII digits (``'١٢'`` is not twelve); NULL becomes 0 (the column default the
  legacy app relied on); anything else is rejected.
* duplicates: when several rows share a session_id, the first (lowest rowid) that the rules
  accept lands and every later one is rejected as ``duplicate_session_id`` (see ``duplicates``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from typing import Any, NamedTuple

COLUMNS = (
    "session_id",
    "user_id",
    "metadata",
    "created_at",
    "expires_at",
    "last_activity",
    "request_count",
)
TIMESTAMP_COLUMNS = ("created_at", "expires_at", "last_activity")
INT4_MIN, INT4_MAX = -(2**31), 2**31 - 1
MAX_SESSION_ID_BYTES = 2048
"""Longest session_id that lands. PostgreSQL's btree refuses index entries over 2,704 bytes
(less when the value does not compress), so a longer key would fail the primary key of every
row; a fixed limit keeps whether a row lands independent of how well its bytes compress."""

# A reject's reason code -> what an operator reads about it.
REASONS: dict[str, str] = {
    "missing_session_id": "session_id is NULL, so the row has no key",
    "unexpected_blob": "a BLOB where text was expected",
    "invalid_utf8": "bytes that are not valid UTF-8",
    "nul_character": "a NUL character, which PostgreSQL text cannot hold",
    "timestamp_type": "a timestamp stored as a number, not text",
    "timestamp_unparseable": "a timestamp in no accepted spelling",
    "timestamp_impossible": "a timestamp naming a date or time that does not exist",
    "invalid_json": "metadata that is not valid JSON",
    "json_not_storable": "metadata JSON that jsonb cannot hold",
    "count_not_integral": "request_count that is not a whole number",
    "count_out_of_range": "request_count outside PostgreSQL integer",
    "extra_columns_unplaceable": "extra columns to carry, but metadata is not a JSON object",
    "session_id_too_long": f"a session_id longer than {MAX_SESSION_ID_BYTES} bytes",
    "duplicate_session_id": "a session_id an earlier row of the backup already has",
    "legacy_key_collision": "metadata already has the key the extra columns would go under",
    "refused_by_postgresql": "a value PostgreSQL refused although the rules above accept it",
}
LEGACY_KEY = "_legacy_columns"

# ASCII only: ``\d`` and ``\s`` would also take other scripts' digits and spaces, which
# ``int()`` and ``fromisoformat`` then read as if they were ASCII.
_TIMESTAMP_SHAPE = re.compile(
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,6})?)?"
    r"(Z|[+-][0-9]{2}(:?[0-9]{2})?)?$"
)
_INTEGER_TEXT = re.compile(r"^[ \t\r\n]*[+-]?[0-9]+[ \t\r\n]*$")


@dataclass(frozen=True)
class Rules:
    """The parameters that change how rows are normalised."""

    zone: tzinfo
    on_invalid_metadata: str = "reject"
    # Columns beyond the legacy schema whose values are carried into metadata (in row order).
    extra_columns: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Reject:
    """A source row that cannot land, with everything needed to find and fix it."""

    rowid: int
    session_id: str | None
    reason: str
    message: str
    raw: dict[str, Any]


class RowProblem(Exception):
    """Raised inside the rules for one value; always caught by :func:`normalise`."""

    def __init__(self, reason: str, column: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.column = column
        self.detail = detail


def raw_value(value: Any, storage: str) -> dict[str, Any]:
    """One raw SQLite value as JSON that keeps it exactly (bytes as hex when not clean text)."""
    if storage == "null" or value is None:
        return {"type": "null", "value": None}
    if isinstance(value, bytes):
        if storage == "text":
            try:
                text = value.decode("utf-8")
            except UnicodeDecodeError:
                return {"type": storage, "hex": value.hex()}
            if "\x00" not in text and not _has_surrogate(text):
                return {"type": storage, "value": text}
        return {"type": storage, "hex": value.hex()}
    if isinstance(value, float):
        return {"type": storage, "value": repr(value)}
    return {"type": storage, "value": value}


def raw_record(row: tuple, extra_columns: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every column of a raw row as :func:`raw_value` keeps it, keyed by column name."""
    n, k = len(COLUMNS), len(extra_columns)
    record = {col: raw_value(row[1 + i], row[1 + n + i]) for i, col in enumerate(COLUMNS)}
    base = 1 + 2 * n
    for i, col in enumerate(extra_columns):
        record[col] = raw_value(row[base + i], row[base + k + i])
    return record


def extra_value(value: Any, storage: str, column: str) -> Any:
    """An extra column's value as JSON: text decoded, numbers as they are, BLOBs as hex."""
    if storage == "null":
        return None
    if storage == "blob":
        return {"hex": value.hex()}
    if storage == "text":
        return decode_text(value, storage, column)
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return value


def with_extras(metadata: str | None, extras: dict[str, Any]) -> str:
    """Metadata JSON with the extra columns under ``_legacy_columns`` (objects and NULL only).

    The key is spliced into the JSON text as it is, so that no number of the original passes
    through a Python float; an object that already has the key is refused, not overwritten.
    """
    try:
        base = None if metadata is None else _json_loads(metadata)
    except RecursionError:
        base = []  # too deep to parse here, and not an object we could extend anyway
    if base is not None and not isinstance(base, dict):
        raise RowProblem(
            "extra_columns_unplaceable",
            "metadata",
            "metadata is not a JSON object, so the extra columns have nowhere to go",
        )
    if base and LEGACY_KEY in base:
        raise RowProblem(
            "legacy_key_collision",
            "metadata",
            f"metadata already has a {LEGACY_KEY!r} key; carrying the extra columns would "
            "overwrite it",
        )
    carried = json.dumps(extras, ensure_ascii=False)
    if not base:  # NULL or {}
        return "{" + json.dumps(LEGACY_KEY) + ": " + carried + "}"
    text = metadata.rstrip()  # type: ignore[union-attr]
    return text[:-1] + ", " + json.dumps(LEGACY_KEY) + ": " + carried + "}"


def _json_loads(text: str) -> Any:
    """Parse JSON without converting numbers (Python's int limit and float rounding must not
    decide whether a row lands), refusing NaN and Infinity, which jsonb cannot hold."""
    return json.loads(text, parse_int=str, parse_float=str, parse_constant=_reject_constant)


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def decode_text(value: Any, storage: str, column: str) -> str:
    """A text value as ``str``; BLOBs, non-UTF-8 bytes and NULs raise :class:`RowProblem`."""
    if storage == "blob":
        raise RowProblem("unexpected_blob", column, f"{column} is a BLOB of {len(value)} bytes")
    if isinstance(value, bytes):
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RowProblem(
                "invalid_utf8", column, f"{column} has a byte that is not UTF-8 at {exc.start}"
            ) from None
    else:
        # INTEGER/REAL where text was declared (numeric affinity, or a hand-made table): keep
        # every digit. repr() of a float is the shortest text that round-trips the double.
        text = repr(value) if isinstance(value, float) else str(value)
    if "\x00" in text:
        raise RowProblem("nul_character", column, f"{column} contains a NUL character")
    return text


def parse_timestamp(value: Any, storage: str, column: str, zone: tzinfo) -> datetime:
    """A source timestamp as an aware UTC instant, by the rules in the module docstring."""
    if storage in ("integer", "real"):
        raise RowProblem(
            "timestamp_type", column, f"{column} is the number {value!r}, not a timestamp text"
        )
    text = decode_text(value, storage, column).strip()
    if len(text) < 16 or text[10] not in "T " or not _TIMESTAMP_SHAPE.match(text):
        raise RowProblem("timestamp_unparseable", column, f"{column}={text[:40]!r} is no timestamp")
    try:
        parsed = datetime.fromisoformat(text)
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=zone)  # fold=0: see the module docstring
        return parsed.astimezone(UTC)
    except (ValueError, OverflowError):
        raise RowProblem(
            "timestamp_impossible", column, f"{column}={text!r} names no real instant"
        ) from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_storable(obj: Any) -> bool:
    """False when jsonb would refuse the value (NUL or lone surrogates in a string)."""
    text = json.dumps(obj, ensure_ascii=False)
    return "\\u0000" not in text and not _has_surrogate(text)


def parse_metadata(value: Any, storage: str, on_invalid: str) -> str | None:
    """Metadata as JSON text ready for ``jsonb`` (NULL stays None)."""
    if storage == "null":
        return None
    if storage == "real" and not math.isfinite(value):
        raise RowProblem("invalid_json", "metadata", f"metadata is the number {value!r}")
    text = decode_text(value, storage, "metadata")
    try:
        obj = _json_loads(text)
    except RecursionError:
        # Nested deeper than Python's parser goes: PostgreSQL, which parses it anyway to store
        # it, is the judge (a refusal there makes the row a reject all the same).
        return text
    except ValueError as exc:
        if on_invalid == "keep_as_json_string":
            return json.dumps(text)
        raise RowProblem("invalid_json", "metadata", f"metadata is not JSON: {exc}") from None
    if "\\u" in text and not _json_storable(obj):
        raise RowProblem(
            "json_not_storable", "metadata", "metadata holds \\u0000 or a lone surrogate"
        )
    return text


def parse_count(value: Any, storage: str) -> int:
    """request_count as an int; NULL is 0, never rounded or wrapped."""
    if storage == "null":
        return 0
    if storage == "integer":
        number = value
    elif storage == "real":
        if not math.isfinite(value) or not value.is_integer():
            raise RowProblem(
                "count_not_integral", "request_count", f"request_count={value!r} is not whole"
            )
        number = int(value)
    else:
        text = decode_text(value, storage, "request_count")
        if not _INTEGER_TEXT.match(text):
            raise RowProblem(
                "count_not_integral", "request_count", f"request_count={text[:40]!r} is not whole"
            )
        digits = text.strip(" \t\r\n").lstrip("+-").lstrip("0")
        if len(digits) > 10:  # beyond integer anyway; int() would refuse past 4,300 digits
            raise RowProblem(
                "count_out_of_range", "request_count", f"request_count has {len(digits)} digits"
            )
        number = int(text)
    if not INT4_MIN <= number <= INT4_MAX:
        raise RowProblem(
            "count_out_of_range", "request_count", f"request_count={number} exceeds integer"
        )
    return number


class Session(NamedTuple):
    """A normalised session, in ``COLUMNS`` order (a tuple still: COPY and ``executemany``
    take it as it is)."""

    session_id: str
    user_id: str | None
    metadata: str | None
    created_at: datetime
    expires_at: datetime
    last_activity: datetime
    request_count: int


ROWID = 0
"""Where a raw row (see the module docstring) keeps its rowid."""
VALUE = {column: 1 + i for i, column in enumerate(COLUMNS)}
"""Where a raw row keeps each column's value …"""
STORAGE = {column: 1 + len(COLUMNS) + i for i, column in enumerate(COLUMNS)}
"""… and each column's SQLite storage class."""


def normalise(row: tuple, rules: Rules) -> Session | Reject:
    """One raw row in, a normalised session tuple (``COLUMNS`` order) or a :class:`Reject` out.

    Never raises for any value a SQLite file can hold.
    """
    (
        rowid,
        sid,
        uid,
        meta,
        created,
        expires,
        last,
        count,
        sid_t,
        uid_t,
        meta_t,
        created_t,
        expires_t,
        last_t,
        count_t,
    ) = row[:15]
    session_id: str | None = None
    try:
        if sid_t == "null":
            raise RowProblem("missing_session_id", "session_id", "session_id is NULL")
        session_id = decode_text(sid, sid_t, "session_id")
        if len(session_id.encode("utf-8", "surrogatepass")) > MAX_SESSION_ID_BYTES:
            raise RowProblem(
                "session_id_too_long",
                "session_id",
                f"session_id is {len(session_id.encode('utf-8', 'surrogatepass'))} bytes long "
                f"(at most {MAX_SESSION_ID_BYTES})",
            )
        user_id = None if uid_t == "null" else decode_text(uid, uid_t, "user_id")
        metadata = parse_metadata(meta, meta_t, rules.on_invalid_metadata)
        if rules.extra_columns:
            k = len(rules.extra_columns)
            extras = {
                col: extra_value(row[15 + i], row[15 + k + i], col)
                for i, col in enumerate(rules.extra_columns)
            }
            metadata = with_extras(metadata, extras)
        return Session(
            session_id,
            user_id,
            metadata,
            parse_timestamp(created, created_t, "created_at", rules.zone),
            parse_timestamp(expires, expires_t, "expires_at", rules.zone),
            parse_timestamp(last, last_t, "last_activity", rules.zone),
            parse_count(count, count_t),
        )
    except RowProblem as problem:
        raw = raw_record(row, rules.extra_columns)
        return Reject(rowid, session_id, problem.reason, problem.detail, raw)


def spelling(text: str) -> str:
    """A timestamp text's shape with digits as 9s, e.g. ``9999-99-99 99:99:99.999999``.

    Used by inspect to census the spellings found in each column.
    """
    return re.sub(r"\d", "9", text)


def wall_clock_kind(naive: datetime, zone: tzinfo) -> str:
    """``ok``, ``nonexistent`` (in a DST gap) or ``ambiguous`` (in a DST overlap) in ``zone``."""
    first = naive.replace(tzinfo=zone, fold=0)
    second = naive.replace(tzinfo=zone, fold=1)
    if first.utcoffset() == second.utcoffset():
        return "ok"
    roundtrip = first.astimezone(UTC).astimezone(zone).replace(tzinfo=None)
    return "ambiguous" if roundtrip == naive else "nonexistent"
