"""The engine of each runbook step, shared by the notebooks and the ``sessionmig`` verbs.

Each function takes validated :class:`Settings` and returns a frozen result; notebooks render
the result, the CLI prints it. Nothing here renders or writes reports.
"""

from __future__ import annotations

import getpass
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from . import params as P
from .errors import SourceError, TargetError, TransientTargetError
from .inspection import InspectResult, inspect_backup
from .load import AuditInfo, LoadOutcome, load, migration_lock
from .progress import progress_bar
from .reconcile import ReconcileResult, reconcile
from .rollback import (
    FinalizeResult,
    RollbackResult,
    finalize,
    migrated_sha256,
    read_manifest,
    record,
    rollback,
)
from .source import FileHash, open_backup
from .transform import Rules

if TYPE_CHECKING:  # the app check pulls in the async SessionManager; load it only for that step
    from .appcheck import AppCheck

DEFAULTS: dict[str, Any] = {
    "database_url_env": "DATABASE_URL",
    "as_of": "",
    "target_schema": "public",
    "batch_rows": 10_000,
    "on_conflict": "fail",
    "on_invalid_metadata": "reject",
    "on_extra_columns": "fail",
    "dry_run": False,
    "expected_sha256": "",
    "run_id": "",
    "operator": "",
    "max_retries": 3,
}
RETRY_BACKOFF_S = 1.0


