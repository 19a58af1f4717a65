"""Regenerate notebooks/*.ipynb (no outputs): run it after changing a notebook's cells here."""

from pathlib import Path

import nbformat as nbf
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from sessionmig.steps import FINALIZE_PARAMETERS

ROOT = Path(__file__).resolve().parent.parent
# Where the data comes from and goes to: every step that touches the target declares these.
TARGET = ["sqlite_path", "database_url_env", "source_timezone", "as_of", "target_schema"]

COMMON = {
    "sqlite_path": ('""', "the SQLite backup file (read through a private copy, never modified)"),
    "database_url_env": (
        '"DATABASE_URL"',
        "NAME of the environment variable holding the target DSN; None starts the embedded server",
    ),
    "source_timezone": (
        '""',
        'IANA zone the legacy server wrote its naive timestamps in, e.g. "Asia/Seoul" (required)',
    ),
    "as_of": (
        '""',
        'ISO-8601 instant used as "now" for active/expired; empty means the start of the run',
    ),
    "target_schema": ('"public"', "PostgreSQL schema that holds the sessions tables"),
    "batch_rows": ("10000", "rows per batch (SQLite fetch and COPY)"),
    "on_conflict": (
        '"fail"',
        "rows already in the target that differ: fail | skip | keep_newer (by last_activity)",
    ),
    "on_invalid_metadata": (
        '"reject"',
        "metadata that is not storable JSON: reject | keep_as_json_string",
    ),
    "on_extra_columns": (
        '"fail"',
        "columns beyond the legacy schema: fail | into_metadata (kept under _legacy_columns)",
    ),
    "dry_run": (
        "False",
        "True: do all the work, report what would happen, then roll back (reconcile: skipped)",
    ),
    "run_steps": (
        "[]",
        "the steps of this run, whose privileges preflight checks; empty means preflight, inspect, migrate, reconcile",
    ),
    "expected_sha256": (
        '""',
        "when set, refuse a backup whose sha256 differs (the reviewed file is the migrated file)",
    ),
    "max_retries": (
        "3",
        "lost connections are retried this many times, waiting 1, 2, 4 s between attempts",
    ),
    "restore_path": (
        '""',
        "where the restored SQLite file is written: the path the app reads (SESSION_SQLITE_PATH)",
    ),
    "migrate_manifest": (
        '""',
        "run folder (or its manifest.json) of the run that migrated this backup",
    ),
    "confirm": ("False", "True allows replacing an existing file at restore_path"),
    "live_sqlite_path": (
        '""',
        "the SQLite file the old app used, to be archived (moved, never deleted)",
    ),
    "archive_dir": ('""', "folder that receives the archived file, named with the run id"),
    "reconcile_manifest": (
        '""',
        "run folder (or manifest.json) of a reconcile run whose verdict was PASS",
    ),
    "soak_hours": ("24", "hours that must have passed since that reconcile run before archiving"),
    "source": (
        '"postgres"',
        "where the queries run: postgres, sqlite (the backup) or both side by side",
    ),
    "query_names": ("[]", "named queries to run (sessionmig query --list); empty runs them all"),
    "window_start": ('""', "ISO-8601 start of the time window; empty means 7 days before as_of"),
    "window_end": ('""', "ISO-8601 end of the time window (exclusive); empty means as_of"),
    "unit": ('"day"', "time bucket: hour or day"),
    "timezone": ('""', "IANA zone for time buckets; empty means source_timezone"),
    "user_id": ('""', "a user to list the sessions of (query user_sessions); empty skips it"),
    "top_n": ("10", "rows kept by the top-N queries"),
    "free_sql": ('""', "optional read-only SQL over the table sessions"),
    "show_ids": (
        "False",
        "True shows session ids in clear; they are bearer tokens, so hashed by default",
    ),
    "run_id": (
        '""',
        "run id shared by the steps of one run as set by sessionmig run; empty means a new one",
    ),
    "operator": (
        '""',
        "who runs this step, for the audit row; empty means the USER environment variable",
    ),
    "state_dir": (
        '""',
        "private directory (0700, never a report folder) keeping each pass's snapshot: the next pass's base",
    ),
    "lock_timeout": (
        '"5s"',
        "longest wait for a row the app holds before the pass gives up, committing nothing (500ms, 5s, 1min)",
    ),
}
# A parameter whose meaning differs in one step: its help there.
CATCHUP_HELP = {
    "sqlite_path": "the migrated snapshot: the first pass's base (its sha256 must be the latest migrate run's)",
    "live_sqlite_path": "the SQLite store the old colour still writes to (read only, through SQLite's backup API)",
    "dry_run": "True: do the whole pass, prove it, report it, then roll back (nothing recorded)",
    "max_retries": "a pass that met the app's row locks (lock_timeout, deadlock) is redone from scratch this many times",
}


