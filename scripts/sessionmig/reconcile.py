"""Prove the migration: every source row is in PostgreSQL with the same meaning, or rejected.

The source is read again, raw, and normalised by the same rules migrate applies (``copyin``),
into a temporary table on the target, so that nothing of the target is pulled into Python.
PostgreSQL fingerprints every row of both tables (a 64-bit hash of all columns — jsonb by
value, times to the microsecond) and sums the fingerprints per day: when every day agrees, the
tables hold the same rows. When one does not, a full join on ``session_id`` compares every
column and counts each difference; the differing rows (missing, extra, changed) are fetched,
at most :data:`MAX_DIFFERENCES`, and described field by field. Rows recorded as
rejects are not copied: their raw values are checked against what the rejects table claims,
and the partition source = migrated + rejected is proved. Distributions (per-day counts, sums,
extremes) and the legacy active-session rule give second signals. The temporary table needs
the TEMP privilege on the target database and disk for one copy of the sessions; it is
dropped at the end.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import sql

from .copyin import stream_backup
from .errors import TargetError
from .mask import mask_id
from .source import Backup, in_background
from .transform import COLUMNS, Reject, Rules, raw_record

PASS, WARN, FAIL = "PASS", "PASS_WITH_WARNINGS", "FAIL"
MAX_DIFFERENCES = 200


@dataclass(frozen=True)
class Difference:
    """One row that breaks the partition or differs, with the id hashed."""

    kind: str  # missing | extra | changed | both | reject_mismatch | unaccounted | orphan_reject
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

    @property
    def partition_holds(self) -> bool:
        return self.source_rows == self.migrated + self.rejected and not any(
            self.counts[k] for k in ("both", "missing", "unaccounted", "orphan_reject")
        )


def canonical_json(value: Any) -> Any:
    """A JSON value in a form where equal means equal in jsonb (``true`` is not ``1``)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float | Decimal):
        return ("number", Decimal(str(value)).normalize() if not isinstance(value, int) else value)
    if isinstance(value, list):
        return [canonical_json(v) for v in value]
    return {k: canonical_json(v) for k, v in value.items()}


def _json(text: str | None) -> Any:
    return None if text is None else canonical_json(json.loads(text, parse_float=Decimal))


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
                paths = json_diff(ja, jb) if ja is not None and jb is not None else ["$ null"]
                out.append(f"metadata: {', '.join(paths[:5])}")
        elif isinstance(a, datetime) and isinstance(b, datetime):
            if a != b:
                out.append(
                    f"{column}: source {a.isoformat()} vs target {b.isoformat()} "
                    f"(target - source = {b - a})"
                )
        elif a != b or type(a) is not type(b):
            shown = (lambda v: "NULL" if v is None else repr(v)) if column == "user_id" else repr
            out.append(f"{column}: source {shown(a)} vs target {shown(b)}")
    return out


def latest_migrate_run(conn: psycopg.Connection, schema: str) -> str | None:
    """The run id of the newest committed migrate run on this target."""
    row = conn.execute(
        sql.SQL(
            "SELECT run_id FROM {} WHERE step = 'migrate' AND NOT dry_run "
            "ORDER BY finished_at DESC LIMIT 1"
        ).format(sql.Identifier(schema, "session_migration_runs"))
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
    value, storage = row[1], row[8]
    if storage != "text":
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return None


SOURCE_TABLE = "sessionmig_source"
WORK_MEM = "128MB"  # enough to hash-join a million rows in one pass; per query, for this run
_SAME = """s.user_id IS NOT DISTINCT FROM t.user_id
       AND s.metadata IS NOT DISTINCT FROM t.metadata
       AND s.created_at = t.created_at AND s.expires_at = t.expires_at
       AND s.last_activity = t.last_activity AND s.request_count = t.request_count"""


def _present(conn: psycopg.Connection, schema: str, keys: list[str]) -> set[str]:
    found: set[str] = set()
    query = sql.SQL("SELECT session_id FROM {} WHERE session_id = ANY(%s)").format(
        sql.Identifier(schema, "sessions")
    )
    for start in range(0, len(keys), 5000):
        found |= {r[0] for r in conn.execute(query, (keys[start : start + 5000],))}
    return found


@dataclass
class _Tally:
    """Counts and named differences of one reconciliation, as it goes."""

    mask: Callable[[str | None], str]
    counts: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            (
                "matched",
                "missing",
                "extra",
                "changed",
                "both",
                "reject_mismatch",
                "unaccounted",
                "orphan_reject",
            ),
            0,
        )
    )
    differences: list[Difference] = field(default_factory=list)

    def note(self, kind: str, key: str | None, rowid: int | None, detail: str) -> None:
        self.counts[kind] += 1
        if len(self.differences) < MAX_DIFFERENCES:
            self.differences.append(Difference(kind, self.mask(key), rowid, detail))


