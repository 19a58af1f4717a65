"""The target's standbys, as preflight shows them: a migration into a primary is only as safe
as the standby a failover would promote, so the operator sees which standbys there are, whether
they stream synchronously, and how far behind they replay.

Read from ``pg_stat_replication`` on the connection preflight already holds; its details are
visible to superusers and members of ``pg_monitor`` only (others see the rows, not their state),
which is said rather than guessed.

Migrate records the same after its commit (:func:`after_commit`): the WAL the server wrote while
the load ran, and how long each standby took to replay the commit — what a failover right after
the cutover would find on the standby it promotes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import psycopg

# How long migrate waits, after its commit, for the standbys to replay it before saying how far
# behind they still are: long enough for a healthy standby, short enough not to hold the run.
REPLAY_WAIT_S = 10.0


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


def wal_lsn(conn: psycopg.Connection[Any]) -> str | None:
    """The server's current WAL position (None on a standby, which writes none)."""
    row = conn.execute(
        "SELECT CASE WHEN pg_catalog.pg_is_in_recovery() THEN NULL "
        "ELSE pg_catalog.pg_current_wal_lsn()::text END"
    ).fetchone()
    return None if row is None else row[0]


@dataclass(frozen=True)
class AfterCommit:
    """What migrate's report says of replication once the load committed."""

    wal_bytes: int | None  # WAL the server wrote from the load's start to just after its commit
    standbys: tuple[str, ...]  # what each standby did with the commit, in words

    def describe(self) -> str:
        wal = "WAL not known" if self.wal_bytes is None else f"{self.wal_bytes:,} bytes of WAL"
        if not self.standbys:
            return f"{wal}; no streaming standby"
        return f"{wal}; " + "; ".join(self.standbys)


def after_commit(
    conn: psycopg.Connection[Any],
    started_at: str | None,
    wait_s: float | None = None,
    poll_s: float = 0.1,
) -> AfterCommit:
    """The WAL written since ``started_at`` (an LSN) and, for each standby, how long it took to
    replay everything up to now (the commit), or how far behind it still is after ``wait_s``.

    Never raises for a reading it cannot make: the load is committed, and what replication
    looks like cannot change that; the report says what could not be read instead."""
    try:
        end = wal_lsn(conn)
        if end is None:
            return AfterCommit(None, ("the target is a standby: no WAL of its own",))
        wal_bytes = None
        if started_at is not None:
            row = conn.execute(
                "SELECT pg_catalog.pg_wal_lsn_diff(%s::pg_catalog.pg_lsn, %s::pg_catalog.pg_lsn)"
                "::bigint",
                (end, started_at),
            ).fetchone()
            wal_bytes = None if row is None else int(row[0])
        waiting = REPLAY_WAIT_S if wait_s is None else wait_s
        return AfterCommit(wal_bytes, _replayed(conn, end, waiting, poll_s))
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return AfterCommit(None, (f"replication could not be read after the commit ({first})",))


def _replayed(
    conn: psycopg.Connection[Any], commit: str, wait_s: float, poll_s: float
) -> tuple[str, ...]:
    began = time.monotonic()
    done: dict[str, str] = {}
    while True:
        rows = conn.execute(
            """SELECT coalesce(nullif(application_name, ''), host(client_addr), 'unnamed'),
                      state, sync_state,
                      pg_catalog.pg_wal_lsn_diff(%s::pg_catalog.pg_lsn, replay_lsn)::bigint
               FROM pg_catalog.pg_stat_replication ORDER BY 1""",
            (commit,),
        ).fetchall()
        # Each statement of a read committed transaction sees the view as it is now.
        conn.commit()
        waited = time.monotonic() - began
        behind: dict[str, str] = {}
        for name, state, sync_state, lag in rows:
            if name in done:
                continue
            if state is None:
                done[name] = f"{name}: state not visible to this role (grant it pg_monitor)"
            elif lag is not None and lag <= 0:
                done[name] = f"{name} ({sync_state}): replayed the commit after {waited:.2f} s"
            else:
                shown = "unknown" if lag is None else f"{lag:,} bytes"
                behind[name] = (
                    f"{name} ({state}, {sync_state}): {shown} of WAL behind the commit after "
                    f"{waited:.1f} s — do not cut over before it has replayed"
                )
        if not behind or waited >= wait_s:
            return tuple(sorted({**done, **behind}.values()))
        time.sleep(poll_s)
