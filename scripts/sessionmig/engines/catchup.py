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
refused while a pass is carried in part.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import socket
import sqlite3
import stat
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import psycopg
from psycopg import sql

from sessionmig import defaults as D
from sessionmig.errors import ParameterError, SourceError, TargetError, TransientTargetError
from sessionmig.postgres.audit import COMMITTED, NOT_COMMITTED, RunRow, write_run
from sessionmig.postgres.audit import commit_outcome as audit_outcome
from sessionmig.postgres.connect import connect
from sessionmig.postgres.load import lock_key, migration_lock
from sessionmig.rules import merge as M
from sessionmig.rules.jsonb import metadata_text
from sessionmig.rules.mask import mask_id, redact
from sessionmig.rules.transform import COLUMNS, Reject, Rules, Session, normalise
from sessionmig.rules.verdict import Verdict
from sessionmig.sqlite.snapshot import SnapshotResult, private_dir, take
from sessionmig.sqlite.source import Backup, in_background, open_backup, sha256_file, shaped
from sessionmig.sqlite.wire import PLAIN, SURE_COLUMNS, RulesPath

if TYPE_CHECKING:  # pandas is heavy; only the notebook's functions need it
    import pandas as pd

T = TypeVar("T")
STEP = "catchup"
PART_STEP = "catchup_part"
"""The audit step of a part of a pass that is not its last (the last writes the pass's row)."""
PART_LOCKED_S = 0.5
"""How long a part should hold its sessions' rows locked: the next part's size is chosen from
the last one's rows per second locked (the app waits at most this long on a touched session)."""
FIRST_PART_ROWS = 4_000
MIN_PART_ROWS = 500
MAX_PART_ROWS = 100_000
LOCK_TIMEOUT = D.LOCK_TIMEOUT
"""How long the pass waits for a row lock the app holds before giving up (and committing
nothing). The app's transactions are one statement each, so this is only hit when something
holds rows for long."""
RETRIES = 3  # a lock timeout or deadlock with the app: the transaction is redone from scratch
# A pass whose process stops between two statements (Ctrl-Z, a debugger, a frozen VM) must not
# hold the app's rows locked until it wakes: the server ends its session after this long idle
# inside the transaction, which then commits nothing (the pass's own gaps are milliseconds
# under the locks, seconds for the merge before them).
IDLE_IN_TRANSACTION = "60s"
EXAMPLES = 3
MAX_MISMATCHES_SHOWN = 20
_SNAPSHOT_NAME = "{sha256}.db"
_RETRY_SQLSTATES = {"55P03", "40P01", "40001"}  # lock_not_available, deadlock, serialization
# Whether the proof may read PostgreSQL's per-transaction row counts (tests turn it off to
# prove the xmin scan that replaces them when track_counts is off).
_COUNTS_TRUSTED = True


class BaseNotCurrent(ParameterError):
    """The base given is not the snapshot last carried into PostgreSQL: refused, so that no
    delta is applied twice."""


@dataclass(frozen=True)
class ConflictDetail:
    """A session whose column both colours changed differently (id masked)."""

    session: str
    column: str
    winner: str
    live_last_activity: datetime
    postgres_last_activity: datetime


@dataclass(frozen=True)
class CatchupResult:
    """What one pass did, and its proof."""

    run_id: str  # the audit row's run_id
    pass_number: int
    migrate_run_id: str
    base_path: str
    base_sha256: str
    live_sqlite_path: str
    live_snapshot: str  # the live store's snapshot, kept in state_dir as the next base
    live_sha256: str
    snapshot: SnapshotResult
    live_rows: int
    inserted: int
    changed: int
    ended: int
    stays_ended: int  # changed or ended in live, already ended in PostgreSQL
    recreated: int  # ended and created again under the same id on the old colour: live's row
    conflicts: int
    unchanged: int
    rejected: int  # live rows the migration's rules refuse: left as they are, named
    conflict_details: tuple[ConflictDetail, ...]
    examples: dict[str, tuple[str, ...]]  # kind -> masked ids
    rejected_examples: tuple[str, ...]
    mismatches: tuple[str, ...]  # what the proof found wrong (then nothing was committed)
    seconds: float
    locked_seconds: float  # the longest any part held its rows: from its locks to its commit
    committed: bool
    dry_run: bool
    verdict: Verdict
    reason: str
    # Touched sessions the app wrote between the pass's unlocked merge and its row locks,
    # merged again from the locked row.
    remerged: int = 0
    parts: int = 1  # transactions the pass was applied in (each proven and recorded)
    resumed: int = 0  # sessions an earlier run carried before its pass stopped part-way

    @property
    def exit_code(self) -> int:
        """0 passed (warnings allowed), 1 the proof failed (nothing committed)."""
        return self.verdict.exit_code

    @property
    def counts(self) -> dict[str, int]:
        return {
            "inserted": self.inserted,
            "changed": self.changed,
            "ended": self.ended,
            "stays_ended": self.stays_ended,
            "recreated": self.recreated,
            "conflicts": self.conflicts,
            "unchanged": self.unchanged,
            "rejected": self.rejected,
        }


# --- the chain of passes -------------------------------------------------------------------


@dataclass(frozen=True)
class Chain:
    """Where the chain of passes stands on a target: the migrate run it starts from and the
    last pass recorded since."""

    migrate_run_id: str
    migrate_sha256: str
    last_pass: int  # 0: no pass yet
    base_sha256: str  # the sha256 the next pass's base must have
    base_recorded_path: str  # where that base was when recorded


def _runs(schema: str) -> sql.Composed:
    return sql.SQL("{}").format(sql.Identifier(schema, "session_migration_runs"))


def chain_of(conn: psycopg.Connection, schema: str) -> Chain:
    """The chain's head: the latest committed migrate run and the last pass recorded after it."""
    try:
        migrate = conn.execute(
            sql.SQL(
                "SELECT run_id, source_sha256, source_path FROM {} "
                "WHERE step = 'migrate' AND NOT dry_run ORDER BY finished_at DESC LIMIT 1"
            ).format(_runs(schema))
        ).fetchone()
    except psycopg.errors.UndefinedTable:
        raise TargetError(
            f"schema {schema!r} has no session_migration_runs: migrate first, then catch up"
        ) from None
    if migrate is None:
        raise TargetError(
            f"no committed migrate run in schema {schema!r}: migrate the first snapshot, then "
            "catch up"
        )
    last = conn.execute(
        sql.SQL(
            "SELECT (parameters->>'catchup_pass')::int, source_sha256, source_path FROM {} "
            "WHERE step = %s AND parameters->>'migrate_run_id' = %s "
            "ORDER BY (parameters->>'catchup_pass')::int DESC LIMIT 1"
        ).format(_runs(schema)),
        (STEP, migrate[0]),
    ).fetchone()
    if last is None:
        return Chain(migrate[0], migrate[1], 0, migrate[1], migrate[2])
    return Chain(migrate[0], migrate[1], last[0], last[1], last[2])


@dataclass(frozen=True)
class Progress:
    """A pass begun and not finished: what its committed parts carried.

    A pass is applied in parts (see :func:`catchup`): the touched sessions in key order, a
    span of them per transaction, each span recorded by a ``catchup_part`` row in the same
    transaction as its writes. The pass's own ``catchup`` row, written by its last part, is what
    moves the chain; until then the parts say how far it got."""

    number: int
    live_sha256: str
    through: int  # the delta's first ``through`` sessions, in key order, are carried
    ids_sha256: str  # of those sessions' ids: a resumed pass proves its delta is the same
    of: int  # sessions the pass touches in all
    parts: int
    kinds: Counter[str]  # the outcomes of the parts' sessions, summed
    rules: str  # :func:`rules_key` of the rules the pass began with

    def key(self) -> tuple[str, int, str]:
        return (self.live_sha256, self.through, self.ids_sha256)


