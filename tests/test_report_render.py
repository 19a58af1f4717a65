"""A step report opens with its answer: the verdict block is lifted above the evidence, the
parameters cells, code, progress bars and tracebacks go to the collapsed appendix, and tables
read in words (thousands separators, no raw Python values)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pandas as pd
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from sessionmig.reports import report
from sessionmig.reports.render import (
    ANSWER,
    ANSWER_KEY,
    Answer,
    Figure,
    answer_html,
    notebook_to_html,
)


def _executed_failing_notebook() -> nbformat.NotebookNode:
    params = new_code_cell('sqlite_path = ""  # the backup')
    params.metadata["tags"] = ["parameters"]
    injected = new_code_cell('sqlite_path = "/srv/b.db"')
    injected.metadata["tags"] = ["injected-parameters"]
    papermill = new_markdown_cell(
        '<span style="color:red">An Exception was encountered at In [4]</span>'
    )
    papermill.metadata["tags"] = ["papermill-error-cell-tag"]
    work = new_code_cell("result = steps.reconcile_step(settings)")
    work.outputs = [
        new_output("stream", name="stderr", text="\r  0%|   | 0/3\r100%|███| 3/3 [00:00]\n"),
        new_output("display_data", data={"text/html": "<table><tr><td>evidence</td></tr></table>"}),
    ]
    verdict = answer_html(
        Answer("reconcile", "FAIL", "1 missing", "Do not cut over.", (Figure("differences", "1"),))
    )
    end = new_code_cell("report.conclude_reconcile(result)")
    end.outputs = [
        new_output("display_data", data={"text/html": verdict}, metadata={ANSWER_KEY: ANSWER}),
        new_output(
            "error",
            ename="VerdictFailed",
            evalue="reconcile: FAIL",
            traceback=["\x1b[31mTraceback (most recent call last)\x1b[0m", "  report.py line 9"],
        ),
    ]
    nb = new_notebook()
    nb.cells = [
        params,
        injected,
        papermill,
        new_markdown_cell("# 03 · Reconcile\n\nPurpose."),
        work,
        end,
    ]
    return nb


def test_the_answer_comes_first_and_the_rest_goes_to_the_appendix(tmp_path: Path) -> None:
    path = tmp_path / "03_reconcile.ipynb"
    nbformat.write(_executed_failing_notebook(), path)
    page = notebook_to_html(path, tmp_path / "03_reconcile.html").read_text()
    main, _, appendix = page.partition('<details class="appendix"')
    title, _, evidence = main.partition('<main class="evidence">')
    assert "<h1>03 · Reconcile</h1>" in title
    assert title.index("FAIL") < len(title) and "What to do:" in title and "differences" in title
    assert "evidence" in evidence and "Purpose." in evidence
    for hidden in ("Traceback", "An Exception was encountered", "0%|", "sqlite_path", "steps."):
        assert hidden not in main, hidden
    assert "Traceback (most recent call last)" in appendix and "\x1b[" not in appendix
    assert (
        "sqlite_path = &quot;/srv/b.db&quot;" in appendix or 'sqlite_path = "/srv/b.db"' in appendix
    )
    assert "100%|███| 3/3" in appendix and "\r" not in appendix
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert "@media print" in page


def test_a_step_that_stopped_before_its_verdict_still_opens_with_one(tmp_path: Path) -> None:
    nb = _executed_failing_notebook()
    nb.cells[-1].outputs = nb.cells[-1].outputs[1:]  # no verdict block, only the error
    path = tmp_path / "x.ipynb"
    nbformat.write(nb, path)
    main = notebook_to_html(path, tmp_path / "x.html").read_text().split("<details")[0]
    # A VerdictFailed is a refusal the step makes: NO-GO in its own words, no class name.
    assert "NO-GO" in main and "reconcile: FAIL" in main and "report.py line 9" not in main
    assert "VerdictFailed" not in main and "Read the traceback" not in main


def test_tables_read_in_words() -> None:
    frame = pd.DataFrame(
        [("days differing", [], True, 32460.0, 32.46, None), ("x", ["a", "b"], False, 1, 0.5, 3)],
        columns=["signal_name", "days", "agree", "rows", "seconds", "other"],
    )
    markup = report.table_html(frame)
    assert "<th>signal name</th>" in markup
    for raw in ("[]", "True", "False", "None", "32460.0", "32.460000", "nan"):
        assert f">{raw}<" not in markup, raw
    for shown in (">none<", ">yes<", ">no<", ">32,460<", ">32.46<", ">a, b<", ">—<"):
        assert shown in markup, shown
    assert report.table_html(frame.head(0), empty="No rows in the window.") == (
        '<p class="say">No rows in the window.</p>'
    )


def test_number_formatting() -> None:
    assert [report.number(v) for v in (1234567, 2.0, 0.125, 18.24, float("nan"))] == [
        "1,234,567",
        "2",
        "0.12",
        "18.24",
        "—",
    ]
