"""Rendering: secrets scrubbed from every output (tracebacks too); HTML needs no network."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_notebook, new_output

from sessionmig.orchestrate import secrets_of
from sessionmig.render import notebook_to_html, scrub_notebook


def test_a_traceback_carrying_the_password_is_scrubbed(tmp_path: Path, monkeypatch) -> None:
    nb = new_notebook()
    cell = new_code_cell("connect(url)")
    cell.outputs = [
        new_output(
            "error",
            ename="OperationalError",
            evalue="bad dsn host=db password=pw-1234",
            traceback=[
                "Traceback",
                "  url = 'postgresql://app:pw-1234@db/x'",
                "raw secret pw-1234 without any pattern",
            ],
        ),
        new_output("stream", name="stderr", text="retrying postgresql://app:pw-1234@db/x"),
    ]
    nb.cells = [cell]
    path = tmp_path / "step.ipynb"
    nbformat.write(nb, path)
    monkeypatch.setenv("TARGET", "postgresql://app:pw-1234@db/x")
    secrets = secrets_of({"database_url_env": "TARGET"})
    assert secrets == ("pw-1234",)
    scrub_notebook(path, secrets)
    html = notebook_to_html(path, tmp_path / "step.html").read_text()
    for text in (path.read_text(), html):
        assert "pw-1234" not in text
        assert "postgresql://app:***@db/x" in text
    assert '<script src="http' not in html


def test_key_value_dsn_passwords_are_found(monkeypatch) -> None:
    monkeypatch.setenv("KV", "host=db user=app password='s3cret-kv' dbname=x")
    assert secrets_of({"database_url_env": "KV"}) == ("s3cret-kv",)
    assert secrets_of({"database_url_env": None}) == ()