def progress_of(conn: psycopg.Connection, schema: str, chain: Chain) -> Progress | None:
    """The parts committed of the pass after the chain's head (None: it has not begun)."""
    rows = conn.execute(
        sql.SQL(
            "SELECT parameters FROM {} WHERE step = %s AND parameters->>'migrate_run_id' = %s "
            "AND (parameters->>'catchup_pass')::int = %s "
            "ORDER BY (parameters->>'through')::int"
        ).format(_runs(schema)),
        (PART_STEP, chain.migrate_run_id, chain.last_pass + 1),
    ).fetchall()
    if not rows:
        return None
    parts = [r[0] for r in rows]
    last = parts[-1]
    kinds: Counter[str] = Counter()
    for part in parts:
        if (part["base_sha256"], part["live_sha256"]) != (chain.base_sha256, last["live_sha256"]):
            raise TargetError(
                f"the parts recorded for catch-up pass {chain.last_pass + 1} name different "
                "snapshots (session_migration_runs, step catchup_part): the audit table was "
                "changed by hand; nothing was done — find out who wrote it"
            )
        kinds.update(part["kinds"])
    return Progress(
        number=chain.last_pass + 1,
        live_sha256=last["live_sha256"],
        through=int(last["through"]),
        ids_sha256=last["ids_sha256"],
        of=int(last["of"]),
        parts=len(parts),
        kinds=kinds,
        rules=str(last.get("rules")),
    )


def refuse_partial_pass(conn: psycopg.Connection, schema: str, chain: Chain, what: str) -> None:
    """Refuse ``what`` (an overlap rollback, …) while a pass is carried in part: PostgreSQL then
    holds some of its sessions as live has them and the others as the base has them, a state
    no snapshot describes."""
    found = progress_of(conn, schema, chain)
    if found is not None:
        raise BaseNotCurrent(
            f"catch-up pass {found.number} is carried in part ({found.through:,} of "
            f"{found.of:,} sessions, {found.parts} parts committed): no {what} may start until "
            "it is finished. Nothing was changed; run the catch-up command again (it finishes "
            "the pass from its kept snapshot), then this one"
        )


def refuse_after_rollback(
    conn: psycopg.Connection, schema: str, chain: Chain, what: str = "catch-up pass"
) -> None:
    """Refuse ``what`` once a rollback during the overlap carried PostgreSQL's changes back into
    the live SQLite file (the target's audit row says so, whatever the file says): a catch-up
    pass would bring them back as SQLite deltas, a second rollback would carry them again —
    either way they would count twice."""
    rolled = conn.execute(
        sql.SQL(
            "SELECT run_id FROM {} WHERE step = 'rollback' AND parameters->>'mode' = 'overlap' "
            "AND parameters->>'migrate_run_id' = %s LIMIT 1"
        ).format(_runs(schema)),
        (chain.migrate_run_id,),
    ).fetchone()
    if rolled is not None:
        raise BaseNotCurrent(
            f"run {rolled[0]} rolled the target back into the live SQLite file after migrate run "
            f"{chain.migrate_run_id}: no {what} may follow it (its changes would count "
            "twice); to cut over again, take a new snapshot and migrate it"
        )


def _base_file(chain: Chain, sqlite_path: Path, state_dir: Path, given: Path | None) -> Path:
    if given is not None:
        return given
    if chain.last_pass == 0:
        return sqlite_path
    return state_dir / _SNAPSHOT_NAME.format(sha256=chain.base_sha256)


def _refuse_stale_base(base: Path, sha: str, chain: Chain) -> None:
    if sha == chain.base_sha256:
        return
    if chain.last_pass == 0:
        raise BaseNotCurrent(
            f"{base}: sha256 {sha} is not the backup the latest migrate run "
            f"({chain.migrate_run_id}) loaded ({chain.migrate_sha256}); sqlite_path must name "
            "the migrated snapshot"
        )
    raise BaseNotCurrent(
        f"{base}: sha256 {sha} is not the base of the next pass: pass {chain.last_pass} "
        f"already carried the snapshot {chain.base_sha256} into PostgreSQL, so this base's "
        "changes would be applied twice; refused. Run the same command again without naming a "
        "base: it takes the last snapshot from state_dir"
    )


def _private_state_dir(state_dir: Path) -> None:
    """``state_dir`` holds live tokens: created 0700, refused when others may read it or when
    it lies inside a report folder (reports are shared; tokens must never be)."""
    for folder in (state_dir, *state_dir.parents):
        if (folder / "manifest.json").is_file():
            raise ParameterError(
                f"state_dir {state_dir} is inside the report folder {folder}: snapshots hold "
                "session tokens and must never be published with a report; choose a private "
                "directory, e.g. /var/lib/sessionmig/catchup"
            )
    private_dir(state_dir)
    if not state_dir.is_dir():
        raise ParameterError(f"state_dir {state_dir} is not a directory")
    mode = stat.S_IMODE(state_dir.stat().st_mode)
    if mode & 0o077:
        raise ParameterError(
            f"state_dir {state_dir} is open to others (mode {mode:o}); it will hold session "
            f"tokens: run chmod 700 {state_dir}, or give a new path"
        )


def _keep_snapshot(taken: SnapshotResult, state_dir: Path) -> tuple[Path, bool]:
    """Name the new snapshot by its sha256; whether this pass created that file (an identical
    one already there — the last pass's, when nothing changed — is the same file, and is never
    this pass's to remove)."""
    final = state_dir / _SNAPSHOT_NAME.format(sha256=taken.sha256)
    incoming = Path(taken.path)
    if final.exists():
        incoming.unlink()
        return final, False
    os.rename(incoming, final)
    return final, True


_INCOMING = re.compile(r"^\.incoming-.*-(?P<pid>[0-9]+)\.db$")
_PARTIAL = re.compile(r"^\.\.?incoming-.*\.partial-(?P<pid>[0-9]+)-[0-9a-f]+(-journal)?$")


def _incoming_name(run_id: str) -> str:
    """Where a pass writes its snapshot before it is named by its sha256; the pid lets a later
    pass tell a killed pass's leftovers from a running one's."""
    return f".incoming-{run_id}-{os.getpid()}.db"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ours(name: str) -> bool:
    return (name.endswith(".db") and len(name) == 67) or name.startswith(
        (".incoming-", "..incoming-")
    )


def _prune(state_dir: Path, keep: set[Path]) -> None:
    """After a commit: remove the snapshots no pass can need any more (they hold tokens) — all
    but the new head and its base — and whatever a killed or refused pass left (incoming
    copies, partial snapshots and their journals). Safe while another pass runs: a pass that
    has not committed yet will be refused by the chain this commit moved."""
    for item in state_dir.iterdir():
        if _ours(item.name) and item.resolve() not in keep:
            item.unlink(missing_ok=True)


def _prune_dead(state_dir: Path) -> None:
    """Before a pass: remove the incoming copies and partial snapshots of passes whose process
    is gone (killed mid-way: each is a full copy of the store, tokens inside). A running pass's
    files are left alone."""
    for item in state_dir.iterdir():
        found = _INCOMING.match(item.name) or _PARTIAL.match(item.name)
        if found and not _alive(int(found["pid"])):
            item.unlink(missing_ok=True)


# --- what changed between the two snapshots ------------------------------------------------


@dataclass
class Delta:
    """The sessions whose normalised rows differ between base and live."""

    base: dict[str, M.Row] = field(default_factory=dict)
    live: dict[str, M.Row] = field(default_factory=dict)
    ids: list[str] = field(default_factory=list)  # the sessions the pass touches, in key order
    live_rows: int = 0
    unchanged: int = 0
    rejected: list[str] = field(default_factory=list)  # masked ids of refused live rows
    base_rejected: set[str] = field(default_factory=set)  # base rows the rules refuse


