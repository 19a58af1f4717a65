"""Prove the migration: every source row is in PostgreSQL with the same meaning, or rejected.

The source is read again and normalised by the rules migrate applies — its plain rows by
reconcile's own reading (``expected``), never by migrate's fast path — into a temporary table
on the target, so that nothing of the target is pulled into Python.
PostgreSQL fingerprints every row of both tables (a 64-bit hash of all columns — metadata by
the text jsonb prints, so ``1.0`` is not ``1``, as the app reading it sees; times to the
microsecond) and sums the fingerprints per day: when every day agrees, the tables hold the same
rows. When one does not, a full join on ``session_id`` compares every
column and counts each difference; the differing rows (missing, extra, changed) are fetched,
at most :data:`MAX_DIFFERENCES`, and described field by field. Rows recorded as
rejects are not copied: their raw values are checked against what the rejects table claims,
and the partition source = migrated + rejected is proved. Distributions (per-day counts, sums,
extremes) and the legacy active-session rule give second signals. The temporary table needs
the TEMP privilege on the target database and disk for one copy of the sessions; it is
dropped at the end.

The proof trusts nothing of the target but its rows: every function and operator it calls is
``pg_catalog``'s, by name (and every connection fixes ``search_path`` and the formats it reads:
:data:`sessionmig.postgres.connect.FIXED_SETTINGS`); the target's ``sessions`` must be an ordinary
table with the migrated columns, types and bytewise collations, without rules, inheritance children
or row-level security applying to the reader (:func:`check_shape`); and when the fingerprints
disagree while the row-by-row comparison finds every row the same, the two readings contradict
each other and reconcile fails.

Two modes. ``strict`` (the default) is the proof right after migrate: any difference fails.
``after_cutover`` is the re-check once the app serves from PostgreSQL and changes rows on every
request: each difference between the backup's rows and the target is either one the
application explains — a later ``last_activity``, a higher ``request_count``, a later
``expires_at`` (validate, extend), a session absent (logout, cleanup, expiry), a session absent
from the backup and created after it was taken — or one nothing explains, which fails: a
``user_id``, ``metadata`` or ``created_at`` changed (no ``SessionManager`` method writes them
after ``create_session``), a count that went down, an instant moved backwards, a session that
was expired when the backup was taken and was validated or extended since (the app deletes or
refuses those), a session absent from the backup but created before it was taken, a rejected
row that now appears. The partition proof and every check of the rejects hold in both modes;
in ``after_cutover`` a source row absent from PostgreSQL counts as ended, since a logout and a
lost row look the same there — ``strict`` right after migrate is what proves none was lost.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import sql

from sessionmig import defaults as D
from sessionmig.engines.appcheck import AppCheck, Asked, ask_the_app, compare, same_session
from sessionmig.errors import ParameterError, TargetError
from sessionmig.postgres.connect import connect
from sessionmig.postgres.copyin import REFUSALS, stream_backup
from sessionmig.rules.jsonb import number_text
from sessionmig.rules.mask import mask_id
from sessionmig.rules.transform import (
    COLUMNS,
    STORAGE,
    VALUE,
    Reject,
    Rules,
    Session,
    normalise,
    raw_record,
)
from sessionmig.rules.verdict import Verdict
from sessionmig.sqlite.expected import ExpectedPath
from sessionmig.sqlite.source import Backup, in_background
from sessionmig.sqlite.wire import WIRE_TYPES, as_wire

PASS, WARN, FAIL = Verdict.PASS, Verdict.PASS_WITH_WARNINGS, Verdict.FAIL
MAX_DIFFERENCES = 200
KINDS: dict[str, str] = {
    "matched": "in the source and in PostgreSQL with identical values",
    "missing": "in the source, landable, not in PostgreSQL",
    "extra": "in PostgreSQL, not in the source",
    "changed": "in both, with a value that differs",
    "both": "recorded as a reject and also present in PostgreSQL",
    "reject_mismatch": "a reject whose raw values or reason do not match the source row",
    "false_reject": "recorded as a reject although it should have landed",
    "unaccounted": "cannot land and is not in the rejects table",
    "orphan_reject": "a reject for a row the source does not have",
    "duplicate": "source rows that share a session_id without being recorded as duplicates",
}
"""Every kind of count a reconciliation keeps; all but ``matched`` fail it."""

STRICT, AFTER_CUTOVER = "strict", "after_cutover"
MODES = (STRICT, AFTER_CUTOVER)
EXPLAINED: dict[str, str] = {
    "ended": "in the backup, not in PostgreSQL: ended by the app (logout, cleanup, expiry)",
    "created_after_cutover": "in PostgreSQL, not in the backup, created after the backup was "
    "taken (its created_at is later than every session the backup holds)",
    "changed_by_app": "in both; every difference is one the app makes (the three below)",
    "later_last_activity": "last_activity later than the backup's (validate_session)",
    "higher_request_count": "request_count higher than the backup's (validate_session)",
    "later_expires_at": "expires_at later than the backup's (extend_session)",
}
"""``after_cutover``: differences the application explains, counted (a changed row counts once
in ``changed_by_app`` and once per column kind)."""
UNEXPLAINED: dict[str, str] = {
    "appeared": "in PostgreSQL, not in the backup, yet created before the backup was taken",
    "user_id_changed": "user_id differs: no SessionManager method changes it after creation",
    "metadata_changed": "metadata differs: no SessionManager method changes it after creation",
    "created_at_changed": "created_at differs: it is written once, by create_session",
    "request_count_decreased": "request_count lower than the backup's: the app only adds",
    "last_activity_backwards": "last_activity earlier than the backup's: the app only moves "
    "it forward",
    "expires_at_backwards": "expires_at earlier than the backup's: extend_session pushes it later",
    "revived": "expired when the backup was taken, yet validated or extended since: the app "
    "deletes or refuses an expired session",
}
"""``after_cutover``: differences nothing explains; each fails it (with ``changed``: the rows
that have one)."""


@dataclass(frozen=True)
class Difference:
    """One row that breaks the partition or differs, with the id hashed."""

    kind: str  # one of KINDS
    session: str
    rowid: int | None
    detail: str


@dataclass(frozen=True)
class ReconcileResult:
    """Counts, the partition proof, parity signals and the verdict of one reconciliation."""

    run_id: str | None
    source_rows: int
    target_rows: int
    migrated: int
    rejected: int
    matched: int
    counts: dict[str, int]
    differences: list[Difference]
    parity: dict[str, Any]
    verdict: str
    reason: str
    warnings: list[str] = field(default_factory=list)
    mode: str = STRICT
    app: AppCheck | None = None  # the application check, when it was asked for

    @property
    def explained(self) -> dict[str, int]:
        """``after_cutover``: the counts of each kind of difference the application explains."""
        return {k: self.counts.get(k, 0) for k in EXPLAINED} if self.mode == AFTER_CUTOVER else {}

    @property
    def partition_holds(self) -> bool:
        return self.source_rows == self.migrated + self.rejected and not any(
            self.counts[k]
            for k in (
                "both",
                "missing",
                "unaccounted",
                "orphan_reject",
                "false_reject",
                "duplicate",
                "reject_mismatch",
            )
        )


def canonical_json(value: Any) -> Any:
    """A JSON value in a form where equal means what a reader of the stored ``jsonb`` sees as
    equal: ``true`` is not ``1``, and a number is its text as jsonb prints it (``1.0`` is not
    ``1``, ``1.50`` is not ``1.5``; ``1e2`` is ``100``, as jsonb stores it)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float | Decimal):
        number = value if isinstance(value, int) else Decimal(str(value))
        return ("number", number_text(number))
    if isinstance(value, list):
        return [canonical_json(v) for v in value]
    return {k: canonical_json(v) for k, v in value.items()}


