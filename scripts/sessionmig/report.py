"""Render step results inside a notebook, and hand each step's verdict to the orchestrator.

Functions here turn the frozen results of :mod:`sessionmig.steps` into pandas tables and HTML
banners; session ids are only ever shown masked. :func:`conclude` writes the step's verdict to
the file named by ``SESSIONMIG_RESULT_FILE`` (set by ``sessionmig run``) and raises on FAIL so
papermill — and the run — stop with a non-zero exit.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import EXIT_ERROR, EXIT_FAIL, SessionmigError, VerdictFailed
from .mask import mask_id
from .params import redact
from .transform import REASONS

RESULT_VARIABLE = "SESSIONMIG_RESULT_FILE"
COLOURS = {
    "PASS": "#1a7f37",
    "PASS_WITH_WARNINGS": "#9a6700",
    "FAIL": "#cf222e",
    "ERROR": "#cf222e",
    "GO": "#1a7f37",
    "NO-GO": "#cf222e",
}


def _display(obj: Any) -> None:
    try:
        from IPython.display import display

        display(obj)
    except ImportError:  # outside IPython, print something readable
        print(obj)


def _html(markup: str) -> Any:
    try:
        from IPython.display import HTML

        return HTML(markup)
    except ImportError:
        return markup


def show(obj: Any) -> None:
    """Display a table or figure in the report (pandas tables without truncation)."""
    if isinstance(obj, pd.DataFrame):
        # Left-aligned text reads better in a report than pandas' right-aligned default.
        left = [("text-align", "left"), ("vertical-align", "top")]
        styled = obj.style.set_table_styles([{"selector": "th, td", "props": left}])
        _display(styled)
    else:
        _display(obj)


def banner(verdict: str, reason: str) -> None:
    """A coloured verdict line a reviewer sees first."""
    colour = COLOURS.get(verdict, "#57606a")
    show(
        _html(
            f'<div style="border-left:6px solid {colour};padding:8px 12px;margin:8px 0;'
            f'font-size:1.1em"><b style="color:{colour}">{html.escape(verdict)}</b> — '
            f"{html.escape(reason)}</div>"
        )
    )


def record(step: str, verdict: str, reason: str, exit_code: int, **summary: Any) -> None:
    """Write this step's verdict where ``sessionmig run`` will read it (if it is running us)."""
    target = os.environ.get(RESULT_VARIABLE)
    if target:
        payload = {
            "step": step,
            "verdict": verdict,
            "reason": redact(reason),
            "exit_code": exit_code,
            "summary": summary,
        }
        Path(target).write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")


def conclude(
    step: str, verdict: str, reason: str, *, exit_code: int = EXIT_FAIL, **summary: Any
) -> None:
    """Show and record the step's verdict; FAIL/NO-GO raise so the run stops non-zero.

    ``exit_code`` says what a failure means: 1 the data is wrong, 2 the run cannot go on.
    """
    banner(verdict, reason)
    failed = verdict in ("FAIL", "NO-GO", "ERROR")
    record(step, verdict, reason, exit_code if failed else 0, **summary)
    if failed:
        error = VerdictFailed if exit_code == EXIT_FAIL else SessionmigError
        raise error(f"{step}: {verdict}: {reason}")


def conclude_preflight(result: Any) -> None:
    """GO when every check holds; NO-GO stops the run (exit 2: it cannot be carried out)."""
    failed = [f"{c.name}: {redact(c.detail)}" for c in result.checks if not c.ok]
    conclude(
        "preflight",
        "NO-GO" if failed else "GO",
        "; ".join(failed) or "every check holds",
        exit_code=EXIT_ERROR,
        source_sha256=result.source_sha256,
        server_version=result.server_version,
    )


def conclude_inspect(result: Any) -> None:
    """Errors stop the run (exit 2); warnings pass for the reviewer to read."""
    errors = [f.message for f in result.findings if f.severity == "error"]
    warnings = [f for f in result.findings if f.severity == "warning"]
    if errors:
        verdict, reason = "ERROR", "; ".join(errors)
    elif warnings:
        verdict, reason = "PASS_WITH_WARNINGS", f"{len(warnings)} warnings to review"
    else:
        verdict, reason = "PASS", "no findings"
    conclude(
        "inspect",
        verdict,
        reason,
        exit_code=EXIT_ERROR,
        rows=result.census.rows if result.census else None,
        sha256=result.files[0].sha256 if result.files else None,
    )