def _canonical(row: M.Row) -> M.Row:
    """A normalised session with metadata spelled as PostgreSQL prints jsonb, so that it
    compares equal to PostgreSQL's own metadata when the JSON is equal."""
    meta = row[2]
    if meta is not None:
        # JSON Python cannot read (too deep) stays as it is: PostgreSQL compares it as jsonb.
        with contextlib.suppress(ValueError, RecursionError):
            meta = metadata_text(meta)
    return (row[0], row[1], meta, row[3], row[4], row[5], row[6])


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _text_affinity(declared: str) -> bool:
    """SQLite's rule: a declared type containing CHAR, CLOB or TEXT (and not INT) gives TEXT
    affinity."""
    upper = declared.upper()
    return "INT" not in upper and any(k in upper for k in ("CHAR", "CLOB", "TEXT"))


def _same(column: str, declared: str, extra: bool) -> str:
    """SQL: the raw value of ``column`` is the same in the live row ``l`` and the base row
    ``b``, for the rules' purpose. ``IS`` alone takes 7 and 7.0 for equal: harmless where the
    rules read both alike (request_count reads both as 7; a number in a timestamp column is a
    reject either way; TEXT affinity stores numbers as text anyway), so the storage class is
    compared only where it could matter — which halves the join on a big store."""
    c = _quoted(column)
    alike = column in ("request_count", "created_at", *M.LATER) or _text_affinity(declared)
    if alike and not extra:
        return f"l.{c} IS b.{c}"
    return f"(l.{c} IS b.{c} AND typeof(l.{c}) = typeof(b.{c}))"


def _raw_rows(
    backup: Backup, schema_name: str, extra: tuple[str, ...], batch: int
) -> Iterator[tuple]:
    """The delta's rows of one snapshot, in the form ``Backup.rows`` gives (``normalise``'s)."""
    names = (*COLUMNS, *extra)
    values = ", ".join(_quoted(c) for c in names)
    types = ", ".join(f"typeof({_quoted(c)})" for c in names)
    cursor = backup.query(
        f"SELECT rowid, {values}, {types} FROM {schema_name}.sessions "
        "WHERE session_id IN (SELECT sid FROM temp.sessionmig_delta)"
    )
    for chunk in backup.batches(cursor, batch):
        for row in chunk:
            yield shaped(row, len(extra))


_BY_ROWID = 500  # rowids bound in one statement (SQLite allows 999 on the oldest builds)
_PG_EPOCH_UTC = datetime(2000, 1, 1, tzinfo=UTC)


def _delta_rows(
    backup: Backup, schema_name: str, rules: Rules, batch: int
) -> Iterator[Session | Reject]:
    """The delta's rows of one snapshot, each as :func:`normalise` makes it. The rows the rules
    surely land as they are (:class:`wire.RulesPath`, the path inspect and the app check take)
    are built a batch at a time; every other row is read raw and goes through ``normalise``.
    Extra columns change what metadata holds: then every row takes the rules."""
    extra = rules.extra_columns
    if extra:
        for raw in _raw_rows(backup, schema_name, extra, batch):
            yield normalise(raw, rules)
        return
    path = RulesPath(rules, repeated_keys=False)  # a repeated key changes no row's text
    cursor = backup.query(
        f"SELECT rowid, {PLAIN}, {SURE_COLUMNS} FROM {schema_name}.sessions "
        "WHERE session_id IN (SELECT sid FROM temp.sessionmig_delta)"
    )
    for chunk in backup.batches(cursor, batch):
        checked = path.check(chunk)
        yield from _sure_sessions(checked.sure, checked)
        doubtful = checked.exact + [checked.rowids[i] for i in np.flatnonzero(~checked.sure)]
        for raw in _raw_by_rowid(backup, schema_name, sorted(doubtful)):
            yield normalise(raw, rules)


def _sure_sessions(sure: np.ndarray, checked: Any) -> Iterator[Session]:
    """The sessions of a checked batch's sure rows, as ``normalise`` makes them: their text as
    UTF-8 (proved), their instants from ``timestamptz``'s microseconds, in UTC."""
    pick = np.flatnonzero(sure).tolist()

    def instants(micros: np.ndarray) -> list[datetime]:
        at = micros[pick].tolist()
        return [_PG_EPOCH_UTC + timedelta(microseconds=m) for m in at]

    def text(value: bytes | None) -> str | None:
        return None if value is None else value.decode("utf-8")

    sids, uids, metas = checked.session_ids, checked.user_ids, checked.metadata
    counts = checked.counts[pick].tolist()
    yield from (
        Session(sids[i].decode("utf-8"), text(uids[i]), text(metas[i]), c, e, la, n)
        for i, c, e, la, n in zip(
            pick,
            instants(checked.created),
            instants(checked.expires),
            instants(checked.last),
            counts,
            strict=True,
        )
    )


def _raw_by_rowid(backup: Backup, schema_name: str, rowids: list[int]) -> Iterator[tuple]:
    """The raw rows (``normalise``'s form) of ``rowids`` in one snapshot."""
    values = ", ".join(_quoted(c) for c in COLUMNS)
    types = ", ".join(f"typeof({_quoted(c)})" for c in COLUMNS)
    for start in range(0, len(rowids), _BY_ROWID):
        some = rowids[start : start + _BY_ROWID]
        cursor = backup.query(
            f"SELECT rowid, {values}, {types} FROM {schema_name}.sessions "
            f"WHERE rowid IN ({', '.join('?' * len(some))}) ORDER BY rowid",
            tuple(some),
        )
        for chunk in backup.batches(cursor, _BY_ROWID):
            for row in chunk:
                yield shaped(row, 0)


