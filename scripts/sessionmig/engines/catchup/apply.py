"""One part's PostgreSQL transaction: copy its delta, merge it with PostgreSQL's rows
read unlocked, lock, write, prove the writes against the rules' rows, record."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

import psycopg
from psycopg import sql

from sessionmig.rules import merge as M
from sessionmig.rules.mask import mask_id
from sessionmig.rules.transform import COLUMNS

if TYPE_CHECKING:  # pandas is heavy; only the notebook's functions need it
    pass

from sessionmig.engines.catchup.chain import (
    CONFLICTS,
    BaseNotCurrent,
    Chain,
    Progress,
    chain_of,
    commit_lock,
    progress_of,
    refuse_after_rollback,
)
from sessionmig.engines.catchup.delta import Delta

# A pass whose process stops between two statements (Ctrl-Z, a debugger, a frozen VM) must not
# hold the app's rows locked until it wakes: the server ends its session after this long idle
# inside the transaction, which then commits nothing (the pass's own gaps are milliseconds
# under the locks, seconds for the merge before them).
IDLE_IN_TRANSACTION = "60s"
EXAMPLES = 3
MAX_MISMATCHES_SHOWN = 20
# Whether the proof may read PostgreSQL's per-transaction row counts (tests turn it off to
# prove the xmin scan that replaces them when track_counts is off).
_COUNTS_TRUSTED = True


@dataclass(frozen=True)
class ConflictDetail:
    """A session whose column both colours changed differently (id masked)."""

    session: str
    column: str
    winner: str
    live_last_activity: datetime
    postgres_last_activity: datetime


# --- the PostgreSQL transaction --------------------------------------------------------------


class _ProofFailed(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class _DryRun(Exception):
    """Raised at the end of a dry run so that its transaction rolls back."""


@dataclass
class Applied:
    """What the transaction did (filled as it goes)."""

    kinds: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    conflicts: list[ConflictDetail] = field(default_factory=list)
    locked_seconds: float = 0.0
    remerged: int = 0  # touched sessions the app wrote between the merge and the row locks
    committing: bool = False  # the COMMIT was sent: an error after it leaves the outcome open
    touched: list[str] = field(default_factory=list)  # the part's sessions


_APPLY_COLUMNS = (
    "session_id",
    "has_base",
    "has_live",
    "recreated",
    *(f"b_{c}" for c in COLUMNS[1:]),
    *(f"l_{c}" for c in COLUMNS[1:]),
)
_EXPECTED_COLUMNS = ("session_id", "present", *COLUMNS[1:])
# Binary COPY (six times faster than text COPY, measured). Metadata goes in jsonb's own binary
# form (a version byte, then the text: the server parses it as it stores it), sent as bytea's
# bytes, which binary COPY passes on untouched: no rewrite of the table to make it jsonb after.
_ROW_TYPES = (
    "user_id text, metadata jsonb, created_at timestamptz, expires_at timestamptz, "
    "last_activity timestamptz, request_count int4"
)
_ROW_COPY_TYPES = ["text", "bytea", "timestamptz", "timestamptz", "timestamptz", "int4"]
_APPLY_COPY_TYPES = ["text", "bool", "bool", "bool", *_ROW_COPY_TYPES, *_ROW_COPY_TYPES]
_EXPECTED_COPY_TYPES = ["text", "bool", *_ROW_COPY_TYPES]


def _create_temp_tables(conn: psycopg.Connection) -> None:
    prefixed = ", ".join(f"{side}_{part}" for side in ("b", "l") for part in _ROW_TYPES.split(", "))
    conn.execute(
        f"""CREATE TEMP TABLE sessionmig_catchup (
                session_id text COLLATE "C" NOT NULL,
                has_base boolean NOT NULL, has_live boolean NOT NULL,
                recreated boolean NOT NULL, {prefixed}
            ) ON COMMIT DROP"""
    )
    conn.execute(
        f"""CREATE TEMP TABLE sessionmig_catchup_expected (
                session_id text COLLATE "C" NOT NULL, present boolean NOT NULL, {_ROW_TYPES}
            ) ON COMMIT DROP"""
    )


def _copy_rows(
    conn: psycopg.Connection, table: str, columns: tuple[str, ...], types: list[str], rows
) -> None:
    """COPY ``rows`` into a temporary table, binary (metadata as jsonb's binary form); then the
    key, and the statistics that let the joins with sessions look rows up by key."""
    statement = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
        sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, columns))
    )
    jsonb = [i for i, c in enumerate(columns) if c.endswith("metadata")]
    with conn.cursor() as cur, cur.copy(statement) as copy:
        copy.set_types(types)
        for row in rows:
            if any(row[i] is not None for i in jsonb):
                row = list(row)
                for i in jsonb:
                    if row[i] is not None:
                        row[i] = b"\x01" + row[i].encode("utf-8")
            copy.write_row(row)
    name = sql.Identifier(table)
    conn.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY (session_id)").format(name))
    # The key alone: the planner needs the row count and the keys' spread to look rows up by
    # key; statistics of every column (two jsonb) cost more than the part's COPY itself.
    conn.execute(sql.SQL("ANALYZE {} (session_id)").format(name))


def _apply_rows(delta: Delta, ids: list[str]) -> Iterator[tuple]:
    empty = (None,) * (len(COLUMNS) - 1)
    for sid in ids:
        b, lv = delta.base.get(sid), delta.live.get(sid)
        yield (
            sid,
            b is not None,
            lv is not None,
            M.recreated(b, lv),
            *(b[1:] if b else empty),
            *(lv[1:] if lv else empty),
        )


# PostgreSQL's touched rows as they are, each with its version (xmin and ctid: any write of
# another transaction gives the row a new one).
_VERSION = "s.xmin::text || '/' || s.ctid::text"
_TOUCHED = "FROM {sessions} s JOIN sessionmig_catchup a ON a.session_id = s.session_id"
_TARGETS = f"""SELECT s.session_id, s.user_id, s.metadata::text, s.created_at, s.expires_at,
                      s.last_activity, s.request_count, {_VERSION} {_TOUCHED}"""
Targets = dict[str, tuple[M.Row, str]]


def _read_targets(conn: psycopg.Connection, schema: str, only: list[str] | None = None) -> Targets:
    """The touched sessions PostgreSQL has, with their versions, read without locking them:
    the merge is computed from these while the app goes on writing. With ``only``, those
    sessions read *and locked* (key order): a session the app ended before the pass's lock and
    created again since is locked here, so the merge made from it cannot go stale."""
    query = sql.SQL(_TARGETS).format(sessions=sql.Identifier(schema, "sessions"))
    if only is not None:
        query = sql.SQL(
            "{} WHERE s.session_id = ANY(%s) ORDER BY s.session_id FOR UPDATE OF s"
        ).format(query)
    rows = conn.execute(query, (only,) if only is not None else None).fetchall()
    return {r[0]: (tuple(r[:7]), r[7]) for r in rows}  # type: ignore[misc]


def _lock_targets(conn: psycopg.Connection, schema: str) -> dict[str, str]:
    """Lock the touched sessions PostgreSQL has (key order: two passes or a pass and a
    multi-row statement of the app lock in one order); their versions now."""
    rows = conn.execute(
        sql.SQL(
            f"SELECT s.session_id, {_VERSION} {_TOUCHED} ORDER BY s.session_id FOR UPDATE OF s"
        ).format(sessions=sql.Identifier(schema, "sessions"))
    ).fetchall()
    return dict(rows)  # type: ignore[arg-type]


def _moved(ids: list[str], seen: Targets, now: dict[str, str]) -> list[str]:
    """The touched sessions another transaction wrote (or created, or ended) between the
    unlocked read and the lock: their merge is computed again from the locked row."""
    return [sid for sid in ids if (seen[sid][1] if sid in seen else None) != now.get(sid)]


def _expected_row(sid: str, outcome: M.Outcome) -> tuple:
    row = outcome.row
    return (sid, True, *row[1:]) if row else (sid, False, *(None,) * 6)


def _replace_expected(conn: psycopg.Connection, rows: list[tuple]) -> None:
    """Put the merge of sessions that moved under the lock in place of their first one."""
    conn.execute(
        "DELETE FROM sessionmig_catchup_expected WHERE session_id = ANY(%s)",
        ([r[0] for r in rows],),
    )
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO sessionmig_catchup_expected (session_id, present, user_id, metadata, "
            "created_at, expires_at, last_activity, request_count) "
            "VALUES (%s, %s, %s, %s::jsonb, %s, %s, %s, %s)",
            rows,
        )


def _replaced(column: str) -> sql.Composable:
    """SQL of a column the side that changed it replaces; both changed: newer last_activity."""
    c, b, lv = sql.Identifier(column), sql.Identifier(f"b_{column}"), sql.Identifier(f"l_{column}")
    # Compared as text for jsonb: equal JSON is one spelling in jsonb, and text is what the
    # rules compare (1 and 1.0 are different values there).
    cast = sql.SQL("::text") if column == "metadata" else sql.SQL("")
    return sql.SQL(
        """CASE WHEN a.has_base AND a.{lv}{cast} IS NOT DISTINCT FROM a.{b}{cast} THEN s.{c}
                WHEN a.has_base AND s.{c}{cast} IS NOT DISTINCT FROM a.{b}{cast} THEN a.{lv}
                WHEN s.{c}{cast} IS NOT DISTINCT FROM a.{lv}{cast} THEN s.{c}
                WHEN a.l_last_activity > s.last_activity THEN a.{lv}
                ELSE s.{c} END"""
    ).format(c=c, b=b, lv=lv, cast=cast)


def _later(column: str) -> sql.Composable:
    c, b, lv = sql.Identifier(column), sql.Identifier(f"b_{column}"), sql.Identifier(f"l_{column}")
    return sql.SQL(
        "CASE WHEN a.has_base AND a.{lv} = a.{b} THEN s.{c} ELSE greatest(s.{c}, a.{lv}) END"
    ).format(c=c, b=b, lv=lv)


def _apply_statements(conn: psycopg.Connection, schema: str) -> dict[str, set[str]]:
    """Apply live's changes with statements that compose with the app's concurrent writes."""
    sessions = sql.Identifier(schema, "sessions")
    assignments = [
        sql.SQL(
            # In bigint, then held within integer: the column saturates, never fails the pass.
            """request_count = CASE WHEN a.has_base
                   THEN least(greatest(s.request_count::int8
                                       + (a.l_request_count::int8 - a.b_request_count),
                                       -2147483648), 2147483647)::int4
                   ELSE greatest(s.request_count, a.l_request_count) END"""
        ),
        *(sql.SQL("{} = {}").format(sql.Identifier(c), _later(c)) for c in M.LATER),
        *(sql.SQL("{} = {}").format(sql.Identifier(c), _replaced(c)) for c in M.REPLACED),
    ]
    updated = conn.execute(
        sql.SQL(
            """UPDATE {} AS s SET {} FROM sessionmig_catchup a
               WHERE a.has_live AND NOT a.recreated AND s.session_id = a.session_id
               RETURNING s.session_id"""
        ).format(sessions, sql.SQL(", ").join(assignments))
    ).fetchall()
    # Ended and created again under its id on the old colour: the new session is live's row.
    replaced = conn.execute(
        sql.SQL(
            """UPDATE {} AS s SET ({}) = ({}) FROM sessionmig_catchup a
               WHERE a.recreated AND s.session_id = a.session_id RETURNING s.session_id"""
        ).format(
            sessions,
            sql.SQL(", ").join(map(sql.Identifier, COLUMNS[1:])),
            sql.SQL(", ").join(
                sql.SQL("a.{}").format(sql.Identifier(f"l_{c}")) for c in COLUMNS[1:]
            ),
        )
    ).fetchall()
    columns = sql.SQL(", ").join(map(sql.Identifier, COLUMNS))
    live_columns = sql.SQL(", ").join(sql.Identifier(f"l_{c}") for c in COLUMNS[1:])
    inserted = conn.execute(
        sql.SQL(
            """INSERT INTO {} ({}) SELECT a.session_id, {} FROM sessionmig_catchup a
               WHERE a.has_live AND (NOT a.has_base OR a.recreated) ORDER BY a.session_id
               ON CONFLICT (session_id) DO NOTHING RETURNING session_id"""
        ).format(sessions, columns, live_columns)
    ).fetchall()
    deleted = conn.execute(
        sql.SQL(
            """DELETE FROM {} AS s USING sessionmig_catchup a
               WHERE a.has_base AND NOT a.has_live AND s.session_id = a.session_id
               RETURNING s.session_id"""
        ).format(sessions)
    ).fetchall()
    return {
        M.CHANGED: {r[0] for r in updated} | {r[0] for r in replaced},
        M.INSERTED: {r[0] for r in inserted},
        M.ENDED: {r[0] for r in deleted},
    }


def _prove(
    conn: psycopg.Connection,
    schema: str,
    expected_kinds: dict[str, set[str]],
    done: dict,
    *,
    counted_before: tuple[int, int, int] | None = None,
) -> list[str]:
    """In the part's own transaction: every touched session equals the rules' outcome, each
    statement touched exactly the sessions it should, and no other row was written
    (``counted_before``: :func:`_write_counts` before the statements)."""
    problems: list[str] = []
    sessions = sql.Identifier(schema, "sessions")
    values = sql.SQL(", ").join(
        sql.SQL("{}.{}{}").format(
            sql.Identifier(alias), sql.Identifier(c), sql.SQL("::text" if c == "metadata" else "")
        )
        for alias in ("s", "e")
        for c in COLUMNS[1:]
    )
    n = len(COLUMNS) - 1
    rows = conn.execute(
        sql.SQL(
            """SELECT e.session_id, e.present, s.session_id IS NOT NULL, {values}
               FROM sessionmig_catchup_expected e LEFT JOIN {} s ON s.session_id = e.session_id
               WHERE e.present <> (s.session_id IS NOT NULL)
                  OR (e.present AND (s.user_id, s.metadata::text, s.created_at, s.expires_at,
                                     s.last_activity, s.request_count)
                      IS DISTINCT FROM (e.user_id, e.metadata::text, e.created_at, e.expires_at,
                                        e.last_activity, e.request_count))
               ORDER BY e.session_id"""
        ).format(sessions, values=values)
    ).fetchall()
    for sid, present, found, *pair in rows[:MAX_MISMATCHES_SHOWN]:
        if present != found:
            what = "present" if found else "absent"
            problems.append(f"{mask_id(sid)} is {what} in PostgreSQL, the rules say otherwise")
            continue
        actual, wanted = pair[:n], pair[n:]
        columns = [
            # user_id and metadata are the user's data: named, not shown.
            f"{c} differs" if c in ("user_id", "metadata") else f"{c} {a} (rules: {w})"
            for c, a, w in zip(COLUMNS[1:], actual, wanted, strict=True)
            if a != w
        ]
        problems.append(f"{mask_id(sid)}: " + ", ".join(columns))
    if len(rows) > MAX_MISMATCHES_SHOWN:
        problems.append(f"… {len(rows) - MAX_MISMATCHES_SHOWN} more sessions differ")
    for kind, wanted_ids in expected_kinds.items():
        got = done[kind]
        if got != wanted_ids:
            extra, missing = len(got - wanted_ids), len(wanted_ids - got)
            problems.append(
                f"the {kind} statement touched {len(got)} sessions, the rules expect "
                f"{len(wanted_ids)} ({extra} unexpected, {missing} missed)"
            )
    problems += _nothing_else_written(conn, schema, done, counted_before)
    return problems


def _write_counts(conn: psycopg.Connection, schema: str) -> tuple[int, int, int] | None:
    """The rows of sessions this backend inserted, updated and deleted and has not yet reported
    (``pg_stat_xact_user_tables``, kept while ``track_counts`` is on, its default); None
    without the counts. Not this transaction's alone: a backend reports its counts when idle,
    at most once a second, so those of its earlier transactions on the same connection (the
    pass's earlier parts) may still be in them — hence read before and after the writes."""
    counted = conn.execute(
        """SELECT current_setting('track_counts')::boolean, n_tup_ins, n_tup_upd, n_tup_del
           FROM pg_stat_xact_user_tables WHERE relid = %s::regclass""",
        (sql.SQL("{}").format(sql.Identifier(schema, "sessions")).as_string(conn),),
    ).fetchone()
    if counted is None or not counted[0] or not _COUNTS_TRUSTED:
        return None
    return (int(counted[1]), int(counted[2]), int(counted[3]))


def _nothing_else_written(
    conn: psycopg.Connection,
    schema: str,
    done: dict[str, set[str]],
    counted_before: tuple[int, int, int] | None = None,
) -> list[str]:
    """No row of sessions but the ones the statements returned was written by this part.

    PostgreSQL counts every row a backend inserted, updated or deleted per table
    (:func:`_write_counts`): what they grew by since ``counted_before`` equal to what the
    statements returned means no other write happened, at no cost. Without the counts, every
    row that carries this transaction's id (``xmin``) is looked at instead, a scan of the
    whole table while the touched rows stay locked.
    """
    sessions = sql.Identifier(schema, "sessions")
    wrote = {kind: len(ids) for kind, ids in done.items()}
    counted = _write_counts(conn, schema)
    if counted is not None:
        base = counted_before or (0, 0, 0)
        inserted, updated, deleted = (now - then for now, then in zip(counted, base, strict=True))
        if (inserted, updated, deleted) == (wrote[M.INSERTED], wrote[M.CHANGED], wrote[M.ENDED]):
            return []
        return [
            f"this pass wrote {inserted} / {updated} / {deleted} rows of sessions (inserted / "
            f"updated / deleted), its statements {wrote[M.INSERTED]} / {wrote[M.CHANGED]} / "
            f"{wrote[M.ENDED]}: something else was written"
        ]
    written, outside = conn.execute(
        sql.SQL(
            """SELECT count(*), count(*) FILTER (WHERE a.session_id IS NULL)
               FROM {} s LEFT JOIN sessionmig_catchup a ON a.session_id = s.session_id
               WHERE s.xmin = pg_current_xact_id()::xid"""
        ).format(sessions)
    ).fetchone()  # type: ignore[misc]
    problems = []
    if outside:
        problems.append(f"{outside} sessions outside the pass's set were written by it")
    if written != wrote[M.CHANGED] + wrote[M.INSERTED]:
        problems.append(
            f"{written} rows carry this pass's writes, its statements wrote "
            f"{wrote[M.CHANGED] + wrote[M.INSERTED]}"
        )
    return problems


def _merge(delta: Delta, sid: str, target: Targets) -> M.Outcome:
    found = target.get(sid)
    return M.merge(delta.base.get(sid), delta.live.get(sid), found[0] if found else None)


def _tally(
    delta: Delta,
    ids: list[str],
    outcomes: dict[str, M.Outcome],
    target: Targets,
    applied: Applied,
) -> dict[str, set[str]]:
    """Count the outcomes of ``ids`` into ``applied``; return the sessions each statement must
    touch."""
    kinds: dict[str, set[str]] = {M.CHANGED: set(), M.INSERTED: set(), M.ENDED: set()}
    for sid in ids:
        outcome, lv = outcomes[sid], delta.live.get(sid)
        t = target[sid][0] if sid in target else None
        applied.kinds[outcome.kind] += 1
        if outcome.kind == M.RECREATED:  # replaced where PostgreSQL has it, else inserted
            kinds[M.CHANGED if t is not None else M.INSERTED].add(sid)
        elif outcome.kind in kinds:
            kinds[outcome.kind].add(sid)
        shown = applied.examples.setdefault(outcome.kind, [])
        if len(shown) < EXAMPLES:
            shown.append(mask_id(sid))
        for conflict in outcome.conflicts:
            assert lv is not None and t is not None
            applied.conflicts.append(
                ConflictDetail(mask_id(sid), conflict.column, conflict.winner, lv[5], t[5])
            )
    return kinds


def _transaction(
    conn: psycopg.Connection,
    schema: str,
    delta: Delta,
    ids: list[str],
    chain: Chain,
    expect: Progress | None,
    lock_timeout: str,
    dry_run: bool,
    record: Callable[[psycopg.Connection, Applied], None],
    applied: Applied,
) -> None:
    """One part's transaction (the whole pass when it is one part): copy the delta of ``ids``,
    merge it with PostgreSQL's rows read unlocked, lock those rows (merging again those the app
    wrote meanwhile), apply, prove, ``record``; fills ``applied``. Raises to roll back (a failed
    proof, a dry run's end, any error)."""
    with conn.transaction():
        conn.execute("SELECT set_config('lock_timeout', %s, true)", (lock_timeout,))
        conn.execute(
            "SELECT set_config('idle_in_transaction_session_timeout', %s, true)",
            (IDLE_IN_TRANSACTION,),
        )
        # The touched sessions are found by key: with a hash join the planner scans all of
        # sessions for every statement (4x slower at 1% changed on 1M sessions, measured), and
        # holds the touched rows' locks that much longer. Local to this transaction.
        conn.execute("SELECT set_config('enable_hashjoin', 'off', true)")
        conn.execute("SELECT set_config('enable_mergejoin', 'off', true)")
        # The migration lock is a session-level lock on a connection that can vanish mid-pass
        # unnoticed; what makes one pass per number, and each part once, is this
        # transaction-level lock (released only by this transaction's end) with the chain and
        # the parts read again under it (and, behind both, the target's unique index on the
        # pass number).
        commit_lock(conn, schema)
        if chain_of(conn, schema) != chain:
            raise BaseNotCurrent(
                "another pass, migrate or rollback committed since this pass began (its "
                "migration lock was lost); nothing was committed — run the same command again"
            )
        refuse_after_rollback(conn, schema, chain)
        now = progress_of(conn, schema, chain)
        if (now and now.key()) != (expect and expect.key()):
            raise BaseNotCurrent(
                f"another run carried parts of catch-up pass {chain.last_pass + 1} since this "
                "one read them (its migration lock was lost); nothing was committed — run the "
                "same command again"
            )
        _create_temp_tables(conn)
        _copy_rows(
            conn, "sessionmig_catchup", _APPLY_COLUMNS, _APPLY_COPY_TYPES, _apply_rows(delta, ids)
        )
        # The merge is computed from PostgreSQL's rows as they are, unlocked: the app goes on
        # serving the touched sessions while the rules run and the expected rows are copied.
        # Only then are the rows locked; those another transaction wrote meanwhile (their
        # version moved) are merged again from the locked row, which nobody else can change.
        seen = _read_targets(conn, schema)
        outcomes = {sid: _merge(delta, sid, seen) for sid in ids}
        _copy_rows(
            conn,
            "sessionmig_catchup_expected",
            _EXPECTED_COLUMNS,
            _EXPECTED_COPY_TYPES,
            (_expected_row(sid, outcomes[sid]) for sid in ids),
        )
        locked = time.perf_counter()
        moved = _moved(ids, seen, _lock_targets(conn, schema))
        if moved:
            # Read again under a lock (a row created again since the lock is locked now; one
            # still absent is inserted with ON CONFLICT and checked by the proof).
            for sid in moved:
                seen.pop(sid, None)
            seen.update(_read_targets(conn, schema, moved))
            outcomes.update((sid, _merge(delta, sid, seen)) for sid in moved)
            _replace_expected(conn, [_expected_row(sid, outcomes[sid]) for sid in moved])
        applied.remerged = len(moved)
        kinds = _tally(delta, ids, outcomes, seen, applied)
        counted = _write_counts(conn, schema)
        done = _apply_statements(conn, schema)
        problems = _prove(conn, schema, kinds, done, counted_before=counted)
        if problems:
            raise _ProofFailed(problems)
        record(conn, applied)
        applied.locked_seconds = time.perf_counter() - locked
        if dry_run:
            raise _DryRun
        # From here the COMMIT is on its way: a failure or interrupt no longer proves that
        # nothing was committed (the server may have committed and its answer been lost).
        applied.committing = True
    applied.locked_seconds = time.perf_counter() - locked  # the commit included


def _kinds(applied: Applied) -> Counter[str]:
    """A part's outcomes as its audit row keeps them (conflicts: sessions, not columns)."""
    kinds = Counter(applied.kinds)
    kinds[CONFLICTS] = len({c.session for c in applied.conflicts})
    return kinds


def _counts(delta: Delta, kinds: Counter[str]) -> dict[str, int]:
    return {
        "inserted": kinds[M.INSERTED],
        "changed": kinds[M.CHANGED],
        "ended": kinds[M.ENDED],
        "stays_ended": kinds[M.STAYS_ENDED],
        "recreated": kinds[M.RECREATED],
        "conflicts": kinds[CONFLICTS],
        "unchanged": delta.unchanged,
        "rejected": len(delta.rejected),
    }
