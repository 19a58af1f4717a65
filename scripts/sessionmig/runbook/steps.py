"""The engine of each runbook step, shared by the notebooks and the ``sessionmig`` verbs.

Each step function takes validated :class:`~sessionmig.runbook.settings.Settings` (plus the step's
own parameters, by keyword) and returns a frozen result; notebooks render the result, the CLI
prints it. Nothing here renders or writes reports. ``Settings``, ``settings`` and
``settings_from`` live in :mod:`sessionmig.runbook.settings` and are re-exported here, where the
notebooks find them.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from sessionmig import defaults as D
from sessionmig.engines.catchup import CatchupResult, catchup
from sessionmig.engines.overlap import LiveRollbackResult, rollback_live
from sessionmig.engines.reconcile import ReconcileResult, reconcile
from sessionmig.engines.rollback import (
    FinalizeResult,
    RollbackResult,
    earlier_restore,
    earlier_result,
    finalize,
    finalize_intents,
    migrated_sha256,
    record_once,
    recorded_at,
    rollback,
)
from sessionmig.errors import EXIT_ERROR, SourceError, TargetError, TransientTargetError
from sessionmig.postgres import replication
from sessionmig.postgres.connect import connect, failure_text
from sessionmig.postgres.load import AuditInfo, LoadOutcome, load, migration_lock
from sessionmig.rules.verdict import Verdict
from sessionmig.runbook import params as P
from sessionmig.runbook.manifest import read_trusted
from sessionmig.runbook.progress import progress_bar

# Re-exported: the notebooks and callers reach them as ``steps.settings`` and so on.
from sessionmig.runbook.settings import Settings as Settings
from sessionmig.runbook.settings import current_operator as current_operator
from sessionmig.runbook.settings import new_run_id as new_run_id
from sessionmig.runbook.settings import settings as settings
from sessionmig.runbook.settings import settings_from as settings_from
from sessionmig.sqlite.inspection import InspectResult, inspect_backup
from sessionmig.sqlite.source import FileHash, open_backup

log = logging.getLogger(__name__)

RETRY_BACKOFF_S = 1.0


# --- preflight -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One go/no-go check of preflight."""

    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class PreflightResult:
    checks: tuple[Check, ...]
    source_sha256: str | None
    server_version: str | None
    existing_rows: dict[str, int] = field(default_factory=dict)
    steps: tuple[str, ...] = ()  # the steps whose needs were checked
    grants: tuple[str, ...] = ()  # the exact statements to ask the DBA for, when any

    @property
    def go(self) -> bool:
        return all(c.ok for c in self.checks)


PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE")
HASH_RECORD_EXTENDED = 140000
"""server_version_num from which ``hash_record_extended`` exists (reconcile fingerprints rows
with it; rollback reconciles too)."""
ALEMBIC_VERSION = "alembic_version"
# The tables whose rights the steps need (others the schema may hold are created by migrate).
SESSIONS, REJECTS, RUNS = "sessions", "session_migration_rejects", "session_migration_runs"


@dataclass(frozen=True)
class TableFacts:
    """What the connected role may do with one of the target's tables."""

    name: str
    exists: bool
    owner: str | None = None
    owned: bool = False  # the role has its owner's rights (needed to drop and rebuild keys)
    privileges: frozenset[str] = frozenset()  # of SELECT, INSERT, UPDATE
    rows: int | None = None  # None when it does not exist or the role cannot count it
    sequence: tuple[str, str] | None = None  # (schema, name) of its id sequence, if any
    sequence_usage: bool = True


@dataclass(frozen=True)
class TargetFacts:
    """What preflight learns of the target; :func:`target_checks` judges it, so the rules can be
    tested on facts no test server has (an old version)."""

    role: str
    database: str
    schema: str
    version_num: int
    version: str
    database_create: bool
    database_temp: bool
    schema_exists: bool
    schema_usage: bool
    schema_create: bool
    tables: dict[str, TableFacts]


def run_steps_of(given: Any) -> tuple[str, ...]:
    """The steps a preflight checks for: a list or a comma-separated text; empty means the
    default run's."""
    if isinstance(given, str):
        given = [p.strip() for p in given.split(",") if p.strip()]
    names = tuple(given or P.DEFAULT_STEPS)
    unknown = [n for n in names if n not in P.STEPS]
    if unknown:
        raise P.ParameterError(
            f"run_steps={list(names)!r}: unknown step(s) {unknown}; choose from "
            f"{', '.join(P.STEPS)}"
        )
    return names