def new_run_id(now: datetime | None = None) -> str:
    """A sortable, unique run id such as ``20261126T121500Z-3f9a``."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{os.urandom(2).hex()}"


@dataclass(frozen=True)
class Settings:
    """Validated parameters of one step, with derived values (zone, instant, rules)."""

    sqlite_path: str
    database_url_env: str | None
    source_timezone: str
    as_of: datetime
    target_schema: str
    batch_rows: int
    on_conflict: str
    on_invalid_metadata: str
    dry_run: bool
    expected_sha256: str
    run_id: str
    operator: str
    max_retries: int = 3
    on_extra_columns: str = "fail"
    declared: tuple[str, ...] = ()

    @property
    def rules(self) -> Rules:
        return Rules(P.zone(self.source_timezone), self.on_invalid_metadata)

    def rules_for(self, backup: Any) -> Rules:
        """The rules for this backup: its extra columns are carried only when asked to."""
        extra = tuple(backup.extra_columns) if self.on_extra_columns == "into_metadata" else ()
        return Rules(P.zone(self.source_timezone), self.on_invalid_metadata, extra)

    def dsn(self) -> str:
        return P.database_url(self.database_url_env)

    def public(self) -> dict[str, Any]:
        """Parameters as recorded in the audit row and manifest (no secrets exist here)."""
        out = asdict(self)
        out["as_of"] = self.as_of.isoformat()
        del out["declared"]
        return out


def settings(**given: Any) -> Settings:
    """Validate the notebook's or CLI's parameters and fill defaults; raises ParameterError."""
    known = {k: v for k, v in given.items() if k in Settings.__dataclass_fields__}
    known.pop("declared", None)
    merged = {**DEFAULTS, **known}
    merged.setdefault("source_timezone", "")
    merged.setdefault("sqlite_path", "")
    P.validate(merged)
    P.zone(merged["source_timezone"])
    return Settings(
        sqlite_path=str(Path(merged["sqlite_path"]).resolve()),
        database_url_env=merged["database_url_env"],
        source_timezone=str(merged["source_timezone"]),
        as_of=P.resolve_as_of(merged["as_of"]),
        target_schema=merged["target_schema"],
        batch_rows=int(merged["batch_rows"]),
        on_conflict=merged["on_conflict"],
        on_invalid_metadata=merged["on_invalid_metadata"],
        dry_run=bool(merged["dry_run"]),
        expected_sha256=str(merged["expected_sha256"] or "").lower(),
        run_id=merged["run_id"] or new_run_id(),
        operator=merged["operator"] or current_operator(),
        max_retries=int(merged["max_retries"]),
        on_extra_columns=merged["on_extra_columns"],
        declared=tuple(k for k in given if k in Settings.__dataclass_fields__),
    )


def current_operator() -> str:
    """Who is running this: ``$USER``, else the login name of the process."""
    return os.environ.get("USER") or getpass.getuser()


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

    @property
    def go(self) -> bool:
        return all(c.ok for c in self.checks)


def preflight(s: Settings) -> PreflightResult:
    """Source readable and hashed, target reachable and writable: go or no-go."""
    from . import schema

    checks: list[Check] = []
    sha = version = None
    existing: dict[str, int] = {}
    try:
        backup = open_backup(s.sqlite_path)
        try:
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
        finally:
            backup.close()
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
        with psycopg.connect(dsn, connect_timeout=10) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
            checks.append(Check("target reachable", True, f"PostgreSQL {version}"))
            can_create = conn.execute(
                """SELECT CASE WHEN to_regnamespace(%(s)s) IS NULL
                               THEN has_database_privilege(current_database(), 'CREATE')
                               ELSE has_schema_privilege(%(s)s, 'CREATE') END""",
                {"s": s.target_schema},
            ).fetchone()[0]  # type: ignore[index]
            checks.append(
                Check(
                    "privileges",
                    bool(can_create),
                    f"{'can' if can_create else 'cannot'} create tables in schema "
                    f"{s.target_schema}",
                )
            )
            for table in schema.TABLES:
                exists = conn.execute(
                    "SELECT to_regclass(%s) IS NOT NULL", (f'"{s.target_schema}"."{table}"',)
                ).fetchone()[0]  # type: ignore[index]
                if exists:
                    existing[table] = conn.execute(
                        sql.SQL("SELECT count(*) FROM {}").format(
                            sql.Identifier(s.target_schema, table)
                        )
                    ).fetchone()[0]  # type: ignore[index]
    except (psycopg.Error, P.ParameterError) as exc:
        checks.append(Check("target reachable", False, P.redact(str(exc)).strip()))
    return PreflightResult(tuple(checks), sha, version, existing)


# --- inspect ---------------------------------------------------------------------------------


def inspect(s: Settings) -> InspectResult:
    """Profile the backup (see :mod:`sessionmig.inspection`)."""
    return inspect_backup(
        s.sqlite_path, s.rules, s.as_of, s.source_timezone, s.batch_rows, s.on_extra_columns
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
        return "PASS_WITH_WARNINGS" if self.outcome.rejected else "PASS"


def migrate(s: Settings, progress: bool = True) -> MigrateResult:
    """Create the schema with Alembic, then load every row in one transaction.

    A lost or refused connection is retried ``max_retries`` times with exponential backoff:
    each attempt is the whole, atomic, idempotent load, so a retry can neither duplicate nor
    half-write anything.
    """
    backup = open_backup(s.sqlite_path)
    try:
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
                print(
                    f"connection lost ({P.redact(str(exc))}); retrying in {delay:.0f} s",
                    file=sys.stderr,
                )
                time.sleep(delay)
        raise AssertionError("unreachable")
    finally:
        backup.close()


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
    from . import schema

    with migration_lock(dsn, s.target_schema):
        try:
            revision = schema.upgrade(dsn, s.target_schema)
        except Exception as exc:  # SQLAlchemy wraps driver errors in many types
            if "OperationalError" in type(exc).__name__:
                raise TransientTargetError(f"creating the schema: {exc}") from None
            raise TargetError(f"creating the schema failed: {P.redact(str(exc))}") from None
        bar = progress_bar(backup.estimated_rows(), progress)
        audit = AuditInfo(
            s.run_id,
            s.sqlite_path,
            s.source_timezone,
            s.public(),
            s.operator,
            socket.gethostname(),
        )
        rules = s.rules_for(backup)
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
            )
        finally:
            bar.close()
    # The load re-hashed the source before its commit.
    return MigrateResult(outcome, revision, backup.hashes_before, backup.hashes_after, s, check)


# --- reconcile -------------------------------------------------------------------------------


def reconcile_step(s: Settings, progress: bool = True) -> ReconcileResult:
    """Compare the raw backup with the target, every row and column."""
    backup = open_backup(s.sqlite_path)
    try:
        if backup.missing_columns:
            raise SourceError(f"{s.sqlite_path}: missing columns {backup.missing_columns}")
        with progress_bar(backup.estimated_rows(), progress) as bar:
            result = reconcile(
                s.dsn(),
                backup,
                s.rules_for(backup),
                schema=s.target_schema,
                as_of=s.as_of,
                batch_rows=s.batch_rows,
                progress=bar.update,
            )
        return result  # reconcile re-hashed the source before it finished
    except psycopg.errors.UndefinedTable:
        raise TargetError(
            f"the target has no sessionmig tables in schema {s.target_schema!r}; run migrate first"
        ) from None
    finally:
        backup.close()


def settings_from(namespace: dict[str, Any]) -> Settings:
    """:func:`settings` from a notebook's globals (the names its parameters cell defines)."""
    return settings(**{k: namespace[k] for k in Settings.__dataclass_fields__ if k in namespace})


