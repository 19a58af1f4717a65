"""Rendering: secrets scrubbed from every output (tracebacks too); HTML needs no network."""

from __future__ import annotations

from pathlib import Path

import nbformat
from conftest import TEST_PASSWORD, dsn_with_password
from nbformat.v4 import new_code_cell, new_notebook, new_output

from sessionmig.reports.render import notebook_to_html, scrub_notebook
from sessionmig.runbook.orchestrate import secrets_of

PW = TEST_PASSWORD
URL = dsn_with_password("app", PW, "db/x")


def test_a_traceback_carrying_the_password_is_scrubbed(tmp_path: Path, monkeypatch) -> None:
    nb = new_notebook()
    cell = new_code_cell("connect(url)")
    cell.outputs = [
        new_output(
            "error",
            ename="OperationalError",
            evalue=f"bad dsn host=db password={PW}",
            traceback=[
                "Traceback",
                f"  url = '{URL}'",
                f"raw secret {PW} without any pattern",
            ],
        ),
        new_output("stream", name="stderr", text=f"retrying {URL}"),
    ]
    nb.cells = [cell]
    path = tmp_path / "step.ipynb"
    nbformat.write(nb, path)
    monkeypatch.setenv("TARGET", URL)
    secrets = secrets_of({"database_url_env": "TARGET"})
    assert secrets == (PW,)
    scrub_notebook(path, secrets)
    html = notebook_to_html(path, tmp_path / "step.html").read_text()
    for text in (path.read_text(), html):
        assert PW not in text
        assert dsn_with_password("app", "***", "db/x") in text
    assert '<script src="http' not in html


def test_key_value_dsn_passwords_are_found(monkeypatch) -> None:
    monkeypatch.setenv("KV", f"host=db user=app password='{PW}' dbname=x")
    assert secrets_of({"database_url_env": "KV"}) == (PW,)
    assert secrets_of({"database_url_env": None}) == ()


def test_a_password_given_to_libpq_by_environment_is_scrubbed_too(monkeypatch) -> None:
    monkeypatch.setenv("NOPW", "postgresql://app@db/x")
    monkeypatch.setenv("PGPASSWORD", PW)
    assert secrets_of({"database_url_env": "NOPW"}) == (PW,)