def target_facts(conn: psycopg.Connection, schema_name: str) -> TargetFacts:
    """Read the connected role's rights on the target. Catalog lookups by name and oid only:
    resolving ``schema.table`` text would itself fail without USAGE on the schema."""
    from sessionmig.postgres import schema

    row = conn.execute(
        """SELECT current_user, current_database(),
                  current_setting('server_version_num')::int, current_setting('server_version'),
                  has_database_privilege(current_database(), 'CREATE'),
                  has_database_privilege(current_database(), 'TEMPORARY'),
                  n.oid IS NOT NULL,
                  coalesce(has_schema_privilege(n.oid, 'USAGE'), false),
                  coalesce(has_schema_privilege(n.oid, 'CREATE'), false)
           FROM (SELECT 1) AS one
           LEFT JOIN pg_namespace n ON n.nspname = %s""",
        (schema_name,),
    ).fetchone()
    assert row is not None
    role, database, version_num, version, db_create, db_temp, exists, usage, create = row
    tables: dict[str, TableFacts] = {}
    for name in dict.fromkeys((SESSIONS, REJECTS, RUNS, *schema.TABLES, ALEMBIC_VERSION)):
        found = conn.execute(
            """SELECT c.oid, pg_get_userbyid(c.relowner), pg_has_role(c.relowner, 'USAGE'),
                      has_table_privilege(c.oid, 'SELECT'), has_table_privilege(c.oid, 'INSERT'),
                      has_table_privilege(c.oid, 'UPDATE'), has_table_privilege(c.oid, 'DELETE')
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')""",
            (schema_name, name),
        ).fetchone()
        if found is None:
            tables[name] = TableFacts(name, False)
            continue
        oid, owner, owned, can_select, can_insert, can_update, can_delete = found
        held = frozenset(
            p
            for p, ok in zip(
                PRIVILEGES, (can_select, can_insert, can_update, can_delete), strict=True
            )
            if ok
        )
        rows = None
        if usage and can_select and name != ALEMBIC_VERSION:
            rows = conn.execute(
                sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema_name, name))
            ).fetchone()[0]  # type: ignore[index]
        # The serial id sequence of the rejects table (its nextval needs USAGE; an identity
        # column's would not), found by its dependency rather than by a name to resolve.
        sequence = conn.execute(
            """SELECT sn.nspname, s.relname, has_sequence_privilege(s.oid, 'USAGE')
               FROM pg_depend d JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
               JOIN pg_namespace sn ON sn.oid = s.relnamespace
               WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
                 AND d.refobjid = %s AND d.deptype = 'a'
               ORDER BY s.relname LIMIT 1""",
            (oid,),
        ).fetchone()
        tables[name] = TableFacts(
            name,
            True,
            owner,
            bool(owned),
            held,
            rows,
            (sequence[0], sequence[1]) if sequence else None,
            bool(sequence[2]) if sequence else True,
        )
    return TargetFacts(
        role,
        database,
        schema_name,
        version_num,
        version,
        bool(db_create),
        bool(db_temp),
        bool(exists),
        bool(usage),
        bool(create),
        tables,
    )


def _statement(template: str, *parts: sql.Composable) -> str:
    return sql.SQL(template).format(*parts).as_string()


