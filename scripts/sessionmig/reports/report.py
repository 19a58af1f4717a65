"""Render step results inside a notebook, and hand each step's verdict to the orchestrator.

Functions here turn the frozen results of :mod:`sessionmig.runbook.steps` into tables a reviewer
reads without help (human column names, units, thousands separators, no raw Python values) and into
the *answer* of each report: the verdict, its reason, what to do, and the three to six figures that
decide the gate (:class:`sessionmig.reports.render.Answer`). The answer is displayed with output
metadata that :mod:`sessionmig.reports.render` lifts to the top of the HTML report. Session ids are
only ever shown masked. :func:`conclude` writes the step's verdict to the file named by
``SESSIONMIG_RESULT_FILE`` (set by ``sessionmig run``) and raises on FAIL so papermill — and the
run — stop with a non-zero exit.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from sessionmig.errors import EXIT_ERROR, EXIT_FAIL, SessionmigError, VerdictFailed
from sessionmig.reports.render import ANSWER, ANSWER_KEY, REFUSAL_TODO, Answer, Figure, answer_html
from sessionmig.rules.mask import mask_id, redact
from sessionmig.rules.transform import COLUMNS, REASONS
from sessionmig.rules.verdict import FAILED, Verdict, partition, plural

RESULT_VARIABLE = "SESSIONMIG_RESULT_FILE"
COLOURS = {
    Verdict.PASS: "#1a7f37",
    Verdict.PASS_WITH_WARNINGS: "#9a6700",
    Verdict.FAIL: "#cf222e",
    Verdict.ERROR: "#cf222e",
    Verdict.GO: "#1a7f37",
    Verdict.NO_GO: "#cf222e",
}
MAX_ROWS = 200
LONG_TOKEN = 24  # a word longer than this (a sha256, raw bytes) may break anywhere in a cell

# What to do after each verdict that is not a plain pass: the line under the banner.
TODO: dict[tuple[str, str], str] = {
    ("preflight", Verdict.NO_GO): (
        "Nothing was read into or written to the target. Fix each check marked ✘ below "
        "(missing privileges come with the exact GRANT to ask the DBA for), then run again."
    ),
    ("inspect", Verdict.ERROR): (
        "Do not migrate this file. The findings below name what is wrong and where; "
        "obtain a sound backup (or fix the cause), then run inspect again."
    ),
    ("inspect", Verdict.PASS_WITH_WARNINGS): (
        "Read each warning below; sign the report when they are understood, "
        "then migrate with expected_sha256 set to the sha256 above."
    ),
    ("migrate", Verdict.PASS_WITH_WARNINGS): (
        "The rejected rows are kept in session_migration_rejects with their raw values; "
        "confirm each reason below is expected, then read the reconcile report."
    ),
    ("migrate", Verdict.ERROR): (
        "Nothing was committed (sessions, rejects and the audit row commit together). "
        "The application keeps using SQLite. Fix the reason above, then run again."
    ),
    ("reconcile", Verdict.FAIL): (
        "Do not cut over: the application keeps using SQLite. Read the differences by kind "
        "below, fix the cause, migrate into a fresh target and reconcile again."
    ),
    ("reconcile", Verdict.PASS_WITH_WARNINGS): (
        "Every row is accounted for. Read the warnings below before signing the cutover."
    ),
    ("rollback", Verdict.FAIL): (
        "Do not switch the application to SQLite: the restored file does not match "
        "PostgreSQL. Keep serving from PostgreSQL and read the differences below."
    ),
}
TODO_FAILED = (
    "Do not go on to the next step: read the reason above and the evidence below, fix the "
    "cause, then run this step again."
)
TODO_WARNINGS = "Read the warnings below and sign off on them before the next step."


def _display(obj: Any, metadata: dict | None = None) -> None:
    try:
        from IPython.display import display

        display(obj, metadata=metadata) if metadata else display(obj)
    except ImportError:  # outside IPython, print something readable
        print(obj)


def _html(markup: str) -> Any:
    try:
        from IPython.display import HTML

        return HTML(markup)
    except ImportError:
        return markup


def _publish(markup: str, text: str, metadata: dict | None = None) -> None:
    """HTML for the report, plain text for the terminal and JupyterLab's text view."""
    try:
        from IPython.display import publish_display_data

        publish_display_data({"text/html": markup, "text/plain": text}, metadata=metadata)
    except ImportError:
        print(text)


# --- numbers and words ---------------------------------------------------------------------------


def number(value: Any, decimals: int = 2) -> str:
    """``32460`` → ``32,460``; ``32.46`` → ``32.46``; ``32.0`` → ``32``; NaN → ``—``."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        if value.is_integer() and abs(value) < 1e15:
            return f"{int(value):,}"
        return f"{value:,.{decimals}f}".rstrip("0").rstrip(".")
    return str(value)


def words(value: Any) -> str:
    """Any cell value as a reviewer reads it: no ``[]``, ``True``, ``None`` or ``nan``."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        return number(value)
    if isinstance(value, list | tuple | set | frozenset):
        return ", ".join(words(v) for v in value) if value else "none"
    if isinstance(value, dict):
        return "; ".join(f"{k}: {words(v)}" for k, v in value.items()) if value else "none"
    try:
        if pd.isna(value):
            return "—"
    except (TypeError, ValueError):
        pass
    if hasattr(value, "isoformat"):
        return str(value.isoformat(sep=" ") if hasattr(value, "hour") else value.isoformat())
    return str(value)