@contextmanager
def step(name: str) -> Iterator[None]:
    """Turn an error inside the step into a clear message in the report, then stop the run."""
    try:
        yield
    except SessionmigError as exc:
        if not isinstance(exc, VerdictFailed):
            message = redact(str(exc))
            banner("ERROR", f"{name} could not be carried out: {message}")
            record(name, "ERROR", message, exc.exit_code)
        raise
    except Exception as exc:
        message = redact(f"{type(exc).__name__}: {exc}")
        banner("ERROR", f"{name} stopped on an unexpected error: {message}")
        record(name, "ERROR", message, EXIT_ERROR)
        raise


def settings_table(settings: Any) -> pd.DataFrame:
    """The step's parameters in force, for the report header (Settings holds no secrets)."""
    shown = set(settings.declared) or set(settings.public())
    rows = [(k, str(v)) for k, v in settings.public().items() if k in shown]
    return pd.DataFrame(rows, columns=["parameter", "value"]).set_index("parameter")


def checks_table(result: Any) -> pd.DataFrame:
    return pd.DataFrame(
        [("✔" if c.ok else "✘", c.name, redact(c.detail)) for c in result.checks],
        columns=["ok", "check", "detail"],
    )


def findings_table(result: Any) -> pd.DataFrame:
    rows = [
        (f.severity, f.code, f.count, f.message, "; ".join(f.examples)) for f in result.findings
    ]
    return pd.DataFrame(rows, columns=["severity", "finding", "rows", "message", "examples"])


def census_table(result: Any) -> pd.DataFrame:
    """Counts and the null/empty profile of each column."""
    c = result.census
    rows = [
        ("rows", c.rows),
        ("active at as_of", c.active),
        ("expired at as_of", c.expired),
        ("rows that cannot land", sum(c.rejects.values())),
    ]
    rows += [(f"NULL {col}", n) for col, n in sorted(c.nulls.items())]
    rows += [(f"empty text {col}", n) for col, n in sorted(c.empties.items())]
    rows += [(f"metadata stored as {k}", n) for k, n in sorted(c.metadata.items())]
    return pd.DataFrame(rows, columns=["measure", "value"]).set_index("measure")


def spellings_table(result: Any) -> pd.DataFrame:
    rows = [
        (col, sp, n)
        for col, counter in result.census.spellings.items()
        for sp, n in counter.most_common(10)
    ]
    return pd.DataFrame(rows, columns=["column", "spelling (digits as 9)", "rows"])


def files_table(files: Any, after: Any = (), check: str = "") -> pd.DataFrame:
    """Each source file's size and sha256 before and after; ``check`` names what proved the
    file sound (shown on the backup's row)."""
    rows = []
    for i, f in enumerate(files):
        later = after[i].sha256 if i < len(after) else ""
        rows.append(
            (
                Path(f.path).name,
                f.size,
                f.sha256,
                later,
                "unchanged" if later == f.sha256 else ("—" if not later else "CHANGED"),
            )
        )
    table = pd.DataFrame(rows, columns=["file", "bytes", "sha256 before", "sha256 after", "state"])
    if check:
        table["soundness"] = [check] + [""] * (len(table) - 1)
    return table


def outcome_table(result: Any) -> pd.DataFrame:
    """pgloader's closing table: read / imported / unchanged / conflicting / rejected / time."""
    o = result.outcome
    return pd.DataFrame(
        [
            (
                "sessions",
                o.rows_read,
                o.inserted,
                o.unchanged,
                o.conflicting,
                o.updated,
                o.rejected,
                round(o.seconds, 2),
                round(o.rows_per_second),
            )
        ],
        columns=[
            "table",
            "read",
            "inserted",
            "unchanged",
            "conflicting",
            "updated",
            "rejected",
            "seconds",
            "rows/s",
        ],
    ).set_index("table")


def rejects_table(result: Any) -> pd.DataFrame:
    """Per reason code: how many rows, what it means, up to 3 examples (ids masked)."""
    o = result.outcome
    rows = [
        (
            reason,
            count,
            REASONS.get(reason, ""),
            "; ".join(
                f"rowid {r.rowid} {mask_id(r.session_id)}: {r.message}"
                for r in o.reject_examples.get(reason, [])
            ),
        )
        for reason, count in sorted(o.reject_counts.items())
    ]
    return pd.DataFrame(rows, columns=["reason", "rows", "meaning", "examples"])