def target_checks(
    facts: TargetFacts, steps: tuple[str, ...], on_conflict: str = D.ON_CONFLICT
) -> tuple[list[Check], list[str]]:
    """Every privilege and server feature ``steps`` need on the target, each as a check; and the
    exact statements that would grant what is missing (the DBA runs them; preflight never does).
    """
    from sessionmig.runbook import manifest

    checks: list[Check] = []
    grants: list[str] = []
    role = sql.Identifier(facts.role)
    database = sql.Identifier(facts.database)

    def need(name: str, ok: bool, why: str, statement: str | None) -> None:
        if ok or statement is None:
            checks.append(Check(name, ok, why))
            return
        grants.append(statement)
        # Without its ';' here: the reason joins the failed checks with '; '. The statement
        # as it is to be run is in ``grants``.
        checks.append(Check(name, False, f"{why}; ask for: {statement.removesuffix(';')}"))

    def by(wanting: set[str]) -> str:
        return ", ".join(s for s in P.STEPS if s in wanting)

    selected = set(steps)
    if wanting := selected & {"reconcile", "rollback"}:
        ok = facts.version_num >= HASH_RECORD_EXTENDED
        checks.append(
            Check(
                "server version",
                ok,
                f"PostgreSQL {facts.version}: {by(wanting)} fingerprint rows with "
                "hash_record_extended, which needs PostgreSQL 14 or newer"
                + ("" if ok else "; run them against a PostgreSQL 14+ server"),
            )
        )
    if "migrate" in selected and not facts.schema_exists:
        need(
            f"CREATE on database {facts.database}",
            facts.database_create,
            f"migrate creates schema {facts.schema}, which does not exist yet",
            _statement("GRANT CREATE ON DATABASE {} TO {};", database, role),
        )
    if wanting := selected & {"migrate", "reconcile", "rollback", "catchup"}:
        need(
            f"TEMPORARY on database {facts.database}",
            facts.database_temp,
            f"{by(wanting)} stage rows in temporary tables",
            _statement("GRANT TEMPORARY ON DATABASE {} TO {};", database, role),
        )
    on_target = selected & {"migrate", "reconcile", "catchup", "analysis", "rollback", "finalize"}
    if not on_target:
        return checks, grants
    # What each step does with each table (the load, the audit row, the rejects, the reads).
    wanted: dict[str, dict[str, set[str]]] = {t: {} for t in facts.tables}

    def want(step: str, table: str, *privileges: str) -> None:
        if step in selected:
            for p in privileges:
                wanted[table].setdefault(p, set()).add(step)

    sessions, rejects, runs = SESSIONS, REJECTS, RUNS
    want("migrate", sessions, "SELECT", "INSERT")
    if on_conflict == "keep_newer":
        want("migrate", sessions, "UPDATE")
    want("migrate", rejects, "INSERT")
    want("migrate", runs, "INSERT")
    want("migrate", ALEMBIC_VERSION, "SELECT")  # Alembic reads the revision on every run
    for table in (sessions, rejects, runs):
        want("reconcile", table, "SELECT")
        want("rollback", table, "SELECT")
    want("rollback", runs, "INSERT")
    want("finalize", runs, "INSERT")
    # A catch-up pass inserts, changes and ends sessions, and records itself.
    want("catchup", sessions, "SELECT", "INSERT", "UPDATE", "DELETE")
    want("catchup", runs, "SELECT", "INSERT")
    want("analysis", sessions, "SELECT")
    # When a run ends, sessionmig run records its manifest's digest in the target's digest
    # table, if it has one (see manifest.py): a run of any step that reaches the target.
    digests = getattr(manifest, "DIGEST_TABLE", None)
    if digests in facts.tables:
        for step in on_target:
            want(step, digests, "INSERT")
    missing = [t for t, f in facts.tables.items() if not f.exists and t != ALEMBIC_VERSION]
    if missing:
        want("migrate", ALEMBIC_VERSION, "UPDATE")  # a pending revision: Alembic records it
    schema_name = sql.Identifier(facts.schema)
    if facts.schema_exists:
        # Creating a table or an index checks CREATE on the schema: migrate creates the missing
        # tables, and into an empty sessions it rebuilds the primary key and index after COPY.
        rebuilds = facts.tables[sessions].rows == 0
        creates = "migrate" in selected and (bool(missing) or rebuilds)
        lacking = [] if facts.schema_usage else ["USAGE"]
        if creates and not facts.schema_create:
            lacking.append("CREATE")
        why = f"{by(on_target)} use schema {facts.schema}"
        if "migrate" in selected and missing:
            why += f"; migrate creates {', '.join(missing)} in it"
        elif creates:
            why += f"; migrate rebuilds the keys of the empty {sessions} in it"
        need(
            f"schema {facts.schema}",
            not lacking,
            why,
            _statement(f"GRANT {', '.join(lacking)} ON SCHEMA {{}} TO {{}};", schema_name, role),
        )
    elif "migrate" not in selected:
        checks.append(
            Check(
                f"schema {facts.schema}",
                False,
                f"the target has no schema {facts.schema}; {by(on_target)} need the tables "
                "migrate creates: run migrate first",
            )
        )
        return checks, grants
    for table, privileges in wanted.items():
        if not privileges:
            continue
        t = facts.tables[table]
        steps_here = set().union(*privileges.values())
        if not t.exists:
            if "migrate" not in selected and table in (SESSIONS, REJECTS, RUNS):
                checks.append(
                    Check(
                        f"table {facts.schema}.{table}",
                        False,
                        f"missing; {by(steps_here)} cannot run without it: run migrate first",
                    )
                )
            continue  # migrate creates it, owned by this role
        lacking = sorted(set(privileges) - t.privileges, key=PRIVILEGES.index)
        target_table = sql.Identifier(facts.schema, table)
        need(
            f"table {facts.schema}.{table}",
            not lacking,
            "; ".join(
                f"{p}: {by(privileges[p])}" for p in sorted(privileges, key=PRIVILEGES.index)
            ),
            _statement(f"GRANT {', '.join(lacking)} ON TABLE {{}} TO {{}};", target_table, role)
            if lacking
            else None,
        )
        if table == sessions and "migrate" in selected and t.rows == 0:
            # Into an empty table migrate takes a SHARE ROW EXCLUSIVE lock, drops the primary
            # key and index and rebuilds them after COPY: the owner's rights.
            need(
                f"owner of {facts.schema}.{table}",
                t.owned,
                f"{table} is empty, so migrate locks it, drops and rebuilds its keys "
                f"(owner {t.owner})",
                _statement("ALTER TABLE {} OWNER TO {};", target_table, role),
            )
        if table == rejects and "migrate" in selected and t.sequence is not None:
            need(
                f"sequence {'.'.join(t.sequence)}",
                t.sequence_usage,
                "migrate numbers each reject from it",
                _statement("GRANT USAGE ON SEQUENCE {} TO {};", sql.Identifier(*t.sequence), role),
            )
    return checks, grants