_SQL_NULL = ("sql", "NULL")  # never equal to any parsed JSON value, JSON null included


def _json(text: str | None) -> Any:
    if text is None:
        return _SQL_NULL
    try:
        return canonical_json(json.loads(text, parse_float=Decimal))
    except RecursionError:
        # Nested deeper than Python parses (jsonb holds it): both sides are jsonb's own text,
        # equal exactly when the values are, so the text is the canonical form.
        return ("deep", text)


def _shown_json(text: str | None, limit: int = 60) -> str:
    """Metadata as a reviewer reads it: SQL NULL spelled out, long JSON cut short."""
    if text is None:
        return "SQL NULL"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def json_diff(left: Any, right: Any, path: str = "$") -> list[str]:
    """Key-level paths where two canonical JSON values differ."""
    if isinstance(left, dict) and isinstance(right, dict):
        out: list[str] = []
        for key in sorted(set(left) | set(right)):
            if key not in left:
                out.append(f"{path}.{key} only in PostgreSQL")
            elif key not in right:
                out.append(f"{path}.{key} missing in PostgreSQL")
            else:
                out.extend(json_diff(left[key], right[key], f"{path}.{key}"))
        return out
    return [] if left == right else [f"{path} differs"]


def field_diff(source: tuple, target: tuple) -> list[str]:
    """Human descriptions of the fields that differ between a source and a target row."""
    out = []
    for i, column in enumerate(COLUMNS[1:], start=1):
        a, b = source[i], target[i]
        if column == "metadata":
            ja, jb = _json(a), _json(b)
            if ja != jb:
                where = json_diff(ja, jb) if _SQL_NULL not in (ja, jb) else []
                paths = f" at {', '.join(where[:5])}" if where else ""
                out.append(f"metadata{paths}: source {_shown_json(a)} vs target {_shown_json(b)}")
        elif isinstance(a, datetime) and isinstance(b, datetime):
            if a != b:
                out.append(
                    f"{column}: source {a.isoformat()} vs target {b.isoformat()} "
                    f"(target - source = {b - a})"
                )
        elif a != b or type(a) is not type(b):
            out.append(f"{column}: source {_shown(a)} vs target {_shown(b)}")
    return out


def _shown(value: Any) -> str:
    return "NULL" if value is None else repr(value)


def latest_migrate_run(conn: psycopg.Connection, schema: str) -> str | None:
    """The run id of the newest committed migrate run on this target."""
    row = conn.execute(
        sql.SQL(
            "SELECT run_id FROM {} WHERE step = 'migrate' AND NOT dry_run "
            "ORDER BY finished_at DESC LIMIT 1"
        ).format(sql.Identifier(schema, "session_migration_runs"))
    ).fetchone()
    return row[0] if row else None


def _recorded_sha256(conn: psycopg.Connection, schema: str, run_id: str | None) -> str | None:
    if run_id is None:
        return None
    row = conn.execute(
        sql.SQL("SELECT source_sha256 FROM {} WHERE run_id = %s").format(
            sql.Identifier(schema, "session_migration_runs")
        ),
        (run_id,),
    ).fetchone()
    return row[0] if row else None


def rejects_of_run(conn: psycopg.Connection, schema: str, run_id: str | None) -> dict[int, dict]:
    if run_id is None:
        return {}
    rows = conn.execute(
        sql.SQL("SELECT source_rowid, session_id, reason, raw FROM {} WHERE run_id = %s").format(
            sql.Identifier(schema, "session_migration_rejects")
        ),
        (run_id,),
    )
    return {r[0]: {"session_id": r[1], "reason": r[2], "raw": r[3]} for r in rows}


def _decoded_key(row: tuple) -> str | None:
    """The row's session_id as PostgreSQL text could hold it, else None: such a key cannot be
    in PostgreSQL, and its reject is matched by source rowid alone."""
    value, storage = row[VALUE["session_id"]], row[STORAGE["session_id"]]
    if storage == "integer":
        return str(value)
    if storage != "text":
        return None
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return None if "\x00" in text else text


SOURCE_TABLE = "sessionmig_source"
_SOURCE = sql.Identifier("pg_temp", SOURCE_TABLE)  # the temporary table, found nowhere else
WORK_MEM = "128MB"  # enough to hash-join a million rows in one pass; per query, for this run

# The proof's SQL names pg_catalog's functions, operators, types and collations itself, so that
# nothing a schema of the target's defines can stand in for them (the connection's search_path
# is fixed too: defence in depth). Texts compare and hash byte by byte (COLLATE "C"); metadata
# by the text jsonb prints, which keeps each number's spelling (1.0 is not 1).
_C = 'COLLATE pg_catalog."C"'
_TEXT = "::pg_catalog.text"


def _op(left: str, op: str, right: str) -> str:
    return f"{left} OPERATOR(pg_catalog.{op}) {right}"


def _same_value(left: str, right: str) -> str:
    """``left IS NOT DISTINCT FROM right`` with pg_catalog's ``=`` (IS DISTINCT FROM looks
    ``=`` up by name)."""
    return f"coalesce({_op(left, '=', right)}, {left} IS NULL AND {right} IS NULL)"


_SAME_USER = _same_value("s.user_id", f"t.user_id {_C}")
_SAME_METADATA = _same_value(f"s.metadata{_TEXT}", f"t.metadata{_TEXT} {_C}")
_SAME = f"""{_SAME_USER}
       AND {_SAME_METADATA}
       AND {_op("s.created_at", "=", "t.created_at")}
       AND {_op("s.expires_at", "=", "t.expires_at")}
       AND {_op("s.last_activity", "=", "t.last_activity")}
       AND {_op("s.request_count", "=", "t.request_count")}"""
_JOIN = _op("t.session_id", "=", f"s.session_id {_C}")


def _present(conn: psycopg.Connection, schema: str, keys: list[str]) -> set[str]:
    """Those of ``keys`` that PostgreSQL holds although no landable source row has them (a key
    can be both rejected and landed when another row of the backup shares it)."""
    found: set[str] = set()
    query = sql.SQL(
        "SELECT t.session_id FROM {} t WHERE t.session_id OPERATOR(pg_catalog.=) "
        "ANY(%s::pg_catalog.text[]) AND NOT EXISTS (SELECT 1 FROM {} s WHERE " + _JOIN + ")"
    ).format(sql.Identifier(schema, "sessions"), _SOURCE)
    for start in range(0, len(keys), 5000):
        found |= {r[0] for r in conn.execute(query, (keys[start : start + 5000],))}
    return found


