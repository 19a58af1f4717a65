"""Prove the migration: every source row is in PostgreSQL with the same meaning, or rejected.

Both sides are streamed in key order (SQLite ``BINARY`` = PostgreSQL ``COLLATE "C"`` = code-point
order for UTF-8) and merge-joined, so memory stays bounded whatever the size. The source is read
raw, through the same read-only reader as migrate, and normalised by the same rules; rejects are
checked against the raw values they claim to hold. The result names every difference with
hashed ids and ends in a verdict: PASS, PASS_WITH_WARNINGS or FAIL.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import sql

from .errors import TargetError
from .mask import mask_id
from .source import Backup
from .transform import COLUMNS, Reject, Rules, normalise, raw_record

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


def _target_rows(conn: psycopg.Connection, schema: str, batch: int) -> Iterator[tuple]:
    query = sql.SQL(
        """SELECT session_id, user_id, metadata::text, created_at, expires_at, last_activity,
                  request_count FROM {} ORDER BY session_id COLLATE "C" """
    ).format(sql.Identifier(schema, "sessions"))
    with conn.cursor(name="sessionmig_reconcile") as cur:
        cur.itersize = batch
        cur.execute(query)
        yield from cur


def latest_migrate_run(conn: psycopg.Connection, schema: str) -> str | None:
    """The run id of the newest committed migrate run on this target."""
    row = conn.execute(
        sql.SQL(
            "SELECT run_id FROM {} WHERE step = 'migrate' AND NOT dry_run "
            "ORDER BY finished_at DESC LIMIT 1"
        ).format(sql.Identifier(schema, "session_migration_runs"))
    ).fetchone()
    return row[0] if row else None


def _rejects(conn: psycopg.Connection, schema: str, run_id: str | None) -> dict[int, dict]:
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
) -> ReconcileResult:
    """Compare every source row and column with the target; see the module docstring."""
    try:
        conn = psycopg.connect(dsn, application_name="sessionmig-reconcile")
    except psycopg.OperationalError as exc:
        raise TargetError(f"cannot connect to the target: {exc}".strip()) from None
    counts = dict.fromkeys(
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
    differences: list[Difference] = []

    def note(kind: str, key: str | None, rowid: int | None, detail: str) -> None:
        counts[kind] += 1
        if len(differences) < MAX_DIFFERENCES:
            differences.append(Difference(kind, mask(key), rowid, detail))

    with conn:
        conn.execute("SET TRANSACTION READ ONLY")
        run_id = run_id or latest_migrate_run(conn, schema)
        rejects = _rejects(conn, schema, run_id)
        seen_rejects: set[int] = set()
        source_rows = migrated = 0
        source_count_sum = 0
        target_iter = _target_rows(conn, schema, batch_rows)
        target = next(target_iter, None)
        target_rows = 0

        def drain_until(key: str) -> tuple | None:
            """Advance the target stream to ``key``; every target key passed is extra."""
            nonlocal target, target_rows
            while target is not None and target[0] < key:
                note("extra", target[0], None, "in PostgreSQL, not in the source")
                target_rows += 1
                target = next(target_iter, None)
            if target is not None and target[0] == key:
                found = target
                target_rows += 1
                target = next(target_iter, None)
                return found
            return None

        for batch in backup.rows(batch_rows, order="session_id", extra=rules.extra_columns):
            for raw in batch:
                source_rows += 1
                rowid = raw[0]
                key = _decoded_key(raw)
                found = drain_until(key) if key is not None else None
                result = normalise(raw, rules)
                recorded = rejects.get(rowid)
                if recorded is not None:
                    seen_rejects.add(rowid)
                    if recorded["raw"] != raw_record(raw, rules.extra_columns):
                        note(
                            "reject_mismatch",
                            key,
                            rowid,
                            "the reject's raw values do not match the source row",
                        )
                    if found is not None:
                        note("both", key, rowid, "rejected and also present in PostgreSQL")
                    continue
                if isinstance(result, Reject):
                    note(
                        "unaccounted",
                        key,
                        rowid,
                        f"cannot land ({result.reason}) and is not in the rejects table",
                    )
                    continue
                if found is None:
                    note("missing", key, rowid, "in the source, not in PostgreSQL")
                    continue
                migrated += 1
                source_count_sum += result[6]
                diffs = field_diff(result, found)
                if diffs:
                    note("changed", key, rowid, "; ".join(diffs))
                else:
                    counts["matched"] += 1
        while target is not None:
            note("extra", target[0], None, "in PostgreSQL, not in the source")
            target_rows += 1
            target = next(target_iter, None)
        for rowid, recorded in rejects.items():
            if rowid not in seen_rejects:
                note(
                    "orphan_reject",
                    recorded["session_id"],
                    rowid,
                    "a reject for a rowid the source does not have",
                )
        parity = _parity(conn, backup, schema, as_of, rules, rejects)
        parity["sum_request_count_source"] = source_count_sum
    rejected = len(seen_rejects)
    verdict, reason, warnings = _verdict(counts, rejected, parity, run_id)
    return ReconcileResult(
        run_id=run_id,
        source_rows=source_rows,
        target_rows=target_rows,
        migrated=migrated,
        rejected=rejected,
        matched=counts["matched"],
        counts=counts,
        differences=differences,
        parity=parity,
        verdict=verdict,
        reason=reason,
        warnings=warnings,
    )


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
    pg_active, pg_sum = conn.execute(
        sql.SQL(
            "SELECT count(*) FILTER (WHERE expires_at > %s), coalesce(sum(request_count), 0) "
            "FROM {}"
        ).format(table),
        (as_of,),
    ).fetchone()  # type: ignore[misc]
    return {
        "as_of": as_of.isoformat(),
        "active_legacy_rule_sqlite": legacy_active,
        "active_legacy_rule_sqlite_excluding_rejects": legacy_active - rejected_active,
        "active_postgres": pg_active,
        "sum_request_count_target": int(pg_sum),
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
    if parity["sum_request_count_source"] != parity["sum_request_count_target"]:
        return FAIL, "sum of request_count differs between source and target", warnings
    if warnings:
        return WARN, "every row is accounted for; " + "; ".join(warnings), warnings
    return PASS, "every source row is in PostgreSQL with identical values", []