def preflight(s: Settings, run_steps: Any = ()) -> PreflightResult:
    """Source readable and hashed; target reachable, recent enough, and every privilege the
    selected steps (``run_steps``; empty means the default run's) need held: go or no-go.
    What is missing is named with the exact GRANT to ask for."""
    steps = run_steps_of(run_steps)
    checks: list[Check] = []
    grants: list[str] = []
    sha = version = None
    existing: dict[str, int] = {}
    try:
        with open_backup(s.sqlite_path) as backup:
            sha = backup.sha256
            checks.append(
                Check(
                    "source readable",
                    True,
                    f"{Path(s.sqlite_path).name}: {backup.count()} rows, sha256 {sha}",
                )
            )
            if backup.side_files:
                checks.append(
                    Check(
                        "side files",
                        True,
                        ", ".join(backup.side_files)
                        + " found beside the backup; their rows will be included",
                    )
                )
            backup.verify_unchanged()
    except SourceError as exc:
        checks.append(Check("source readable", False, str(exc)))
    if s.expected_sha256 and sha and sha != s.expected_sha256:
        checks.append(
            Check(
                "expected sha256",
                False,
                f"the backup's sha256 is {sha}, expected {s.expected_sha256}",
            )
        )
    try:
        dsn = s.dsn()
        with connect(dsn, "preflight") as conn:
            facts = target_facts(conn, s.target_schema)
            # A pooler announces a backend pid of its own. In transaction mode it hands each
            # transaction another server session: advisory locks, an exported snapshot and
            # the session settings the steps rely on do not hold there.
            server_pid = conn.execute("SELECT pg_catalog.pg_backend_pid()").fetchone()
            announced_pid = conn.info.backend_pid
            standbys_go, standbys_seen = replication.check(conn)
        version = facts.version
        checks.append(
            Check("target reachable", True, f"PostgreSQL {version}, as role {facts.role}")
        )
        if server_pid is not None and server_pid[0] != announced_pid:
            checks.append(
                Check(
                    "direct connection",
                    False,
                    "the DSN leads through a connection pooler (PgBouncer?): the steps need a "
                    "server session of their own (advisory locks, an exported snapshot, "
                    "session settings), which a transaction pooler does not keep; give "
                    "sessionmig a direct DSN to PostgreSQL",
                )
            )
        checks.append(Check("standbys", standbys_go, standbys_seen))
        more, grants = target_checks(facts, steps, s.on_conflict)
        checks += more
        existing = {t.name: t.rows for t in facts.tables.values() if t.rows is not None}
    except (psycopg.Error, P.ParameterError, TargetError) as exc:
        checks.append(Check("target reachable", False, P.redact(str(exc)).strip()))
    return PreflightResult(tuple(checks), sha, version, existing, steps, tuple(grants))


# --- inspect ---------------------------------------------------------------------------------


def inspect(s: Settings, progress: bool = True) -> InspectResult:
    """Profile the backup (see :mod:`sessionmig.sqlite.inspection`), with a bar of its phases."""
    with progress_bar(None, progress, phase="opening the backup") as bar:
        return inspect_backup(
            s.sqlite_path,
            s.rules,
            s.as_of,
            s.source_timezone,
            s.batch_rows,
            s.on_extra_columns,
            progress=bar.update,
            phase=bar.phase,
        )


# --- migrate ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MigrateResult:
    outcome: LoadOutcome
    revision: str
    hashes_before: tuple[FileHash, ...]
    hashes_after: tuple[FileHash, ...]
    settings: Settings
    source_check: str = ""  # what proved the file sound before the commit

    @property
    def verdict(self) -> str:
        return Verdict.PASS_WITH_WARNINGS if self.outcome.rejected else Verdict.PASS


def migrate(s: Settings, progress: bool = True) -> MigrateResult:
    """Create the schema with Alembic, then load every row in one transaction.

    A lost or refused connection is retried ``max_retries`` times with exponential backoff:
    each attempt is the whole, atomic, idempotent load, so a retry can neither duplicate nor
    half-write anything.
    """
    with open_backup(s.sqlite_path) as backup:
        _check_source(s, backup)
        dsn = s.dsn()
        for attempt in range(s.max_retries + 1):
            try:
                return _migrate_once(s, backup, dsn, progress)
            except TransientTargetError as exc:
                if attempt == s.max_retries:
                    raise TransientTargetError(
                        f"{P.redact(str(exc))} — gave up after {attempt + 1} attempt(s); the "
                        "target holds nothing of this run. Check the server and run again"
                    ) from None
                delay = RETRY_BACKOFF_S * 2**attempt
                log.warning("connection lost (%s); retrying in %.0f s", P.redact(str(exc)), delay)
                time.sleep(delay)
        raise AssertionError("unreachable")


def _require_expected_sha256(s: Settings, backup: Any) -> None:
    if s.expected_sha256 and backup.sha256 != s.expected_sha256:
        raise SourceError(
            f"{s.sqlite_path}: sha256 is {backup.sha256}, but expected_sha256 is "
            f"{s.expected_sha256}; this is not the file that was reviewed — find the right "
            "file or review this one and update expected_sha256. Nothing was written"
        )


def _check_source(s: Settings, backup: Any) -> None:
    if backup.missing_columns:
        raise SourceError(
            f"{s.sqlite_path}: sessions lacks the columns {backup.missing_columns}; this is not "
            "the legacy schema — check sqlite_path and run inspect"
        )
    if backup.extra_columns and s.on_extra_columns == "fail":
        raise SourceError(
            f"{s.sqlite_path}: sessions has extra columns {backup.extra_columns} that the target "
            "has no place for; to keep their values in metadata._legacy_columns rerun with "
            "-p on_extra_columns=into_metadata"
        )