def type_rules_table() -> pd.DataFrame:
    """The type rules in force (the same text as the RUNBOOK's)."""
    rules = [
        (
            "created_at, expires_at, last_activity",
            "text 'YYYY-MM-DD[ T]HH:MM[:SS[.ffffff]]' with optional Z or ±HH:MM; "
            "naive = wall clock in source_timezone; DST overlap = first occurrence, "
            "DST gap = offset before the gap; "
            "numbers, other spellings and impossible dates are rejected",
        ),
        (
            "metadata",
            "NULL stays NULL; JSON text → jsonb (any JSON value); invalid JSON, NaN/"
            "Infinity, \\u0000 or lone surrogates are rejected (or kept as a JSON string when "
            "on_invalid_metadata=keep_as_json_string)",
        ),
        (
            "session_id, user_id",
            "UTF-8 text without NUL, stored as text (never truncated); BLOBs, "
            "bad bytes (kept as hex in the reject) and NULL session_id are rejected",
        ),
        (
            "request_count",
            "integral value in any storage class within integer; NULL becomes 0; "
            "fractions, words and out-of-range values are rejected, never rounded or wrapped",
        ),
    ]
    return pd.DataFrame(rules, columns=["column", "rule"])


def reconcile_tables(result: Any) -> dict[str, pd.DataFrame]:
    """Partition proof, difference counts, named differences and parity signals."""
    partition = pd.DataFrame(
        [
            ("source rows", result.source_rows),
            ("migrated (matched or changed)", result.migrated),
            ("rejected (in session_migration_rejects)", result.rejected),
            ("migrated + rejected", result.migrated + result.rejected),
            ("partition holds", result.partition_holds),
            ("rows in PostgreSQL", result.target_rows),
            (
                "rows compared in PostgreSQL (full join on session_id, every column)",
                result.source_rows - result.rejected + result.counts["extra"],
            ),
        ],
        columns=["measure", "value"],
    ).set_index("measure")
    counts = pd.DataFrame(sorted(result.counts.items()), columns=["kind", "rows"])
    diffs = pd.DataFrame(
        [(d.kind, d.session, d.rowid, d.detail) for d in result.differences],
        columns=["kind", "session", "source rowid", "detail"],
    )
    parity = pd.DataFrame(sorted(result.parity.items()), columns=["signal", "value"])
    return {"partition": partition, "counts": counts, "differences": diffs, "parity": parity}


def conclude_migrate(result: Any) -> None:
    """PASS, or PASS_WITH_WARNINGS when rows were rejected (all kept with their reasons)."""
    o = result.outcome
    reason = (
        f"{o.inserted} inserted, {o.unchanged} unchanged, {o.updated} updated, "
        f"{o.rejected} rejected"
    )
    if o.dry_run:
        reason += " (dry run: rolled back, nothing written)"
    counts = {k: v for k, v in vars(o).items() if isinstance(v, int | float)}
    conclude("migrate", result.verdict, reason, **counts)


def app_check_table(app: Any) -> pd.DataFrame:
    """What the new SessionManager accepts at as_of, against the source."""
    rows = [
        ("sessions checked", app.checked),
        ("active at as_of per the source", app.expected_active),
        ("accepted by SessionManager", app.accepted_active),
        ("active in the source, refused by the app", app.wrongly_rejected),
        ("expired in the source, accepted by the app", app.wrongly_accepted),
    ]
    rows += [("example", e) for e in app.examples]
    return pd.DataFrame(rows, columns=["measure", "value"]).set_index("measure")


def conclude_reconcile(result: Any, app: Any = None) -> None:
    """Show and record the reconcile verdict (the app check's view included)."""
    from .appcheck import combined_verdict

    verdict, reason = combined_verdict(result.verdict, result.reason, app)
    conclude(
        "reconcile",
        verdict,
        reason,
        source_rows=result.source_rows,
        migrated=result.migrated,
        rejected=result.rejected,
    )


def rollback_table(restored: Any) -> pd.DataFrame:
    rows = [
        ("restored file", restored.restore_path),
        ("backup sha256 (as migrated)", restored.backup_sha256),
        ("restored file sha256", restored.restored_sha256),
        ("sessions created in PostgreSQL, carried back", restored.carried_new),
        ("sessions changed in PostgreSQL, carried back", restored.carried_changed),
        ("sessions ended in PostgreSQL, removed", restored.carried_ended),
        ("rows kept as they were (incl. rejects)", restored.kept),
    ]
    return pd.DataFrame(rows, columns=["measure", "value"]).set_index("measure")


def conclude_rollback(restored: Any, result: Any) -> None:
    """The restored file must reconcile with PostgreSQL before the app is switched back."""
    conclude(
        "rollback",
        result.verdict,
        f"{restored.restore_path} restored ({restored.carried_new} new, "
        f"{restored.carried_changed} changed, {restored.carried_ended} ended carried back); "
        f"reconcile: {result.reason}",
    )


def finalize_table(result: Any) -> pd.DataFrame:
    return pd.DataFrame(list(result.files), columns=["archived file", "sha256"])


def query_header(name: str) -> Any:
    """A query's name and what it answers, as a heading in the report."""
    from .queries import get

    return _html(f"<h3>{html.escape(name)}</h3><p>{html.escape(get(name).description)}</p>")