def _decoded(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _live_shape(base: Backup, live_path: Path) -> dict[str, str]:
    """The attached live snapshot's columns and declared types; refused unless it is the app's
    table: the base's columns, session_id unique, a rowid table."""
    columns = {
        _decoded(r[1]): _decoded(r[2]) for r in base.query("PRAGMA live.table_xinfo(sessions)")
    }
    if sorted(columns) != sorted(base.columns):
        raise SourceError(
            f"{live_path}: its columns {sorted(columns)} differ from the base's "
            f"{sorted(base.columns)}; the app's schema changed since the migration"
        )
    unique = False
    for _, name, is_unique, _, partial in base.query("PRAGMA live.index_list(sessions)"):
        if is_unique and not partial:
            info = base.query(f"PRAGMA live.index_info({_quoted(_decoded(name))})").fetchall()
            unique = unique or [_decoded(r[2]) for r in info] == ["session_id"]
    if not unique:
        raise SourceError(
            f"{live_path}: session_id is not unique in this file; catch-up matches sessions by "
            "it (the app's store has it as its primary key)"
        )
    try:
        base.query("SELECT rowid FROM live.sessions LIMIT 1").fetchall()
    except SourceError:
        raise SourceError(
            f"{live_path}: sessions is a WITHOUT ROWID table, not the app's"
        ) from None
    return columns


def _ended_in_live(base_uri: str, live_uri: str) -> list[bytes]:
    """The base's session ids that live does not have (logouts and cleanups), by key."""
    conn = sqlite3.connect(base_uri, uri=True)
    conn.text_factory = bytes
    try:
        conn.execute("ATTACH DATABASE ? AS live", (live_uri,))
        return [
            r[0]
            for r in conn.execute(
                """SELECT b.session_id FROM main.sessions b WHERE NOT EXISTS
                       (SELECT 1 FROM live.sessions l WHERE l.session_id = b.session_id)"""
            )
        ]
    except sqlite3.DatabaseError as exc:
        raise SourceError(f"comparing the snapshots failed ({exc}); take a new pass") from None
    finally:
        conn.close()


def diff(
    base: Backup,
    live_path: Path,
    rules: Rules,
    batch_rows: int = D.BATCH_ROWS,
    live_rows: int | None = None,
) -> Delta:
    """The sessions that differ between the base and the live snapshot, normalised by the
    migration's rules.

    SQLite compares the raw rows first, so only the rows that differ are read into Python:
    each live row against the base row with the same rowid (a session keeps its rowid while the
    app updates it; a rowid that holds another session, or none, marks the session to be looked
    at by its key), and base sessions missing from live by their key. The live snapshot is
    attached to the base's connection, read only (it was hashed as it was taken).
    """
    if base.missing_columns:
        raise SourceError(f"{base.original}: sessions lacks {base.missing_columns}")
    if base.renamed:
        raise SourceError(
            f"{base.original}: sessions has a column named rowid, which hides SQLite's rowid; "
            "catch-up matches live rows to the base's by rowid, so it cannot carry this store "
            "— migrate a fresh snapshot instead (migrate reads it from a private copy)"
        )
    if not base.session_id_unique:
        raise SourceError(
            f"{base.original}: session_id is not unique in this file; catch-up matches sessions "
            "by it (the app's store has it as its primary key)"
        )
    extra = rules.extra_columns
    uri = live_path.resolve().as_uri() + "?mode=ro&immutable=1"
    base.query("ATTACH DATABASE ? AS live", (uri,))
    try:
        columns = _live_shape(base, live_path)
        same = " AND ".join(
            _same(c, columns.get(c, ""), c in extra) for c in (*COLUMNS[1:], *extra)
        )
        # The two halves run at once, each on a connection of its own (SQLite works outside
        # the GIL): the sessions ended in live, by key, on a thread …
        ended = in_background(_ended_in_live, base.uri, uri)
        # … and every live row against the base row with its rowid, here.
        base.query(
            f"""CREATE TEMP TABLE sessionmig_delta AS
                SELECT l.session_id AS sid FROM live.sessions l
                LEFT JOIN main.sessions b ON b.rowid = l.rowid
                WHERE b.rowid IS NULL OR b.session_id IS NOT l.session_id OR NOT ({same})"""
        )
        # CAST: the ids come back as the bytes SQLite holds; bound as text they match again.
        base.connection.executemany(
            "INSERT INTO temp.sessionmig_delta VALUES (CAST(? AS TEXT))",
            ((sid,) for sid in ended.result()),
        )
        base.connection.commit()  # sqlite3 opened a transaction for the insert; DETACH needs none
        if live_rows is None:
            live_rows = base.query("SELECT count(*) FROM live.sessions").fetchone()[0]
        delta = Delta(live_rows=live_rows)
        refused: set[str] = set()
        fetched_live = 0
        for row in _delta_rows(base, "live", rules, batch_rows):
            fetched_live += 1
            if isinstance(row, Reject):
                # Left exactly as PostgreSQL has it, and named: never read as a logout.
                if row.session_id is not None:
                    refused.add(row.session_id)
                delta.rejected.append(mask_id(row.session_id))
            else:
                delta.live[row[0]] = row
        for row in _delta_rows(base, "main", rules, batch_rows):
            if not isinstance(row, Reject):  # a base reject never landed: as if absent
                delta.base[row[0]] = row
            elif row.session_id is not None:
                delta.base_rejected.add(row.session_id)
    finally:
        base.query("DROP TABLE IF EXISTS temp.sessionmig_delta")
        base.query("DETACH DATABASE live")
    equal = 0
    for sid in sorted(delta.base.keys() | delta.live.keys()):
        if sid in refused:
            continue
        b, lv = delta.base.get(sid), delta.live.get(sid)
        if lv is not None and (b is None or b[2] != lv[2]):
            # Metadata is compared with PostgreSQL's only where live changed it (or brought
            # it): only then is it spelled as jsonb, which costs a parse.
            lv = delta.live[sid] = _canonical(lv)
            if b is not None:
                b = delta.base[sid] = _canonical(b)
        if b is not None and b == lv:
            equal += 1  # the raw values differ, the sessions do not (7 vs 7.0)
            continue
        delta.ids.append(sid)
    delta.unchanged = delta.live_rows - fetched_live + equal
    return delta


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


def _record_pass(
    conn: psycopg.Connection,
    schema: str,
    *,
    run_id: str,
    started: datetime,
    live_snapshot: str,
    live_sha256: str,
    source_timezone: str,
    counts: dict[str, int],
    live_rows: int,
    parameters: dict[str, Any],
    operator: str | None,
) -> None:
    """The pass's audit row, in the pass's own transaction: recorded if and only if the pass
    committed. Its ``source_sha256`` is the live snapshot's, the next pass's base."""
    write_run(
        conn,
        schema,
        RunRow(
            run_id=run_id,
            step=STEP,
            started_at=started,
            source_path=live_snapshot,
            source_sha256=live_sha256,
            source_timezone=source_timezone,
            rows_read=live_rows,
            inserted=counts["inserted"],
            unchanged=counts["unchanged"],
            conflicting=counts["conflicts"],
            updated=counts["changed"],
            rejected=counts["rejected"],
            parameters={**parameters, "counts": counts},
            operator=operator,
            host=socket.gethostname(),
        ),
    )


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


CONFLICTS = "conflicts"


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


def commit_lock(conn: psycopg.Connection, schema: str) -> None:
    """Take the target's commit lock for the rest of this transaction: every transaction that
    moves the chain (a pass, an overlap rollback's intent) holds it from its re-check of the
    chain to its end. A transaction-level advisory lock dies with the transaction, never
    separately from it (waits at most the transaction's ``lock_timeout``)."""
    conn.execute(
        "SELECT pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended(%s, 0))",
        (lock_key(schema) + ":commit",),
    )


def commit_outcome(dsn: str, schema: str, run_id: str, backend_pid: int | None) -> str:
    """:func:`sessionmig.postgres.audit.commit_outcome` for a pass: also waits for the commit lock,
    so whichever transaction held it last (this pass's, lost) is over."""
    return audit_outcome(
        dsn, schema, run_id, backend_pid, settle=lambda conn: commit_lock(conn, schema)
    )


# --- one pass --------------------------------------------------------------------------------

BACKGROUND_NICE = 10
"""How much lower the CPU priority of the pass's SQLite side is (snapshot, hashing, diff: all
CPU, several threads at once) than the PostgreSQL transaction's. On a host the app or
PostgreSQL shares, that work yields the CPU to them (measured on 2 cores: with three of the
pass's threads busy, CPU pressure stays at 80-100 % and the app's requests queue behind them;
``benchmarks/CATCHUP.md``); alone on a host it runs as fast as before. The snapshot's own
thread is only this much nicer, never idle: in rollback-journal mode its steps hold the live
file's read lock, and the old colour's writer waits for it; the hashing and the diff after it
hold no such lock and run idle (:func:`_idle_priority`)."""


def _in_background_priority(nice: int, work: Callable[..., T], *args: Any) -> T:
    """``work(*args)`` on a thread ``nice`` steps nicer than this one; the threads it starts
    inherit that. Linux only (its nice value is per thread, and a thread can lower its own
    priority but never raise it back, hence a thread of its own); elsewhere it runs as is."""

    def niced() -> T:
        if nice > 0 and sys.platform.startswith("linux"):
            me = threading.get_native_id()
            with contextlib.suppress(OSError):
                os.setpriority(
                    os.PRIO_PROCESS, me, min(19, os.getpriority(os.PRIO_PROCESS, me) + nice)
                )
        return work(*args)

    return in_background(niced).result()


def _idle_priority() -> None:
    """This thread, and those it starts, run only when nothing else wants the CPU (Linux's
    SCHED_IDLE: any other task waking up takes the CPU from it at once). For the hashing and
    the diff, which hold no lock anyone waits for; not for the snapshot, whose steps hold the
    live file's read lock in rollback-journal mode."""
    if sys.platform.startswith("linux") and hasattr(os, "SCHED_IDLE"):
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


@dataclass(frozen=True)
class _Snapshots:
    """The SQLite side of a pass: the base (open), the live store's new snapshot (at the path
    ``take`` wrote, hashed), and their delta."""

    base: Backup
    taken: SnapshotResult
    delta: Delta


def _read_snapshots(
    base_file: Path,
    chain: Chain,
    live_path: Path,
    incoming: Path,
    rules: Rules,
    batch_rows: int,
    evidence: bool,
    kept: Path | None = None,
) -> _Snapshots:
    """Open and hash the base, snapshot the live store to ``incoming``, hash the snapshot while
    SQLite compares it with the base. When the base is ``evidence`` (the migrated backup), it
    is hashed again once the diff has read it, and a change raises before anything is locked in
    PostgreSQL. On failure nothing is left open and ``incoming`` is gone. With ``kept`` (the
    snapshot a pass carried in part began with), that file is the live side instead of a new
    snapshot, and it must still have the sha256 that names it."""
    base = open_backup(base_file)  # hashed on a thread meanwhile
    try:
        if kept is None:
            taken, snapshot = take(live_path, incoming, check=False, replace=True), incoming
        else:
            taken, snapshot = _resumed(kept, live_path), kept
        try:
            _idle_priority()  # the live file is no longer read: no lock of the app's to hold
            # The copy is hashed on a thread while SQLite compares it with the base.
            digest = in_background(sha256_file, snapshot)
            _refuse_stale_base(base_file, base.sha256, chain)
            _refuse_rolled_back_file(snapshot, live_path)
            delta = diff(base, snapshot, rules, batch_rows, taken.sessions)
            # Every read of the base is done: its re-hash runs here, idle like the rest of the
            # SQLite side, rather than beside the transaction at the caller's priority.
            if evidence:
                base.verify_unchanged()
            sha = digest.result()
            if kept is not None and kept.name != _SNAPSHOT_NAME.format(sha256=sha):
                raise SourceError(
                    f"{kept}: its sha256 is now {sha}, not the one it is named by: the snapshot "
                    "a pass carried in part began with was changed in state_dir; nothing was "
                    "changed in PostgreSQL — restore it, or find out what wrote to it"
                )
            taken = dataclasses.replace(taken, sha256=sha)
        except BaseException:
            if kept is None:
                incoming.unlink(missing_ok=True)
            raise
    except BaseException:
        base.close()
        raise
    return _Snapshots(base, taken, delta)


def _resumed(kept: Path, live_path: Path) -> SnapshotResult:
    """The kept snapshot as the live side of a pass finished from it (no new copy taken)."""
    return SnapshotResult(
        live_path=str(live_path),
        path=str(kept),
        sha256="",
        size=kept.stat().st_size,
        pages=0,
        page_size=0,
        journal_mode="kept (a pass finished from its first snapshot)",
        sessions=None,
        seconds=0.0,
        waited_s=0.0,
        attempts=0,
        restarts=0,
        step_pages=-1,
        check="skipped",
    )


ROLLBACK_MARKER = "sessionmig_rollback_passes"
"""The table a rollback during the overlap writes into the live SQLite file, in the SQLite
transaction of its merge (:mod:`sessionmig.engines.overlap`)."""


def _refuse_rolled_back_file(snapshot_path: Path, live_path: Path) -> None:
    """Refuse a live file a rollback during the overlap already wrote PostgreSQL's changes into
    (its marker, read from the pass's own snapshot of it): carried again they would count twice.
    The target's audit row says the same where it was written; this holds where it was not."""
    conn = sqlite3.connect(snapshot_path.resolve().as_uri() + "?mode=ro&immutable=1", uri=True)
    try:
        marked = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (ROLLBACK_MARKER,)
        ).fetchone()
        rows = (
            conn.execute(f"SELECT count(*) FROM {ROLLBACK_MARKER}").fetchone() if marked else None
        )
    except sqlite3.DatabaseError as exc:
        raise SourceError(f"{live_path}: its snapshot cannot be read ({exc})") from None
    finally:
        conn.close()
    if rows and rows[0]:
        raise BaseNotCurrent(
            f"{live_path}: a rollback during the overlap already carried PostgreSQL's changes "
            f"into this file (its table {ROLLBACK_MARKER} says so): a catch-up pass would carry "
            "them back and count them twice. Nothing was changed; to cut over again, take a new "
            "snapshot and migrate it"
        )