def _require_sound(s: Settings, messages: list[str]) -> None:
    if messages != ["ok"]:
        raise SourceError(
            f"{s.sqlite_path}: quick_check failed: {messages[:3]}; the file is damaged — take "
            "a fresh backup. Nothing was written"
        )


def _migrate_once(s: Settings, backup: Any, dsn: str, progress: bool) -> MigrateResult:
    # Imported here, not at the top: SQLAlchemy's import then overlaps the source's hashing.
    from sessionmig.postgres import schema

    with migration_lock(dsn, s.target_schema), contextlib.ExitStack() as undo:
        try:
            # Removed again if the load does not commit (an interrupted first run), so the
            # target is left exactly as it was.
            revision = undo.enter_context(schema.provisional(dsn, s.target_schema))
        except Exception as exc:  # SQLAlchemy wraps driver errors in many types
            if "OperationalError" in type(exc).__name__:
                raise TransientTargetError(f"creating the schema: {exc}") from None
            raise TargetError(f"creating the schema failed: {P.redact(str(exc))}") from None
        bar = progress_bar(backup.estimated_rows(), progress, phase="copying rows")
        audit = AuditInfo(
            s.run_id,
            s.sqlite_path,
            s.source_timezone,
            s.public(),
            s.operator,
            socket.gethostname(),
        )
        rules = s.rules
        # The file must be sound before anything commits. When it is byte for byte the one
        # inspect checked in full (expected_sha256), that check stands; otherwise
        # quick_check, which proves what the table scan reads, runs beside the load. The
        # sha256 (hashed beside the load too) is compared last.
        if s.expected_sha256:
            check = "integrity_check by inspect: sha256 equals expected_sha256"

            def before_commit() -> None:
                _require_expected_sha256(s, backup)

        else:
            check = "quick_check beside the load: ok"
            sound = backup.quick_check_later()

            def before_commit() -> None:
                _require_sound(s, sound.result())

        try:
            outcome = load(
                dsn,
                backup,
                rules,
                audit,
                schema=s.target_schema,
                on_conflict=s.on_conflict,
                dry_run=s.dry_run,
                batch_rows=s.batch_rows,
                progress=bar.update,
                before_commit=before_commit,
                phase=bar.phase,
            )
        finally:
            bar.close()
    # The load re-hashed the source before its commit.
    return MigrateResult(outcome, revision, backup.hashes_before, backup.hashes_after, s, check)


# --- reconcile -------------------------------------------------------------------------------


SKIPPED = Verdict.SKIPPED
DRY_RUN_NOTHING_TO_RECONCILE = (
    "skipped: dry run, nothing was written (migrate rolled its rows back), so there is nothing "
    "to reconcile; run without dry_run to migrate and reconcile"
)


def skipped_reconcile(reason: str) -> ReconcileResult:
    """A reconcile that did not compare anything, and says so instead of a verdict on data."""
    from sessionmig.engines import reconcile as engine

    # Every kind the engine counts, at zero (the report's tables read some of them by name).
    kinds = getattr(engine, "KINDS", ("matched", "missing", "extra", "changed", "both"))
    return ReconcileResult(
        run_id=None,
        source_rows=0,
        target_rows=0,
        migrated=0,
        rejected=0,
        matched=0,
        counts=dict.fromkeys((*kinds, "unaccounted", "orphan_reject"), 0),
        differences=[],
        parity={},
        verdict=SKIPPED,
        reason=reason,
    )


def reconcile_step(
    s: Settings, progress: bool = True, run_id: str | None = None
) -> ReconcileResult:
    """Compare the raw backup with the target, every row and column.

    In a dry run migrate rolled back everything it loaded: comparing the backup with the
    target would report every row missing (or check an earlier run's rows as if they were
    this one's), so reconcile is skipped, with that said, and the run keeps migrate's verdict.
    """
    if s.dry_run:
        return skipped_reconcile(DRY_RUN_NOTHING_TO_RECONCILE)
    with open_backup(s.sqlite_path) as backup:
        if backup.missing_columns:
            raise SourceError(f"{s.sqlite_path}: missing columns {backup.missing_columns}")
        with progress_bar(backup.estimated_rows(), progress, phase="comparing rows") as bar:
            return reconcile(  # which re-hashes the source before it finishes
                s.dsn(),
                backup,
                s.rules,
                schema=s.target_schema,
                as_of=s.as_of,
                batch_rows=s.batch_rows,
                progress=bar.update,
                mode=s.reconcile_mode,
                run_id=run_id,
                app_check=True,
            )


