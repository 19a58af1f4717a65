"""Pages that never contradict themselves.

- The cover's headline comes from the worst verdict, whatever it is (every combination).
- A figure whose truth is the point (the partition) says whether it holds, everywhere.
- Every command a page offers runs as printed (executed here, through the installed CLI).
- Words for people and advice that fits: the order stated is the order drawn, charts with
  real axes, plurals, zones on times, the digest shown, a refusal read as a refusal, a dead
  kernel said with what is known.
"""

from __future__ import annotations

import dataclasses
import html
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import matplotlib
import nbformat
import pandas as pd
import pytest
from conftest import ROOT, env_file
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

matplotlib.use("Agg")

from sessionmig import cli  # noqa: E402
from sessionmig.engines.reconcile import KINDS, ReconcileResult  # noqa: E402
from sessionmig.engines.rollback import RollbackResult  # noqa: E402
from sessionmig.errors import VerdictFailed  # noqa: E402
from sessionmig.reports import cover, plots, render, report  # noqa: E402
from sessionmig.rules import verdict as V  # noqa: E402
from sessionmig.rules.verdict import FAILED, Verdict, worst  # noqa: E402
from sessionmig.runbook import orchestrate  # noqa: E402

SESSIONMIG = ROOT / ".venv" / "bin" / "sessionmig"