def human(name: Any) -> str:
    """A column name as words: ``rows_read`` → ``rows read``."""
    return str(name).replace("_", " ")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def table_html(frame: pd.DataFrame, caption: str = "", empty: str = "") -> str:
    """``frame`` as an HTML table: human column names, numbers right-aligned with thousands
    separators, every value in words (escaped); an empty frame is said in a sentence."""
    if len(frame) == 0:
        return f'<p class="say">{html.escape(empty or "No rows.")}</p>'
    named_index = not isinstance(frame.index, pd.RangeIndex) or frame.index.name is not None
    shown = frame.reset_index() if named_index else frame
    columns = [human(c) for c in shown.columns]
    numeric = [
        all(_is_number(v) or v is None for v in shown[c].tolist()) and len(shown) > 0
        for c in shown.columns
    ]
    head = "".join(
        f"<th{' class=num' if n else ''}>{html.escape(c)}</th>"
        for c, n in zip(columns, numeric, strict=True)
    )
    body = []
    for row in shown.itertuples(index=False):
        cells = []
        for value, n in zip(row, numeric, strict=False):
            text = words(value)
            long = any(len(token) > LONG_TOKEN for token in text.split())
            cls = ' class="num"' if n or _is_number(value) else ' class="long"' if long else ""
            cells.append(f"<td{cls}>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def show(obj: Any, caption: str = "", empty: str = "", limit: int = MAX_ROWS) -> None:
    """Display a table (in words, see :func:`table_html`) or figure in the report."""
    if isinstance(obj, pd.DataFrame):
        more = len(obj) - limit
        frame = obj.head(limit) if more > 0 else obj
        markup = table_html(frame, caption, empty)
        if more > 0:
            markup += f'<p class="muted">… and {plural(more, "more row")}, not shown.</p>'
        _publish(markup, frame.to_string() if len(frame) else (empty or "No rows."))
    else:
        _display(obj)


def say(text: str) -> None:
    """A sentence in the report (an empty result, a chart that has nothing to show)."""
    _publish(f'<p class="say">{html.escape(text)}</p>', text)


def side_by_side(
    parts: Sequence[tuple[str, pd.DataFrame]], empty: str = "", note: str = "", fold: str = ""
) -> None:
    """Two (or more) tables beside each other, each with its heading (``note`` above them);
    folded under ``fold`` (a ``<details>`` the reader opens) when it is given."""
    cells = "".join(
        f"<div><h4>{html.escape(label)}</h4>{table_html(frame, empty=empty)}</div>"
        for label, frame in parts
    )
    text = "\n\n".join(f"{label}\n{frame.to_string()}" for label, frame in parts)
    said = f'<p class="muted">{html.escape(note)}</p>' if note else ""
    tables = f'<div class="side-by-side">{cells}</div>'
    _publish(f"{said}{_folded(tables, fold)}", (note + "\n" if note else "") + text)


FOLD_ROWS = 12
"""An analysis answer longer than this is folded under its chart: the page shows the picture,
the reader opens the rows."""


def _folded(markup: str, summary: str) -> str:
    if not summary:
        return markup
    return f'<details class="rows"><summary>{html.escape(summary)}</summary>{markup}</details>'


# --- the answer: verdict, reason, what to do, key figures ----------------------------------------


def banner(
    verdict: str,
    reason: str,
    figures: Iterable[Figure] = (),
    todo: str | None = None,
    step: str = "",
) -> None:
    """The verdict block a reviewer sees first (lifted to the top of the HTML report)."""
    if todo is None:
        todo = TODO.get((step, verdict)) or (
            TODO_FAILED
            if verdict in FAILED
            else TODO_WARNINGS
            if verdict == Verdict.PASS_WITH_WARNINGS
            else ""
        )
    answer = Answer(step, verdict, redact(reason), todo, tuple(figures))
    text = f"{verdict} — {answer.reason}" + (f"\nWhat to do: {todo}" if todo else "")
    text += "".join(f"\n  {f.label}: {f.value} {f.note}".rstrip() for f in answer.figures)
    _publish(answer_html(answer), text, metadata={ANSWER_KEY: ANSWER})


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
    step: str,
    verdict: str,
    reason: str,
    *,
    exit_code: int = EXIT_FAIL,
    figures: Sequence[Figure] = (),
    todo: str | None = None,
    **summary: Any,
) -> None:
    """Show and record the step's verdict; FAIL/NO-GO raise so the run stops non-zero.

    ``exit_code`` says what a failure means: 1 the data is wrong, 2 the run cannot go on.
    ``figures`` are the key figures shown under the banner (and on the run's index page).
    """
    banner(verdict, reason, figures, todo, step)
    failed = verdict in FAILED
    if figures:
        summary["key_figures"] = [[f.label, f.value, f.note, f.bad] for f in figures]
    record(step, verdict, reason, exit_code if failed else 0, **summary)
    if failed:
        error = (VerdictFailed if exit_code == EXIT_FAIL else SessionmigError)(
            f"{step}: {verdict}: {reason}"
        )
        error.concluded = True  # type: ignore[attr-defined]  # shown and recorded: step() lets it by
        raise error


def short(sha256: str | None) -> str:
    """The first 16 hex digits of a sha256, enough to compare by eye (the full one is below)."""
    return f"{sha256[:12]}…" if sha256 else "—"


