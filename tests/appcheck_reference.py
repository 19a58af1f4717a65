"""The application check computed the slow, obvious way — the oracle the runbook's check is
tested against.

Every row of the backup goes through the rules (``transform.normalise``) one by one; the rows
that never land (later copies of a ``session_id``, rows PostgreSQL refused) are left out; the
manager is asked about the others by id (``SessionManager.active_among``, one question per
batch), and a difference is explained after the cutover by PostgreSQL's current row. The
runbook's check streams the app's answers over the whole table and compares them with
reconcile's own reading in SQL; both must count the same sessions the same way.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime

import psycopg
from psycopg import sql

from sessionmig.engines.reconcile import latest_migrate_run
from sessionmig.rules.mask import mask_id
from sessionmig.rules.transform import ROWID, Reject, Rules, normalise
from sessionmig.sqlite.keys import duplicate_rejects
from sessionmig.sqlite.source import Backup
from sessionmig.store import SessionManager


@dataclass(frozen=True)
class Reference:
    checked: int
    expected_active: int
    accepted_active: int
    wrongly_rejected: int
    wrongly_accepted: int
    examples: list[str] = field(default_factory=list)  # every one, in rowid order
    explained: int = 0


def _refused(dsn: str, schema: str) -> set[int]:
    with psycopg.connect(dsn) as conn:
        run = latest_migrate_run(conn, schema)
        rows = conn.execute(
            sql.SQL(
                "SELECT source_rowid FROM {} WHERE run_id = %s AND reason = 'refused_by_postgresql'"
            ).format(sql.Identifier(schema, "session_migration_rejects")),
            (run,),
        ).fetchall()
    return {r[0] for r in rows}


def _now(dsn: str, schema: str, ids: list[str]) -> dict[str, datetime]:
    if not ids:
        return {}
    query = sql.SQL("SELECT session_id, expires_at FROM {} WHERE session_id = ANY(%s)").format(
        sql.Identifier(schema, "sessions")
    )
    with psycopg.connect(dsn) as conn:
        return dict(conn.execute(query, (ids,)).fetchall())


def reference_app_check(
    dsn: str,
    backup: Backup,
    rules: Rules,
    *,
    schema: str,
    as_of: datetime,
    mode: str = "strict",
    batch_rows: int = 500,
) -> Reference:
    return asyncio.run(_check(dsn, backup, rules, schema, as_of, mode, batch_rows))


async def _check(
    dsn: str, backup: Backup, rules: Rules, schema: str, as_of: datetime, mode: str, batch: int
) -> Reference:
    manager = SessionManager(dsn, schema=schema, pool_size=1)
    checked = expected = accepted = wrongly_rejected = wrongly_accepted = explained = 0
    examples: list[str] = []
    repeated = duplicate_rejects(backup, rules)
    refused = _refused(dsn, schema)
    try:
        for raw in backup.rows(batch, extra=rules.extra_columns):
            rows = [
                r
                for r in (
                    normalise(row, rules)
                    for row in raw
                    if row[ROWID] not in repeated and row[ROWID] not in refused
                )
                if not isinstance(r, Reject)
            ]
            ids = [r.session_id for r in rows]
            active = await manager.active_among(ids, as_of)
            differ = [r for r in rows if (r.expires_at > as_of) != (r.session_id in active)]
            by_app: set[str] = set()
            if mode == "after_cutover":
                now = _now(dsn, schema, [r.session_id for r in differ])
                for r in differ:
                    gone = r.session_id not in now
                    if gone or now[r.session_id] > max(r.expires_at, as_of):
                        by_app.add(r.session_id)
                explained += len(by_app)
            checked += len(rows)
            for r in rows:
                if r.session_id in by_app:
                    continue
                should, does = r.expires_at > as_of, r.session_id in active
                expected += should
                accepted += does
                if should != does:
                    wrongly_rejected += should
                    wrongly_accepted += does
                    examples.append(
                        f"{mask_id(r.session_id)}: source says "
                        f"{'active' if should else 'expired'}, the app says "
                        f"{'active' if does else 'not active'}"
                    )
    finally:
        await manager.close()
    return Reference(
        checked, expected, accepted, wrongly_rejected, wrongly_accepted, examples, explained
    )