# --- analysis --------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnalysisResult:
    """The named queries' answers on each source, what went wrong, and what they disagree on."""

    sources: tuple[str, ...]
    results: dict[str, Any]  # query name -> DataFrame (with a ``source`` column for two)
    free: dict[str, Any]  # source -> DataFrame of the free SQL
    errors: dict[str, str]  # query (or "free SQL on SOURCE") -> what went wrong
    differences: tuple[str, ...]  # one line per query whose answers differ between sources
    warnings: tuple[str, ...]

    @property
    def verdict(self) -> str:
        if self.errors:
            return Verdict.ERROR
        return Verdict.PASS_WITH_WARNINGS if self.differences or self.warnings else Verdict.PASS

    @property
    def exit_code(self) -> int:
        """What the verdict means for the run: 2 when a query could not be carried out."""
        return EXIT_ERROR if self.errors else 0

    @property
    def reason(self) -> str:
        ran = f"{len(self.results)} queries on {', '.join(self.sources)}"
        if self.errors:
            failed = "; ".join(f"{name}: {message}" for name, message in self.errors.items())
            return f"{len(self.errors)} failed ({failed}); {ran}"
        found = list(self.warnings)
        if self.differences:
            found.insert(
                0,
                f"the sources differ on {len(self.differences)} of {len(self.results)} "
                "queries: " + "; ".join(self.differences),
            )
        # Agreement between the sources is a finding, not the proof: each query's meaning is
        # checked against an independent computation by the test suite (test_query_oracle).
        return (
            "; ".join(found)
            if found
            else f"{ran}; each query computes the meaning `sessionmig query --list` states, "
            "checked against an independent computation"
            + (", and the sources agree" if len(self.sources) > 1 else "")
        )


def _plain(value: Any) -> Any:
    """A cell as a comparable Python value: the drivers return Decimal, numpy or float where
    the other side returns int for the same number."""
    import math
    from decimal import Decimal

    if hasattr(value, "item") and not isinstance(value, str | bytes):
        value = value.item()  # numpy scalars
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, Decimal):
        value = int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, float):
        return int(value) if value.is_integer() else round(value, 9)
    return value


def _rows(frame: Any) -> list[tuple]:
    return [tuple(_plain(v) for v in row) for row in frame.itertuples(index=False)]


def _difference(name: str, frame: Any, sources: tuple[str, ...]) -> str | None:
    """How the two sources' answers to query ``name`` differ (None when they do not)."""
    from collections import Counter

    a, b = sources
    sides = {
        s: frame[frame["source"] == s].drop(columns="source").reset_index(drop=True)
        for s in sources
    }
    rows = {s: _rows(sides[s]) for s in sources}
    if Counter(rows[a]) == Counter(rows[b]):
        return None
    if len(rows[a]) == len(rows[b]) == 1:
        # One row each (active_at, anomalies): name every measure that differs, with numbers.
        columns = list(sides[a].columns)
        changed = [
            f"{c} {x} on {a} vs {y} on {b}"
            for c, x, y in zip(columns, rows[a][0], rows[b][0], strict=True)
            if x != y
        ]
        return f"{name}: " + ", ".join(changed)
    only_a = sum((Counter(rows[a]) - Counter(rows[b])).values())
    only_b = sum((Counter(rows[b]) - Counter(rows[a])).values())
    return (
        f"{name}: {len(rows[a])} rows on {a}, {len(rows[b])} on {b}; "
        f"{only_a} only on {a}, {only_b} only on {b}"
    )


def analysis(
    s: Settings,
    sources: tuple[str, ...],
    query_names: list[str],
    common: dict[str, Any],
    free_sql: str = "",
    *,
    show_ids: bool = False,
) -> AnalysisResult:
    """Run the named queries (and the free SQL) on each source; compare the sources.

    Each query runs on its own, so one that fails is named without hiding the others'
    answers; a failure makes the verdict ERROR. With two sources, every query whose answers
    differ is named with its numbers (PASS_WITH_WARNINGS: after cutover PostgreSQL rightly
    holds sessions the backup does not, so a difference is for the reader to judge, while
    reconcile is the proof); so is a source that holds no session at all.
    """
    from sessionmig.engines import queries

    backends = queries.backends_for(s, sources)
    wanted = list(query_names) or [
        q.name
        for q in queries.QUERIES
        if q.name != "user_sessions"
        or common.get("user_id") not in (None, "")
        or common.get("anonymous")
    ]
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name in wanted:
        try:
            results.update(queries.run_many([name], sources, backends, s, common, show_ids))
        except Exception as exc:  # any failure is reported by name; the run then says ERROR
            errors[name] = P.redact(f"{type(exc).__name__}: {exc}".strip())
    free: dict[str, Any] = {}
    if free_sql:
        for source in sources:
            try:
                free[source] = queries.run_free_sql(free_sql, source, backends, show_ids=show_ids)
            except Exception as exc:
                errors[f"free SQL on {source}"] = P.redact(f"{type(exc).__name__}: {exc}".strip())
    differences = []
    if len(sources) == 2:
        for name, frame in results.items():
            found = _difference(name, frame, sources)
            if found:
                differences.append(found)
    warnings = []
    if "anomalies" in results:
        frame = results["anomalies"]
        for source in sources:
            part = frame[frame["source"] == source] if "source" in frame.columns else frame
            if len(part) and _plain(part["rows"].iloc[0]) == 0:
                warnings.append(f"{source} holds no sessions")
    return AnalysisResult(
        tuple(sources), results, free, errors, tuple(differences), tuple(warnings)
    )