@dataclass
class _Tally:
    """Counts and named differences of one reconciliation, as it goes."""

    mask: Callable[[str | None], str]
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    differences: list[Difference] = field(default_factory=list)

    def note(self, kind: str, key: str | None, rowid: int | None, detail: str) -> None:
        self.counts[kind] += 1
        if len(self.differences) < MAX_DIFFERENCES:
            self.differences.append(Difference(kind, self.mask(key), rowid, detail))


@dataclass
class _SourceSide:
    """What the pass over the source learns besides the rows it copies."""

    rows: int = 0
    rejected_keys: list[str] = field(default_factory=list)  # keys that must not be in the target
    seen_rejects: set[int] = field(default_factory=set)
    refused: list[tuple[int, Session]] = field(default_factory=list)  # to offer the server again
    duplicates: list[tuple[int, str]] = field(default_factory=list)  # (rowid, key) to check
    # Recorded as rejects for any other reason although the rules land them: rows that should
    # have landed, which the application check asks about too.
    landable: list[Session] = field(default_factory=list)


def row_hash(seed: int) -> sql.Composable:
    """A row's 64-bit fingerprint under this run's secret ``seed``.

    ``hash_record_extended`` alone combines its columns' hashes linearly (``31*h + hash(c)``),
    so a *sum* of such hashes depends only on which values each column holds, not on which row
    holds them: values swapped between two rows would cancel out. Hashing that hash again with
    ``hashint8extended`` mixes the whole row non-linearly, so any change to any row moves the
    sum unless 64-bit hashes collide; the seed is drawn per run, after the data is in place, so
    no one can craft such a collision. Equal rows hash equal on both tables: texts byte by
    byte (``COLLATE "C"``, whatever a column's collation), metadata by the text jsonb prints,
    where ``1.0`` and ``1`` differ as they do for the app. Every name is pg_catalog's.
    """
    return sql.SQL(
        "pg_catalog.hashint8extended(pg_catalog.hash_record_extended(ROW("
        f"session_id {_C}, user_id {_C}, metadata{_TEXT} {_C}, created_at, expires_at, "
        "last_activity, request_count), {seed}), {seed})"
    ).format(seed=sql.Literal(seed))


def new_seed() -> int:
    """A fresh fingerprint seed (int8, non-negative)."""
    return secrets.randbits(62)


def _create_source_table(conn: psycopg.Connection, seed: int) -> None:
    # The fingerprint is a generated column, so the server computes it while the client is
    # still reading the backup, instead of afterwards. (DDL takes no bound parameters; the
    # seed is an int of ours, as a literal.)
    conn.execute(
        sql.SQL(
            """CREATE TEMP TABLE {} (
                   session_id pg_catalog.text COLLATE pg_catalog."C",
                   user_id pg_catalog.text COLLATE pg_catalog."C", metadata pg_catalog.jsonb,
                   created_at pg_catalog.timestamptz, expires_at pg_catalog.timestamptz,
                   last_activity pg_catalog.timestamptz, request_count pg_catalog.int4,
                   fingerprint pg_catalog.int8 GENERATED ALWAYS AS ({hash}) STORED
               ) ON COMMIT DROP"""
        ).format(_SOURCE, hash=row_hash(seed))
    )


@dataclass(frozen=True)
class _Day:
    """One day (in the source zone) of a table, by created_at."""

    rows: int
    request_count: int
    created_min: datetime
    created_max: datetime
    fingerprint: int  # the sum of the day's row fingerprints
    active: int = 0  # rows with expires_at after the instant asked for (the target's profile)


def _profile(
    conn: psycopg.Connection,
    table: sql.Composable,
    fingerprint: sql.Composable,
    zone: str,
    active_at: datetime | None = None,
) -> dict[str, _Day]:
    """Per-day counts, sums, extremes and summed row fingerprints of a table, in one scan;
    with ``active_at``, also the rows whose expires_at is later (the active sessions)."""
    query = sql.SQL(
        """SELECT (created_at AT TIME ZONE %s::pg_catalog.text)::pg_catalog.date,
                  pg_catalog.count(*), pg_catalog.sum(request_count),
                  pg_catalog.min(created_at), pg_catalog.max(created_at),
                  pg_catalog.sum({fingerprint}),
                  pg_catalog.count(*) FILTER (
                      WHERE expires_at OPERATOR(pg_catalog.>) %s::pg_catalog.timestamptz)
           FROM {table} GROUP BY 1"""
    ).format(fingerprint=fingerprint, table=table)
    return {
        day.isoformat(): _Day(n, int(total), low, high, int(prints), active)
        for day, n, total, low, high, prints, active in conn.execute(query, (zone, active_at))
    }


def _read_source(
    conn: psycopg.Connection,
    backup: Backup,
    rules: Rules,
    rejects: dict[int, dict],
    tally: _Tally,
    batch_rows: int,
    progress: Callable[[int], None] | None,
) -> _SourceSide:
    """Copy every source row that can land into the temporary table; check the rest."""
    side = _SourceSide()

    def unaccounted(reject: Reject) -> None:
        tally.note(
            "unaccounted",
            reject.session_id,
            reject.rowid,
            f"cannot land ({reject.reason}) and is not in the rejects table",
        )

    def recorded(raw: tuple) -> None:
        """Re-derive a recorded reject from the source row by the rules, never trusting the
        rejects table: same raw values, same reason, or proof that it could not land."""
        rowid = raw[0]
        side.seen_rejects.add(rowid)
        claim = rejects[rowid]
        key = _decoded_key(raw)
        if key is not None and claim["reason"] != "duplicate_session_id":
            side.rejected_keys.append(key)  # then no row of PostgreSQL may have it
        derived = normalise(raw, rules)
        if not isinstance(derived, Reject) and claim["reason"] not in (
            "refused_by_postgresql",
            "duplicate_session_id",
        ):
            side.landable.append(derived)
        if claim["raw"] != raw_record(raw, rules.extra_columns):
            tally.note(
                "reject_mismatch", key, rowid, "the reject's raw values do not match the source row"
            )
            return
        if isinstance(derived, Reject):
            if derived.reason != claim["reason"]:
                tally.note(
                    "reject_mismatch",
                    key,
                    rowid,
                    f"recorded as {claim['reason']}, but the rules reject it as {derived.reason}",
                )
        elif claim["reason"] == "refused_by_postgresql":
            side.refused.append((rowid, derived))
        elif claim["reason"] == "duplicate_session_id":
            side.duplicates.append((rowid, derived.session_id))
        else:
            tally.note(
                "false_reject",
                derived.session_id,
                rowid,
                f"recorded as {claim['reason']}, but the rules accept the row: it should have "
                "landed",
            )

    streamed = stream_backup(
        conn,
        backup,
        rules,
        _SOURCE,
        on_reject=unaccounted,
        divert=rejects,
        on_diverted=recorded,
        fast=ExpectedPath(rules.zone),  # not migrate's fast path: see ``expected``
        batch_rows=batch_rows,
        progress=progress,
    )
    side.rows = streamed.read
    return side