def published(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """What the report functions publish (HTML, text), captured instead of displayed."""
    said: list[tuple[str, str]] = []
    monkeypatch.setattr(
        report, "_publish", lambda markup, text, metadata=None: said.append((markup, text))
    )
    return said


def page_of(data: dict[str, Any]) -> str:
    return render.cover_page(cover.cover(data))


def headline_of(page: str) -> str:
    found = re.search(r'<div class="verdict [a-z]+"><p class="line">(.*?)</p>', page, re.S)
    assert found, page[:400]
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", found.group(1))).split())


# --- 7: the headline comes from the worst verdict --------------------------------------------

# Every verdict a step can carry, and the statuses of steps that recorded none.
STEP_STATES: list[tuple[str | None, str]] = [(v.value, "passed") for v in Verdict] + [
    (None, "failed"),
    (None, "interrupted"),
    (None, "skipped"),
]
RUN_VERDICTS = ["", *(v.value for v in Verdict)]


def test_the_headline_follows_the_worst_verdict_in_every_combination() -> None:
    checked = 0
    for n in (1, 2, 3):
        for states in itertools.product(STEP_STATES, repeat=n):
            steps = [
                {"name": f"s{i}", "verdict": v, "status": st, "reason": f"reason {i}"}
                for i, (v, st) in enumerate(states)
            ]
            verdicts = [cover.of_step(s["verdict"], s["status"]) for s in steps]
            # The run's own verdict as _seal computes it, and any other it might carry.
            for exit_code in (0, 1, 2):
                own = orchestrate.run_verdict(exit_code, verdicts).value
                for run in {own, *RUN_VERDICTS}:
                    shown, sentence = cover.run_headline({"verdict": run, "steps": steps})
                    expected = worst([Verdict(run) if run else Verdict.PASS, *verdicts])
                    expected = Verdict.PASS if expected == Verdict.GO else expected
                    assert shown == expected, (states, run, shown)
                    assert shown.severity >= max(v.severity for v in verdicts)
                    assert shown != Verdict.GO  # a run passes; GO is a preflight's word
                    if shown in FAILED:
                        assert "passed" not in sentence, (states, run, sentence)
                        carriers = [f"s{i}" for i, v in enumerate(verdicts) if v == shown]
                        if carriers:
                            assert sentence.startswith(f"{carriers[0]}: reason"), sentence
                    else:
                        everyone = all(v.passed and v != Verdict.SKIPPED for v in verdicts)
                        assert ("every step passed" in sentence) == everyone, (states, sentence)
                        warned = Verdict.PASS_WITH_WARNINGS in verdicts
                        assert ("warnings" in sentence) == warned, (states, sentence)
                    checked += 1
    assert checked > 10_000


def test_an_error_step_never_gets_every_step_passed() -> None:
    """The reproduction: a step that stopped without a verdict (its kernel died)."""
    data = {
        "run_id": "r1",
        "environment": "prod",
        "verdict": "ERROR",
        "steps": [
            {
                "name": "preflight",
                "status": "passed",
                "verdict": "GO",
                "reason": "every check holds",
            },
            {
                "name": "inspect",
                "status": "failed",
                "verdict": None,
                "reason": "DeadKernelError: Kernel died",
            },
        ],
    }
    page = page_of(data)
    assert "every step passed" not in page
    assert headline_of(page) == "ERROR inspect: DeadKernelError: Kernel died"
    assert "FAILED" not in page  # no word that no verdict has
    assert orchestrate.run_verdict(2, [Verdict.GO, Verdict.NO_GO]) == Verdict.NO_GO
    assert orchestrate.run_verdict(1, [Verdict.PASS, Verdict.FAIL]) == Verdict.FAIL
    assert orchestrate.run_verdict(2, [Verdict.PASS]) == Verdict.ERROR


# --- 8: the partition says whether it holds ----------------------------------------------------


def reconcile_result(source: int, migrated: int, rejected: int, **counts: int) -> ReconcileResult:
    kinds = {k: 0 for k in KINDS}
    kinds.update(matched=migrated, **counts)
    return ReconcileResult(
        run_id="20260115T000000Z-aaaa",
        source_rows=source,
        target_rows=migrated,
        migrated=migrated,
        rejected=rejected,
        matched=migrated,
        counts=kinds,
        differences=[],
        parity={"days_compared": 30},
        verdict="FAIL",
        reason="rows differ or are unaccounted for: 1 missing",
    )


def test_a_partition_that_does_not_hold_never_reads_as_an_equation(
    monkeypatch, tmp_path: Path
) -> None:
    figure, note, holds = V.partition(50_000, 49_992, 7)
    assert not holds and figure == "✘ 50,000 ≠ 49,992 + 7"
    assert note.startswith("does NOT hold: 1 row unaccounted")
    assert V.partition(50_000, 49_993, 7)[0] == "✔ 50,000 = 49,993 + 7"
    assert "3 rows more" in V.partition(10, 10, 3)[1]
    # the sums agree but a row is counted twice: no ✔, and what broke it
    tricky = V.partition(10, 9, 1, holds=False, why="both 1")
    assert tricky[0].startswith("✘") and "both 1" in tricky[1]

    result = reconcile_result(50_000, 49_992, 7, missing=1)
    # the reconcile report: the answer's figure, the partition table, the sentence
    shown = {f.label: f for f in report.reconcile_figures(result)}
    fig = shown["partition: source = migrated + rejected"]
    assert "≠" in fig.value and "=" not in fig.value and fig.bad and "1 row unaccounted" in fig.note
    table = report.reconcile_tables(result)["partition"]
    text = " ".join(map(str, table["rows"]))
    assert "50,000 ≠ 49,992 + 7" in text and "1 row unaccounted" in text
    assert "≠" in report.partition_sentence(result)

    # the cover: the figure as conclude records it, marked
    said = published(monkeypatch)
    monkeypatch.setenv(report.RESULT_VARIABLE, str(tmp_path / "r8.json"))  # this test's own
    with pytest.raises(VerdictFailed):
        report.conclude_reconcile(result)
    assert said and "≠" in said[0][0]
    recorded = json.loads(Path(os.environ[report.RESULT_VARIABLE]).read_text())
    data = {
        "run_id": "r8",
        "verdict": "FAIL",
        "steps": [{"name": "reconcile", "status": "failed", **recorded}],
    }
    page = page_of(data)
    assert "50,000 = 49,992 + 7" not in page and "50,000 ≠ 49,992 + 7" in page
    assert re.search(r'<span class="bad">partition[^<]*<b>✘ 50,000 ≠ 49,992 \+ 7</b>', page), (
        re.findall(r"<td>[^\n]*partition[^\n]*</td>", page),
        recorded.get("summary", {}).get("key_figures"),
    )

    # the terminal: the step's line
    record = orchestrate.StepRecord("reconcile", "03_reconcile.ipynb", "failed", "FAIL")
    record.summary = recorded["summary"]
    line = orchestrate.step_line(record)
    assert "50,000 ≠ 49,992 + 7" in line and "1 row unaccounted" in line


def test_the_terminal_summary_says_the_partition_does_not_hold() -> None:
    record = orchestrate.StepRecord("reconcile", "03_reconcile.ipynb", "failed", "FAIL")
    record.summary = {"source_rows": 50_000, "migrated": 49_992, "rejected": 7}
    outcome = orchestrate.RunOutcome(1, Path("r"), Path("r/index.html"), "", (record,), "0" * 64)
    lines = "\n".join(cli.run_summary(outcome))
    assert "50,000 = 49,992 + 7" not in lines.replace("migrated ", "").replace("rejected ", "")
    assert "≠" in lines and "1 row unaccounted" in lines


# --- 11: words for people, advice that fits ------------------------------------------------------


def both(name: str, rows: list[tuple]) -> pd.DataFrame:
    x, y = plots.SPECS[name][:2]
    frames = [
        pd.DataFrame([(*r, src) for r in rows], columns=[x, y, "source"])
        for src in ("postgres", "sqlite")  # as a query returns them: PostgreSQL first
    ]
    return pd.concat(frames, ignore_index=True)


def test_the_order_stated_is_the_order_drawn(monkeypatch) -> None:
    said = published(monkeypatch)
    monkeypatch.setattr(report, "query_header", lambda name: "")
    monkeypatch.setattr(report, "_display", lambda obj, metadata=None: None)
    report.show_query("lifetime_hours", both("lifetime_hours", [(1, 5), (24, 7)]))
    markup = said[-1][0]
    headings = re.findall(r"<h4>(.*?)</h4>", markup)
    assert headings[0].startswith("on SQLite") and headings[1].startswith("on PostgreSQL")
    assert "SQLite (the backup) on the left, PostgreSQL (the target) on the right" in markup
    fig = plots.plot_query("lifetime_hours", both("lifetime_hours", [(1, 5), (24, 7)]))
    # One panel: SQLite named first, as filled bars, PostgreSQL outlined.
    title = fig.axes[0].get_title(loc="left")
    assert "SQLite (bars) and PostgreSQL (outline)" in title


def test_charts_have_real_axes_labels_and_counts_from_zero() -> None:
    bins = both("request_count_distribution", [(0, 4_600), (10, 4_800), (50, 4_700), (200, 4_900)])
    fig = plots.plot_query("request_count_distribution", bins)
    for ax in fig.axes:
        starts = sorted({p.get_x() for p in ax.patches})
        assert starts == [0, 10, 50, 200]  # bars where the bins are, on a numeric axis
        assert not [line for line in ax.get_lines() if len(line.get_xdata()) > 1]
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_ylim()[0] == 0
    peaks = both(
        "active_over_time",
        [("2026-01-14 10:00", 4_500), ("2026-01-14 11:00", 5_000), ("2026-01-14 15:00", 4_800)],
    )
    watch = pd.DataFrame(
        {"hour": [0, 1, 2], "active": [4_500, 4_900, 5_000], "week_before": [4_600, 4_700, 4_800]}
    )
    frames = {
        "active_over_time": peaks,
        "lifetime_hours": both("lifetime_hours", [(1, 4_500), (24, 5_000)]),
        "ttl_used": both("ttl_used", [(0, 4_500), (10, 5_000)]),
        "cutover_watch": watch,
    }
    for name, frame in frames.items():
        fig = plots.plot_query(name, frame)
        for ax in fig.axes:
            assert ax.get_xlabel(), name
            assert ax.get_ylim()[0] == 0, (name, ax.get_ylim())
    # the hour buckets sit at their hours: the 15:00 bar is four hours after the 11:00 one
    ax = plots.plot_query("active_over_time", peaks).axes[0]
    xs = sorted({p.get_x() for p in ax.patches})
    assert xs[2] - xs[1] == pytest.approx(4 / 24)

    class Census:
        created_per_day = {"2026-01-01": 3, "2026-01-05": 4}
        remaining_ttl_hours = {0: 2, 48: 5}

    for fig in (plots.plot_created_per_day(Census), plots.plot_remaining_ttl(Census)):
        ax = fig.axes[0]
        assert ax.get_xlabel() and ax.get_ylim()[0] == 0
        assert len({round(p.get_x() + p.get_width() / 2) for p in ax.patches}) == 2
    days = {"2026-01-01": (4_600, 4_600), "2026-01-03": (4_800, 4_799)}
    ax = plots.plot_reconcile_days(days).axes[0]
    assert ax.get_xlabel() and ax.get_ylim()[0] == 0
    assert "1 day differs" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_one_is_singular(monkeypatch) -> None:
    assert [V.plural(n, "row") for n in (0, 1, 2, 1000)] == [
        "0 rows",
        "1 row",
        "2 rows",
        "1,000 rows",
    ]
    said = published(monkeypatch)
    report.show(pd.DataFrame({"a": range(3)}), limit=2)
    assert "1 more row," in said[-1][0] and "1 more rows" not in said[-1][0]

    class Plain:
        parity = {"days_compared": 1, "days_with_different_counts": []}

    report.show_reconcile_days(
        Plain(), plots=type("P", (), {"plot_reconcile_days": staticmethod(lambda d: None)})
    )
    assert "1 days" not in said[-1][1] and "1 day " in said[-1][1]
    result = reconcile_result(400, 393, 7)
    assert {f.value for f in report.reconcile_figures(result)} >= {"393 rows"}
    one = reconcile_result(1, 1, 0)
    one.parity["days_compared"] = 1  # the dict is the result's own, not a field
    notes = " ".join(f.note + " " + f.value for f in report.reconcile_figures(one))
    assert "1 rows" not in notes and "1 days" not in notes


def test_restore_rollback_names_the_run_it_was_given(tmp_path: Path, monkeypatch) -> None:
    given = tmp_path / "reports" / "prod" / "RUN-A"
    given.mkdir(parents=True)
    (given / "manifest.json").write_text(json.dumps({"run_id": "RUN-A"}))
    restored = RollbackResult("/srv/app/sessions.db", "a" * 64, "b" * 64, 1, 2, 0, 397)
    result = dataclasses.replace(
        reconcile_result(400, 393, 7),
        run_id="RUN-B",
        verdict="PASS_WITH_WARNINGS",
        reason=(
            "every row is accounted for; migrate run RUN-B recorded source sha256 "
            "cccccccccccccccc…, but this backup is bbbbbbbbbbbbbbbb…: the rows match this file, "
            "not necessarily the one that was migrated; 7 source rows were rejected; each is in "
            "session_migration_rejects"
        ),
    )
    said = published(monkeypatch)
    monkeypatch.delenv(report.RESULT_VARIABLE, raising=False)
    report.conclude_rollback(restored, result)  # the notebook as it is: no run is named wrongly
    assert "RUN-B recorded source sha256" not in said[-1][1]
    report.conclude_rollback(restored, result, str(given))
    text = said[-1][1]
    assert "the backup migrate run RUN-A migrated" in text
    assert "RUN-B recorded source sha256" not in text
    assert (
        "rejects of migrate run RUN-B (the latest on the target), not those of migrate run RUN-A"
        in text
    )


def test_times_on_the_cover_carry_their_zone() -> None:
    data = {
        "run_id": "r",
        "started_at": "2026-01-15T03:04:05.123456+00:00",
        "finished_at": "2026-01-15T12:05:06.5+09:00",
        "steps": [],
    }
    c = cover.cover(data)
    assert c.started == "2026-01-15 03:04:05 UTC"
    assert c.finished == "2026-01-15 12:05:06 (UTC+09:00)"
    assert cover.when("2026-01-15T03:04:05") == "2026-01-15 03:04:05 (time zone not recorded)"


def test_the_cover_shows_the_digest_and_where_it_is_kept() -> None:
    digest = "ab" * 32
    data = {
        "run_id": "r",
        "steps": [],
        "manifest_record": {"status": "recorded in public.session_migration_manifests when sealed"},
    }
    page = page_of(data)
    assert "session_migration_manifests" in page and "manifest_sha256" in page
    assert render.shown_digest(page) is None
    sealed = render.with_digest(page, digest)
    assert render.shown_digest(sealed) == digest and digest in sealed
    assert render.without_digest(sealed) == render.without_digest(page)
    assert digest in page_of({**data, "manifest_sha256": digest})


def test_a_planned_refusal_reads_as_one(tmp_path: Path, monkeypatch) -> None:
    said = published(monkeypatch)
    out = tmp_path / "result.json"
    monkeypatch.setenv(report.RESULT_VARIABLE, str(out))
    soak = (
        "the soak period is not over: 3.0 h left (until 2026-01-16T12:00:00+00:00); "
        "watch the app until then"
    )
    with pytest.raises(VerdictFailed), report.step("finalize"):
        raise VerdictFailed(soak)
    markup, text = said[-1]
    assert "NO-GO" in markup and soak in html.unescape(markup)
    assert "traceback" not in text.lower() and "VerdictFailed" not in text
    assert json.loads(out.read_text())["verdict"] == "NO-GO"
    # A notebook that stopped on the refusal without a verdict block reads the same way.
    nb = new_notebook()
    cell = new_code_cell("steps.finalize_step(...)")
    cell.outputs = [
        new_output("error", ename="VerdictFailed", evalue=soak, traceback=["Traceback", "x"])
    ]
    nb.cells = [new_markdown_cell("# 06 · Finalize"), cell]
    path = tmp_path / "06_finalize.ipynb"
    nbformat.write(nb, path)
    main = render.notebook_to_html(path, tmp_path / "06.html").read_text().split("<details")[0]
    main = main.split("</style>")[1]
    assert "NO-GO" in main and "soak period is not over" in main
    assert "traceback" not in main.lower() and "VerdictFailed" not in main
    # A real error still points to its traceback.
    error = render.stopped_answer("x", "KeyError", "'a'")
    assert error.verdict == "ERROR" and "traceback" in error.todo


# --- 9 and 11 (dead kernel): whole runs ----------------------------------------------------------


def printed_verify(run_dir: Path) -> str:
    page = (run_dir / "index.html").read_text()
    found = re.search(r'<pre class="code">(sessionmig verify .*?)</pre>', page, re.S)
    assert found, "no verify command on the cover"
    return html.unescape(found.group(1)).strip()


def run_printed(command: str, cwd: Path, dsn: str) -> subprocess.CompletedProcess:
    argv = shlex.split(command)
    assert argv[0] == "sessionmig"
    return subprocess.run(
        [str(SESSIONMIG), *argv[1:]],
        cwd=cwd,
        env={**os.environ, "SMTEST_DSN": dsn},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_the_printed_verify_command_runs_as_printed(
    tmp_path: Path, small_backup: Path, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SMTEST_DSN", dsn)
    monkeypatch.chdir(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # --env path/to/own.yaml, given relative to the current folder
    (tmp_path / "conf").mkdir()
    own = env_file(tmp_path / "conf", small_backup)
    by_path = orchestrate.run(os.path.relpath(own), ["migrate"], {}, "reports")
    assert by_path.exit_code == 0, by_path.message
    # --env NAME, found in a --project-dir
    project = tmp_path / "project"
    (project / "runbook" / "environments").mkdir(parents=True)
    (project / "notebooks").symlink_to(ROOT / "notebooks")
    shutil.copy(own, project / "runbook" / "environments" / "ci.yaml")
    by_name = orchestrate.run("ci", ["reconcile"], {}, "reports", project_dir=str(project))
    assert by_name.exit_code == 0, by_name.message

    for outcome in (by_path, by_name):
        command = printed_verify(outcome.run_dir)
        assert outcome.verify == command  # what the terminal can print, the same words
        checked = run_printed(command, elsewhere, dsn)
        assert checked.returncode == 0, (command, checked.stdout + checked.stderr)
        assert "files match the manifest" in checked.stdout
        assert f"its digest is the one run {outcome.run_dir.name} recorded" in checked.stdout
    assert "--project-dir" in printed_verify(by_name.run_dir)

    page = (by_path.run_dir / "index.html").read_text()
    digest = json.loads((by_path.run_dir / "manifest.json").read_text())["manifest_sha256"]
    assert render.shown_digest(page) == digest


DYING = """import os, signal
os.kill(os.getpid(), signal.SIGKILL)"""


@pytest.mark.slow
def test_a_dead_kernel_says_what_is_known(
    tmp_path: Path, small_backup: Path, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SMTEST_DSN", dsn)
    project = tmp_path / "project"
    (project / "runbook" / "environments").mkdir(parents=True)
    (project / "notebooks").mkdir()
    for notebook in (ROOT / "notebooks").glob("*.ipynb"):
        shutil.copy(notebook, project / "notebooks")
    nb = nbformat.read(project / "notebooks" / "05_rollback.ipynb", as_version=4)
    first = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(first + 1, new_code_cell(DYING))
    nbformat.write(nb, project / "notebooks" / "05_rollback.ipynb")
    env = env_file(tmp_path, small_backup)
    live = tmp_path / "live.db"
    shutil.copy(small_backup, live)
    outcome = orchestrate.run(
        str(env),
        ["rollback"],
        {
            "live_sqlite_path": str(live),
            "state_dir": str(tmp_path / "state"),
            "migrate_manifest": str(tmp_path),
        },
        tmp_path / "reports",
        project_dir=str(project),
    )
    assert outcome.exit_code == 2 and outcome.verdict == "ERROR", outcome.message
    page = html.unescape((outcome.run_dir / "index.html").read_text())
    step = html.unescape((outcome.run_dir / "05_rollback.html").read_text()).split("<details")[0]
    for text in (page, step):
        assert "every step passed" not in text
        assert "kernel" in text and "died" in text
        assert f"rollback during the overlap writes the live SQLite file {live}" in text
        assert "the target has no audit row of rollback for this run" in text
    assert "NO VERDICT" not in step
    assert headline_of((outcome.run_dir / "index.html").read_text()).startswith("ERROR rollback: ")
    assert outcome.message.startswith("ERROR: rollback: ")


@pytest.mark.parametrize(
    ("step", "rows", "said"),
    [
        (
            "finalize",
            [{"run_id": "r1-finalize", "step": "finalize", "dry_run": False}],
            "finalize had moved the live file and recorded it",
        ),
        (
            "rollback",
            [{"run_id": "r1-rollback-overlap-intent", "step": "rollback", "state": "intent"}],
            "recorded its intent",
        ),
        (
            "catchup",
            [{"run_id": "r1-catchup-3", "step": "catchup", "catchup_pass": "3"}],
            "catch-up pass 3 had committed",
        ),
        ("finalize", [], "the same command finishes it exactly once"),
    ],
)
def test_an_interrupted_writing_step_says_what_its_audit_rows_say(step, rows, said) -> None:
    """An interrupted finalize, rollback or catch-up pass is described by its own audit rows,
    never as "nothing of this run was committed" because no migrate row was found."""
    record = orchestrate.StepRecord(step, f"0x_{step}.ipynb", "interrupted")
    record.interrupted = True
    facts = orchestrate.TargetFacts(
        audit=[{"finished_at": "2026-12-07T09:00:00+00:00", **r} for r in rows]
    )
    found = orchestrate._account_for_interrupt([record], facts, "r1")
    assert said in found["what_happened"]
    assert found["committed"] is bool(rows)
    if rows:
        assert "nothing of this run was committed" not in found["what_happened"]