# --- rollback and finalize -------------------------------------------------------------------


def _trusted_check(dsn: str, step: str) -> psycopg.Connection:
    """The step's own connection to the target, for reading the run folder it acts on; a
    failure says that nothing was done (the folder is read before anything is written)."""
    try:
        return connect(dsn, step, autocommit=True)
    except TargetError as exc:
        raise type(exc)(
            f"{step} stopped before writing anything (nothing was moved, written or "
            f"recorded): {exc}"
        ) from None


def _before_writing(step: str, exc: psycopg.Error) -> TargetError:
    return TransientTargetError(
        f"{step} stopped while checking the run folder against the target "
        f"({failure_text(exc)}): nothing was moved, written or recorded; run the same command "
        "again"
    )


def rollback_step(
    s: Settings,
    *,
    restore_path: str,
    migrate_manifest: str,
    confirm: bool = False,
    live_sqlite_path: str = "",
    state_dir: str = "",
) -> tuple[RollbackResult | LiveRollbackResult, ReconcileResult | None]:
    """Restore the migrated backup with PostgreSQL's sessions carried back, record it, and
    reconcile the restored file against PostgreSQL with the same engine as step 03.

    ``migrate_manifest`` is read as ``sessionmig verify DIR --env ENV`` checks it
    (:func:`~sessionmig.runbook.manifest.read_trusted`): its digest must be the one its run recorded
    in this target. With ``live_sqlite_path`` (a live cutover's overlap, the old colour still
    serving) the catch-up's merge runs the other way into that file instead; it checks every
    session it touched before committing and records itself, and there is no reconcile (the
    live file rightly holds the old colour's own changes), so the second value is None.

    Re-running the same command after a fault: a restored file this command wrote and did not
    record is restored afresh and recorded once; one it recorded is reconciled again, without a
    second restore or row (``confirm=true`` restores afresh as a new rollback)."""
    if live_sqlite_path:
        if not migrate_manifest:
            raise P.ParameterError(
                "migrate_manifest is empty: give the run folder (or its manifest.json) of the "
                "run that migrated the first snapshot"
            )
        if not state_dir:
            raise P.ParameterError(
                "state_dir is empty: give the catch-up passes' state_dir (the base is there)"
            )
        dsn = s.dsn()
        try:
            with _trusted_check(dsn, "rollback") as conn:
                expected_sha256 = migrated_sha256(
                    read_trusted(migrate_manifest, conn, s.target_schema)
                )
        except psycopg.Error as exc:
            raise _before_writing("rollback", exc) from None
        live = rollback_live(
            dsn,
            sqlite_path=s.sqlite_path,
            live_sqlite_path=live_sqlite_path,
            state_dir=state_dir,
            expected_sha256=expected_sha256,
            rules=s.rules,
            schema=s.target_schema,
            run_id=s.run_id,
            operator=s.operator,
        )
        return live, None
    if not restore_path:
        raise P.ParameterError(
            "restore_path is empty: give the path the app reads its "
            "sessions.db from (SESSION_SQLITE_PATH)"
        )
    if not migrate_manifest:
        raise P.ParameterError(
            "migrate_manifest is empty: give the run folder (or its "
            "manifest.json) of the run that migrated this backup"
        )
    started = datetime.now(UTC)
    dsn = s.dsn()
    try:
        with _trusted_check(dsn, "rollback") as conn:
            given = read_trusted(migrate_manifest, conn, s.target_schema)
            expected = migrated_sha256(given)
            earlier = earlier_restore(restore_path)
            if earlier is not None and earlier.get("backup_sha256") != expected:
                earlier = None  # another backup's restore: not this command's to replace
            when = (
                recorded_at(conn, s.target_schema, "rollback", str(earlier["run_id"]))
                if earlier
                else None
            )
    except psycopg.Error as exc:
        raise _before_writing("rollback", exc) from None
    if earlier is not None and when is not None and not confirm:
        # This command's restore, recorded, untouched since: the rollback is done; check it.
        done = earlier_result(earlier, when)
        named = str(given.get("run_id") or "") or None
        return done, reconcile_step(replace(s, sqlite_path=done.restore_path), run_id=named)
    result = rollback(
        s.sqlite_path,
        restore_path,
        expected,
        dsn,
        s.rules,
        schema=s.target_schema,
        confirm=bool(confirm),
        batch_rows=s.batch_rows,
        run_id=s.run_id,
        replaceable=earlier is not None,
    )
    record_once(
        dsn,
        s.target_schema,
        "rollback",
        s.run_id,
        f"rollback wrote the restored file {result.restore_path} (sha256 {result.restored_sha256})",
        "do not switch the app to it yet: run the same command again (it restores afresh and "
        "records it once)",
        path=result.restore_path,
        sha256=result.restored_sha256,
        zone=s.source_timezone,
        counts={
            "rows": result.carried_new
            + result.carried_changed
            + result.carried_ended
            + result.kept,
            "inserted": result.carried_new,
            "updated": result.carried_changed,
            "unchanged": result.kept,
        },
        parameters={
            **s.public(),
            "restore_path": restore_path,
            "migrate_manifest": migrate_manifest,
        },
        operator=s.operator,
        host=socket.gethostname(),
        started=started,
    )
    check = replace(s, sqlite_path=result.restore_path)
    # Against the rejects of the run the operator named, not whichever migrate ran last.
    return result, reconcile_step(check, run_id=str(given.get("run_id") or "") or None)


