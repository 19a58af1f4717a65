"""The chain of runs a pass belongs to, as the target's audit table records it: the
migration and the passes committed on it, a pass carried in part, the refusals that
follow from them, the commit lock under which they are read, and the audit rows a
pass and each of its parts write."""

from __future__ import annotations

import hashlib
import socket
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from sessionmig.errors import ParameterError, TargetError
from sessionmig.postgres.audit import RunRow, write_run
from sessionmig.postgres.audit import commit_outcome as audit_outcome
from sessionmig.postgres.load import lock_key
from sessionmig.rules import merge as M
from sessionmig.rules.transform import Rules

if TYPE_CHECKING:  # pandas is heavy; only the notebook's functions need it
    pass


STEP = "catchup"
PART_STEP = "catchup_part"
"""The audit step of a part of a pass that is not its last (the last writes the pass's row)."""


class BaseNotCurrent(ParameterError):
    """The base given is not the snapshot last carried into PostgreSQL: refused, so that no
    delta is applied twice."""


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


CONFLICTS = "conflicts"


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


def _ids_digest(ids: list[str], hasher: Any = None) -> Any:
    hasher = hasher.copy() if hasher is not None else hashlib.sha256()
    for sid in ids:
        hasher.update(sid.encode("utf-8", "surrogatepass") + b"\n")
    return hasher


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