def preflight_figures(result: Any) -> list[Figure]:
    failed = [c for c in result.checks if not c.ok]
    existing = sum(v for v in result.existing_rows.values() if isinstance(v, int))
    return [
        Figure(
            "checks holding",
            f"{len(result.checks) - len(failed)} of {len(result.checks)}",
            "; ".join(c.name for c in failed[:3]) if failed else "every check holds",
            bad=bool(failed),
        ),
        Figure("source sha256", short(result.source_sha256), "of the backup as read now"),
        Figure("server", (result.server_version or "unreachable").split(" on ")[0]),
        Figure(
            "rows already in the target",
            number(existing),
            "tables to be created" if not result.existing_rows else "",
        ),
        Figure(
            "privileges to ask for",
            number(len(result.grants)),
            "GRANT statements listed below" if result.grants else "none missing",
            bad=bool(result.grants),
        ),
    ]


def conclude_preflight(result: Any) -> None:
    """GO when every check holds; NO-GO stops the run (exit 2: it cannot be carried out)."""
    failed = [f"{c.name}: {redact(c.detail)}" for c in result.checks if not c.ok]
    conclude(
        "preflight",
        Verdict.NO_GO if failed else Verdict.GO,
        "; ".join(failed) or "every check holds",
        exit_code=EXIT_ERROR,
        figures=preflight_figures(result),
        source_sha256=result.source_sha256,
        server_version=result.server_version,
    )


def inspect_figures(result: Any) -> list[Figure]:
    c = result.census
    errors = sum(1 for f in result.findings if f.severity == "error")
    warnings = sum(1 for f in result.findings if f.severity == "warning")
    figures = [
        Figure("sessions in the backup", number(c.rows) if c else "—"),
        Figure(
            "active / expired at as_of",
            f"{number(c.active)} / {number(c.expired)}" if c else "—",
            f"as_of {c.as_of.isoformat(timespec='minutes')}" if c else "",
        ),
        Figure(
            "rows that cannot land",
            number(sum(c.rejects.values())) if c else "—",
            "kept as rejects by migrate, with a reason",
        ),
        Figure(
            "findings",
            f"{errors} errors · {warnings} warnings",
            "errors block the migration",
            bad=bool(errors),
        ),
        Figure(
            "backup sha256",
            short(result.files[0].sha256) if result.files else "—",
            "pass it to migrate as expected_sha256",
        ),
    ]
    return figures


def conclude_inspect(result: Any) -> None:
    """Errors stop the run (exit 2); warnings pass for the reviewer to read."""
    errors = [f.message for f in result.findings if f.severity == "error"]
    warnings = [f for f in result.findings if f.severity == "warning"]
    if errors:
        verdict, reason = Verdict.ERROR, "; ".join(errors)
    elif warnings:
        verdict = Verdict.PASS_WITH_WARNINGS
        reason = f"{len(warnings)} warnings to review: " + "; ".join(
            f"{f.code.replace('_', ' ')} ({f.count:,})" for f in warnings
        )
    else:
        verdict, reason = Verdict.PASS, "no findings: every row can land as it is"
    conclude(
        "inspect",
        verdict,
        reason,
        exit_code=EXIT_ERROR,
        figures=inspect_figures(result),
        rows=result.census.rows if result.census else None,
        sha256=result.files[0].sha256 if result.files else None,
    )


@contextmanager
def step(name: str) -> Iterator[None]:
    """Turn an error inside the step into a clear message in the report, then stop the run."""
    try:
        yield
    except SessionmigError as exc:
        if getattr(exc, "concluded", False):
            raise
        message = redact(str(exc))
        if isinstance(exc, VerdictFailed):
            # A refusal the step is built to make (the soak period is not over, a run folder
            # was altered): NO-GO in its own words, and no traceback to read.
            banner(Verdict.NO_GO, f"{name} refused: {message}", todo=REFUSAL_TODO, step=name)
            record(name, Verdict.NO_GO, message, exc.exit_code)
        else:
            banner(Verdict.ERROR, f"{name} could not be carried out: {message}", step=name)
            record(name, Verdict.ERROR, message, exc.exit_code)
        raise
    except Exception as exc:
        message = redact(f"{type(exc).__name__}: {exc}")
        banner(Verdict.ERROR, f"{name} stopped on an unexpected error: {message}", step=name)
        record(name, Verdict.ERROR, message, EXIT_ERROR)
        raise


# --- tables --------------------------------------------------------------------------------------


def settings_table(settings: Any) -> pd.DataFrame:
    """The step's parameters in force (Settings holds no secrets)."""
    shown = set(settings.declared) or set(settings.public())
    rows = [
        (k, words(v) if v != "" else "(empty)") for k, v in settings.public().items() if k in shown
    ]
    return pd.DataFrame(rows, columns=["parameter", "value"])


def checks_table(result: Any) -> pd.DataFrame:
    return pd.DataFrame(
        [("✔ holds" if c.ok else "✘ fails", c.name, redact(c.detail)) for c in result.checks],
        columns=["result", "check", "what was found"],
    )


def existing_rows_table(result: Any) -> pd.DataFrame:
    """Rows already in each target table (a table that does not exist yet is said so)."""
    rows = [
        (name, n if isinstance(n, int) else words(n)) for name, n in result.existing_rows.items()
    ]
    return pd.DataFrame(rows, columns=["table", "rows"])


def findings_table(result: Any) -> pd.DataFrame:
    rows = [
        (
            f.severity,
            f.code.replace("_", " "),
            f.count,
            f.message,
            "; ".join(f.examples) or "—",
        )
        for f in result.findings
    ]
    return pd.DataFrame(rows, columns=["severity", "finding", "rows", "what it means", "examples"])