CLOCK_MARGIN = timedelta(minutes=10)
"""How much earlier than the base's latest instant a session created in live may say it was
created (a transaction begun before the base's snapshot and committed after it; clocks)."""


def _refuse_going_back(delta: Delta, live_path: Path, base_file: Path) -> None:
    """Refuse a live snapshot that is not a later state of the base's store: carried, it
    would count requests back down and end every session created since the older file."""
    pairs = [(sid, delta.base.get(sid), delta.live.get(sid)) for sid in delta.ids]
    back = M.going_back(pairs)
    older = M.created_before_base(
        [p for p in pairs if p[0] not in delta.base_rejected], CLOCK_MARGIN, datetime.now(UTC)
    )
    if older:
        back[M.BEFORE_BASE] = older
    if back:
        raise SourceError(
            f"{live_path}: not a later state of the store the base {base_file} was taken from: "
            f"{M.describe_going_back(back)}. The app only counts requests up, never changes "
            "created_at and creates sessions as of now, so this file is older than the base or "
            "another store (a restored backup, another environment's file). Nothing was "
            "changed; point live_sqlite_path at the file the old colour writes to now"
        )


def catchup(
    dsn: str,
    *,
    sqlite_path: str | Path,
    live_sqlite_path: str | Path,
    state_dir: str | Path,
    rules: Rules,
    schema: str = D.TARGET_SCHEMA,
    run_id: str,
    source_timezone: str,
    operator: str | None = None,
    parameters: dict[str, Any] | None = None,
    base_path: str | Path | None = None,
    lock_timeout: str = LOCK_TIMEOUT,
    retries: int = RETRIES,
    batch_rows: int = D.BATCH_ROWS,
    dry_run: bool = False,
    background_nice: int = BACKGROUND_NICE,
) -> CatchupResult:
    """Run one catch-up pass; see the module docstring.

    ``sqlite_path`` is the migrated snapshot (the first pass's base); later passes find their
    base in ``state_dir`` by the sha256 the last pass recorded. ``base_path`` names a base
    explicitly; it is refused unless it is the one the chain expects. Raises
    :class:`BaseNotCurrent`, ``ParameterError``, ``SourceError`` or ``TargetError`` when the
    pass cannot be carried out (nothing committed); returns a FAIL verdict when its proof
    failed (nothing committed either). The SQLite side (snapshot, hashes, diff) runs on
    threads ``background_nice`` steps nicer than the caller's (0: as the caller).
    """
    started_clock = time.perf_counter()
    started = datetime.now(UTC)
    live_path = Path(live_sqlite_path).resolve()
    state = Path(state_dir).resolve()
    migrated = Path(sqlite_path).resolve()
    if live_path == migrated:
        raise ParameterError(
            "live_sqlite_path is sqlite_path: sqlite_path names the migrated snapshot, "
            "live_sqlite_path the store the old colour writes to"
        )
    _private_state_dir(state)
    with migration_lock(dsn, schema), _connect(dsn) as conn:
        _prune_dead(state)
        chain = chain_of(conn, schema)  # autocommit: no transaction open while SQLite is read
        refuse_after_rollback(conn, schema, chain)
        base_file = _base_file(chain, migrated, state, Path(base_path) if base_path else None)
        if not base_file.is_file():
            raise ParameterError(
                f"{base_file}: the base of pass {chain.last_pass + 1} (sha256 "
                f"{chain.base_sha256}) is not there; give the state_dir the earlier passes used"
            )
        number = chain.last_pass + 1
        pass_run_id = f"{run_id}-{STEP}-{number}"
        progress = progress_of(conn, schema, chain)
        kept = None if progress is None else _kept_file(progress, state)
        local = _in_background_priority(
            background_nice,
            _read_snapshots,
            base_file,
            chain,
            live_path,
            state / _incoming_name(run_id),
            rules,
            batch_rows,
            base_file == migrated,
            kept,
        )
        with local.base:
            taken, delta = local.taken, local.delta
            live_file, created, outcome = Path(taken.path), kept is None, Outcome()
            try:
                _refuse_going_back(delta, live_path, base_file)
                if kept is None:
                    live_file, created = _keep_snapshot(taken, state)
                taken = dataclasses.replace(taken, path=str(live_file))
                record = {
                    "run_id": pass_run_id,
                    "started": started,
                    "live_snapshot": str(live_file),
                    "live_sha256": taken.sha256,
                    "source_timezone": source_timezone,
                    "live_rows": delta.live_rows,
                    "operator": operator,
                    "parameters": {
                        **(parameters or {}),
                        "live_sqlite_path": str(live_path),
                        "state_dir": str(state),
                        "catchup_pass": number,
                        "migrate_run_id": chain.migrate_run_id,
                        "base_path": str(base_file),
                        "base_sha256": chain.base_sha256,
                        "live_sha256": taken.sha256,
                        "rules": rules_key(rules),
                    },
                }
                job = _Pass(
                    dsn, schema, delta, chain, lock_timeout, dry_run, record, retries, outcome
                )
                applied, mismatches = job.apply(conn, progress)
            finally:
                if outcome.value == COMMITTED:
                    _prune(state, {live_file.resolve(), base_file.resolve()})
                elif outcome.value == NOT_COMMITTED and created and not outcome.parts:
                    live_file.unlink(missing_ok=True)  # no part recorded it: never a base
                # UNKNOWN, or parts committed: kept — it may be the next base, or the snapshot
                # the pass is finished from; the next pass asks the target and prunes whatever
                # the chain does not name.
    committed = outcome.value == COMMITTED
    counts = _counts(delta, (progress.kinds if progress else Counter()) + applied.kinds)
    return _result(
        pass_run_id,
        number,
        chain,
        base_file,
        live_path,
        live_file,
        taken,
        delta,
        applied,
        counts,
        mismatches,
        time.perf_counter() - started_clock,
        committed,
        dry_run,
        outcome.resolved,
        parts=(progress.parts if progress else 0) + outcome.parts,
        resumed=progress.through if progress else 0,
    )


