"""The snapshot diff: the sessions whose normalised rows differ between the base and
the live snapshot, found by SQLite and read by the migration's rules."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sessionmig import defaults as D
from sessionmig.errors import SourceError
from sessionmig.rules import merge as M
from sessionmig.rules.jsonb import metadata_text
from sessionmig.rules.mask import mask_id
from sessionmig.rules.transform import COLUMNS, Reject, Rules, Session, normalise
from sessionmig.sqlite.source import Backup, in_background, shaped
from sessionmig.sqlite.wire import PLAIN, SURE_COLUMNS, RulesPath, Sure

if TYPE_CHECKING:  # pandas is heavy; only the notebook's functions need it
    pass


# --- what changed between the two snapshots ------------------------------------------------


@dataclass
class Delta:
    """The sessions whose normalised rows differ between base and live."""

    base: dict[str, M.Row] = field(default_factory=dict)
    live: dict[str, M.Row] = field(default_factory=dict)
    ids: list[str] = field(default_factory=list)  # the sessions the pass touches, in key order
    live_rows: int = 0
    unchanged: int = 0
    rejected: list[str] = field(default_factory=list)  # masked ids of refused live rows
    base_rejected: set[str] = field(default_factory=set)  # base rows the rules refuse


def _canonical(row: M.Row) -> M.Row:
    """A normalised session with metadata spelled as PostgreSQL prints jsonb, so that it
    compares equal to PostgreSQL's own metadata when the JSON is equal."""
    meta = row[2]
    if meta is not None:
        # JSON Python cannot read (too deep) stays as it is: PostgreSQL compares it as jsonb.
        with contextlib.suppress(ValueError, RecursionError):
            meta = metadata_text(meta)
    return (row[0], row[1], meta, row[3], row[4], row[5], row[6])


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _text_affinity(declared: str) -> bool:
    """SQLite's rule: a declared type containing CHAR, CLOB or TEXT (and not INT) gives TEXT
    affinity."""
    upper = declared.upper()
    return "INT" not in upper and any(k in upper for k in ("CHAR", "CLOB", "TEXT"))


def _same(column: str, declared: str, extra: bool) -> str:
    """SQL: the raw value of ``column`` is the same in the live row ``l`` and the base row
    ``b``, for the rules' purpose. ``IS`` alone takes 7 and 7.0 for equal: harmless where the
    rules read both alike (request_count reads both as 7; a number in a timestamp column is a
    reject either way; TEXT affinity stores numbers as text anyway), so the storage class is
    compared only where it could matter — which halves the join on a big store."""
    c = _quoted(column)
    alike = column in ("request_count", "created_at", *M.LATER) or _text_affinity(declared)
    if alike and not extra:
        return f"l.{c} IS b.{c}"
    return f"(l.{c} IS b.{c} AND typeof(l.{c}) = typeof(b.{c}))"


# The delta's rows of one snapshot: those whose key the comparison put in the temporary table.
_IN_DELTA = "session_id IN (SELECT sid FROM temp.sessionmig_delta)"


def _raw_select(schema_name: str, names: tuple[str, ...], where: str) -> str:
    """SQL: ``rowid``, the values and the storage classes of ``names``, in the form
    ``Backup.rows`` gives (``normalise``'s), of one snapshot's rows that match ``where``."""
    values = ", ".join(_quoted(c) for c in names)
    types = ", ".join(f"typeof({_quoted(c)})" for c in names)
    return f"SELECT rowid, {values}, {types} FROM {schema_name}.sessions WHERE {where}"


def _raw_rows(
    backup: Backup, schema_name: str, extra: tuple[str, ...], batch: int
) -> Iterator[tuple]:
    """The delta's rows of one snapshot, in the form ``Backup.rows`` gives (``normalise``'s)."""
    cursor = backup.query(_raw_select(schema_name, (*COLUMNS, *extra), _IN_DELTA))
    for chunk in backup.batches(cursor, batch):
        for row in chunk:
            yield shaped(row, len(extra))


_BY_ROWID = 500  # rowids bound in one statement (SQLite allows 999 on the oldest builds)
_PG_EPOCH_UTC = datetime(2000, 1, 1, tzinfo=UTC)