def params_cell(names, helps=None):
    helps = helps or {}
    width = max(len(f"{n} = {COMMON[n][0]}") for n in names)
    lines = ["# Parameters: papermill injects overrides in a cell right after this one."]
    for n in names:
        code = f"{n} = {COMMON[n][0]}"
        lines.append(f"{code.ljust(width)}  # {helps.get(n, COMMON[n][1])}")
    c = new_code_cell("\n".join(lines))
    c.metadata["tags"] = ["parameters"]
    return c


def nb(path, title, intro, names, body, helps=None):
    n = new_notebook()
    n.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    n.metadata["language_info"] = {"name": "python"}
    cells = [params_cell(names, helps), new_markdown_cell(f"# {title}\n\n{intro}")]
    for kind, src in body:
        cells.append(new_markdown_cell(src) if kind == "md" else new_code_cell(src))
    # Stable ids, so regenerating an unchanged notebook changes nothing in git.
    for index, cell in enumerate(cells):
        cell.id = f"{Path(path).stem}-{index:02d}"
    n.cells = cells
    nbf.write(n, ROOT / path)


SETUP = (
    "code",
    "from sessionmig import report, steps\n\nsettings = steps.settings_from(globals())\nreport.show(report.settings_table(settings))",
)

nb(
    "notebooks/00_preflight.ipynb",
    "00 · Preflight",
    "Is the source readable and what is its sha256? Is the target reachable, which server, does it hold every privilege and feature the steps of this run need, do the tables already hold rows? **Go** only when every check holds; what is missing is named with the exact `GRANT` to ask for.",
    [
        *TARGET,
        "on_conflict",
        "expected_sha256",
        "run_steps",
        "run_id",
    ],
    [
        SETUP,
        (
            "code",
            'with report.step("preflight"):\n    result = steps.preflight(settings, run_steps)\nreport.show(report.checks_table(result))',
        ),
        (
            "code",
            'if result.grants:  # one place to copy them from, for the DBA\n    print("Missing privileges; ask the DBA to run:\\n" + "\\n".join(result.grants))',
        ),
        ("md", "Rows already in the target tables (empty when the tables do not exist yet):"),
        ("code", "report.show(result.existing_rows)"),
        ("code", "report.conclude_preflight(result)"),
    ],
)

nb(
    "notebooks/01_inspect.ipynb",
    "01 · Inspect the SQLite backup",
    "Integrity, schema, counts at `as_of`, how each timestamp column is spelled, JSON validity, nulls, anomalies and the rows that cannot land. Errors block the migration; warnings are for the reviewer to read. Session ids are shown only as keyed hashes.",
    [
        "sqlite_path",
        "source_timezone",
        "as_of",
        "batch_rows",
        "on_invalid_metadata",
        "on_extra_columns",
        "run_id",
    ],
    [
        SETUP,
        (
            "code",
            'with report.step("inspect"):\n    result = steps.inspect(settings)\nreport.show(report.files_table(result.files))',
        ),
        ("md", "## Findings (errors block migration)"),
        ("code", "report.show(report.findings_table(result))"),
        (
            "code",
            "if result.census is not None:\n    report.show(report.census_table(result))\n    report.show(report.spellings_table(result))",
        ),
        ("md", "## Sessions over time"),
        (
            "code",
            "from sessionmig import plots\n\nif result.census is not None and result.census.created_per_day:\n    plots.plot_created_per_day(result.census)\n    plots.plot_remaining_ttl(result.census)",
        ),
        ("code", "report.conclude_inspect(result)"),
    ],
)