def census_table(result: Any) -> pd.DataFrame:
    """Counts and the null/empty profile of each column."""
    c = result.census
    rows = [
        ("sessions (rows)", c.rows),
        (f"active at as_of ({c.as_of.isoformat(timespec='minutes')})", c.active),
        ("expired at as_of", c.expired),
        ("rows that cannot land", sum(c.rejects.values())),
    ]
    rows += [(f"{col} is NULL", n) for col, n in sorted(c.nulls.items())]
    rows += [(f"{col} is empty text", n) for col, n in sorted(c.empties.items())]
    rows += [(f"metadata stored as {k}", n) for k, n in sorted(c.metadata.items())]
    return pd.DataFrame(rows, columns=["measure", "sessions"])


def spellings_table(result: Any) -> pd.DataFrame:
    """How each timestamp column is written: the ten commonest shapes (every digit shown as 9)."""
    rows = [
        (col, sp, n)
        for col, counter in result.census.spellings.items()
        for sp, n in counter.most_common(10)
    ]
    return pd.DataFrame(
        rows, columns=["column", "how it is written (each digit shown as 9)", "rows"]
    )


def files_table(files: Any, after: Any = (), check: str = "") -> pd.DataFrame:
    """Each source file's size and sha256 before and after; ``check`` names what proved the
    file sound (shown on the backup's row)."""
    rows = []
    for i, f in enumerate(files):
        later = after[i].sha256 if i < len(after) else ""
        state = (
            "unchanged" if later == f.sha256 else ("not hashed again" if not later else "CHANGED")
        )
        rows.append((Path(f.path).name, f.size, f.sha256, later or "—", state))
    table = pd.DataFrame(
        rows, columns=["file", "size (bytes)", "sha256 before", "sha256 after", "state"]
    )
    if check and len(table):
        table["proved sound by"] = [check] + ["—"] * (len(table) - 1)
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
                round(o.seconds, 1),
                round(o.rows_per_second),
            )
        ],
        columns=[
            "table",
            "rows read",
            "inserted",
            "unchanged",
            "conflicting",
            "updated",
            "rejected",
            "time (s)",
            "rows per second",
        ],
    )


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
    return pd.DataFrame(rows, columns=["reason", "rows", "what it means", "examples (ids hashed)"])


def type_rules_table() -> pd.DataFrame:
    """The type rules in force, one line per column group (the RUNBOOK's "Type rules" section
    says the same at length, with examples)."""
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


def migrate_figures(result: Any) -> list[Figure]:
    o = result.outcome
    before = result.hashes_before[0].sha256 if result.hashes_before else None
    after = result.hashes_after[0].sha256 if result.hashes_after else None
    landed = o.inserted + o.unchanged + o.updated
    by_reason = ", ".join(f"{k} {v:,}" for k, v in sorted(o.reject_counts.items()))
    return [
        Figure("rows read", number(o.rows_read), "from the backup"),
        Figure(
            "landed in PostgreSQL",
            number(landed),
            f"{o.inserted:,} inserted, {o.unchanged:,} unchanged, {o.updated:,} updated"
            + (" — dry run, rolled back" if o.dry_run else ""),
        ),
        Figure("rejected", number(o.rejected), by_reason or "no row rejected"),
        Figure(
            "backup sha256 before = after",
            short(before),
            "unchanged during the load" if before == after else "CHANGED during the load",
            bad=before != after,
        ),
        Figure("time", f"{o.seconds:,.1f} s", f"{o.rows_per_second:,.0f} rows per second"),
        *_replication_figure(o),
    ]


def _replication_figure(o: Any) -> list[Figure]:
    """What a failover right after the commit would find: the WAL written, each standby's
    replay of the commit (or how far behind it still was)."""
    seen = getattr(o, "replication", None)
    if seen is None:
        return []
    behind = any("behind the commit" in s or "could not be read" in s for s in seen.standbys)
    value = "—" if seen.wal_bytes is None else f"{seen.wal_bytes / 1e6:,.1f} MB"
    return [
        Figure(
            "WAL written, standbys after the commit",
            value,
            "; ".join(seen.standbys) or "no streaming standby",
            bad=behind,
        )
    ]


def conclude_migrate(result: Any) -> None:
    """PASS, or PASS_WITH_WARNINGS when rows were rejected (all kept with their reasons)."""
    o = result.outcome
    reason = (
        f"{o.inserted:,} inserted, {o.unchanged:,} unchanged, {o.updated:,} updated, "
        f"{o.rejected:,} rejected (each kept with its reason)"
    )
    if o.dry_run:
        reason += " (dry run: rolled back, nothing written)"
    counts: dict[str, Any] = {k: v for k, v in vars(o).items() if isinstance(v, int | float)}
    conclude("migrate", result.verdict, reason, figures=migrate_figures(result), **counts)


# --- reconcile -----------------------------------------------------------------------------------

PARITY_WORDS = {
    "as_of": "the instant compared at (as_of)",
    "active_legacy_rule_sqlite": "active by the legacy rule on SQLite (text compare)",
    "active_legacy_rule_sqlite_excluding_rejects": "the same, without the rejected rows",
    "active_postgres": "active in PostgreSQL (expires_at > as_of)",
    "sum_request_count_source": "sum of request_count, source",
    "sum_request_count_target": "sum of request_count, PostgreSQL",
    "created_min_source": "earliest created_at, source",
    "created_min_target": "earliest created_at, PostgreSQL",
    "created_max_source": "latest created_at, source",
    "created_max_target": "latest created_at, PostgreSQL",
    "days_compared": "days compared (by created_at, source zone)",
    "days_with_different_counts": "days whose session counts differ",
    "distributions_agree": "per-day counts, sums and extremes agree",
}


