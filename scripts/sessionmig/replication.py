"""The target's standbys, as preflight shows them: a migration into a primary is only as safe
as the standby a failover would promote, so the operator sees which standbys there are, whether
they stream synchronously, and how far behind they replay.

Read from ``pg_stat_replication`` on the connection preflight already holds; its details are
visible to superusers and members of ``pg_monitor`` only (others see the rows, not their state),
which is said rather than guessed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg


@dataclass(frozen=True)
class Standby:
    name: str
    state: str | None  # streaming, catchup, … (None: not visible to this role)
    sync_state: str | None  # sync, async, potential, quorum
    replay_lag_bytes: int | None  # WAL written on the primary not yet replayed there
    replay_lag_s: float | None

    def describe(self) -> str:
        if self.state is None:
            return f"{self.name} (state not visible to this role: grant it pg_monitor)"
        lag = (
            "replay lag unknown"
            if self.replay_lag_bytes is None
            else f"replay lag {self.replay_lag_bytes:,} bytes"
            + ("" if self.replay_lag_s is None else f" / {self.replay_lag_s:.3f} s")
        )
        return f"{self.name} ({self.state}, {self.sync_state}, {lag})"


def standbys(conn: psycopg.Connection[Any]) -> list[Standby]:
    rows = conn.execute(
        """SELECT coalesce(nullif(application_name, ''), host(client_addr), 'unnamed'),
                  state, sync_state,
                  pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), replay_lsn)::bigint,
                  extract(epoch FROM replay_lag)::float8
           FROM pg_catalog.pg_stat_replication ORDER BY 1"""
    ).fetchall()
    return [Standby(*row) for row in rows]


def check(conn: psycopg.Connection[Any]) -> tuple[bool, str]:
    """Preflight's "standbys" check: (go, what it says)."""
    in_recovery = conn.execute("SELECT pg_catalog.pg_is_in_recovery()").fetchone()
    if in_recovery is not None and in_recovery[0]:
        return False, (
            "the target is a standby (in recovery, read only): point the DSN at the primary, "
            "or at every host with target_session_attrs=read-write"
        )
    found = standbys(conn)
    if not found:
        return True, (
            "none: no streaming standby of this primary (a failover would have nothing with "
            "the migrated rows to promote)"
        )
    return True, "; ".join(s.describe() for s in found)
