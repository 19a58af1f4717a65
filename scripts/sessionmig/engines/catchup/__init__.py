"""One catch-up pass: carry what the old colour wrote to SQLite since the last pass into
PostgreSQL, exactly once, while both colours serve.

A pass is a three-way merge (rules in :mod:`sessionmig.rules.merge`): **base** = the snapshot last
carried into PostgreSQL, **live** = a new snapshot of the live SQLite store (taken by
:mod:`sessionmig.sqlite.snapshot` into ``state_dir``), **target** = PostgreSQL's rows now.
Rows of both snapshots are normalised by the migration's own rules (``transform.normalise``); a
SQLite join of the two snapshots finds the sessions whose raw values differ, so only those are
read into Python.

PostgreSQL is written in **parts**: the touched sessions in key order, a span of them per
transaction, each part sized so that it holds its rows locked about :data:`PART_LOCKED_S` (the
first :data:`FIRST_PART_ROWS` sessions, then as many as the last part's pace allows): a pass
carrying 30% of a large store never holds the app's rows for more than about a second. A part,
under ``lock_timeout``, merges its sessions with PostgreSQL's rows read unlocked, then locks them
(``FOR UPDATE``, in key order; those the app wrote meanwhile are merged again), and applies the
changes by set-based statements that compose with the app's own writes (``request_count =
request_count + Δ``, ``greatest(…)``), so the app on PostgreSQL waits at most on a row lock and
never loses an update. In the same transaction the part proves itself: every session of it
equals ``merge(base, live, target-before)``, each statement touched exactly the sessions it
should, and no other row was written by this transaction. A mismatch rolls the part back and
says what. The parts partition the delta, so their proofs compose into the pass's.

Exactly once: each part records, in its own transaction, how far the pass got (a
``catchup_part`` row: how many sessions of the delta in key order are carried, and the digest of
their ids); the last part records the pass itself (step ``catchup``: its base and live sha256),
which is what moves the chain. The live snapshot is kept in ``state_dir`` from before the first
part: it is the next pass's base, and the snapshot a pass stopped part-way is finished from —
the same command, run again, reads the parts, computes the same delta from the same two files
(refused if its digest differs) and carries only the sessions not yet carried. The chain starts
at the latest committed migrate run, whose backup (``sqlite_path``) is the first base; a pass
whose base is not the last one recorded is refused, so a delta is never applied twice; a part
that dies before its commit committed nothing. Passes hold the migration's advisory lock, and
every part re-reads the chain and the parts under a transaction-level commit lock, so two
passes (or a pass and a migrate or rollback) never interleave; a rollback during the overlap is
refused while a pass is carried in part."""

from sessionmig.engines.catchup.apply import EXAMPLES, ConflictDetail
from sessionmig.engines.catchup.chain import (
    PART_STEP,
    STEP,
    BaseNotCurrent,
    Chain,
    Progress,
    chain_of,
    commit_lock,
    commit_outcome,
    progress_of,
    refuse_after_rollback,
    refuse_partial_pass,
    rules_key,
)
from sessionmig.engines.catchup.delta import Delta, diff
from sessionmig.engines.catchup.passes import (
    FIRST_PART_ROWS,
    LOCK_TIMEOUT,
    MAX_PART_ROWS,
    MIN_PART_ROWS,
    PART_LOCKED_S,
    RETRIES,
    CatchupResult,
    catchup,
)
from sessionmig.engines.catchup.priority import BACKGROUND_NICE
from sessionmig.engines.catchup.state import CLOCK_MARGIN, ROLLBACK_MARKER, SNAPSHOT_NAME
from sessionmig.engines.catchup.tables import MEANINGS, catchup_tables

__all__ = [
    "BACKGROUND_NICE",
    "CLOCK_MARGIN",
    "EXAMPLES",
    "FIRST_PART_ROWS",
    "LOCK_TIMEOUT",
    "MAX_PART_ROWS",
    "MEANINGS",
    "MIN_PART_ROWS",
    "PART_LOCKED_S",
    "PART_STEP",
    "RETRIES",
    "ROLLBACK_MARKER",
    "SNAPSHOT_NAME",
    "STEP",
    "BaseNotCurrent",
    "CatchupResult",
    "Chain",
    "ConflictDetail",
    "Delta",
    "Progress",
    "catchup",
    "catchup_tables",
    "chain_of",
    "commit_lock",
    "commit_outcome",
    "diff",
    "progress_of",
    "refuse_after_rollback",
    "refuse_partial_pass",
    "rules_key",
]
