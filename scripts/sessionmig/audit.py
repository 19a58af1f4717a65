"""The audit trail on the target: one row in ``session_migration_runs`` per step that wrote.

Every step that changes the target (migrate, rollback, finalize, catch-up) records who, when,
from which file (path and sha256) and how many rows, with the same statement, inside the
transaction of the change it describes where there is one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb


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
