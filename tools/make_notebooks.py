"""Regenerate notebooks/*.ipynb (no outputs): run it after changing a notebook's cells here."""

from pathlib import Path

import nbformat as nbf
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from sessionmig.runbook import params as P

ROOT = Path(__file__).resolve().parent.parent


def params_cell(step):
    """The step's parameters, each with its default and help, from sessionmig.runbook.params."""
    declared = P.of_steps([step])
    width = max(len(f"{p.name} = {p.literal}") for p in declared)
    lines = ["# Parameters: papermill injects overrides in a cell right after this one."]
    for p in declared:
        lines.append(f"{f'{p.name} = {p.literal}'.ljust(width)}  # {p.help_for(step)}")
    c = new_code_cell("\n".join(lines))
    c.metadata["tags"] = ["parameters"]
    return c


def nb(path, title, intro, step, body):
    n = new_notebook()
    n.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    n.metadata["language_info"] = {"name": "python"}
    cells = [params_cell(step), new_markdown_cell(f"# {title}\n\n{intro}")]
    for kind, src in body:
        cells.append(new_markdown_cell(src) if kind == "md" else new_code_cell(src))
    # Stable ids, so regenerating an unchanged notebook changes nothing in git.
    for index, cell in enumerate(cells):
        cell.id = f"{Path(path).stem}-{index:02d}"
    n.cells = cells
    nbf.write(n, ROOT / path)


SETUP = (
    "code",
    "from sessionmig.reports import report\nfrom sessionmig.runbook import steps\n\nsettings = steps.settings_from(globals())\nreport.show_settings(settings)",
)

nb(
    "notebooks/00_preflight.ipynb",
    "00 · Preflight",
    "Is the source readable and what is its sha256? Is the target reachable, which server, does it hold every privilege and feature the steps of this run need, do the tables already hold rows? **Go** only when every check holds; what is missing is named with the exact `GRANT` to ask for.\n\n**The gate:** GO when every check below holds. NO-GO stops the run before anything is read into or written to the target.",
    "preflight",
    [
        SETUP,
        (
            "code",
            'with report.step("preflight"):\n    result = steps.preflight(settings, run_steps)',
        ),
        (
            "md",
            "## Checks\n\nOne row per check: **✔ holds** or **✘ fails**, with what was found. Every check must hold for GO.",
        ),
        ("code", "report.show(report.checks_table(result))"),
        (
            "code",
            'if result.grants:  # one place to copy them from, for the DBA\n    print("Missing privileges; ask the DBA to run:\\n" + "\\n".join(result.grants))',
        ),
        (
            "md",
            "## Rows already in the target\n\nA table that already holds rows is merged into per `on_conflict`; none means the tables are created by migrate.",
        ),
        (
            "code",
            'report.show(report.existing_rows_table(result), empty="The target tables do not exist yet: migrate creates them.")',
        ),
        ("code", "report.conclude_preflight(result)"),
    ],
)

nb(
    "notebooks/01_inspect.ipynb",
    "01 · Inspect the SQLite backup",
    "Integrity, schema, counts at `as_of`, how each timestamp column is spelled, JSON validity, nulls, anomalies and the rows that cannot land. Errors block the migration; warnings are for the reviewer to read. Session ids are shown only as keyed hashes.\n\n**The gate:** PASS when nothing stands in the way; PASS_WITH_WARNINGS when something needs a reviewer's eye (each warning named); ERROR — the run stops — when the file is damaged or a row would be lost.",
    "inspect",
    [
        SETUP,
        (
            "code",
            'with report.step("inspect"):\n    result = steps.inspect(settings)',
        ),
        (
            "md",
            "## The file\n\nIts size and sha256: the sha256 is what migrate must be given as `expected_sha256`, so the reviewed file is the migrated file.",
        ),
        ("code", "report.show(report.files_table(result.files))"),
        (
            "md",
            "## Findings\n\nOne row per kind of finding, with how many rows it concerns and up to three examples (ids hashed). **error** blocks the migration; **warning** is for the reviewer to read and accept.",
        ),
        ("code", 'report.show(report.findings_table(result), empty="No findings.")'),
        (
            "md",
            "## Counts at `as_of`\n\nActive means `expires_at` after `as_of`. NULL and empty counts are per column; the rows that cannot land are what migrate will keep as rejects.",
        ),
        ("code", "if result.census is not None:\n    report.show(report.census_table(result))"),
        (
            "md",
            "## How the timestamps are written\n\nEach distinct shape of text, every digit shown as 9, with how many rows use it. Shapes the type rules do not accept are counted in the findings above.",
        ),
        ("code", "if result.census is not None:\n    report.show(report.spellings_table(result))"),
        ("md", "## Sessions over time"),
        (
            "code",
            "from sessionmig.reports import plots\n\nreport.show_inspect_charts(result, plots)",
        ),
        ("code", "report.conclude_inspect(result)"),
    ],
)