def _delta_rows(
    backup: Backup, schema_name: str, rules: Rules, batch: int
) -> Iterator[Session | Reject]:
    """The delta's rows of one snapshot, each as :func:`normalise` makes it. The rows the rules
    surely land as they are (:class:`wire.RulesPath`, the path inspect and the app check take)
    are built a batch at a time; every other row is read raw and goes through ``normalise``.
    Extra columns change what metadata holds: then every row takes the rules."""
    extra = rules.extra_columns
    if extra:
        for raw in _raw_rows(backup, schema_name, extra, batch):
            yield normalise(raw, rules)
        return
    path = RulesPath(rules, repeated_keys=False)  # a repeated key changes no row's text
    cursor = backup.query(
        f"SELECT rowid, {PLAIN}, {SURE_COLUMNS} FROM {schema_name}.sessions WHERE {_IN_DELTA}"
    )
    for chunk in backup.batches(cursor, batch):
        checked = path.check(chunk)
        yield from _sure_sessions(checked)
        doubtful = checked.exact + [checked.rowids[i] for i in np.flatnonzero(~checked.sure)]
        for raw in _raw_by_rowid(backup, schema_name, sorted(doubtful)):
            yield normalise(raw, rules)


def _sure_sessions(checked: Sure) -> Iterator[Session]:
    """The sessions of a checked batch's sure rows, as ``normalise`` makes them: their text as
    UTF-8 (proved), their instants from ``timestamptz``'s microseconds, in UTC."""
    pick = np.flatnonzero(checked.sure).tolist()

    def instants(micros: np.ndarray) -> list[datetime]:
        at = micros[pick].tolist()
        return [_PG_EPOCH_UTC + timedelta(microseconds=m) for m in at]

    def text(value: bytes | None) -> str | None:
        return None if value is None else value.decode("utf-8")

    sids, uids, metas = checked.session_ids, checked.user_ids, checked.metadata
    counts = checked.counts[pick].tolist()
    yield from (
        Session(sids[i].decode("utf-8"), text(uids[i]), text(metas[i]), c, e, la, n)
        for i, c, e, la, n in zip(
            pick,
            instants(checked.created),
            instants(checked.expires),
            instants(checked.last),
            counts,
            strict=True,
        )
    )


def _raw_by_rowid(backup: Backup, schema_name: str, rowids: list[int]) -> Iterator[tuple]:
    """The raw rows (``normalise``'s form) of ``rowids`` in one snapshot."""
    for start in range(0, len(rowids), _BY_ROWID):
        some = rowids[start : start + _BY_ROWID]
        where = f"rowid IN ({', '.join('?' * len(some))}) ORDER BY rowid"
        cursor = backup.query(_raw_select(schema_name, COLUMNS, where), tuple(some))
        for chunk in backup.batches(cursor, _BY_ROWID):
            for row in chunk:
                yield shaped(row, 0)