_LANDABLE = sql.Identifier("pg_temp", "sessionmig_landable_rejects")


def _should_have_landed(conn: psycopg.Connection, side: _SourceSide) -> sql.Composable:
    """The rows that should have landed, as ``(session_id, expires_at)``: the copied rows and
    those recorded as rejects although the rules land them (``false_reject``)."""
    rows = sql.SQL("SELECT session_id, expires_at FROM {}").format(_SOURCE)
    if not side.landable:
        return rows
    conn.execute(
        sql.SQL(
            'CREATE TEMP TABLE {} (session_id pg_catalog.text COLLATE pg_catalog."C", '
            "expires_at pg_catalog.timestamptz) ON COMMIT DROP"
        ).format(_LANDABLE)
    )
    with conn.cursor().copy(sql.SQL("COPY {} FROM STDIN").format(_LANDABLE)) as copy:
        for session in side.landable:
            copy.write_row((session.session_id, session.expires_at))
    return sql.SQL("{} UNION ALL SELECT session_id, expires_at FROM {}").format(rows, _LANDABLE)


def _offer_refused(conn: psycopg.Connection, side: _SourceSide, tally: _Tally) -> None:
    """Offer each row recorded as ``refused_by_postgresql`` to the server again, in a
    savepoint that is always rolled back: a reject the server would now take is false."""
    statement = sql.SQL("COPY {} FROM STDIN (FORMAT BINARY)").format(_SOURCE)
    for rowid, session in side.refused:
        try:
            with (
                conn.transaction(force_rollback=True),
                conn.cursor() as cur,
                cur.copy(statement) as copy,
            ):
                copy.set_types(WIRE_TYPES)
                copy.write_row(as_wire(session))
        except REFUSALS:
            continue
        tally.note(
            "false_reject",
            session.session_id,
            rowid,
            "recorded as refused_by_postgresql, but PostgreSQL accepts the row",
        )


def _check_duplicates(
    backup: Backup, side: _SourceSide, rejects: dict[int, dict], tally: _Tally
) -> None:
    """A ``duplicate_session_id`` reject holds only when exactly one row with its session_id
    landed, and that row comes earlier in the backup (the documented rule: first one lands).
    Found in the backup itself, by SQLite's own reading of the key, not by migrate's code."""
    keys = sorted({key for _, key in side.duplicates})
    holders: dict[str, list[int]] = {}
    for start in range(0, len(keys), 500):
        chunk = keys[start : start + 500]
        marks = ", ".join("?" * len(chunk))
        found = backup.query(
            "SELECT rowid, CAST(session_id AS TEXT) FROM sessions "
            f"WHERE CAST(session_id AS TEXT) IN ({marks})",
            tuple(chunk),
        )
        for rowid, value in found:
            holders.setdefault(value.decode("utf-8", "replace"), []).append(rowid)
    for rowid, key in side.duplicates:
        landed = sorted(r for r in holders.get(key, ()) if r not in rejects)
        if len(landed) != 1 or landed[0] > rowid:
            tally.note(
                "false_reject",
                key,
                rowid,
                "recorded as duplicate_session_id, but no earlier row with its session_id landed",
            )


def _repeated_keys(conn: psycopg.Connection, tally: _Tally) -> None:
    """Source rows that would land under one session_id: the target can hold only one."""
    query = sql.SQL(
        "SELECT session_id, pg_catalog.count(*) FROM {} GROUP BY session_id "
        "HAVING pg_catalog.count(*) OPERATOR(pg_catalog.>) 1 ORDER BY session_id " + _C
    ).format(_SOURCE)
    for key, n in conn.execute(query):
        for _ in range(n - 1):
            tally.note(
                "duplicate",
                key,
                None,
                f"{n} landable source rows share this session_id and only one is recorded as "
                "landing",
            )


def _compare(conn: psycopg.Connection, schema: str) -> dict[str, int]:
    """Counts of matched / changed / missing / extra rows, from one full join in PostgreSQL."""
    query = sql.SQL(
        """SELECT pg_catalog.count(*) FILTER (WHERE t.session_id IS NULL),
                  pg_catalog.count(*) FILTER (WHERE s.session_id IS NULL),
                  pg_catalog.count(*) FILTER (WHERE s.session_id IS NOT NULL
                                              AND t.session_id IS NOT NULL AND NOT ({same})),
                  pg_catalog.count(*) FILTER (WHERE {same})
           FROM {source} s FULL JOIN {target} t ON {join}"""
    ).format(
        same=sql.SQL(_SAME),
        join=sql.SQL(_JOIN),
        source=_SOURCE,
        target=sql.Identifier(schema, "sessions"),
    )
    missing, extra, changed, matched = conn.execute(query).fetchone()  # type: ignore[misc]
    return {"missing": missing, "extra": extra, "changed": changed, "matched": matched}


_IN_TARGET = ("matched", "changed", "extra", "changed_by_app", "created_after_cutover", "appeared")
_BOTH = "s.session_id IS NOT NULL AND t.session_id IS NOT NULL"
# Per column, for a session in both: what nothing in the app explains. The cutoff is bound as
# %(cutoff)s: before it the backup was taken (see _cutoff).
_UNEXPLAINED_IN_BOTH = {
    "user_id_changed": f"NOT {_SAME_USER}",
    "metadata_changed": f"NOT {_SAME_METADATA}",
    "created_at_changed": _op("s.created_at", "<>", "t.created_at"),
    "request_count_decreased": _op("t.request_count", "<", "s.request_count"),
    "last_activity_backwards": _op("t.last_activity", "<", "s.last_activity"),
    "expires_at_backwards": _op("t.expires_at", "<", "s.expires_at"),
    "revived": f"""{_op("s.expires_at", "<=", "%(cutoff)s")}
                   AND ({_op("t.expires_at", ">", "s.expires_at")}
                        OR {_op("t.last_activity", ">", "s.last_activity")}
                        OR {_op("t.request_count", ">", "s.request_count")})""",
}
_EXPLAINED_IN_BOTH = {
    "later_last_activity": _op("t.last_activity", ">", "s.last_activity"),
    "higher_request_count": _op("t.request_count", ">", "s.request_count"),
    "later_expires_at": _op("t.expires_at", ">", "s.expires_at"),
}
_AFTER_BACKUP = f"coalesce({_op('t.created_at', '>', '%(cutoff)s')}, false)"


def _unexplained_row() -> str:
    return "(" + " OR ".join(f"({c})" for c in _UNEXPLAINED_IN_BOTH.values()) + ")"