nb(
    "notebooks/02_migrate.ipynb",
    "02 · Migrate",
    "Creates the schema with Alembic, then streams every row through the type rules into PostgreSQL with COPY, in **one transaction**: sessions, rejects and the audit row commit together or not at all. Rows that cannot land are kept in `session_migration_rejects` with their raw values and a reason.\n\n**The gate:** PASS when every row read landed; PASS_WITH_WARNINGS when rows were rejected (each kept, with its reason, for the reviewer to confirm); the backup's sha256 must be the same before and after. Anything else rolls the whole transaction back.",
    "migrate",
    [
        SETUP,
        ("code", 'with report.step("migrate"):\n    result = steps.migrate(settings)'),
        (
            "md",
            "## What was loaded\n\nRows read = inserted + unchanged + updated + rejected (+ conflicting, when `on_conflict` lets them stand).",
        ),
        ("code", "report.show(report.outcome_table(result))"),
        (
            "md",
            "## Rejected rows, by reason\n\nEach reason with what it means and up to three examples (ids hashed). The rows themselves are in `session_migration_rejects`, raw values included.",
        ),
        ("code", 'report.show(report.rejects_table(result), empty="No row was rejected.")'),
        (
            "md",
            "## The backup, before and after\n\nThe sha256 must be the same before and after the load: the file migrated is the file inspected.",
        ),
        (
            "code",
            "report.show(report.files_table(result.hashes_before, result.hashes_after, result.source_check))",
        ),
        (
            "md",
            "## Type rules in force\n\nHow each column of the legacy schema is turned into its PostgreSQL type.",
        ),
        ("code", "report.show(report.type_rules_table())"),
        ("code", "report.conclude_migrate(result)"),
    ],
)

nb(
    "notebooks/03_reconcile.ipynb",
    "03 · Reconcile",
    "Compares the **raw backup** with PostgreSQL, every row and every column, and proves the partition: source rows = migrated + rejected, disjoint. Differences are named with hashed ids. A `FAIL` stops the run with a non-zero exit. In a dry run nothing was written, so there is nothing to compare: the step says `SKIPPED` and the run keeps migrate's verdict.\n\n**The gate:** PASS when source rows = migrated + rejected holds, every compared row is identical in every column and the new `SessionManager` accepts exactly the sessions the source says are active. Any difference of any kind is a FAIL: do not cut over. With `reconcile_mode=after_cutover` (re-checking once the app serves from PostgreSQL) the changes the application explains — later `last_activity`/`expires_at`, higher `request_count`, sessions ended or created since — are counted and shown, and only a change nothing explains fails.",
    "reconcile",
    [
        SETUP,
        (
            "code",
            'from sessionmig.reports import plots\n\nwith report.step("reconcile"):\n    result = steps.reconcile_step(settings)\ncompared = result.verdict != steps.SKIPPED\ntables = report.reconcile_tables(result)',
        ),
        (
            "md",
            "## Differences\n\nFirst per kind (and, for changed rows, per column), then the rows themselves (ids hashed). An empty list is said in words.",
        ),
        ("code", "if compared:\n    report.show_differences(result)"),
        (
            "md",
            "## Sessions per day\n\nThe source's landable rows (bars) against PostgreSQL's (line), by the day each session was created; a day that differs is marked.",
        ),
        ("code", "if compared:\n    report.show_reconcile_days(result, plots)"),
        (
            "md",
            "## Partition proof\n\nEvery source row is either migrated or rejected, never both and never neither. Each count kind is explained; every kind except *matched* fails the reconcile.",
        ),
        (
            "code",
            'if compared:\n    report.show(tables["partition"])\n    report.show(tables["counts"])',
        ),
        (
            "md",
            "## Application-level parity\n\nThe new `SessionManager` is asked, read only, which sessions it accepts at `as_of`; the legacy rule and the distributions are compared on both sides. The first table must show no session refused or accepted wrongly.",
        ),
        (
            "code",
            'app = result.app if compared else None\nif app is not None:\n    report.show(report.app_check_table(app))\n    report.show(tables["parity"])',
        ),
        ("code", "report.conclude_reconcile(result, app)"),
    ],
)

nb(
    "notebooks/05_rollback.ipynb",
    "05 · Roll back to SQLite",
    "Restores the backup the migrate run recorded (its sha256 must match), carries back the sessions PostgreSQL created, changed or ended since, in the legacy format, so nobody who logged in after cutover is logged out. Then reconciles the restored file against PostgreSQL with the same engine as step 03. Switch the app with `SESSION_DB_TYPE=sqlite` only after a PASS here.",
    "rollback",
    [
        SETUP,
        (
            "code",
            'with report.step("rollback"):\n    restored, result = steps.rollback_step(\n        settings,\n        restore_path=restore_path,\n        migrate_manifest=migrate_manifest,\n        confirm=confirm,\n        live_sqlite_path=live_sqlite_path,\n        state_dir=state_dir,\n    )\nreport.show(report.rollback_table(restored))',
        ),
        ("md", "## The restored file against PostgreSQL"),
        (
            "code",
            "report.show_rollback_check(result)",
        ),
        ("code", "report.conclude_rollback(restored, result, migrate_manifest)"),
    ],
)