def app_check(s: Settings) -> AppCheck:
    """Ask the new SessionManager, read only, which sessions it accepts at ``as_of``."""
    from .appcheck import check_with_manager

    backup = open_backup(s.sqlite_path)
    try:
        return check_with_manager(
            s.dsn(),
            backup,
            s.rules_for(backup),
            schema=s.target_schema,
            as_of=s.as_of,
            batch_rows=s.batch_rows,
        )
    finally:
        backup.close()


# --- rollback and finalize -------------------------------------------------------------------


def rollback_step(
    s: Settings, *, restore_path: str, migrate_manifest: str, confirm: bool = False
) -> tuple[RollbackResult, ReconcileResult]:
    """Restore the migrated backup with PostgreSQL's sessions carried back, record it, and
    reconcile the restored file against PostgreSQL with the same engine as step 03."""
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
    expected = migrated_sha256(read_manifest(migrate_manifest))
    started = datetime.now(UTC)
    dsn = s.dsn()
    result = rollback(
        s.sqlite_path,
        restore_path,
        expected,
        dsn,
        s.rules,
        schema=s.target_schema,
        confirm=bool(confirm),
        batch_rows=s.batch_rows,
    )
    record(
        dsn,
        s.target_schema,
        "rollback",
        s.run_id,
        result.restore_path,
        result.restored_sha256,
        s.source_timezone,
        {
            "rows": result.carried_new
            + result.carried_changed
            + result.carried_ended
            + result.kept,
            "inserted": result.carried_new,
            "updated": result.carried_changed,
            "unchanged": result.kept,
        },
        {**s.public(), "restore_path": restore_path, "migrate_manifest": migrate_manifest},
        s.operator,
        socket.gethostname(),
        started,
    )
    check = replace(s, sqlite_path=result.restore_path)
    return result, reconcile_step(check)


def finalize_step(
    *,
    live_sqlite_path: str,
    archive_dir: str,
    reconcile_manifest: str,
    soak_hours: float,
    database_url_env: str | None,
    target_schema: str = "public",
    as_of: Any = "",
    run_id: str = "",
    operator: str = "",
    source_timezone: str = "UTC",
) -> FinalizeResult:
    """Archive the live SQLite file after a reconcile PASS and the soak period; record it."""
    for name, value in (
        ("live_sqlite_path", live_sqlite_path),
        ("archive_dir", archive_dir),
        ("reconcile_manifest", reconcile_manifest),
    ):
        if not value:
            raise P.ParameterError(f"{name} is empty; see runbook/RUNBOOK.md, step Finalize")
    if isinstance(soak_hours, bool) or not isinstance(soak_hours, int | float) or soak_hours < 0:
        raise P.ParameterError(f"soak_hours={soak_hours!r} must be a number of hours >= 0")
    started = datetime.now(UTC)
    now = P.resolve_as_of(as_of, started)
    run_id = run_id or new_run_id()
    result = finalize(
        live_sqlite_path, archive_dir, read_manifest(reconcile_manifest), soak_hours, now, run_id
    )
    record(
        P.database_url(database_url_env),
        target_schema,
        "finalize",
        run_id,
        result.archived_to,
        result.files[0][1],
        source_timezone,
        {},
        {
            "live_sqlite_path": live_sqlite_path,
            "archive_dir": archive_dir,
            "reconcile_manifest": reconcile_manifest,
            "soak_hours": soak_hours,
        },
        operator or current_operator(),
        socket.gethostname(),
        started,
    )
    return result


FINALIZE_PARAMETERS = (
    "live_sqlite_path",
    "archive_dir",
    "reconcile_manifest",
    "soak_hours",
    "database_url_env",
    "source_timezone",
    "target_schema",
    "run_id",
    "operator",
)


def finalize_parameters(namespace: dict[str, Any]) -> dict[str, Any]:
    """The finalize notebook's parameters, picked from its globals."""
    return {k: namespace[k] for k in FINALIZE_PARAMETERS if k in namespace}