def _cutoff(conn: psycopg.Connection, run_id: str | None, schema: str) -> datetime | None:
    """When the backup was taken, at the latest as its own rows tell: its newest created_at (a
    session created after the backup was taken is created after every session in it), capped
    by the start of the migrate run that loaded it (a future-dated row cannot push it later)."""
    row = conn.execute(
        sql.SQL(
            "SELECT least((SELECT pg_catalog.max(created_at) FROM {}), "
            "(SELECT started_at FROM {} WHERE run_id OPERATOR(pg_catalog.=) %s::pg_catalog.text))"
        ).format(_SOURCE, sql.Identifier(schema, "session_migration_runs")),
        (run_id,),
    ).fetchone()
    return row[0] if row else None


def _classify(conn: psycopg.Connection, schema: str, cutoff: datetime | None) -> dict[str, int]:
    """``after_cutover``: every difference counted as explained by the app or not, from one
    full join in PostgreSQL (nothing of either table is pulled into Python)."""
    unexplained = _unexplained_row()
    filters: dict[str, str] = {
        "matched": f"{_BOTH} AND {_SAME}",
        "ended": "t.session_id IS NULL",
        "created_after_cutover": f"s.session_id IS NULL AND {_AFTER_BACKUP}",
        "appeared": f"s.session_id IS NULL AND NOT {_AFTER_BACKUP}",
        "changed": f"{_BOTH} AND NOT ({_SAME}) AND {unexplained}",
        "changed_by_app": f"{_BOTH} AND NOT ({_SAME}) AND NOT {unexplained}",
        **{k: f"{_BOTH} AND ({c})" for k, c in _UNEXPLAINED_IN_BOTH.items()},
        **{
            k: f"{_BOTH} AND NOT ({_SAME}) AND NOT {unexplained} AND ({c})"
            for k, c in _EXPLAINED_IN_BOTH.items()
        },
    }
    query = sql.SQL("SELECT {} FROM {} s FULL JOIN {} t ON {}").format(
        sql.SQL(", ").join(
            sql.SQL(f"pg_catalog.count(*) FILTER (WHERE {c})") for c in filters.values()
        ),
        _SOURCE,
        sql.Identifier(schema, "sessions"),
        sql.SQL(_JOIN),
    )
    row = conn.execute(query, {"cutoff": cutoff}).fetchone()
    assert row is not None
    return {"missing": 0, "extra": 0, **dict(zip(filters, row, strict=True))}


def _name_unexplained(
    conn: psycopg.Connection,
    backup: Backup,
    schema: str,
    tally: _Tally,
    limit: int,
    cutoff: datetime | None,
) -> None:
    """``after_cutover``: fetch up to ``limit`` rows with a difference nothing explains and
    name, for each, the rules it breaks and its fields."""
    columns = sql.SQL(
        "{p}.session_id, {p}.user_id, {p}.metadata::pg_catalog.text, {p}.created_at, "
        "{p}.expires_at, {p}.last_activity, {p}.request_count"
    )
    kinds = list(_UNEXPLAINED_IN_BOTH)
    query = sql.SQL(
        """SELECT {s_cols}, {t_cols}, {flags}
           FROM {source} s FULL JOIN {target} t ON {join}
           WHERE (s.session_id IS NULL AND NOT {after})
              OR ({both} AND {unexplained})
           ORDER BY coalesce(s.session_id, t.session_id) COLLATE pg_catalog."C"
           LIMIT %(limit)s"""
    ).format(
        s_cols=columns.format(p=sql.Identifier("s")),
        t_cols=columns.format(p=sql.Identifier("t")),
        flags=sql.SQL(", ").join(
            sql.SQL(f"coalesce({_BOTH} AND ({c}), false)") for c in _UNEXPLAINED_IN_BOTH.values()
        ),
        after=sql.SQL(_AFTER_BACKUP),
        both=sql.SQL(_BOTH),
        unexplained=sql.SQL(_unexplained_row()),
        join=sql.SQL(_JOIN),
        source=_SOURCE,
        target=sql.Identifier(schema, "sessions"),
    )
    for row in conn.execute(query, {"cutoff": cutoff, "limit": limit}).fetchall():
        source, target, flags = row[:7], row[7:14], row[14:]
        if source[0] is None:
            shown = cutoff.isoformat() if cutoff else "unknown"
            key, kind = target[0], "appeared"
            detail = (
                f"in PostgreSQL, not in the backup, created {target[3].isoformat()}: before the "
                f"backup was taken ({shown}), so no session created since explains it"
            )
            rowid = None
        else:
            key = source[0]
            broken = [k for k, flag in zip(kinds, flags, strict=True) if flag]
            kind = broken[0]
            detail = f"{', '.join(broken)}: " + "; ".join(field_diff(source, target))
            found = backup.query("SELECT rowid FROM sessions WHERE session_id = ?", (key,))
            rowid = (found.fetchone() or (None,))[0]
        tally.differences.append(Difference(kind, tally.mask(key), rowid, detail))


def _name_differences(
    conn: psycopg.Connection, backup: Backup, schema: str, tally: _Tally, limit: int
) -> None:
    """Fetch up to ``limit`` differing rows and describe each, field by field."""
    columns = sql.SQL(
        "{p}.session_id, {p}.user_id, {p}.metadata::pg_catalog.text, {p}.created_at, "
        "{p}.expires_at, {p}.last_activity, {p}.request_count"
    )
    query = sql.SQL(
        """SELECT {s_cols}, {t_cols}
           FROM {source} s FULL JOIN {target} t ON {join}
           WHERE s.session_id IS NULL OR t.session_id IS NULL OR NOT ({same})
           ORDER BY coalesce(s.session_id, t.session_id) COLLATE pg_catalog."C" LIMIT %s"""
    ).format(
        s_cols=columns.format(p=sql.Identifier("s")),
        t_cols=columns.format(p=sql.Identifier("t")),
        same=sql.SQL(_SAME),
        join=sql.SQL(_JOIN),
        source=_SOURCE,
        target=sql.Identifier(schema, "sessions"),
    )
    for row in conn.execute(query, (limit,)).fetchall():
        source, target = row[:7], row[7:]
        if target[0] is None:
            key = source[0]
            detail, kind = "in the source, not in PostgreSQL", "missing"
        elif source[0] is None:
            key = target[0]
            detail, kind = "in PostgreSQL, not in the source", "extra"
        else:
            key = source[0]
            detail, kind = "; ".join(field_diff(source, target)), "changed"
        rowid = None
        if kind != "extra":
            found = backup.query("SELECT rowid FROM sessions WHERE session_id = ?", (key,))
            rowid = (found.fetchone() or (None,))[0]
        tally.differences.append(Difference(kind, tally.mask(key), rowid, detail))