nb(
    "notebooks/02_migrate.ipynb",
    "02 · Migrate",
    "Creates the schema with Alembic, then streams every row through the type rules into PostgreSQL with COPY, in **one transaction**: sessions, rejects and the audit row commit together or not at all. Rows that cannot land are kept in `session_migration_rejects` with their raw values and a reason.",
    [
        *TARGET,
        "batch_rows",
        "on_conflict",
        "on_invalid_metadata",
        "on_extra_columns",
        "dry_run",
        "expected_sha256",
        "max_retries",
        "run_id",
        "operator",
    ],
    [
        SETUP,
        ("md", "## Type rules in force"),
        ("code", "report.show(report.type_rules_table())"),
        ("code", 'with report.step("migrate"):\n    result = steps.migrate(settings)'),
        ("md", "## Summary"),
        (
            "code",
            "report.show(report.outcome_table(result))\nreport.show(report.rejects_table(result))\nreport.show(report.files_table(result.hashes_before, result.hashes_after, result.source_check))",
        ),
        ("code", "report.conclude_migrate(result)"),
    ],
)

nb(
    "notebooks/03_reconcile.ipynb",
    "03 · Reconcile",
    "Compares the **raw backup** with PostgreSQL, every row and every column, and proves the partition: source rows = migrated + rejected, disjoint. Differences are named with hashed ids. A `FAIL` stops the run with a non-zero exit. In a dry run nothing was written, so there is nothing to compare: the step says `SKIPPED` and the run keeps migrate's verdict.",
    [
        *TARGET,
        "batch_rows",
        "on_invalid_metadata",
        "on_extra_columns",
        "dry_run",
        "run_id",
    ],
    [
        SETUP,
        (
            "code",
            'with report.step("reconcile"):\n    result = steps.reconcile_step(settings)\ncompared = result.verdict != steps.SKIPPED\ntables = report.reconcile_tables(result)',
        ),
        ("md", "## Partition proof"),
        (
            "code",
            'if compared:\n    report.show(tables["partition"])\n    report.show(tables["counts"])',
        ),
        ("md", "## Differences (first 200, ids hashed)"),
        ("code", 'if compared:\n    report.show(tables["differences"])'),
        (
            "md",
            "## Application-level parity\n\nThe new `SessionManager` is asked, read only, which sessions it accepts at `as_of`; the legacy rule and the distributions are compared on both sides.",
        ),
        (
            "code",
            'app = steps.app_check(settings) if compared else None\nif app is not None:\n    report.show(report.app_check_table(app))\n    report.show(tables["parity"])',
        ),
        ("code", "report.conclude_reconcile(result, app)"),
    ],
)

nb(
    "notebooks/05_rollback.ipynb",
    "05 · Roll back to SQLite",
    "Restores the backup the migrate run recorded (its sha256 must match), carries back the sessions PostgreSQL created, changed or ended since, in the legacy format, so nobody who logged in after cutover is logged out. Then reconciles the restored file against PostgreSQL with the same engine as step 03. Switch the app with `SESSION_DB_TYPE=sqlite` only after a PASS here.",
    [
        *TARGET,
        "batch_rows",
        "restore_path",
        "migrate_manifest",
        "confirm",
        "run_id",
        "operator",
    ],
    [
        SETUP,
        (
            "code",
            'with report.step("rollback"):\n    restored, result = steps.rollback_step(\n        settings, restore_path=restore_path, migrate_manifest=migrate_manifest, confirm=confirm\n    )\nreport.show(report.rollback_table(restored))',
        ),
        ("md", "## The restored file against PostgreSQL"),
        (
            "code",
            'tables = report.reconcile_tables(result)\nreport.show(tables["partition"])\nreport.show(tables["differences"])',
        ),
        ("code", "report.conclude_rollback(restored, result)"),
    ],
)

nb(
    "notebooks/06_finalize.ipynb",
    "06 · Finalize: archive the live SQLite file",
    "Only after a reconcile **PASS** (read from its sealed manifest, verified first) and the soak period: the live SQLite file is moved to the archive folder with its sha256 recorded — never deleted — and the step is recorded in `session_migration_runs`.",
    list(FINALIZE_PARAMETERS),
    [
        ("code", "from sessionmig import report, steps"),
        (
            "code",
            'with report.step("finalize"):\n    result = steps.finalize_step(**steps.finalize_parameters(globals()))\nreport.show(report.finalize_table(result))',
        ),
        ("code", 'report.conclude("finalize", "PASS", f"archived to {result.archived_to}")'),
    ],
)

