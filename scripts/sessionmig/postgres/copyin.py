"""Stream a backup into a PostgreSQL table by binary COPY: the fast path where it is safe, the
rules everywhere else, and every row accounted for.

Plain rows (see ``source.Backup.plain_rows``) go to the server as raw bytes with their
timestamps converted by ``transform.WallClock``; every other row is read raw and normalised by
``transform.normalise``. Rows are copied in spans of :data:`SPAN_ROWS`, each under its own
savepoint: when PostgreSQL refuses a value in one (bad UTF-8, a NUL, JSON it cannot store …),
the span is rolled back and redone with the rules applied to every row, so each reject carries
the rules' reason; a value the rules accept but the server still refuses becomes a
``refused_by_postgresql`` reject with the server's message. Memory is bounded by one fetch
batch (and, for a redone span, one rowid per row).
"""

from __future__ import annotations

import gc
import re
from collections.abc import Callable, Container, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import psycopg
from psycopg import sql
from psycopg.types.string import BytesBinaryDumper

from sessionmig import defaults as D
from sessionmig.errors import TargetError
from sessionmig.rules.transform import Reject, Rules, normalise, raw_record
from sessionmig.sqlite.source import Backup
from sessionmig.sqlite.wire import WIRE_TYPES, MigratePath, WireRow, as_wire

# Errors that mean "this value cannot be stored", as opposed to a lost or broken connection.
REFUSALS = (
    psycopg.errors.DataError,
    psycopg.errors.IntegrityError,
    psycopg.errors.ProgramLimitExceeded,
    psycopg.errors.StatementTooComplex,  # JSON nested deeper than the server's stack
)
_LINE = re.compile(r"^COPY .*, line (\d+)")


@dataclass
class Streamed:
    """What one pass over the backup did."""

    read: int = 0
    copied: int = 0
    spans_redone: int = 0


SPAN_ROWS = 250_000
"""Rows per savepoint. Each span ends in a round trip that waits for the server to catch up,
so spans are long; a refused span is redone by the rules, at about 3 s per 250,000 rows."""


class FastPath(Protocol):
    """How plain rows are read and written a batch at a time (rows the rules need not see).

    ``rows`` yields batches in rowid order, each row ``(rowid, …, plain)`` with ``plain`` last;
    ``write_plain`` writes those it is sure of as wire rows (``wire.WIRE_TYPES``) and returns
    the rowids of the others, which then take the rules.
    """

    def rows(self, backup: Backup, batch_rows: int) -> Iterator[list[tuple]]: ...

    def write_plain(self, write: Callable[[WireRow], None], rows: list[tuple]) -> list[int]: ...


@dataclass(frozen=True)
class _Aside:
    """Rows not to copy: diverted (handed over raw) or settled (rejects decided beforehand)."""

    divert: Container[int]
    settled: Mapping[int, Reject]

    def __contains__(self, rowid: object) -> bool:
        return rowid in self.divert or rowid in self.settled

    def __bool__(self) -> bool:
        return bool(self.divert) or bool(self.settled)


@dataclass
class _Span:
    """One savepoint's worth of rows: what to apply once its COPY has succeeded."""

    first: int = 0
    last: int = 0
    rows: int = 0
    copied: int = 0
    rejects: list[Reject] = field(default_factory=list)
    diverted: list[tuple] = field(default_factory=list)


def stream_backup(
    conn: psycopg.Connection,
    backup: Backup,
    rules: Rules,
    table: sql.Composable,
    *,
    on_reject: Callable[[Reject], None],
    divert: Container[int] = frozenset(),
    on_diverted: Callable[[tuple], None] | None = None,
    settled: Mapping[int, Reject] | None = None,
    fast: FastPath | None = None,
    batch_rows: int = D.BATCH_ROWS,
    progress: Callable[[int], None] | None = None,
) -> Streamed:
    """COPY every row of ``backup`` that can land into ``table`` (the session columns, in
    ``COLUMNS`` order); hand each reject to ``on_reject``. Rows whose rowid is in ``divert`` are
    not copied but handed raw to ``on_diverted``; rows in ``settled`` are rejects decided
    beforehand (``keys.duplicate_rejects``). ``fast`` reads and writes plain rows (migrate's
    :class:`MigratePath` unless given). Runs inside the caller's transaction."""
    statement = sql.SQL("COPY {} FROM STDIN (FORMAT BINARY)").format(table)
    # By type oid, psycopg finds the last dumper registered for bytea: DB-API's pure-Python
    # one. Put the C dumper of plain bytes back on top, for this connection only.
    conn.adapters.register_dumper(bytes, BytesBinaryDumper)
    aside = _Aside(divert, settled or {})
    fast = fast or MigratePath(rules)
    stats = Streamed()
    chunks = fast.rows(backup, batch_rows)
    with gc_paused():
        while True:
            span = _Span()
            try:
                with conn.transaction(), conn.cursor() as cur, cur.copy(statement) as copy:
                    copy.set_types(WIRE_TYPES)
                    _fill(copy, span, chunks, fast, backup, rules, aside, progress)
            except REFUSALS:
                stats.spans_redone += 1
                span = _by_the_rules(conn, statement, backup, span.first, span.last, rules, aside)
            if not span.rows:
                return stats
            for reject in span.rejects:
                on_reject(reject)
            if on_diverted:
                for raw in span.diverted:
                    on_diverted(raw)
            stats.read += span.rows
            stats.copied += span.copied


@contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off for a while: millions of short-lived tuples, none in a
    cycle, which it would only rescan."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def _fill(
    copy: psycopg.Copy,
    span: _Span,
    chunks: Iterator[list[tuple]],
    fast: FastPath,
    backup: Backup,
    rules: Rules,
    divert: _Aside,
    progress: Callable[[int], None] | None,
) -> None:
    """Write chunks into the COPY until the span is full or the backup ends.

    Rows are written as each chunk is made, so the server parses one while the next is read.
    """
    write = copy.write_row
    # Extra columns change what metadata holds, so such rows all take the rules.
    plain_ones = not rules.extra_columns
    while span.rows < SPAN_ROWS:
        chunk = next(chunks, None)
        if chunk is None:
            return
        if not span.rows:
            span.first = chunk[0][0]
        span.last = chunk[-1][0]
        span.rows += len(chunk)
        exact: list[int] = []
        if plain_ones:
            if divert:
                plain = [row for row in chunk if row[-1] and row[0] not in divert]
            else:  # the usual case, spared a membership test per row
                plain = [row for row in chunk if row[-1]]
            if len(plain) < len(chunk):
                kept = {row[0] for row in plain}
                exact = [row[0] for row in chunk if row[0] not in kept]
            if plain:
                doubtful = fast.write_plain(write, plain)
                span.copied += len(plain) - len(doubtful)
                exact += doubtful
        else:
            exact = [row[0] for row in chunk]
        for rowid in sorted(exact):
            wire = _apply_rules(span, backup.raw_row(rowid, rules.extra_columns), rules, divert)
            if wire is not None:
                write(wire)
                span.copied += 1
        if progress:
            progress(len(chunk))


def _apply_rules(span: _Span, raw: tuple, rules: Rules, divert: _Aside) -> WireRow | None:
    """A row by the rules: its wire form, or None when it is diverted or rejected."""
    if raw[0] in divert.divert:
        span.diverted.append(raw)
        return None
    if raw[0] in divert.settled:
        span.rejects.append(divert.settled[raw[0]])
        return None
    result = normalise(raw, rules)
    if isinstance(result, Reject):
        span.rejects.append(result)
        return None
    return as_wire(result)


def _by_the_rules(
    conn: psycopg.Connection,
    statement: sql.Composed,
    backup: Backup,
    first: int,
    last: int,
    rules: Rules,
    divert: _Aside,
) -> _Span:
    """Redo a refused span, streaming, with every row normalised by the rules. A row the
    rules accept but the server still refuses is set aside as a reject, with the server's
    message, and the span is copied again without it."""
    refused: dict[int, Reject] = {}
    while True:
        span = _Span(first, last)
        copied: list[int] = []  # rowid per COPY line, to name a refused one
        try:
            with conn.transaction(), conn.cursor() as cur, cur.copy(statement) as copy:
                copy.set_types(WIRE_TYPES)
                for chunk in backup.raw_rows_between(first, last, rules.extra_columns):
                    for raw in chunk:
                        span.rows += 1
                        if raw[0] in refused:
                            continue
                        row = _apply_rules(span, raw, rules, divert)
                        if row is not None:
                            copy.write_row(row)
                            copied.append(raw[0])
        except REFUSALS as exc:
            index = _refused_line(exc) - 1
            if not 0 <= index < len(copied):
                raise TargetError(
                    f"PostgreSQL refused a row between rowids {first} and {last} "
                    f"({_message(exc)}) and the row could not be identified; run inspect on "
                    "the backup and report this"
                ) from None
            raw = backup.raw_row(copied[index], rules.extra_columns)
            accepted = normalise(raw, rules)  # it was copied, so the rules accepted it
            refused[raw[0]] = Reject(
                raw[0],
                None if isinstance(accepted, Reject) else accepted.session_id,
                "refused_by_postgresql",
                _message(exc),
                raw_record(raw, rules.extra_columns),
            )
            continue
        span.rejects.extend(refused.values())
        span.copied = len(copied)
        return span


def _refused_line(exc: psycopg.Error) -> int:
    """The 1-based row of the COPY that the server refused, from its error context (whose
    last line is COPY's own; earlier lines may be a parser's, such as "JSON data, line 1")."""
    lines = (exc.diag.context or "").splitlines()
    match = _LINE.search(lines[-1]) if lines else None
    return int(match.group(1)) if match else 0


def _message(exc: psycopg.Error) -> str:
    diag = exc.diag
    text = diag.message_primary or str(exc)
    return f"{text} ({diag.message_detail})" if diag.message_detail else text