def finalize_step(
    s: Settings,
    *,
    live_sqlite_path: str,
    archive_dir: str,
    reconcile_manifest: str,
    soak_hours: float = D.SOAK_HOURS,
) -> FinalizeResult:
    """Archive the live SQLite file after a reconcile PASS and the soak period; record it.

    ``reconcile_manifest`` is read as ``sessionmig verify DIR --env ENV`` checks it
    (:func:`~sessionmig.runbook.manifest.read_trusted`). The soak period is measured on the wall
    clock: ``as_of`` is the data's "now" (which sessions are active), and an environment may fix
    it in the past. Re-running the same command after a fault completes an earlier run's move and
    records it once (under that run's id, the one the archived names carry)."""
    for name, value in (
        ("live_sqlite_path", live_sqlite_path),
        ("archive_dir", archive_dir),
        ("reconcile_manifest", reconcile_manifest),
    ):
        if not value:
            raise P.ParameterError(f"{name} is empty; see runbook/RUNBOOK.md, step Finalize")
    P.validate({"soak_hours": soak_hours})
    started = datetime.now(UTC)
    dsn = s.dsn()
    try:
        with _trusted_check(dsn, "finalize") as conn:
            trusted = read_trusted(reconcile_manifest, conn, s.target_schema)
            recorded = {}
            for intent in finalize_intents(archive_dir, live_sqlite_path):
                when = recorded_at(conn, s.target_schema, "finalize", str(intent["run_id"]))
                if when is not None:
                    recorded[str(intent["run_id"])] = when
    except psycopg.Error as exc:
        raise _before_writing("finalize", exc) from None
    result = finalize(
        live_sqlite_path,
        archive_dir,
        trusted,
        soak_hours,
        started,
        s.run_id,
        recorded=recorded,
    )
    moved = ", ".join(f"{path} (sha256 {sha})" for path, sha in result.files)
    record_once(
        dsn,
        s.target_schema,
        "finalize",
        result.run_id,
        f"finalize moved the live file to {moved}",
        "run the same command again: it finds the archived file and records it once",
        path=result.archived_to,
        sha256=result.files[0][1],
        zone=s.source_timezone,
        counts={},
        parameters={
            "live_sqlite_path": live_sqlite_path,
            "archive_dir": archive_dir,
            "reconcile_manifest": reconcile_manifest,
            "soak_hours": soak_hours,
            **({"completed_by_run": s.run_id} if result.resumed else {}),
        },
        operator=s.operator,
        host=socket.gethostname(),
        started=started,
    )
    return result


FINALIZE_OWN = ("live_sqlite_path", "archive_dir", "reconcile_manifest", "soak_hours")


def finalize_parameters(namespace: dict[str, Any]) -> dict[str, Any]:
    """:func:`finalize_step`'s arguments from the finalize notebook's globals: its settings
    (finalize never reads the backup, so ``sqlite_path`` is not required) and its own four."""
    own = {k: namespace[k] for k in FINALIZE_OWN if k in namespace}
    return {
        "s": settings(
            require_source=False, **{k: namespace[k] for k in P.SETTINGS if k in namespace}
        ),
        **own,
    }


# --- catchup ---------------------------------------------------------------------------------

_INTERVAL = re.compile(r"^[0-9]+(\.[0-9]+)?(ms|s|min)$")


def catchup_step(
    s: Settings, live_sqlite_path: str, state_dir: str, *, lock_timeout: str = D.LOCK_TIMEOUT
) -> CatchupResult:
    """One pass as the runbook runs it (notebook ``07_catchup``, ``sessionmig catchup``): the
    same command each time; the base is found from the audit table and ``state_dir``."""
    if not live_sqlite_path:
        raise P.ParameterError(
            "live_sqlite_path is empty: give the SQLite file the old colour writes to "
            "(its SESSION_SQLITE_PATH)"
        )
    if not state_dir:
        raise P.ParameterError(
            "state_dir is empty: give a private directory (0700) kept between passes, outside "
            "any report folder, e.g. /var/lib/sessionmig/catchup"
        )
    if not isinstance(lock_timeout, str) or not _INTERVAL.match(lock_timeout):
        raise P.ParameterError(
            f"lock_timeout={lock_timeout!r}: give a duration such as 500ms, 5s or 1min"
        )
    return catchup(
        s.dsn(),
        sqlite_path=s.sqlite_path,
        live_sqlite_path=live_sqlite_path,
        state_dir=state_dir,
        rules=s.rules,
        schema=s.target_schema,
        run_id=s.run_id,
        source_timezone=s.source_timezone,
        operator=s.operator,
        parameters=s.public(),
        lock_timeout=lock_timeout,
        retries=s.max_retries,
        batch_rows=s.batch_rows,
        dry_run=s.dry_run,
    )