def reconcile(
    dsn: str,
    backup: Backup,
    rules: Rules,
    *,
    schema: str = D.TARGET_SCHEMA,
    as_of: datetime,
    batch_rows: int = D.BATCH_ROWS,
    run_id: str | None = None,
    mask: Callable[[str | None], str] = mask_id,
    progress: Callable[[int], None] | None = None,
    mode: str = STRICT,
    app_check: bool = False,
) -> ReconcileResult:
    """Compare every source row and column with the target; see the module docstring.
    ``mode`` is ``strict`` (every difference fails) or ``after_cutover`` (differences the
    application explains are counted, the others fail). ``app_check``: also ask the new
    ``SessionManager`` which sessions it accepts at ``as_of`` (:mod:`sessionmig.engines.appcheck`),
    against the same reading of the backup."""
    if mode not in MODES:
        raise ParameterError(
            f"reconcile_mode={mode!r}: give strict (right after migrate: any difference fails) "
            "or after_cutover (once the app serves from PostgreSQL)"
        )
    conn = connect(dsn, "reconcile")  # raises TargetUnreachable/TargetRefused, redacted
    try:
        asked = None
        if app_check:
            # The app reads the table only once the shape says what it reads can be trusted.
            with conn.transaction():
                conn.execute("SELECT pg_catalog.set_config('row_security', 'off', true)")
                check_shape(conn, schema)
            asked = ask_the_app(conn, dsn, schema, as_of, mode == AFTER_CUTOVER, mask)
        return _reconcile(
            conn, dsn, backup, rules, schema, as_of, batch_rows, run_id, mask, progress, mode, asked
        )
    except psycopg.Error as exc:
        # A target damaged in a way the shape check cannot see, or lost mid-way: one line that
        # says so, never a traceback. The detail is left out: it can quote a key.
        raise TargetError(
            f"reconcile could not read the target (SQLSTATE {exc.sqlstate}: "
            f"{exc.diag.message_primary or type(exc).__name__}); nothing was changed. Check "
            f"the target's {schema} tables against the Alembic revision and run again"
        ) from None
    finally:
        conn.close()


EXPECTED_TYPES = {
    "session_id": "text",
    "user_id": "text",
    "metadata": "jsonb",
    "created_at": "timestamp with time zone",
    "expires_at": "timestamp with time zone",
    "last_activity": "timestamp with time zone",
    "request_count": "integer",
}
"""What every column of the target's sessions must be for a comparison to mean anything."""

RELATION_KINDS = {
    "v": "view",
    "m": "materialized view",
    "f": "foreign table",
    "p": "partitioned table",
    "S": "sequence",
    "c": "composite type",
    "i": "index",
    "I": "partitioned index",
    "t": "TOAST table",
}
"""What ``pg_class.relkind`` says a relation is, for every kind but an ordinary table."""

_RESTORE = "Restore it (alembic upgrade head on an empty schema, then migrate) before reconciling"


def check_shape(conn: psycopg.Connection, schema: str) -> None:
    """Refuse, by name, a target whose ``sessions`` a read could see otherwise than as the rows
    migrate stored: not an ordinary table (a view, a materialized view, a foreign or a
    partitioned table shows rows computed or kept elsewhere); a column missing, retyped, or
    under a collation that is not bytewise (``session_id``: ``"C"``, as revision 0002 sets)
    or not deterministic (another text column), where different texts compare equal; a rule;
    inheritance children, whose rows a read of the table includes; row-level security that
    applies to this role, whose policies can hide rows. The table is locked against DDL
    (``ACCESS SHARE``, as any read takes) for the rest of the transaction, so what was checked
    stays true while it is read. Raises :class:`TargetError` with what, where and what to do."""
    name = f"{schema}.sessions"
    table = sql.Identifier(schema, "sessions").as_string(conn)
    shape = (
        "SELECT c.oid, c.relkind FROM pg_catalog.pg_class c "
        "WHERE c.oid OPERATOR(pg_catalog.=) pg_catalog.to_regclass(%s::pg_catalog.text)"
    )
    found = conn.execute(shape, (table,)).fetchone()
    if found is None:
        raise TargetError(
            f"the target has no sessions table in schema {schema!r}; run migrate first (or "
            "check target_schema and the DSN's database)"
        )
    oid, kind = found
    if kind != "r":
        what = RELATION_KINDS.get(kind, f"relation of kind {kind!r}")
        raise TargetError(
            f"the target's {name} is a {what}, not an ordinary table: what it shows need not "
            f"be the rows migrate stored, so reconcile cannot prove anything from it. {_RESTORE}"
        )
    conn.execute(
        sql.SQL("LOCK TABLE ONLY {} IN ACCESS SHARE MODE").format(
            sql.Identifier(schema, "sessions")
        )
    )
    if conn.execute(shape, (table,)).fetchone() != (oid, "r"):
        raise TargetError(
            f"the target's {name} was replaced while reconcile checked it; run reconcile again"
        )
    wrong = _wrong_columns(conn, oid)
    if wrong:
        raise TargetError(
            f"the target's {name} is not the table migrate wrote: "
            + "; ".join(wrong)
            + ". "
            + _RESTORE
        )
    rules = [
        r
        for (r,) in conn.execute(
            "SELECT rulename::pg_catalog.text FROM pg_catalog.pg_rewrite "
            "WHERE ev_class OPERATOR(pg_catalog.=) %s ORDER BY 1",
            (oid,),
        )
    ]
    if rules:
        raise TargetError(
            f"the target's {name} has rules ({', '.join(rules)}): a rule rewrites what a "
            "statement on the table does, so its rows cannot be trusted as migrate wrote them. "
            f"Have the table's owner drop them (DROP RULE … ON {name}), or restore the table, "
            "then reconcile"
        )
    children = [
        c
        for (c,) in conn.execute(
            "SELECT i.inhrelid::pg_catalog.regclass::pg_catalog.text FROM pg_catalog.pg_inherits i "
            "WHERE i.inhparent OPERATOR(pg_catalog.=) %s ORDER BY 1",
            (oid,),
        )
    ]
    if children:
        raise TargetError(
            f"the target's {name} has inheritance children ({', '.join(children)}): a read of "
            "the table includes their rows. Detach them (ALTER TABLE … NO INHERIT "
            f"{name}) or restore the table, then reconcile"
        )
    row = conn.execute(
        "SELECT pg_catalog.row_security_active(%s::pg_catalog.oid), c.relforcerowsecurity, "
        "CURRENT_USER::pg_catalog.text FROM pg_catalog.pg_class c "
        "WHERE c.oid OPERATOR(pg_catalog.=) %s",
        (oid, oid),
    ).fetchone()
    if row is not None and row[0]:
        forced = " (forced on its owner too)" if row[1] else ""
        raise TargetError(
            f"row-level security applies to the target's {name} for role {row[2]!r}{forced}: "
            "its policies can hide rows from the proof. Reconcile as a role it does not apply "
            "to (a superuser, a role with BYPASSRLS, or the table's owner without FORCE ROW "
            "LEVEL SECURITY)"
        )