def kinds() -> dict[str, str]:
    from sessionmig.engines.reconcile import KINDS

    return KINDS


def partition_words(result: Any) -> tuple[str, str, bool]:
    """(figure, note, holds) of a reconcile's partition proof, see :func:`verdict.partition`:
    the figure says ≠ and ✘ when it does not hold, and the note by how many rows."""
    broken = [
        f"{k.replace('_', ' ')} {v:,}"
        for k in ("both", "missing", "unaccounted", "orphan_reject", "false_reject", "duplicate")
        if (v := result.counts.get(k, 0))
    ]
    return partition(
        result.source_rows,
        result.migrated,
        result.rejected,
        result.partition_holds,
        ", ".join(broken),
    )


def partition_sentence(result: Any) -> str:
    """Source rows = migrated + rejected, in words, saying whether it holds."""
    figure, note, _ = partition_words(result)
    mark, source, sign, migrated, _, rejected = figure.split(" ")
    return f"{mark} {source} source rows {sign} {migrated} migrated + {rejected} rejected — {note}"


# The explained kinds that count rows; the others count a row's columns (a row can be in several).
EXPLAINED_ROWS = ("ended", "created_after_cutover", "changed_by_app")


def _compared_rows(result: Any) -> int:
    """Rows the full join looked at: the landable source rows plus PostgreSQL's rows the source
    does not hold (after a cutover: sessions created since, and any that appeared)."""
    counts = result.counts
    since = counts.get("extra", 0) + counts.get("created_after_cutover", 0)
    return result.source_rows - result.rejected + since + counts.get("appeared", 0)


def reconcile_figures(result: Any) -> list[Figure]:
    explained = dict(getattr(result, "explained", {}) or {})
    broken = {k: v for k, v in result.counts.items() if k != "matched" and v and k not in explained}
    compared = _compared_rows(result)
    days = result.parity.get("days_compared")
    mode = (
        [
            Figure(
                "changes the application explains (after cutover)",
                plural(sum(explained.get(k, 0) for k in EXPLAINED_ROWS), "row"),
                "; ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in explained.items() if v)
                or "none",
            )
        ]
        if explained
        else []
    )
    return mode + [
        Figure(
            "partition: source = migrated + rejected",
            *partition_words(result)[:2],
            bad=not partition_words(result)[2],
        ),
        Figure(
            "differences",
            "none" if not broken else f"{sum(broken.values()):,}",
            "; ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in broken.items())
            or "every compared row identical",
            bad=bool(broken),
        ),
        Figure(
            "what was compared",
            plural(compared, "row"),
            "every column, by session_id" + (f"; {plural(days, 'day')} of counts" if days else ""),
        ),
        Figure("rows in PostgreSQL", number(result.target_rows), f"{result.matched:,} identical"),
    ]


def differences_summary(result: Any) -> pd.DataFrame:
    """Differences per kind (and, for changed rows, per column), with what each kind means —
    before any row list. Kinds with no rows are left out."""
    meaning = kinds()
    rows: list[tuple[str, str, int, str]] = []
    for kind, n in result.counts.items():
        if kind == "matched" or not n:
            continue
        if kind == "changed":
            per_column: dict[str, int] = {}
            for d in result.differences:
                if d.kind == "changed":
                    for part in d.detail.split(";"):
                        column = part.strip().split(":", 1)[0].split(" ", 1)[0]
                        if column in COLUMNS:
                            per_column[column] = per_column.get(column, 0) + 1
            if per_column:
                for column, m in sorted(per_column.items(), key=lambda kv: -kv[1]):
                    rows.append((kind, column, m, meaning.get(kind, "")))
                continue
        rows.append((kind, "—", n, meaning.get(kind, "")))
    return pd.DataFrame(rows, columns=["kind", "column", "rows", "what it means"])


def kinds_table() -> pd.DataFrame:
    """Every count kind a reconciliation keeps, with its meaning (all but matched fail it)."""
    return pd.DataFrame(
        [(k, v, "no" if k == "matched" else "yes") for k, v in kinds().items()],
        columns=["kind", "what it means", "fails the reconcile"],
    )


def reconcile_tables(result: Any) -> dict[str, pd.DataFrame]:
    """Partition proof, difference counts, named differences and parity signals."""
    partition = pd.DataFrame(
        [
            ("source rows", result.source_rows),
            ("migrated (matched or changed)", result.migrated),
            ("rejected (in session_migration_rejects)", result.rejected),
            ("migrated + rejected", result.migrated + result.rejected),
            ("partition: source = migrated + rejected", " — ".join(partition_words(result)[:2])),
            ("rows in PostgreSQL", result.target_rows),
            (
                "rows compared in PostgreSQL (full join on session_id, every column)",
                _compared_rows(result),
            ),
        ],
        columns=["measure", "rows"],
    )
    meaning = kinds()
    counts = pd.DataFrame(
        [(k, v, meaning.get(k, "")) for k, v in result.counts.items()],
        columns=["kind", "rows", "what it means"],
    )
    diffs = pd.DataFrame(
        [(d.kind, d.session, d.rowid, d.detail) for d in result.differences],
        columns=["kind", "session (hashed)", "source rowid", "what differs"],
    )
    parity = pd.DataFrame(
        [
            (PARITY_WORDS.get(k, human(k)), words(v))
            for k, v in result.parity.items()
            if k != "per_day"
        ],
        columns=["signal", "value"],
    )
    return {
        "partition": partition,
        "counts": counts,
        "summary": differences_summary(result),
        "differences": diffs,
        "parity": parity,
    }