nb(
    "notebooks/04_session_analysis.ipynb",
    "04 · Session analysis",
    "Named, documented queries over the sessions — on PostgreSQL, on the SQLite backup (normalised by the migration's own rules into a private read-only copy), or on both side by side. Read-only, with a statement timeout; session ids are hashed unless `show_ids` is set. `sessionmig query --list` lists the queries. The verdict says what was found: **ERROR** when a query failed (each named), **PASS_WITH_WARNINGS** when the two sources answer differently (each query named with its numbers — expected after cutover, a finding before it) or a source holds no session, **PASS** otherwise.",
    [
        *TARGET,
        "source",
        "query_names",
        "window_start",
        "window_end",
        "unit",
        "timezone",
        "user_id",
        "top_n",
        "free_sql",
        "show_ids",
    ],
    [
        SETUP,
        (
            "code",
            'from sessionmig import plots\n\nsources = ("sqlite", "postgres") if source == "both" else (source,)\ncommon = {"start": window_start, "end": window_end, "unit": unit, "timezone": timezone, "user_id": user_id, "top_n": top_n}',
        ),
        (
            "code",
            'with report.step("analysis"):\n    result = steps.analysis(settings, sources, query_names, common, free_sql, show_ids=show_ids)',
        ),
        (
            "code",
            "for name, frame in result.results.items():\n    report.show(report.query_header(name))\n    report.show(frame.head(200))\n    plots.plot_query(name, frame)",
        ),
        ("md", "## Free SQL (read-only; table `sessions`)"),
        (
            "code",
            "for frame in result.free.values():\n    report.show(frame.head(200))",
        ),
        ("md", "## What the queries found"),
        (
            "code",
            "for line in [*result.differences, *result.warnings, *result.errors.values()]:\n    print(line)",
        ),
        (
            "code",
            'report.conclude("analysis", result.verdict, result.reason, exit_code=result.exit_code)',
        ),
    ],
)

nb(
    "notebooks/07_catchup.ipynb",
    "07 · Catch-up: carry the old colour's changes into PostgreSQL",
    "While both colours serve, each pass takes a consistent snapshot of the live SQLite store (SQLite's online backup API; the app's writers never fail) and merges it three ways: **base** = the snapshot the last pass carried (the migrated one, first), **live** = the new snapshot, **target** = PostgreSQL now. Sessions created on the old colour are inserted, its changes go *on top of* PostgreSQL's rows (`request_count` gains live − base, instants take the later value), sessions it ended are ended; what only PostgreSQL changed is never touched. One transaction per pass, proven inside itself before it commits, recorded in `session_migration_runs` with both sha256s: **exactly once** — run the same command again for the next pass. Session ids are shown only as keyed hashes.",
    [
        *TARGET,
        "live_sqlite_path",
        "state_dir",
        "lock_timeout",
        "batch_rows",
        "on_invalid_metadata",
        "on_extra_columns",
        "dry_run",
        "max_retries",
        "run_id",
        "operator",
    ],
    [
        SETUP,
        (
            "code",
            'from sessionmig import catchup\n\nwith report.step("catchup"):\n    result = catchup.catchup_step(\n        settings, live_sqlite_path, state_dir, lock_timeout=lock_timeout\n    )\ntables = catchup.catchup_tables(result)',
        ),
        ("md", "## What this pass carried"),
        ("code", 'report.show(tables["counts"])'),
        (
            "md",
            "## The chain of snapshots\n\nThe base must be the snapshot the previous pass recorded (else the pass is refused: nothing is applied twice); the live snapshot, kept in `state_dir`, is the next pass's base.",
        ),
        ("code", 'report.show(tables["snapshots"])'),
        ("md", "## Conflicts: changed on both colours (ids hashed; the newer `last_activity` won)"),
        ("code", 'report.show(tables["conflicts"])'),
        ("md", "## Examples (ids hashed)"),
        ("code", 'report.show(tables["examples"])'),
        (
            "md",
            "## Proof and time\n\nChecked inside the pass's own transaction, before its commit: every touched session equals the merge rules' outcome from PostgreSQL's row as it was, each statement touched exactly its sessions, and no other row carries the pass's writes. A mismatch rolls the whole pass back (**FAIL**).",
        ),
        ("code", 'report.show(tables["proof"])\nreport.show(tables["timing"])'),
        (
            "code",
            'report.conclude(\n    "catchup",\n    result.verdict,\n    result.reason,\n    pass_number=result.pass_number,\n    base_sha256=result.base_sha256,\n    live_sha256=result.live_sha256,\n    counts=result.counts,\n)',
        ),
    ],
    helps=CATCHUP_HELP,
)
