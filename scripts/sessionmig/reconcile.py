"""Prove the migration: every source row is in PostgreSQL with the same meaning, or rejected.

Every row and column is compared without pulling the target into Python (the approach data-diff
made known): each side computes a 64-bit fingerprint per row from a canonical text of all its
columns — PostgreSQL in SQL, the source in Python after the same normalisation migrate applies —
and sums them per bucket of keys (md5 of the id). Only buckets whose count or sum differ are
drilled into: both sides' rows of those buckets are streamed in key order (SQLite ``BINARY`` =
PostgreSQL ``COLLATE "C"`` = code-point order for UTF-8), merge-joined, and compared field by
field, so each difference is named (missing, extra, changed, with a field-level diff). Memory is
bounded by the bucket table and one batch. Rejects are checked against the raw values they claim
to hold, and the partition source = migrated + rejected is proved. Distributions (per-day counts,
sums, extremes) and the legacy active-session rule give second, independent signals.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import sql

from .errors import TargetError
from .jsonb import metadata_text
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
    buckets_compared: int = 0
    buckets_differing: int = 0

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


BUCKET_HEX = 4  # 65,536 buckets: ~150 rows each at 10M rows, so a drill-down stays small
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
SEP = "\x1f"
MASK64 = (1 << 64) - 1


def bucket_of(key: str) -> int:
    """The bucket of a key: the first hex digits of md5(key), as PostgreSQL computes it too."""
    return int(hashlib.md5(key.encode("utf-8", "surrogatepass")).hexdigest()[:BUCKET_HEX], 16)


def _micros(moment: datetime) -> int:
    return (moment - EPOCH) // timedelta(microseconds=1)


def row_text(row: tuple) -> str:
    """The canonical text of a normalised row, identical to :data:`ROW_TEXT_SQL`'s."""
    sid, user, meta, created, expires, last, count = row
    meta_text = "N" if meta is None else "v" + metadata_text(meta)
    return SEP.join(
        (
            sid,
            "N" if user is None else "v" + user,
            meta_text,
            str(_micros(created)),
            str(_micros(expires)),
            str(_micros(last)),
            str(count),
        )
    )