nb(
    "notebooks/06_finalize.ipynb",
    "06 · Finalize: archive the live SQLite file",
    "Only after a reconcile **PASS** (read from its sealed manifest, verified first) and the soak period: the live SQLite file is moved to the archive folder with its sha256 recorded — never deleted — and the step is recorded in `session_migration_runs`.",
    "finalize",
    [
        ("code", "from sessionmig.reports import report\nfrom sessionmig.runbook import steps"),
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
    "Named, documented queries over the sessions — on PostgreSQL, on the SQLite backup (normalised by the migration's own rules into a private read-only copy), or on both side by side. Read-only, with a statement timeout; session ids are hashed unless `show_ids` is set. `sessionmig query --list` lists the queries. The verdict says what was found: **ERROR** when a query failed (each named), **PASS_WITH_WARNINGS** when the two sources answer differently (each query named with its numbers — expected after cutover, a finding before it) or a source holds no session, **PASS** otherwise.\n\n**How to read it:** the zone, bucket unit and window every bucketed answer uses are stated first, in the verdict's figures and the line under them. Each query then has a heading saying what it answers and its chart (when a picture says more), before its rows: with `source=both` one chart holds both sources — SQLite (the backup) as filled bars, PostgreSQL (the target) as outlined bars over them, every bucket where they differ marked, the title saying whether they agree — and the rows stand side by side (SQLite on the left), folded when longer than a dozen lines. Bucket labels carry their UTC offset, in the tables as in the CSV and JSON exports. An empty answer is said in words, with the window it used.",
    "analysis",
    [
        SETUP,
        (
            "code",
            'from sessionmig.engines import queries\nfrom sessionmig.reports import plots\n\nsources = ("sqlite", "postgres") if source == "both" else (source,)\ncommon = {"start": window_start, "end": window_end, "unit": unit, "timezone": timezone, "user_id": user_id, "top_n": top_n}',
        ),
        (
            "code",
            'with report.step("analysis"):\n    result = steps.analysis(settings, sources, query_names, common, free_sql, show_ids=show_ids)',
        ),
        (
            "code",
            'about = queries.analysis_window(common, settings.as_of, settings.source_timezone)\nreport.say(about["words"])',
        ),
        (
            "code",
            "window = report.window_words(settings, common)\nfor name, frame in result.results.items():\n    report.show_query(name, frame, window, chart=plots.plot_query)",
        ),
        ("md", "## Free SQL (read-only; table `sessions`)"),
        (
            "code",
            'if not free_sql:\n    report.say("No free SQL was given (parameter free_sql).")\nfor frame in result.free.values():\n    report.show(frame, empty="The free SQL returned no rows.")',
        ),
        ("md", "## What the queries found"),
        (
            "code",
            'found = [*result.differences, *result.warnings, *result.errors.values()]\nfor line in found:\n    report.say(line)\nif not found:\n    report.say("Nothing to note: every query answered, the same on each source.")',
        ),
        (
            "code",
            'report.conclude(\n    "analysis",\n    result.verdict,\n    result.reason,\n    exit_code=result.exit_code,\n    figures=[\n        *report.analysis_figures(result),\n        report.Figure("buckets", f\'{about["unit"]} in {about["timezone"]}\', f\'window {about["window"]}\'),\n    ],\n)',
        ),
    ],
)

nb(
    "notebooks/07_catchup.ipynb",
    "07 · Catch-up: carry the old colour's changes into PostgreSQL",
    "While both colours serve, each pass takes a consistent snapshot of the live SQLite store (SQLite's online backup API; the app's writers never fail) and merges it three ways: **base** = the snapshot the last pass carried (the migrated one, first), **live** = the new snapshot, **target** = PostgreSQL now. Sessions created on the old colour are inserted, its changes go *on top of* PostgreSQL's rows (`request_count` gains live − base, instants take the later value), sessions it ended are ended; what only PostgreSQL changed is never touched. One transaction per pass, proven inside itself before it commits, recorded in `session_migration_runs` with both sha256s: **exactly once** — run the same command again for the next pass. Session ids are shown only as keyed hashes.",
    "catchup",
    [
        SETUP,
        (
            "code",
            'from sessionmig.engines import catchup\n\nwith report.step("catchup"):\n    result = steps.catchup_step(\n        settings, live_sqlite_path, state_dir, lock_timeout=lock_timeout\n    )\ntables = catchup.catchup_tables(result)',
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
)
