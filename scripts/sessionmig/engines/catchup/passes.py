"""One catch-up pass from start to end: its snapshots and diff, its parts (each its own
exactly-once transaction, sized by the last one's pace), a pass carried in part
finished from its kept snapshot, a lost COMMIT settled from the audit row, and the
result the runbook reports."""

from __future__ import annotations

import contextlib
import dataclasses
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg

from sessionmig import defaults as D
from sessionmig.errors import ParameterError, SourceError, TargetError, TransientTargetError
from sessionmig.postgres.audit import COMMITTED, NOT_COMMITTED
from sessionmig.postgres.connect import connect
from sessionmig.postgres.load import migration_lock
from sessionmig.rules.mask import redact
from sessionmig.rules.transform import Rules
from sessionmig.rules.verdict import Verdict
from sessionmig.sqlite.snapshot import SnapshotResult

if TYPE_CHECKING:  # pandas is heavy; only the notebook's functions need it
    pass

from sessionmig.engines.catchup.apply import (
    EXAMPLES,
    IDLE_IN_TRANSACTION,
    Applied,
    ConflictDetail,
    _counts,
    _DryRun,
    _kinds,
    _ProofFailed,
    _transaction,
)
from sessionmig.engines.catchup.chain import (
    STEP,
    BaseNotCurrent,
    Chain,
    Progress,
    _ids_digest,
    _record_part,
    _record_pass,
    chain_of,
    commit_outcome,
    progress_of,
    refuse_after_rollback,
    rules_key,
)
from sessionmig.engines.catchup.delta import Delta
from sessionmig.engines.catchup.priority import BACKGROUND_NICE, _in_background_priority
from sessionmig.engines.catchup.state import (
    _base_file,
    _incoming_name,
    _keep_snapshot,
    _kept_file,
    _private_state_dir,
    _prune,
    _prune_dead,
    _read_snapshots,
    _refuse_going_back,
)

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
_RETRY_SQLSTATES = {"55P03", "40P01", "40001"}  # lock_not_available, deadlock, serialization


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


@dataclass
class Outcome:
    """Whether the pass committed, as far as it is known (filled by :func:`_apply`)."""

    value: str = NOT_COMMITTED
    resolved: bool = False  # COMMIT's answer was lost and the target was asked
    parts: int = 0  # parts this run committed (its last included, when it committed)


def _next_part_rows(rows: int, locked_s: float) -> int:
    """The next part's size: as many sessions as the last part's pace locks in
    :data:`PART_LOCKED_S`, at most twice as many as the last (a pace measured on a few rows is
    noisy), within :data:`MIN_PART_ROWS` … :data:`MAX_PART_ROWS`."""
    if locked_s <= 0:
        return min(MAX_PART_ROWS, max(MIN_PART_ROWS, 2 * rows))
    paced = int(rows * PART_LOCKED_S / locked_s)
    return min(MAX_PART_ROWS, max(MIN_PART_ROWS, min(paced, 2 * max(rows, 1))))


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