def row_hash(row: tuple) -> int:
    """A signed 64-bit fingerprint of a normalised row (md5 of its canonical text)."""
    digest = hashlib.md5(row_text(row).encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


BUCKET_SQL = f"('x' || substr(md5(session_id), 1, {BUCKET_HEX}))::bit({BUCKET_HEX * 4})::int"
ROW_TEXT_SQL = """concat_ws(E'\\x1f', session_id,
    CASE WHEN user_id IS NULL THEN 'N' ELSE 'v' || user_id END,
    CASE WHEN metadata IS NULL THEN 'N' ELSE 'v' || metadata::text END,
    (extract(epoch FROM created_at) * 1000000)::bigint,
    (extract(epoch FROM expires_at) * 1000000)::bigint,
    (extract(epoch FROM last_activity) * 1000000)::bigint,
    request_count)"""
ROW_HASH_SQL = f"('x' || substr(md5({ROW_TEXT_SQL}), 1, 16))::bit(64)::bigint"


def _target_buckets(conn: psycopg.Connection, schema: str) -> dict[int, tuple[int, int]]:
    """Per bucket: (rows, sum of row hashes mod 2**64), computed entirely in PostgreSQL."""
    query = sql.SQL(
        "SELECT b, count(*), sum(h) FROM (SELECT {bucket} AS b, {hash} AS h FROM {t}) x GROUP BY b"
    ).format(
        bucket=sql.SQL(BUCKET_SQL), hash=sql.SQL(ROW_HASH_SQL), t=sql.Identifier(schema, "sessions")
    )
    return {b: (n, int(h) & MASK64) for b, n, h in conn.execute(query)}


def _target_rows(
    conn: psycopg.Connection, schema: str, buckets: list[int], batch: int
) -> Iterator[tuple]:
    """The rows of the given buckets, in key order (streamed by a server-side cursor)."""
    query = sql.SQL(
        """SELECT session_id, user_id, metadata::text, created_at, expires_at, last_activity,
                  request_count FROM {} WHERE {} = ANY(%s) ORDER BY session_id COLLATE "C" """
    ).format(sql.Identifier(schema, "sessions"), sql.SQL(BUCKET_SQL))
    with conn.cursor(name="sessionmig_drill_down") as cur:
        cur.itersize = batch
        cur.execute(query, (buckets,))
        yield from cur


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
    """What the first pass over the source learns: buckets, rejects seen, distributions."""

    buckets: dict[int, list[int]] = field(default_factory=dict)
    rows: int = 0
    expected: int = 0
    rejected_keys: list[str] = field(default_factory=list)
    seen_rejects: set[int] = field(default_factory=set)
    per_day: Counter = field(default_factory=Counter)
    count_sum: int = 0
    created_min: datetime | None = None
    created_max: datetime | None = None


def _first_pass(
    backup: Backup, rules: Rules, rejects: dict[int, dict], tally: _Tally, batch_rows: int
) -> _SourceSide:
    side = _SourceSide()
    for batch in backup.rows(batch_rows, extra=rules.extra_columns):
        for raw in batch:
            side.rows += 1
            rowid = raw[0]
            recorded = rejects.get(rowid)
            if recorded is not None:
                side.seen_rejects.add(rowid)
                key = _decoded_key(raw)
                if key is not None:
                    side.rejected_keys.append(key)
                if recorded["raw"] != raw_record(raw, rules.extra_columns):
                    tally.note(
                        "reject_mismatch",
                        key,
                        rowid,
                        "the reject's raw values do not match the source row",
                    )
                continue
            result = normalise(raw, rules)
            if isinstance(result, Reject):
                tally.note(
                    "unaccounted",
                    _decoded_key(raw),
                    rowid,
                    f"cannot land ({result.reason}) and is not in the rejects table",
                )
                continue
            side.expected += 1
            cell = side.buckets.setdefault(bucket_of(result[0]), [0, 0])
            cell[0] += 1
            cell[1] = (cell[1] + row_hash(result)) & MASK64
            created = result[3]
            side.per_day[created.astimezone(rules.zone).date().isoformat()] += 1
            side.count_sum += result[6]
            if side.created_min is None or created < side.created_min:
                side.created_min = created
            if side.created_max is None or created > side.created_max:
                side.created_max = created
    return side


def _drill_down(
    conn: psycopg.Connection,
    backup: Backup,
    rules: Rules,
    schema: str,
    buckets: list[int],
    rejects: dict[int, dict],
    tally: _Tally,
    batch_rows: int,
) -> None:
    """Merge-join both sides' rows of the differing buckets and name every difference."""
    wanted = set(buckets)
    target_iter = _target_rows(conn, schema, sorted(wanted), batch_rows)
    target = next(target_iter, None)
    for batch in backup.rows(batch_rows, order="session_id", extra=rules.extra_columns):
        for raw in batch:
            key = _decoded_key(raw)
            if key is None or raw[0] in rejects or bucket_of(key) not in wanted:
                continue
            result = normalise(raw, rules)
            if isinstance(result, Reject):
                continue  # counted as unaccounted in the first pass
            while target is not None and target[0] < key:
                tally.note("extra", target[0], None, "in PostgreSQL, not in the source")
                target = next(target_iter, None)
            if target is None or target[0] != key:
                tally.note("missing", key, raw[0], "in the source, not in PostgreSQL")
                continue
            diffs = field_diff(result, target)
            target = next(target_iter, None)
            if diffs:
                tally.note("changed", key, raw[0], "; ".join(diffs))
            else:
                tally.counts["matched"] += 1
    while target is not None:
        tally.note("extra", target[0], None, "in PostgreSQL, not in the source")
        target = next(target_iter, None)


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
    tally = _Tally(mask)
    with conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        run_id = run_id or latest_migrate_run(conn, schema)
        rejects = rejects_of_run(conn, schema, run_id)
        side = _first_pass(backup, rules, rejects, tally, batch_rows)
        target = _target_buckets(conn, schema)
        differing = sorted(
            b
            for b in set(side.buckets) | set(target)
            if tuple(side.buckets.get(b, (0, 0))) != target.get(b, (0, 0))
        )
        equal_rows = sum(n for b, (n, _) in side.buckets.items() if b not in set(differing))
        tally.counts["matched"] += equal_rows
        if differing:
            _drill_down(conn, backup, rules, schema, differing, rejects, tally, batch_rows)
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
        target_rows = sum(n for n, _ in target.values())
        parity = _parity(conn, backup, schema, as_of, rules, rejects)
        parity.update(_distributions(conn, schema, rules, side))
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
        buckets_compared=len(set(side.buckets) | set(target)),
        buckets_differing=len(differing),
    )


def _distributions(
    conn: psycopg.Connection, schema: str, rules: Rules, side: _SourceSide
) -> dict[str, Any]:
    """A second, independent signal: per-day counts, sums and extremes on both sides."""
    zone = getattr(rules.zone, "key", "UTC")
    table = sql.Identifier(schema, "sessions")
    per_day = {
        d.isoformat(): n
        for d, n in conn.execute(
            sql.SQL(
                "SELECT (created_at AT TIME ZONE %s)::date, count(*) FROM {} GROUP BY 1"
            ).format(table),
            (zone,),
        )
    }
    total, low, high = conn.execute(
        sql.SQL(
            "SELECT coalesce(sum(request_count), 0), min(created_at), max(created_at) FROM {}"
        ).format(table)
    ).fetchone()  # type: ignore[misc]
    days_differing = sorted(
        d for d in set(per_day) | set(side.per_day) if per_day.get(d, 0) != side.per_day.get(d, 0)
    )
    return {
        "sum_request_count_source": side.count_sum,
        "sum_request_count_target": int(total),
        "created_min_source": side.created_min.isoformat() if side.created_min else None,
        "created_min_target": low.isoformat() if low else None,
        "created_max_source": side.created_max.isoformat() if side.created_max else None,
        "created_max_target": high.isoformat() if high else None,
        "days_compared": len(set(per_day) | set(side.per_day)),
        "days_with_different_counts": days_differing[:20],
        "distributions_agree": not days_differing
        and side.count_sum == int(total)
        and side.created_min == low
        and side.created_max == high,
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