def show_differences(result: Any) -> None:
    """The "no differences" sentence, or the differences per kind and column, then the rows."""
    tables = reconcile_tables(result)
    if len(tables["summary"]) == 0:
        compared = plural(result.matched, "compared row")
        rejects = (
            "no row was rejected"
            if not result.rejected
            else f"the {plural(1, 'rejected row')} is recorded with its reason"
            if result.rejected == 1
            else f"each of the {plural(result.rejected, 'rejected row')} is recorded with its "
            "reason"
        )
        say(
            f"No differences: {'the' if result.matched == 1 else 'all'} {compared} "
            f"{'is' if result.matched == 1 else 'are'} identical in every column, and {rejects}."
        )
        return
    show(tables["summary"], caption="Differences per kind and column")
    shown = len(result.differences)
    total = sum(v for k, v in result.counts.items() if k != "matched")
    show(
        tables["differences"],
        caption=f"The rows ({shown:,} named of {total:,}; ids hashed)"
        if shown != total
        else f"The {plural(total, 'row')} (ids hashed)",
        limit=50,
    )


def app_check_table(app: Any) -> pd.DataFrame:
    """What the new SessionManager accepts at as_of, against the source."""
    rows = [
        ("sessions checked", app.checked),
        ("active at as_of per the source", app.expected_active),
        ("accepted by SessionManager", app.accepted_active),
        ("active in the source, refused by the app", app.wrongly_rejected),
        ("expired in the source, accepted by the app", app.wrongly_accepted),
    ]
    if app.explained:
        # after_cutover: left out of the rows above, and said so.
        rows.insert(
            1,
            (
                "treated differently, explained by the app since the backup (ended or extended; "
                "not counted below)",
                app.explained,
            ),
        )
    rows += [("example", e) for e in app.examples]
    return pd.DataFrame(rows, columns=["measure", "sessions"])


def conclude_reconcile(result: Any, app: Any = None) -> None:
    """Show and record the reconcile verdict (the app check's view included: ``app``, else
    the result's own)."""
    from sessionmig.engines.appcheck import combined_verdict

    app = app if app is not None else getattr(result, "app", None)

    verdict, reason = combined_verdict(result.verdict, result.reason, app)
    figures = reconcile_figures(result) if result.verdict != Verdict.SKIPPED else []
    if app is not None:
        wrong = app.wrongly_rejected + app.wrongly_accepted
        figures.append(
            Figure(
                "app check at as_of",
                f"{app.accepted_active:,} of {app.expected_active:,} active accepted",
                f"{plural(wrong, 'session')} treated differently" if wrong else "the app agrees",
                bad=bool(wrong),
            )
        )
    conclude(
        "reconcile",
        verdict,
        reason,
        figures=figures,
        source_rows=result.source_rows,
        migrated=result.migrated,
        rejected=result.rejected,
        partition_holds=result.partition_holds,
    )


# --- rollback, finalize, analysis ----------------------------------------------------------------


def _live_rollback_table(live: Any) -> pd.DataFrame:
    rows = [
        ("the old colour's live file", live.live_sqlite_path),
        ("base (snapshot last carried into PostgreSQL)", Path(live.base_path).name),
        ("base sha256", live.base_sha256),
        ("catch-up pass of that base (0: the migrated backup)", live.catchup_pass),
        ("sessions created in PostgreSQL, inserted", live.inserted),
        ("sessions changed in PostgreSQL, changes applied", live.changed),
        ("sessions ended in PostgreSQL, ended", live.ended),
        ("changed in PostgreSQL, already ended in SQLite (stay ended)", live.stays_ended),
        ("changed on both sides (newer last_activity won)", live.conflicts),
        ("the same in the base and PostgreSQL (not touched)", live.unchanged),
        ("longest wait of the app's SQLite writes", f"{live.locked_seconds:.2f} s"),
        ("time", f"{live.seconds:.1f} s"),
    ]
    if getattr(live, "completed_earlier", False):
        rows.insert(
            0,
            (
                "completed here",
                "an earlier run wrote the live file and could not record it; this run wrote "
                "only the record (the counts are the earlier run's, from the file's marker)",
            ),
        )
    return pd.DataFrame(rows, columns=["measure", "value"])


def show_rollback_check(result: Any) -> None:
    """The restored file's reconcile, or why a rollback during the overlap has none."""
    if result is None:
        say(
            "Rollback during the overlap: every session it touched was read back and checked "
            "against the merge's outcome inside the SQLite transaction before it committed; "
            "the live file rightly holds the old colour's own changes, so it is not reconciled "
            "against PostgreSQL."
        )
        return
    show_differences(result)
    show(reconcile_tables(result)["partition"])