def _kept_file(progress: Progress, state_dir: Path) -> Path:
    """The live snapshot a pass carried in part began with: it is finished from that one."""
    kept = state_dir / _SNAPSHOT_NAME.format(sha256=progress.live_sha256)
    if not kept.is_file():
        raise ParameterError(
            f"catch-up pass {progress.number} is carried in part ({progress.through:,} of "
            f"{progress.of:,} sessions, {progress.parts} parts committed) from the live snapshot "
            f"{progress.live_sha256}, and {kept} is not there: a pass carried in part is "
            "finished from the snapshot it began with. Nothing was changed; give the state_dir "
            "the run that began it used"
        )
    return kept


@dataclass
class Outcome:
    """Whether the pass committed, as far as it is known (filled by :func:`_apply`)."""

    value: str = NOT_COMMITTED
    resolved: bool = False  # COMMIT's answer was lost and the target was asked
    parts: int = 0  # parts this run committed (its last included, when it committed)


def _ids_digest(ids: list[str], hasher: Any = None) -> Any:
    hasher = hasher.copy() if hasher is not None else hashlib.sha256()
    for sid in ids:
        hasher.update(sid.encode("utf-8", "surrogatepass") + b"\n")
    return hasher


def _next_part_rows(rows: int, locked_s: float) -> int:
    """The next part's size: as many sessions as the last part's pace locks in
    :data:`PART_LOCKED_S`, at most twice as many as the last (a pace measured on a few rows is
    noisy), within :data:`MIN_PART_ROWS` … :data:`MAX_PART_ROWS`."""
    if locked_s <= 0:
        return min(MAX_PART_ROWS, max(MIN_PART_ROWS, 2 * rows))
    paced = int(rows * PART_LOCKED_S / locked_s)
    return min(MAX_PART_ROWS, max(MIN_PART_ROWS, min(paced, 2 * max(rows, 1))))


def _record_part(
    conn: psycopg.Connection, schema: str, record: dict[str, Any], part: dict[str, Any]
) -> None:
    """A part's audit row, in the part's own transaction: recorded if and only if its writes
    committed. It says how far the pass got (``through`` of ``of`` sessions in key order, the
    digest of their ids) and what the part did; it never moves the chain."""
    kinds = part["kinds"]
    write_run(
        conn,
        schema,
        RunRow(
            run_id=part["run_id"],
            step=PART_STEP,
            started_at=record["started"],
            source_path=record["live_snapshot"],
            source_sha256=record["live_sha256"],
            source_timezone=record["source_timezone"],
            rows_read=part["rows"],
            inserted=kinds[M.INSERTED],
            conflicting=kinds[CONFLICTS],
            updated=kinds[M.CHANGED],
            parameters={
                **{k: record["parameters"][k] for k in _PART_PARAMETERS},
                "through": part["through"],
                "of": part["of"],
                "ids_sha256": part["ids_sha256"],
                "kinds": dict(kinds),
                "pass_run_id": record["run_id"],
            },
            operator=record["operator"],
            host=socket.gethostname(),
        ),
    )


_PART_PARAMETERS = ("catchup_pass", "migrate_run_id", "base_sha256", "live_sha256", "rules")


def rules_key(rules: Rules) -> str:
    """The rules a delta is normalised by, as a part records them: a pass is finished by the
    rules it began with (the same sessions differ in another zone, with other values)."""
    zone = getattr(rules.zone, "key", str(rules.zone))
    return f"{zone}|{rules.on_invalid_metadata}|{','.join(rules.extra_columns)}"


@dataclass(frozen=True)
class _PartSpec:
    """Which sessions a part carries and how its audit row names them."""

    run_id: str  # the part's audit row (the pass's own, for the last part)
    through: int
    of: int
    ids_sha256: str
    last: bool