@dataclass
class _SourceSide:
    """What the pass over the source learns besides the rows it copies."""

    rows: int = 0
    rejected_keys: list[str] = field(default_factory=list)
    seen_rejects: set[int] = field(default_factory=set)


ROW_HASH = """hash_record_extended((session_id, user_id, metadata, created_at, expires_at,
                                    last_activity, request_count), 0)"""
"""A row's 64-bit fingerprint. Equal rows (jsonb by value) hash equal on both tables, since
both are hashed by the same server with the same functions."""


def _create_source_table(conn: psycopg.Connection) -> None:
    # The fingerprint is a generated column, so the server computes it while the client is
    # still reading the backup, instead of afterwards.
    conn.execute(
        sql.SQL(
            """CREATE TEMP TABLE {} (
                   session_id text, user_id text, metadata jsonb, created_at timestamptz,
                   expires_at timestamptz, last_activity timestamptz, request_count int4,
                   fingerprint int8 GENERATED ALWAYS AS ({hash}) STORED
               ) ON COMMIT DROP"""
        ).format(sql.Identifier(SOURCE_TABLE), hash=sql.SQL(ROW_HASH))
    )


@dataclass(frozen=True)
class _Day:
    """One day (in the source zone) of a table, by created_at."""

    rows: int
    request_count: int
    created_min: datetime
    created_max: datetime
    fingerprint: int  # the sum of the day's row fingerprints


def _profile(
    conn: psycopg.Connection, table: sql.Composable, fingerprint: sql.Composable, zone: str
) -> dict[str, _Day]:
    """Per-day counts, sums, extremes and summed row fingerprints of a table, in one scan."""
    query = sql.SQL(
        """SELECT (created_at AT TIME ZONE %s)::date, count(*), sum(request_count),
                  min(created_at), max(created_at), sum({fingerprint})
           FROM {table} GROUP BY 1"""
    ).format(fingerprint=fingerprint, table=table)
    return {
        day.isoformat(): _Day(n, int(total), low, high, int(prints))
        for day, n, total, low, high, prints in conn.execute(query, (zone,))
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
        rowid = raw[0]
        side.seen_rejects.add(rowid)
        key = _decoded_key(raw)
        if key is not None:
            side.rejected_keys.append(key)
        if rejects[rowid]["raw"] != raw_record(raw, rules.extra_columns):
            tally.note(
                "reject_mismatch", key, rowid, "the reject's raw values do not match the source row"
            )

    streamed = stream_backup(
        conn,
        backup,
        rules,
        sql.Identifier(SOURCE_TABLE),
        on_reject=unaccounted,
        divert=rejects,
        on_diverted=recorded,
        batch_rows=batch_rows,
        progress=progress,
    )
    side.rows = streamed.read
    return side


def _compare(conn: psycopg.Connection, schema: str) -> dict[str, int]:
    """Counts of matched / changed / missing / extra rows, from one full join in PostgreSQL."""
    query = sql.SQL(
        """SELECT count(*) FILTER (WHERE t.session_id IS NULL),
                  count(*) FILTER (WHERE s.session_id IS NULL),
                  count(*) FILTER (WHERE s.session_id IS NOT NULL AND t.session_id IS NOT NULL
                                   AND NOT ({same})),
                  count(*) FILTER (WHERE {same})
           FROM {source} s FULL JOIN {target} t ON t.session_id = s.session_id"""
    ).format(
        same=sql.SQL(_SAME),
        source=sql.Identifier(SOURCE_TABLE),
        target=sql.Identifier(schema, "sessions"),
    )
    missing, extra, changed, matched = conn.execute(query).fetchone()  # type: ignore[misc]
    return {"missing": missing, "extra": extra, "changed": changed, "matched": matched}


def _name_differences(
    conn: psycopg.Connection, backup: Backup, schema: str, tally: _Tally, limit: int
) -> None:
    """Fetch up to ``limit`` differing rows and describe each, field by field."""
    columns = sql.SQL(
        "{p}.session_id, {p}.user_id, {p}.metadata::text, {p}.created_at, {p}.expires_at, "
        "{p}.last_activity, {p}.request_count"
    )
    query = sql.SQL(
        """SELECT {s_cols}, {t_cols}
           FROM {source} s FULL JOIN {target} t ON t.session_id = s.session_id
           WHERE s.session_id IS NULL OR t.session_id IS NULL OR NOT ({same})
           ORDER BY coalesce(s.session_id, t.session_id) COLLATE "C" LIMIT %s"""
    ).format(
        s_cols=columns.format(p=sql.Identifier("s")),
        t_cols=columns.format(p=sql.Identifier("t")),
        same=sql.SQL(_SAME),
        source=sql.Identifier(SOURCE_TABLE),
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
    schema: str = "public",
    as_of: datetime,
    batch_rows: int = 10_000,
    run_id: str | None = None,
    mask: Callable[[str | None], str] = mask_id,
    progress: Callable[[int], None] | None = None,
) -> ReconcileResult:
    """Compare every source row and column with the target; see the module docstring."""
    try:
        conn = psycopg.connect(dsn, application_name="sessionmig-reconcile")
    except psycopg.OperationalError as exc:
        raise TargetError(f"cannot connect to the target: {exc}".strip()) from None
    tally = _Tally(mask)
    with conn:
        # One snapshot for every query. Not READ ONLY: the source rows go to a temporary
        # table, which dies with the transaction; nothing else is written.
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        conn.execute("SELECT set_config('work_mem', %s, true)", (WORK_MEM,))
        run_id = run_id or latest_migrate_run(conn, schema)
        rejects = rejects_of_run(conn, schema, run_id)
        _create_source_table(conn)
        # The target's profile needs no source row: a second connection computes it in this
        # transaction's snapshot while this one streams the source, on the server's idle core.
        zone = getattr(rules.zone, "key", "UTC")
        snapshot = conn.execute("SELECT pg_export_snapshot()").fetchone()[0]  # type: ignore[index]
        target_profile = in_background(_profile_in_snapshot, dsn, snapshot, schema, zone)
        side = _read_source(conn, backup, rules, rejects, tally, batch_rows, progress)
        parity = _parity(conn, backup, schema, as_of, rules, rejects)
        # The source is read (bar the rowids of differences to name): hash it again while the
        # server works.
        unchanged_source = backup.verify_unchanged_later()
        source = _profile(conn, sql.Identifier(SOURCE_TABLE), sql.Identifier("fingerprint"), zone)
        target = target_profile.result()
        if _same_rows(source, target):
            compared = {"missing": 0, "extra": 0, "changed": 0}
            compared["matched"] = sum(day.rows for day in source.values())
        else:
            compared = _compare(conn, schema)
        for kind, n in compared.items():
            tally.counts[kind] += n
        if compared["missing"] or compared["extra"] or compared["changed"]:
            room = max(0, MAX_DIFFERENCES - len(tally.differences))
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
        target_rows = compared["matched"] + compared["changed"] + compared["extra"]
        parity.update(_distributions(source, target))
        unchanged_source.result()
    counts = tally.counts
    migrated = counts["matched"] + counts["changed"]
    rejected = len(side.seen_rejects)
    verdict, reason, warnings = _verdict(counts, rejected, parity, run_id)
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
    )