def rollback_table(restored: Any) -> pd.DataFrame:
    if hasattr(restored, "live_sqlite_path"):
        return _live_rollback_table(restored)
    rows = [
        ("restored file", restored.restore_path),
        ("backup sha256 (as migrated)", restored.backup_sha256),
        ("restored file sha256", restored.restored_sha256),
        ("sessions created in PostgreSQL, carried back", restored.carried_new),
        ("sessions changed in PostgreSQL, carried back", restored.carried_changed),
        ("sessions ended in PostgreSQL, removed", restored.carried_ended),
        ("rows kept as they were (incl. rejects)", restored.kept),
    ]
    return pd.DataFrame(rows, columns=["measure", "value"])


def _run_of(migrate_manifest: str) -> str | None:
    """The run id a migrate run folder (or its manifest.json) names; None when unreadable."""
    if not migrate_manifest:
        return None
    path = Path(migrate_manifest)
    path = path / "manifest.json" if path.is_dir() else path
    try:
        return str(json.loads(path.read_text(encoding="utf-8"))["run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _rollback_reconcile_words(result: Any, migrate_run: str | None) -> str:
    """The restored file's reconcile in a rollback's words.

    The restored file holds PostgreSQL's changes, so it is not the migrated backup byte for
    byte: reconcile's note that a migrate run recorded another sha256 is expected here, and it
    names the run it looked up, which need not be the one the rollback was given; it is left
    out. When the rejects reconcile read are another run's than ``migrate_run``'s, that is
    said, naming both."""
    parts = [
        part
        for part in str(result.reason).split("; ")
        if not (part.startswith("migrate run ") and "recorded source sha256" in part)
    ]
    words = "; ".join(parts)
    if len(parts) < len(str(result.reason).split("; ")):
        words += (
            "; the restored file's sha256 differs from the migrated backup's, as a restore "
            "that carried PostgreSQL's changes back must"
        )
    read = getattr(result, "run_id", None)
    if migrate_run and read and read != migrate_run:
        words += (
            f"; reconcile compared the rejects of migrate run {read} (the latest on the "
            f"target), not those of migrate run {migrate_run}, whose backup was restored: "
            "check that no other migration ran into this target since"
        )
    return words


def conclude_rollback(restored: Any, result: Any, migrate_manifest: str = "") -> None:
    """The restored file must reconcile with PostgreSQL before the app is switched back.

    ``migrate_manifest`` (the step's parameter) names the migrate run whose backup was
    restored; the reason names that run, and no other as if it were it."""
    if result is None:  # during the overlap: checked and recorded by the rollback itself
        carried = restored.inserted + restored.changed + restored.ended
        conclude(
            "rollback",
            Verdict.PASS,
            f"{restored.live_sqlite_path}: PostgreSQL's changes since catch-up pass "
            f"{restored.catchup_pass} merged in ({restored.inserted} new, {restored.changed} "
            f"changed, {restored.ended} ended, {restored.conflicts} conflicts); every touched "
            "session checked before commit"
            + (
                "; written by an earlier run that could not record it, recorded by this one"
                if getattr(restored, "completed_earlier", False)
                else ""
            ),
            figures=[
                Figure(
                    "carried from PostgreSQL",
                    number(carried),
                    f"{restored.inserted:,} new, {restored.changed:,} changed, "
                    f"{restored.ended:,} ended",
                ),
                Figure("conflicts (newer last_activity won)", number(restored.conflicts), ""),
                Figure("base", short(restored.base_sha256), f"pass {restored.catchup_pass}"),
                Figure(
                    "time",
                    f"{restored.seconds:.1f} s",
                    f"app writes waited at most {restored.locked_seconds:.2f} s",
                ),
            ],
        )
        return
    figures = [
        Figure("restored file", Path(restored.restore_path).name, short(restored.restored_sha256)),
        Figure(
            "carried back from PostgreSQL",
            number(restored.carried_new + restored.carried_changed + restored.carried_ended),
            f"{restored.carried_new:,} new, {restored.carried_changed:,} changed, "
            f"{restored.carried_ended:,} ended",
        ),
        *reconcile_figures(result)[:2],
    ]
    migrate_run = _run_of(migrate_manifest)
    origin = (
        f"the backup migrate run {migrate_run} migrated" if migrate_run else "the migrated backup"
    )
    conclude(
        "rollback",
        result.verdict,
        f"{restored.restore_path} restored from {origin} (sha256 {short(restored.backup_sha256)}), "
        f"with PostgreSQL's sessions carried back ({restored.carried_new:,} new, "
        f"{restored.carried_changed:,} changed, {restored.carried_ended:,} ended); "
        f"the restored file against PostgreSQL: {_rollback_reconcile_words(result, migrate_run)}",
        figures=figures,
    )


def finalize_table(result: Any) -> pd.DataFrame:
    return pd.DataFrame(list(result.files), columns=["archived file", "sha256"])


def query_header(name: str) -> Any:
    """A query's name and what it answers, as a heading in the report."""
    from sessionmig.engines.queries import get

    return _html(f"<h3>{html.escape(name)}</h3><p>{html.escape(get(name).description)}</p>")


SOURCE_ORDER = ("sqlite", "postgres")
"""Before, then after: the order two sources are laid out in, left to right (tables, charts)."""
SOURCE_WORDS = {"sqlite": "SQLite (the backup)", "postgres": "PostgreSQL (the target)"}


def source_order(sources: Iterable[Any]) -> list[str]:
    """``sources`` left to right: SQLite (before) first, PostgreSQL (after), any other last."""
    found = [str(s) for s in dict.fromkeys(sources)]
    return sorted(found, key=lambda s: (SOURCE_ORDER.index(s) if s in SOURCE_ORDER else 9, s))


def order_sentence(sources: Sequence[str]) -> str:
    """The order the page lays two sources out in, stated from that same order."""
    names = [SOURCE_WORDS.get(s, s) for s in sources]
    return f"{names[0]} on the left, {names[-1]} on the right."


def show_query(
    name: str, frame: pd.DataFrame, window: str = "", chart: Callable | None = None
) -> None:
    """One analysis query: heading, its chart first when ``chart(name, frame)`` draws one, then
    its answer (two sources side by side, SQLite on the left) — folded when longer than
    :data:`FOLD_ROWS` rows, so no long table stands before a picture — or a sentence when there
    is nothing to show."""
    show(query_header(name))
    figure = chart(name, frame) if chart is not None else None
    if figure is not None:
        _display(figure)
        import matplotlib.pyplot as plt

        plt.close(figure)  # shown here, beside its query, not again at the cell's end
    empty = f"No rows: the query found nothing{(' in ' + window) if window else ''}."
    if len(frame) and "source" in frame.columns and frame["source"].nunique() > 1:
        groups = {str(src): part for src, part in frame.groupby("source", sort=False)}
        order = source_order(groups)
        parts = [
            (
                f"on {SOURCE_WORDS.get(src, src)}",
                groups[src].drop(columns="source").reset_index(drop=True),
            )
            for src in order
        ]
        rows = max(len(part) for _, part in parts)
        fold = f"The answer: {plural(rows, 'row')} per source (open to read)"
        side_by_side(
            parts, empty=empty, note=order_sentence(order), fold=fold if rows > FOLD_ROWS else ""
        )
    elif len(frame) > FOLD_ROWS:
        more = len(frame) - MAX_ROWS
        markup = table_html(frame.head(MAX_ROWS), empty=empty)
        if more > 0:
            markup += f'<p class="muted">… and {plural(more, "more row")}, not shown.</p>'
        fold = f"The answer: {plural(len(frame), 'row')} (open to read)"
        _publish(_folded(markup, fold), frame.head(MAX_ROWS).to_string())
    else:
        show(frame, empty=empty)


def window_words(settings: Any, common: Mapping[str, Any]) -> str:
    """The time window an analysis used, in words (the defaults spelled out)."""
    start = common.get("start") or "7 days before as_of"
    end = common.get("end") or f"as_of ({settings.as_of.isoformat(timespec='minutes')})"
    return f"the window {start} → {end}"


def analysis_figures(result: Any) -> list[Figure]:
    empty = sum(1 for f in result.results.values() if len(f) == 0)
    return [
        Figure("queries run", number(len(result.results)), "on " + " and ".join(result.sources)),
        Figure(
            "answers that differ between sources",
            number(len(result.differences)) if len(result.sources) > 1 else "—",
            "one source only" if len(result.sources) == 1 else "",
            bad=bool(result.differences),
        ),
        Figure("queries that failed", number(len(result.errors)), bad=bool(result.errors)),
        Figure("empty answers", number(empty), "said in words below"),
    ]


APPENDIX = "appendix"
"""Output metadata value: the output belongs in the report's collapsed appendix."""


def show_settings(settings: Any) -> None:
    """The parameters in force (as resolved: ``as_of`` filled in, types checked), for the
    report's appendix beside the parameters cells."""
    frame = settings_table(settings)
    _publish(
        table_html(frame, caption="Parameters in force (as resolved)"),
        frame.to_string(),
        metadata={ANSWER_KEY: APPENDIX},
    )


def show_inspect_charts(result: Any, plots: Any) -> None:
    """Sessions created per day and hours left at as_of, or a sentence for each that has
    nothing to draw (no blank chart with a −0.04…0.04 axis)."""
    census = result.census
    if census is None:
        say("No chart: the backup could not be read, see the findings above.")
        return
    if plots.plot_created_per_day(census) is None:
        say("No chart of sessions per day: no row could be read as a session.")
    if plots.plot_remaining_ttl(census) is None:
        say(
            f"No session is active at as_of ({census.as_of.isoformat(timespec='minutes')}): "
            f"all {census.expired:,} readable sessions had expired by then, so there is no "
            "remaining lifetime to chart. Set as_of to an instant inside the backup's period "
            "to see one."
        )


def reconcile_per_day(result: Any) -> dict[str, tuple[int, int]] | None:
    """Per-day (source rows, target rows) when the reconcile result carries them."""
    days = getattr(result, "per_day", None) or result.parity.get("per_day")
    if not days:
        return None
    return {str(d): (int(v[0]), int(v[1])) for d, v in dict(days).items()}


def show_reconcile_days(result: Any, plots: Any) -> None:
    """The per-day chart, or in words what is known of the days."""
    days = reconcile_per_day(result)
    if days is not None and plots.plot_reconcile_days(days) is not None:
        return
    compared = result.parity.get("days_compared")
    differing = result.parity.get("days_with_different_counts") or []
    if compared is None:
        say("No per-day counts were kept by this reconcile.")
    elif differing:
        say(
            f"{len(differing):,} of {plural(compared, 'day')} "
            f"{'has a' if len(differing) == 1 else 'have'} different session "
            f"{'count' if len(differing) == 1 else 'counts'}: " + ", ".join(map(str, differing))
        )
    else:
        say(
            f"{'The' if compared == 1 else 'All'} {plural(compared, 'day')} (by created_at) "
            f"{'holds' if compared == 1 else 'hold'} the same number of sessions on both sides."
        )