@dataclass
class _Pass:
    """A pass's PostgreSQL side: what every part needs, and what the parts did so far.

    :meth:`apply` carries the delta in parts, each its own transaction: the touched sessions in
    key order, a part at a time, sized so that each holds its rows locked about
    :data:`PART_LOCKED_S`. Every part is proven and recorded with its writes; the last records
    the pass. A pass that stopped after some parts goes on from the first session not yet
    carried, once its delta is proven the same."""

    dsn: str
    schema: str
    delta: Delta
    chain: Chain
    lock_timeout: str
    dry_run: bool
    record: dict[str, Any]
    retries: int
    outcome: Outcome
    total: Applied = field(default_factory=Applied)

    @property
    def number(self) -> int:
        return self.chain.last_pass + 1

    def apply(
        self, conn: psycopg.Connection, progress: Progress | None
    ) -> tuple[Applied, tuple[str, ...]]:
        """(what the parts did, what a proof found wrong); ``self.outcome`` says what
        committed."""
        ids = self.delta.ids
        start = progress.through if progress else 0
        done = _ids_digest(ids[:start])
        self._refuse_another_delta(progress, done.hexdigest())
        before = progress.kinds if progress else Counter()
        expect, size = progress, FIRST_PART_ROWS
        with contextlib.ExitStack() as opened:
            while True:
                if conn.closed or conn.broken:
                    # A part whose COMMIT's answer was lost, and which the target says
                    # committed: the next part goes on a new connection.
                    conn = opened.enter_context(_connect(self.dsn))
                end = min(len(ids), start + size)
                part, through = ids[start:end], _ids_digest(ids[start:end], done)
                last = end == len(ids)
                run_id = self.record["run_id"]
                spec = _PartSpec(
                    run_id if last else f"{run_id}-part-{end}",
                    end,
                    len(ids),
                    through.hexdigest(),
                    last,
                )
                try:
                    applied, problems = self._part(conn, part, expect, spec, before)
                except BaseException as exc:
                    carried = (progress.parts if progress else 0) + self.outcome.parts
                    if carried and not isinstance(exc, KeyboardInterrupt):
                        raise _partial(exc, self.number, start, len(ids), carried) from None
                    raise
                self._add(applied)
                if problems or last:
                    return self.total, problems
                if not self.dry_run:
                    parts = (expect.parts if expect else 0) + 1
                    expect = Progress(
                        self.number, self.record["live_sha256"], end, spec.ids_sha256,
                        len(ids), parts, before + self.total.kinds,
                        self.record["parameters"]["rules"],
                    )  # fmt: skip
                start, done = end, through
                size = _next_part_rows(len(part), applied.locked_seconds)

    def _refuse_another_delta(self, progress: Progress | None, done: str) -> None:
        """A pass carried in part is finished only by the rules and the delta it began with."""
        if progress is None:
            return
        rules = self.record["parameters"]["rules"]
        if progress.rules != rules:
            raise ParameterError(
                f"catch-up pass {self.number} was begun under other rules ({progress.rules}: "
                f"zone, on_invalid_metadata, extra columns) than this run's ({rules}); "
                f"{progress.through:,} of its {progress.of:,} sessions are carried by those "
                "rules. Nothing was changed; run it with the parameters of the run that began it"
            )
        if (progress.of, progress.ids_sha256) != (len(self.delta.ids), done):
            raise SourceError(
                f"catch-up pass {self.number} was begun with another delta ({progress.through:,} "
                f"of {progress.of:,} sessions carried) than the one its kept snapshot gives now "
                f"({len(self.delta.ids):,} sessions); nothing was changed. The snapshot and the "
                "base are the same files (their sha256 are checked): report this as a bug"
            )

    def _add(self, applied: Applied) -> None:
        total = self.total
        total.kinds += _kinds(applied)
        total.remerged += applied.remerged
        total.conflicts += applied.conflicts
        total.locked_seconds = max(total.locked_seconds, applied.locked_seconds)
        for kind, shown in applied.examples.items():
            kept = total.examples.setdefault(kind, [])
            kept += shown[: EXAMPLES - len(kept)]

    def _write(
        self, conn: psycopg.Connection, applied: Applied, spec: _PartSpec, before: Counter[str]
    ) -> None:
        """The part's audit row; the last part's is the pass's, with the whole pass's counts."""
        if spec.last:
            kinds = before + self.total.kinds + _kinds(applied)
            _record_pass(conn, self.schema, counts=_counts(self.delta, kinds), **self.record)
            return
        part = {
            "run_id": spec.run_id,
            "rows": len(applied.touched),
            "through": spec.through,
            "of": spec.of,
            "ids_sha256": spec.ids_sha256,
            "kinds": _kinds(applied),
        }
        _record_part(conn, self.schema, self.record, part)

    def _part(
        self,
        conn: psycopg.Connection,
        ids: list[str],
        expect: Progress | None,
        spec: _PartSpec,
        before: Counter[str],
    ) -> tuple[Applied, tuple[str, ...]]:
        """One part's transaction, redone from scratch when the app's row locks got in its
        way: (what it did, what its proof found wrong). When COMMIT's answer is lost (a dropped
        connection, Ctrl-C, SIGTERM), the target is asked before anything is decided: the
        part's audit row (the pass's, for the last) is the truth."""
        pid, outcome = conn.info.backend_pid, self.outcome
        for attempt in range(self.retries + 1):
            applied = Applied(touched=ids)  # each attempt starts again from PostgreSQL now
            try:
                _transaction(
                    conn, self.schema, self.delta, ids, self.chain, expect, self.lock_timeout,
                    self.dry_run, lambda c, a: self._write(c, a, spec, before), applied,
                )  # fmt: skip
            except _DryRun:
                return applied, ()
            except _ProofFailed as failed:
                return applied, tuple(failed.problems)
            except BaseException as exc:
                if not applied.committing:
                    _raise_uncommitted(exc, self.lock_timeout, attempt < self.retries)
                    time.sleep(0.2 * 2**attempt)  # the app's row locks are short-lived
                    continue
                value = commit_outcome(self.dsn, self.schema, spec.run_id, pid)
                outcome.resolved = True
                what = f"catch-up pass {self.number}"
                if not spec.last:
                    what += f" (its part through session {spec.through:,} of {spec.of:,})"
                if value == COMMITTED:
                    self._committed(spec)
                elif value != NOT_COMMITTED:  # unknown: its snapshot may be the next base
                    outcome.value = value
                if not isinstance(exc, Exception):  # Ctrl-C, SIGTERM: stop, saying what holds
                    raise KeyboardInterrupt(
                        f"interrupted at COMMIT: {what} {value} (asked of the target's audit row)"
                    ) from exc
                if value == COMMITTED:
                    return applied, ()
                raise _lost_commit(exc, what, value) from None
            self._committed(spec)
            return applied, ()
        raise AssertionError("unreachable")

    def _committed(self, spec: _PartSpec) -> None:
        self.outcome.parts += 1
        if spec.last:
            self.outcome.value = COMMITTED