def _wrong_columns(conn: psycopg.Connection, oid: int) -> list[str]:
    """Each column of the table with ``oid`` that is missing, of another type, or under a
    collation the comparison cannot trust."""
    found = {
        column: (kind, collation, deterministic)
        for column, kind, collation, deterministic in conn.execute(
            """SELECT a.attname::pg_catalog.text, pg_catalog.format_type(a.atttypid, NULL),
                      CASE WHEN co.oid IS NOT NULL THEN pg_catalog.quote_ident(n.nspname)
                           OPERATOR(pg_catalog.||) '.'
                           OPERATOR(pg_catalog.||) pg_catalog.quote_ident(co.collname) END,
                      co.collisdeterministic
               FROM pg_catalog.pg_attribute a
               LEFT JOIN pg_catalog.pg_collation co
                      ON co.oid OPERATOR(pg_catalog.=) a.attcollation
               LEFT JOIN pg_catalog.pg_namespace n
                      ON n.oid OPERATOR(pg_catalog.=) co.collnamespace
               WHERE a.attrelid OPERATOR(pg_catalog.=) %s
                 AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped""",
            (oid,),
        )
    }
    wrong = []
    for column, kind in EXPECTED_TYPES.items():
        if column not in found:
            wrong.append(f"{column} is missing")
            continue
        have, collation, deterministic = found[column]
        if have != kind:
            wrong.append(f"{column} is {have} (expected {kind})")
        elif column == "session_id" and collation != 'pg_catalog."C"':
            shown = (collation or "none").removeprefix("pg_catalog.")
            wrong.append(
                f'session_id has collation {shown} (expected "C", byte by byte, as revision '
                "0002 sets: under another collation different tokens can compare equal)"
            )
        elif kind == "text" and deterministic is False:
            wrong.append(
                f"{column} has collation {collation}, which is not deterministic (texts that "
                "differ compare equal under it)"
            )
    return wrong


def _reconcile(
    conn: psycopg.Connection,
    dsn: str,
    backup: Backup,
    rules: Rules,
    schema: str,
    as_of: datetime,
    batch_rows: int,
    run_id: str | None,
    mask: Callable[[str | None], str],
    progress: Callable[[int], None] | None,
    mode: str = STRICT,
    asked: Asked | None = None,
) -> ReconcileResult:
    tally = _Tally(mask)
    if mode == AFTER_CUTOVER:
        tally.counts.update(dict.fromkeys((*EXPLAINED, *UNEXPLAINED), 0))
    seed = new_seed()
    with conn:
        # One snapshot for every query. Not READ ONLY: the source rows go to a temporary
        # table, which dies with the transaction; nothing else is written.
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        if asked is not None:
            same_session(conn, asked)  # behind a transaction pooler: refused before any work
        conn.execute("SELECT set_config('work_mem', %s, true)", (WORK_MEM,))
        # A policy that would filter what this role reads is an error, never a silent filter.
        conn.execute("SELECT pg_catalog.set_config('row_security', 'off', true)")
        check_shape(conn, schema)
        run_id = run_id or latest_migrate_run(conn, schema)
        rejects = rejects_of_run(conn, schema, run_id)
        recorded_sha256 = _recorded_sha256(conn, schema, run_id)
        _create_source_table(conn, seed)
        # The target's profile needs no source row: a second connection computes it in this
        # transaction's snapshot while this one streams the source, on the server's idle core.
        zone = getattr(rules.zone, "key", "UTC")
        snapshot = conn.execute("SELECT pg_export_snapshot()").fetchone()[0]  # type: ignore[index]
        target_profile = in_background(
            _profile_in_snapshot, dsn, snapshot, schema, zone, seed, as_of
        )
        side = _read_source(conn, backup, rules, rejects, tally, batch_rows, progress)
        _offer_refused(conn, side, tally)
        _check_duplicates(backup, side, rejects, tally)
        if not backup.session_id_unique or _has_number_keys(backup):
            _repeated_keys(conn, tally)
        parity = _parity(backup, as_of, rules, rejects)
        # The source is read (bar the rowids of differences to name): hash it again while the
        # server works.
        unchanged_source = backup.verify_unchanged_later()
        source = _profile(conn, _SOURCE, sql.Identifier("fingerprint"), zone)
        target = target_profile.result()
        # In the target's own scan, in this transaction's snapshot: no second pass over it.
        parity["active_postgres"] = sum(day.active for day in target.values())
        cutoff = _cutoff(conn, run_id, schema) if mode == AFTER_CUTOVER else None
        fingerprints_agree = _same_rows(source, target)
        if fingerprints_agree:
            compared = {"missing": 0, "extra": 0, "changed": 0}
            compared["matched"] = sum(day.rows for day in source.values())
        elif mode == AFTER_CUTOVER:
            compared = _classify(conn, schema, cutoff)
        else:
            compared = _compare(conn, schema)
        for kind, n in compared.items():
            tally.counts[kind] += n
        room = max(0, MAX_DIFFERENCES - len(tally.differences))
        if mode == AFTER_CUTOVER:
            if any(compared.get(k) for k in ("changed", *UNEXPLAINED)):
                _name_unexplained(conn, backup, schema, tally, room, cutoff)
        elif compared["missing"] or compared["extra"] or compared["changed"]:
            _name_differences(conn, backup, schema, tally, room)
        for key in sorted(_present(conn, schema, side.rejected_keys)):
            tally.note("both", key, None, "rejected and also present in PostgreSQL")
        for rowid, recorded in rejects.items():
            if rowid not in side.seen_rejects:
                tally.note(
                    "orphan_reject",
                    recorded["session_id"],
                    rowid,
                    "a reject for a rowid the source does not have",
                )
        target_rows = sum(compared.get(k, 0) for k in _IN_TARGET)
        parity.update(_distributions(source, target))
        # Two readings of one pair of tables: the fingerprints, and the row-by-row comparison.
        # When the first says the rows differ and the second finds nothing, the target reads
        # differently by hash and by equality, and neither can be trusted.
        parity["fingerprints_agree"] = fingerprints_agree
        parity["readings_agree"] = fingerprints_agree or any(
            n for k, n in compared.items() if k != "matched"
        )
        if mode == AFTER_CUTOVER:
            parity["reconcile_mode"] = mode
            parity["backup_taken_not_before"] = cutoff.isoformat() if cutoff else None
        # While the source's rows are still on the server: the app's answers against them.
        app = compare(conn, _should_have_landed(conn, side), asked) if asked else None
        unchanged_source.result()
    counts = tally.counts
    # In after_cutover a landed row the app ended since is still a row that landed.
    migrated = counts["matched"] + counts["changed"] + counts.get("changed_by_app", 0)
    migrated += counts.get("ended", 0)
    rejected = len(side.seen_rejects)
    other_source = []
    if recorded_sha256 is not None and recorded_sha256 != backup.sha256:
        other_source.append(
            f"migrate run {run_id} recorded source sha256 {recorded_sha256[:16]}…, but this "
            f"backup is {backup.sha256[:16]}…: the rows match this file, not necessarily the "
            "one that was migrated"
        )
    verdict, reason, warnings = _verdict(counts, rejected, parity, run_id, other_source, mode)
    return ReconcileResult(
        run_id=run_id,
        source_rows=side.rows,
        target_rows=target_rows,
        migrated=migrated,
        rejected=rejected,
        matched=counts["matched"],
        counts=counts,
        differences=tally.differences,
        parity=parity,
        verdict=verdict,
        reason=reason,
        warnings=warnings,
        mode=mode,
        app=app,
    )


