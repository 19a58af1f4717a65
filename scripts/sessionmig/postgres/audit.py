"""The audit trail on the target: one row in ``session_migration_runs`` per step that wrote.

Every step that changes the target (migrate, rollback, finalize, catch-up) records who, when,
from which file (path and sha256) and how many rows, with the same statement, inside the
transaction of the change it describes where there is one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from sessionmig.errors import TargetError
from sessionmig.postgres.connect import connect


@dataclass(frozen=True)
class RunRow:
    """One row of ``session_migration_runs``; ``finished_at`` is the server's clock at insert."""

    run_id: str
    step: str
    started_at: datetime
    source_path: str
    source_sha256: str
    source_timezone: str
    rows_read: int = 0
    inserted: int = 0
    unchanged: int = 0
    conflicting: int = 0
    updated: int = 0
    rejected: int = 0
    dry_run: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)
    operator: str | None = None
    host: str | None = None


_COLUMNS = (
    "run_id",
    "step",
    "started_at",
    "dry_run",
    "source_path",
    "source_sha256",
    "source_timezone",
    "rows_read",
    "inserted",
    "unchanged",
    "conflicting",
    "updated",
    "rejected",
    "parameters",
    "operator",
    "host",
)


def write_run(conn: psycopg.Connection, schema: str, row: RunRow) -> None:
    """Insert ``row`` on ``conn``, in the caller's transaction. ``finished_at`` is
    ``clock_timestamp()``: the real end, not the transaction's start as ``now()`` would be."""
    values = [getattr(row, c) for c in _COLUMNS]
    values[_COLUMNS.index("parameters")] = Jsonb(row.parameters)
    conn.execute(
        sql.SQL("INSERT INTO {} ({}, finished_at) VALUES ({}, clock_timestamp())").format(
            sql.Identifier(schema, "session_migration_runs"),
            sql.SQL(", ").join(map(sql.Identifier, _COLUMNS)),
            sql.SQL(", ").join(sql.Placeholder() * len(_COLUMNS)),
        ),
        values,
    )


# --- when COMMIT's answer is lost: the audit row is the truth ----------------------------------

COMMITTED, NOT_COMMITTED, UNKNOWN = "committed", "not committed", "unknown"
RESOLVE_TIMEOUT_S = 30.0


def commit_outcome(
    dsn: str,
    schema: str,
    run_id: str,
    backend_pid: int | None,
    *,
    settle: Callable[[psycopg.Connection], None] | None = None,
    timeout_s: float = RESOLVE_TIMEOUT_S,
) -> str:
    """Whether the transaction that writes audit row ``run_id`` committed, asked of the target
    on a new connection after its COMMIT's answer was lost (a dropped connection, Ctrl-C).

    The old backend is ended if it is still there (a backend finishes a COMMIT it has begun
    before it obeys) and awaited, so its transaction is over one way or the other; ``settle``
    may wait for more inside the reading transaction (a lock the old one held). ``UNKNOWN``
    when the target cannot be asked now or the old backend does not go away in time."""
    try:
        with connect(dsn, "resolve", autocommit=True, connect_timeout=10) as conn:
            if backend_pid and not _backend_gone(conn, backend_pid, timeout_s):
                return UNKNOWN
            with conn.transaction():
                conn.execute(
                    "SELECT pg_catalog.set_config('lock_timeout', %s, true)",
                    (f"{int(timeout_s * 1000)}ms",),
                )
                if settle is not None:
                    settle(conn)
                found = conn.execute(
                    sql.SQL("SELECT 1 FROM {} WHERE run_id = %s").format(
                        sql.Identifier(schema, "session_migration_runs")
                    ),
                    (run_id,),
                ).fetchone()
            return COMMITTED if found else NOT_COMMITTED
    except (psycopg.Error, OSError, TargetError):
        return UNKNOWN


def _backend_gone(conn: psycopg.Connection, pid: int, timeout_s: float) -> bool:
    """End backend ``pid`` (only if it is one of ours) and wait until it has gone."""
    ours = (
        "SELECT pid FROM pg_catalog.pg_stat_activity WHERE pid = %s "
        "AND pid <> pg_catalog.pg_backend_pid() AND application_name LIKE 'sessionmig-%%'"
    )
    conn.execute(f"SELECT pg_catalog.pg_terminate_backend(pid) FROM ({ours}) AS old", (pid,))
    deadline = time.monotonic() + timeout_s
    while conn.execute(ours, (pid,)).fetchone() is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