def _partial(exc: BaseException, number: int, through: int, of: int, parts: int) -> Exception:
    """What a part's failure means once earlier parts committed: the pass is carried in part,
    and the same command finishes it."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    # The part's own words without "nothing was committed": true of the part, not the pass.
    cause = re.split(r"[;:,]?\s*nothing was committed", first)[0]
    message = (
        f"catch-up pass {number} stopped part-way: {parts} of its parts are committed, each "
        f"proven and recorded ({through:,} of {of:,} sessions carried); the part after them "
        f"failed ({redact(cause)}). Run the same command again: it finishes the pass from its "
        "kept snapshot, carrying only what is not yet carried"
    )
    kind = type(exc) if isinstance(exc, (TargetError, SourceError, ParameterError)) else None
    try:
        return kind(message) if kind else TransientTargetError(message)
    except TypeError:  # an error class with a constructor of its own
        return TransientTargetError(message)


def _raise_uncommitted(exc: BaseException, lock_timeout: str, may_retry: bool) -> None:
    """Raise what a failure before COMMIT means (nothing was committed); returns only when the
    transaction should be redone (a lock timeout or deadlock with the app)."""
    if isinstance(exc, psycopg.OperationalError):
        if getattr(exc, "sqlstate", None) in _RETRY_SQLSTATES and may_retry:
            return
        raise _target_error(exc, lock_timeout) from None
    if isinstance(exc, psycopg.errors.IdleInTransactionSessionTimeout):
        raise TransientTargetError(
            f"the pass's process stood still inside its transaction for longer than "
            f"{IDLE_IN_TRANSACTION} (stopped, suspended or starved), and the server ended its "
            "session to free the app's rows; nothing was committed — run the same command again"
        ) from None
    if isinstance(exc, psycopg.errors.UniqueViolation):
        # The target's own guard: another pass with this number committed first.
        raise BaseNotCurrent(
            "another catch-up pass with this number committed meanwhile (the target's unique "
            "index on pass numbers refused this one); nothing was committed — run the same "
            "command again"
        ) from None
    if isinstance(exc, (psycopg.errors.DataError, psycopg.errors.ProgramLimitExceeded)):
        # The rules accepted a value PostgreSQL refuses (migrate rejects such rows as
        # refused_by_postgresql); here it stops the pass, which committed nothing.
        raise SourceError(
            "a session the old colour changed holds a value PostgreSQL refuses "
            f"({redact(str(exc).strip().splitlines()[0])}); nothing was committed. End that "
            "session on the old colour, or migrate it by hand, then run the pass again"
        ) from None
    raise exc


def _lost_commit(exc: BaseException, what: str, outcome: str) -> TransientTargetError:
    message = redact(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    if outcome == NOT_COMMITTED:
        return TransientTargetError(
            f"the connection was lost at COMMIT ({message}); the target's audit row, read on a "
            f"new connection, shows {what} was not committed: nothing was "
            "committed — run the same command again"
        )
    return TransientTargetError(
        f"the connection was lost while COMMIT's answer was in flight ({message}) and the "
        f"target cannot be asked now: whether {what} committed is unknown. Its "
        "snapshot is kept in state_dir; run the same command again once the target answers: it "
        "reads the audit row first and carries exactly what is not yet carried"
    )


def _connect(dsn: str) -> psycopg.Connection:
    # autocommit: ``conn.transaction()`` is then a real BEGIN/COMMIT, never a savepoint
    # (writes under a savepoint would carry a subtransaction's xmin, and the proof reads
    # the top transaction's).
    conn = connect(dsn, "catchup", autocommit=True, connect_timeout=15)
    # Each pass's BEGIN names its isolation: read committed is what the row locks and the
    # merge of rows the app moved rely on, even where a pooler dropped the startup options.
    conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
    return conn


def _target_error(exc: psycopg.Error, lock_timeout: str) -> TargetError:
    state = getattr(exc, "sqlstate", None)
    message = redact(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    if state in _RETRY_SQLSTATES:
        return TargetError(
            f"the app held rows this pass must change for longer than lock_timeout "
            f"{lock_timeout}, again and again ({message}); nothing was committed — run the "
            "same command again"
        )
    return TransientTargetError(
        f"the target failed during the pass, before its COMMIT ({message}); nothing was "
        "committed — run the same command again: it carries exactly what is not yet carried"
    )


def _result(
    pass_run_id: str,
    number: int,
    chain: Chain,
    base_file: Path,
    live_path: Path,
    live_file: Path,
    taken: SnapshotResult,
    delta: Delta,
    applied: Applied,
    counts: dict[str, int],
    mismatches: tuple[str, ...],
    seconds: float,
    committed: bool,
    dry_run: bool,
    resolved: bool = False,
    *,
    parts: int = 1,
    resumed: int = 0,
) -> CatchupResult:
    conflicts = counts["conflicts"]
    if mismatches:
        verdict = Verdict.FAIL
        what = (
            "nothing was committed"
            if not parts
            else f"its part committed nothing ({parts} earlier parts are committed, each proven; "
            "the pass is carried in part and no rollback or other pass may start until it is "
            "finished)"
        )
        reason = (
            f"the proof failed, {what}: "
            + "; ".join(mismatches[:3])
            + ("; …" if len(mismatches) > 3 else "")
        )
    else:
        warnings = []
        if conflicts:
            warnings.append(
                f"{conflicts} sessions changed on both colours (the newer last_activity won)"
            )
        if counts["recreated"]:
            warnings.append(
                f"{counts['recreated']} sessions were ended and created again under the same id "
                "on the old colour: the new session replaced the old one (examples below)"
            )
        if counts["rejected"]:
            warnings.append(
                f"{counts['rejected']} live rows the migration's rules refuse were left as "
                "PostgreSQL has them"
            )
        verdict = Verdict.PASS_WITH_WARNINGS if warnings else Verdict.PASS
        did = (
            f"pass {number}: {counts['inserted']} inserted, {counts['changed']} changed, "
            f"{counts['ended']} ended, {counts['stays_ended']} already ended in PostgreSQL, "
            f"{counts['unchanged']} unchanged; every touched session proven equal to the rules"
        )
        if parts > 1 or resumed:
            did += f", applied in {parts} parts of at most {PART_LOCKED_S:g} s of row locks each"
        if resumed:
            did += (
                f" (the first {resumed:,} sessions by an earlier run whose pass stopped "
                "part-way; this run finished it from the same snapshot)"
            )
        reason = "; ".join([did, *warnings])
        if dry_run:
            reason = "dry run, nothing committed: " + reason
        if resolved:
            reason += (
                "; COMMIT's answer was lost, and the target's audit row (read on a new "
                "connection) shows the pass committed"
            )
    return CatchupResult(
        run_id=pass_run_id,
        pass_number=number,
        migrate_run_id=chain.migrate_run_id,
        base_path=str(base_file),
        base_sha256=chain.base_sha256,
        live_sqlite_path=str(live_path),
        live_snapshot=str(live_file),
        live_sha256=taken.sha256,
        snapshot=taken,
        live_rows=delta.live_rows,
        inserted=counts["inserted"],
        changed=counts["changed"],
        ended=counts["ended"],
        stays_ended=counts["stays_ended"],
        recreated=counts["recreated"],
        conflicts=conflicts,
        unchanged=counts["unchanged"],
        rejected=counts["rejected"],
        conflict_details=tuple(applied.conflicts),
        examples={k: tuple(v) for k, v in applied.examples.items()},
        rejected_examples=tuple(delta.rejected[:EXAMPLES]),
        mismatches=mismatches,
        seconds=seconds,
        locked_seconds=applied.locked_seconds,
        remerged=applied.remerged,
        parts=parts,
        resumed=resumed,
        committed=committed,
        dry_run=dry_run,
        verdict=verdict,
        reason=reason,
    )


MEANINGS = {
    "inserted": "created on the old colour since the base: added to PostgreSQL",
    "changed": "changed on the old colour: its changes applied on top of PostgreSQL's row",
    "ended": "ended on the old colour (logout, cleanup): deleted from PostgreSQL",
    "stays_ended": "changed or ended on the old colour, already ended in PostgreSQL: stays ended",
    "recreated": "ended and created again under the same id on the old colour: the new session "
    "replaces the old one in PostgreSQL",
    "conflicts": "user_id/metadata/created_at changed on both colours: newer last_activity won",
    "unchanged": "the same in both snapshots: PostgreSQL's row untouched",
    "rejected": "live rows the migration's rules refuse: left as PostgreSQL has them",
}


def catchup_tables(result: CatchupResult) -> dict[str, pd.DataFrame]:
    """The pass's report tables (session ids masked): counts, snapshots, conflicts, examples,
    proof."""
    import pandas as pd

    counts = pd.DataFrame(
        [(k, v, MEANINGS[k]) for k, v in result.counts.items()],
        columns=["sessions", "count", "meaning"],
    ).set_index("sessions")
    snap = result.snapshot
    snapshots = pd.DataFrame(
        [
            ("base (carried by the previous pass)", result.base_path, result.base_sha256),
            ("live store", result.live_sqlite_path, f"{snap.journal_mode} mode, read only"),
            ("live snapshot (next pass's base)", result.live_snapshot, result.live_sha256),
        ],
        columns=["file", "path", "sha256"],
    ).set_index("file")
    timing = pd.DataFrame(
        [
            ("whole pass", f"{result.seconds:.2f} s"),
            ("snapshot of the live store", f"{snap.seconds:.2f} s"),
            ("waiting for the app's SQLite locks", f"{snap.waited_s:.2f} s"),
            ("snapshot restarts (app committed meanwhile)", str(snap.restarts)),
            ("longest time a part held touched rows locked", f"{result.locked_seconds:.2f} s"),
            ("parts (transactions, each proven and recorded)", f"{result.parts:,}"),
            ("sessions carried by an earlier run of this pass", f"{result.resumed:,}"),
            (
                "sessions the app wrote during the merge (merged again under the lock)",
                f"{result.remerged:,}",
            ),
            ("sessions in the live snapshot", f"{result.live_rows:,}"),
            ("audit row (session_migration_runs)", result.run_id if result.committed else "-"),
        ],
        columns=["measure", "value"],
    ).set_index("measure")
    conflicts = pd.DataFrame(
        [
            (c.session, c.column, c.winner, c.live_last_activity, c.postgres_last_activity)
            for c in result.conflict_details[:200]
        ],
        columns=["session", "column", "winner", "last_activity live", "last_activity postgres"],
    )
    examples = pd.DataFrame(
        [(kind, ", ".join(ids)) for kind, ids in result.examples.items()]
        + ([("rejected", ", ".join(result.rejected_examples))] if result.rejected else []),
        columns=["sessions", f"examples (first {EXAMPLES}, ids hashed)"],
    ).set_index("sessions")
    checks = (
        "every touched session equals merge(base, live, PostgreSQL before)",
        "each statement touched exactly the sessions the rules name",
        "no other row carries this pass's writes (xmin)",
    )
    proof = pd.DataFrame(
        [("mismatch: nothing was committed", m) for m in result.mismatches]
        or [(check, "holds") for check in checks],
        columns=["check", "result"],
    ).set_index("check")
    return {
        "counts": counts,
        "snapshots": snapshots,
        "timing": timing,
        "conflicts": conflicts,
        "examples": examples,
        "proof": proof,
    }