def _has_number_keys(backup: Backup) -> bool:
    """Whether any session_id is stored as a number (then ``1`` and ``'1'`` are one key)."""
    found = backup.query("SELECT EXISTS (SELECT 1 FROM sessions WHERE session_id < '')")
    return bool(found.fetchone()[0])


def _profile_in_snapshot(
    dsn: str, snapshot: str, schema: str, zone: str, seed: int, as_of: datetime
) -> dict[str, _Day]:
    """:func:`_profile` of the target, on its own connection, in an exported snapshot."""
    with connect(dsn, "reconcile-target") as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        # A utility statement takes no bound parameters; the id is the server's, quoted.
        conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
        conn.execute("SELECT pg_catalog.set_config('row_security', 'off', true)")
        return _profile(conn, sql.Identifier(schema, "sessions"), row_hash(seed), zone, as_of)


def _same_rows(source: dict[str, _Day], target: dict[str, _Day]) -> bool:
    """Whether both tables hold the same rows: every day's count and fingerprint sum agree
    (a difference that cancels out needs seeded 64-bit hashes to collide: see
    :func:`row_hash`)."""
    return source.keys() == target.keys() and all(
        (day.rows, day.fingerprint) == (target[d].rows, target[d].fingerprint)
        for d, day in source.items()
    )


def _totals(days: dict[str, _Day]) -> tuple[int, datetime | None, datetime | None]:
    values = days.values()
    return (
        sum(d.request_count for d in values),
        min((d.created_min for d in values), default=None),
        max((d.created_max for d in values), default=None),
    )


def _distributions(source: dict[str, _Day], target: dict[str, _Day]) -> dict[str, Any]:
    """A second signal: per-day counts, request_count sums and created_at extremes of the
    source's rows (as normalised into the temporary table) and of the target's."""
    src_sum, src_low, src_high = _totals(source)
    total, low, high = _totals(target)
    days_differing = sorted(
        d
        for d in set(source) | set(target)
        if (source[d].rows if d in source else 0) != (target[d].rows if d in target else 0)
    )
    return {
        "sum_request_count_source": src_sum,
        "sum_request_count_target": total,
        "created_min_source": src_low.isoformat() if src_low else None,
        "created_min_target": low.isoformat() if low else None,
        "created_max_source": src_high.isoformat() if src_high else None,
        "created_max_target": high.isoformat() if high else None,
        "days_compared": len(set(source) | set(target)),
        "days_with_different_counts": days_differing[:20],
        # Rows per day on each side, for the report's chart (a day is a short key: a few
        # hundred entries for a year of sessions).
        "per_day": {
            d: [source[d].rows if d in source else 0, target[d].rows if d in target else 0]
            for d in sorted(set(source) | set(target))
        },
        "distributions_agree": not days_differing
        and src_sum == total
        and src_low == low
        and src_high == high,
    }


def _parity(
    backup: Backup, as_of: datetime, rules: Rules, rejects: dict[int, dict]
) -> dict[str, Any]:
    """Application-level signals: active sessions by the legacy rule on the backup (the
    caller adds PostgreSQL's count, ``active_postgres``, from the target's profile)."""
    # The legacy app compared naive local datetime.now() with the stored text: a string compare.
    local_now = as_of.astimezone(rules.zone).replace(tzinfo=None).isoformat(" ")
    legacy_active = backup.query(
        "SELECT count(*) FROM sessions WHERE expires_at > ?", (local_now,)
    ).fetchone()[0]
    rejected_active = 0
    rowids = sorted(rejects)
    for start in range(0, len(rowids), 500):
        chunk = rowids[start : start + 500]
        marks = ", ".join("?" * len(chunk))
        rejected_active += backup.query(
            f"SELECT count(*) FROM sessions WHERE expires_at > ? AND rowid IN ({marks})",
            (local_now, *chunk),
        ).fetchone()[0]
    return {
        "as_of": as_of.isoformat(),
        "active_legacy_rule_sqlite": legacy_active,
        "active_legacy_rule_sqlite_excluding_rejects": legacy_active - rejected_active,
        "active_postgres": None,
    }


def _verdict(
    counts: dict[str, int],
    rejected: int,
    parity: dict[str, Any],
    run_id: str | None,
    noted: list[str],
    mode: str = STRICT,
) -> tuple[str, str, list[str]]:
    after = mode == AFTER_CUTOVER
    if parity.get("readings_agree") is False:
        return (
            FAIL,
            "the row fingerprints differ between the source and PostgreSQL, yet comparing "
            "row by row finds every row the same: the target reads differently by hash and by "
            "equality (an operator, a collation or a definition of its own?), so nothing it "
            "shows can be trusted; do not cut over, and have the target's sessions table "
            "checked",
            list(noted),
        )
    broken = {k: v for k, v in counts.items() if k != "matched" and v and k not in EXPLAINED}
    if broken:
        summary = ", ".join(f"{v} {k}" for k, v in broken.items())
        label = "after_cutover: differences the application does not explain" if after else ""
        return FAIL, f"{label or 'rows differ or are unaccounted for'}: {summary}", list(noted)
    if after:
        return _verdict_after_cutover(counts, rejected, run_id, noted)
    warnings = _run_warnings(rejected, run_id, noted)
    if parity["active_legacy_rule_sqlite_excluding_rejects"] != parity["active_postgres"]:
        warnings.append(
            "active sessions differ between the legacy string comparison on SQLite "
            f"({parity['active_legacy_rule_sqlite_excluding_rejects']}) and PostgreSQL "
            f"({parity['active_postgres']}): rows with offsets or 'T' spellings compare "
            "differently as text; the instants themselves all match"
        )
    if not parity["distributions_agree"]:
        return FAIL, "per-day counts, request_count sums or created_at extremes differ", warnings
    if warnings:
        return WARN, "every row is accounted for; " + "; ".join(warnings), warnings
    return PASS, "every source row is in PostgreSQL with identical values", []


def _run_warnings(rejected: int, run_id: str | None, noted: list[str]) -> list[str]:
    """What every passing verdict says beside the rows: no migrate run on record, rejects."""
    warnings = list(noted)
    if run_id is None:
        warnings.append("no committed migrate run found on the target")
    if rejected:
        warnings.append(
            f"{rejected} source rows were rejected; each is in "
            "session_migration_rejects with its raw values"
        )
    return warnings


def _verdict_after_cutover(
    counts: dict[str, int], rejected: int, run_id: str | None, noted: list[str]
) -> tuple[str, str, list[str]]:
    """No unexplained difference: PASS, saying what the application changed. Distributions
    and the active count move with the app by design, so they are reported, not judged."""
    warnings = _run_warnings(rejected, run_id, noted)
    found = ", ".join(f"{counts[k]} {k}" for k in EXPLAINED if counts[k])
    reason = (
        "after_cutover: every source row is accounted for and every difference is one the "
        "application explains" + (f" ({found})" if found else " (none found)")
    )
    if warnings:
        return WARN, reason + "; " + "; ".join(warnings), warnings
    return PASS, reason, []