def _decoded(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _live_shape(base: Backup, live_path: Path) -> dict[str, str]:
    """The attached live snapshot's columns and declared types; refused unless it is the app's
    table: the base's columns, session_id unique, a rowid table."""
    columns = {
        _decoded(r[1]): _decoded(r[2]) for r in base.query("PRAGMA live.table_xinfo(sessions)")
    }
    if sorted(columns) != sorted(base.columns):
        raise SourceError(
            f"{live_path}: its columns {sorted(columns)} differ from the base's "
            f"{sorted(base.columns)}; the app's schema changed since the migration"
        )
    unique = False
    for _, name, is_unique, _, partial in base.query("PRAGMA live.index_list(sessions)"):
        if is_unique and not partial:
            info = base.query(f"PRAGMA live.index_info({_quoted(_decoded(name))})").fetchall()
            unique = unique or [_decoded(r[2]) for r in info] == ["session_id"]
    if not unique:
        raise SourceError(
            f"{live_path}: session_id is not unique in this file; catch-up matches sessions by "
            "it (the app's store has it as its primary key)"
        )
    try:
        base.query("SELECT rowid FROM live.sessions LIMIT 1").fetchall()
    except SourceError:
        raise SourceError(
            f"{live_path}: sessions is a WITHOUT ROWID table, not the app's"
        ) from None
    return columns


def _ended_in_live(base_uri: str, live_uri: str) -> list[bytes]:
    """The base's session ids that live does not have (logouts and cleanups), by key."""
    conn = sqlite3.connect(base_uri, uri=True)
    conn.text_factory = bytes
    try:
        conn.execute("ATTACH DATABASE ? AS live", (live_uri,))
        return [
            r[0]
            for r in conn.execute(
                """SELECT b.session_id FROM main.sessions b WHERE NOT EXISTS
                       (SELECT 1 FROM live.sessions l WHERE l.session_id = b.session_id)"""
            )
        ]
    except sqlite3.DatabaseError as exc:
        raise SourceError(f"comparing the snapshots failed ({exc}); take a new pass") from None
    finally:
        conn.close()


def diff(
    base: Backup,
    live_path: Path,
    rules: Rules,
    batch_rows: int = D.BATCH_ROWS,
    live_rows: int | None = None,
) -> Delta:
    """The sessions that differ between the base and the live snapshot, normalised by the
    migration's rules.

    SQLite compares the raw rows first, so only the rows that differ are read into Python:
    each live row against the base row with the same rowid (a session keeps its rowid while the
    app updates it; a rowid that holds another session, or none, marks the session to be looked
    at by its key), and base sessions missing from live by their key. The live snapshot is
    attached to the base's connection, read only (it was hashed as it was taken).
    """
    if base.missing_columns:
        raise SourceError(f"{base.original}: sessions lacks {base.missing_columns}")
    if base.renamed:
        raise SourceError(
            f"{base.original}: sessions has a column named rowid, which hides SQLite's rowid; "
            "catch-up matches live rows to the base's by rowid, so it cannot carry this store "
            "— migrate a fresh snapshot instead (migrate reads it from a private copy)"
        )
    if not base.session_id_unique:
        raise SourceError(
            f"{base.original}: session_id is not unique in this file; catch-up matches sessions "
            "by it (the app's store has it as its primary key)"
        )
    extra = rules.extra_columns
    uri = live_path.resolve().as_uri() + "?mode=ro&immutable=1"
    base.query("ATTACH DATABASE ? AS live", (uri,))
    try:
        columns = _live_shape(base, live_path)
        same = " AND ".join(
            _same(c, columns.get(c, ""), c in extra) for c in (*COLUMNS[1:], *extra)
        )
        # The two halves run at once, each on a connection of its own (SQLite works outside
        # the GIL): the sessions ended in live, by key, on a thread …
        ended = in_background(_ended_in_live, base.uri, uri)
        # … and every live row against the base row with its rowid, here.
        base.query(
            f"""CREATE TEMP TABLE sessionmig_delta AS
                SELECT l.session_id AS sid FROM live.sessions l
                LEFT JOIN main.sessions b ON b.rowid = l.rowid
                WHERE b.rowid IS NULL OR b.session_id IS NOT l.session_id OR NOT ({same})"""
        )
        # CAST: the ids come back as the bytes SQLite holds; bound as text they match again.
        base.connection.executemany(
            "INSERT INTO temp.sessionmig_delta VALUES (CAST(? AS TEXT))",
            ((sid,) for sid in ended.result()),
        )
        base.connection.commit()  # sqlite3 opened a transaction for the insert; DETACH needs none
        if live_rows is None:
            live_rows = base.query("SELECT count(*) FROM live.sessions").fetchone()[0]
        delta = Delta(live_rows=live_rows)
        refused: set[str] = set()
        fetched_live = 0
        for row in _delta_rows(base, "live", rules, batch_rows):
            fetched_live += 1
            if isinstance(row, Reject):
                # Left exactly as PostgreSQL has it, and named: never read as a logout.
                if row.session_id is not None:
                    refused.add(row.session_id)
                delta.rejected.append(mask_id(row.session_id))
            else:
                delta.live[row[0]] = row
        for row in _delta_rows(base, "main", rules, batch_rows):
            if not isinstance(row, Reject):  # a base reject never landed: as if absent
                delta.base[row[0]] = row
            elif row.session_id is not None:
                delta.base_rejected.add(row.session_id)
    finally:
        base.query("DROP TABLE IF EXISTS temp.sessionmig_delta")
        base.query("DETACH DATABASE live")
    equal = 0
    for sid in sorted(delta.base.keys() | delta.live.keys()):
        if sid in refused:
            continue
        b, lv = delta.base.get(sid), delta.live.get(sid)
        if lv is not None and (b is None or b[2] != lv[2]):
            # Metadata is compared with PostgreSQL's only where live changed it (or brought
            # it): only then is it spelled as jsonb, which costs a parse.
            lv = delta.live[sid] = _canonical(lv)
            if b is not None:
                b = delta.base[sid] = _canonical(b)
        if b is not None and b == lv:
            equal += 1  # the raw values differ, the sessions do not (7 vs 7.0)
            continue
        delta.ids.append(sid)
    delta.unchanged = delta.live_rows - fetched_live + equal
    return delta