def _profile_in_snapshot(dsn: str, snapshot: str, schema: str, zone: str) -> dict[str, _Day]:
    """:func:`_profile` of the target, on its own connection, in an exported snapshot."""
    with psycopg.connect(dsn, application_name="sessionmig-reconcile-target") as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        # A utility statement takes no bound parameters; the id is the server's, quoted.
        conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
        return _profile(conn, sql.Identifier(schema, "sessions"), sql.SQL(ROW_HASH), zone)


def _same_rows(source: dict[str, _Day], target: dict[str, _Day]) -> bool:
    """Whether both tables hold the same rows: every day's count and fingerprint sum agree
    (a difference that cancels out needs 64-bit hashes to collide: about 1 in 2**64)."""
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
        "distributions_agree": not days_differing
        and src_sum == total
        and src_low == low
        and src_high == high,
    }


def _parity(
    conn: psycopg.Connection,
    backup: Backup,
    schema: str,
    as_of: datetime,
    rules: Rules,
    rejects: dict[int, dict],
) -> dict[str, Any]:
    """Application-level signals: active sessions by the legacy rule vs by PostgreSQL."""
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
    table = sql.Identifier(schema, "sessions")
    (pg_active,) = conn.execute(
        sql.SQL("SELECT count(*) FILTER (WHERE expires_at > %s) FROM {}").format(table), (as_of,)
    ).fetchone()  # type: ignore[misc]
    return {
        "as_of": as_of.isoformat(),
        "active_legacy_rule_sqlite": legacy_active,
        "active_legacy_rule_sqlite_excluding_rejects": legacy_active - rejected_active,
        "active_postgres": pg_active,
    }


def _verdict(
    counts: dict[str, int], rejected: int, parity: dict[str, Any], run_id: str | None
) -> tuple[str, str, list[str]]:
    broken = {k: v for k, v in counts.items() if k != "matched" and v}
    if broken:
        summary = ", ".join(f"{v} {k}" for k, v in broken.items())
        return FAIL, f"rows differ or are unaccounted for: {summary}", []
    warnings = []
    if run_id is None:
        warnings.append("no committed migrate run found on the target")
    if rejected:
        warnings.append(
            f"{rejected} source rows were rejected; each is in "
            "session_migration_rejects with its raw values"
        )
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
