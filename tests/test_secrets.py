"""A password never leaves the process, however malformed its DSN.

Every DSN form libpq accepts, written the way a hurried operator writes it (a bad ``%xx``
escape, an unencoded ``@`` or ``/``, words in ``password=``, the password in a query parameter,
PGPASSWORD, a SQLAlchemy ``postgresql+psycopg://`` URL), against every path a message takes to
an output: the exception texts of psycopg, libpq's parser and SQLAlchemy, the CLI's stderr,
executed notebooks (tracebacks and papermill's metadata), their HTML, index.html and the
manifest.
"""

from __future__ import annotations

import html
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import nbformat
import psycopg
import pytest
from conftest import ROOT, TEST_PASSWORD, env_file
from nbformat.v4 import new_code_cell, new_notebook, new_output
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from sessionmig import cli
from sessionmig.reports.render import notebook_to_html, scrub_notebook
from sessionmig.rules import mask
from sessionmig.runbook import params as P
from sessionstore import redact as redact_module

# Two halves of the per-run password, each long enough to be recognised on its own: a
# malformed DSN makes libpq split a password and quote one half in an error.
HEAD, TAIL = TEST_PASSWORD[:9], TEST_PASSWORD[9:] + "x7Q"
PIECES = (HEAD, TAIL)
CLOSED = "127.0.0.1:1"  # nothing listens: connection attempts fail at once


def url(password: str, rest: str = f"{CLOSED}/db", scheme: str = "postgresql") -> str:
    return f"{scheme}://app" + ":" + password + "@" + rest


# Every way of spelling the password that libpq reads differently from what was meant.
DSN_FORMS: dict[str, str] = {
    "bad_percent_escape": url(f"{HEAD}%zz{TAIL}"),
    "percent_00": url(f"{HEAD}%00{TAIL}"),
    "unencoded_at": url(f"{HEAD}@{TAIL}"),
    "unencoded_slash": url(f"{HEAD}/{TAIL}"),
    "unencoded_colon": url(f"{HEAD}:{TAIL}"),
    "unencoded_question_mark": url(f"{HEAD}?{TAIL}"),
    "unencoded_hash": url(f"{HEAD}#{TAIL}"),
    "well_formed_url": url(f"{HEAD}{TAIL}"),
    "query_bad_escape": f"postgresql://app@{CLOSED}/db?password={HEAD}%zz{TAIL}",
    "query_ampersand": f"postgresql://app@{CLOSED}/db?sslmode=disable&password={HEAD}&{TAIL}",
    "key_value_unquoted_words": f"host=127.0.0.1 port=1 user=app password={HEAD} {TAIL} dbname=x",
    "key_value_quoted_words": f"host=127.0.0.1 port=1 password='{HEAD} {TAIL}' dbname=x",
    "key_value_unterminated_quote": f"host=127.0.0.1 port=1 password='{HEAD} {TAIL} dbname=x",
    "key_value_escaped_quote": f"host=127.0.0.1 port=1 password='{HEAD}\\' {TAIL}' dbname=x",
    "sqlalchemy_url": url(f"{HEAD}{TAIL}", scheme="postgresql+psycopg"),
    "sqlalchemy_url_unencoded_at": url(f"{HEAD}@{TAIL}", scheme="postgresql+psycopg"),
}


def messages_about(dsn: str) -> list[str]:
    """What psycopg, libpq's parser and SQLAlchemy say about ``dsn``, and how code quotes it."""
    attempts: list[Callable[[], object]] = [
        lambda: conninfo_to_dict(dsn),
        lambda: psycopg.connect(dsn, connect_timeout=2).close(),
        lambda: make_url(dsn),
        lambda: str(make_url(dsn)),
        lambda: create_engine(P.sqlalchemy_url(dsn)).connect().close(),
    ]
    out = [dsn, repr(dsn), json.dumps(dsn), html.escape(dsn), f"url = {dsn!r}"]
    for attempt in attempts:
        try:
            out.append(repr(attempt()))
        except Exception as exc:  # the messages under test
            out.append(f"{type(exc).__name__}: {exc}")
            out.append(repr(exc))
    return out


def leaked(text: str) -> list[str]:
    return [piece for piece in PIECES if piece in text]


@pytest.mark.parametrize("form", sorted(DSN_FORMS))
def test_every_dsn_form_is_redacted_from_every_library_message(
    form: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    dsn = DSN_FORMS[form]
    monkeypatch.setenv("SMTEST_SECRET_DSN", dsn)
    messages = messages_about(dsn)
    for message in messages:
        clean = P.redact(message)
        assert not leaked(clean), (form, message, clean)
    for message in messages:
        # Each output format sees the same text escaped its own way.
        assert not leaked(mask.redact_html(html.escape(message)))
        assert not leaked(json.dumps(mask.scrub({"reason": message})))


def test_bad_percent_escape_never_leaks_password_even_unregistered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The safety net, for a DSN no variable names: libpq's parse errors quote raw text."""
    monkeypatch.setattr(redact_module, "_registered", set(), raising=False)
    for dsn in (
        DSN_FORMS["bad_percent_escape"],
        DSN_FORMS["query_ampersand"],
        DSN_FORMS["sqlalchemy_url_unencoded_at"],
    ):
        with pytest.raises(psycopg.ProgrammingError) as err:
            conninfo_to_dict(dsn)
        assert not leaked(P.redact(str(err.value))), str(err.value)


def test_pgpassword_and_dict_reprs_are_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGPASSWORD", f"{HEAD}{TAIL}")
    text = (
        f"env PGPASSWORD={HEAD}{TAIL}; kwargs {{'user': 'app', 'password': '{HEAD}'}}; "
        f"plain {HEAD}{TAIL}"
    )
    assert not leaked(P.redact(text))


def test_a_password_that_contains_a_word_never_garbles_the_pages_that_quote_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # CI ran with a random hex password that happened to contain "bad": every class="bad" of
    # the rendered pages became class="***", and a failed partition lost its red.
    secret = "pw-0bad" + "c0ffee" + "deadbeef"
    monkeypatch.setenv("SMTEST_WORDY_DSN", f"postgresql://app:{secret}@db.example/app")
    page = "<span class=\"bad\">partition</span> <td class='v PASS'>ok</td> \"dead\" 'fee'"
    assert mask.redact_html(page) == page
    # what libpq quotes of it is still masked, whole or split off at a separator
    assert secret not in P.redact(f'failed to resolve host "{secret}"')
    monkeypatch.setenv("SMTEST_WORDY_DSN", f"postgresql://app:{secret}@tail9part@db.example/a")
    said = P.redact('could not translate host name "tail9part@db.example" to address')
    assert "tail9part" not in said and "***" in said


def test_redaction_leaves_ordinary_text_and_figures_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SMTEST_SECRET_DSN", DSN_FORMS["unencoded_at"])
    ordinary = (
        'connection to server at "127.0.0.1", port 1 failed: Connection refused; '
        "<td colspan=\"2\" class='v PASS'>PASS</td> source_timezone='Asia/Seoul'"
    )
    assert P.redact(ordinary) == ordinary
    image = "data:image/png;base64," + ("A" * 40) + TAIL + ("B" * 40)
    page = f'<img src="{image}"> {HEAD}'
    assert mask.redact_html(page) == f'<img src="{image}"> ***'


def test_executed_notebook_is_scrubbed_everywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """papermill keeps a failing cell's traceback in the .ipynb and the exception and the
    parameters in its metadata: every one of them is scrubbed, and so is the HTML."""
    dsn = DSN_FORMS["unencoded_at"]
    monkeypatch.setenv("SMTEST_SECRET_DSN", dsn)
    error = f"failed to resolve host '{TAIL}@127.0.0.1': [Errno -2] Name or service not known"
    nb = new_notebook()
    nb.metadata["papermill"] = {"exception": True, "parameters": {"note": f"dsn {dsn}"}}
    cell = new_code_cell("steps.migrate(settings)")
    cell.metadata["papermill"] = {"exception": True}
    cell.outputs = [
        new_output(
            "error",
            ename="OperationalError",
            evalue=error,
            traceback=["\x1b[0;31mOperationalError\x1b[0m: " + error, f"  dsn = {dsn!r}"],
        ),
        new_output("stream", name="stderr", text=f'invalid percent-encoded token: "{HEAD}%zz"\n'),
        new_output("display_data", data={"text/html": f"<b>{html.escape(error)}</b>"}),
    ]
    nb.cells = [cell]
    clean = tmp_path / "step.ipynb"
    nbformat.write(nb, clean)
    scrub_notebook(clean)
    page = notebook_to_html(clean, tmp_path / "step.html")
    for file in (clean, page):
        assert not leaked(file.read_text(encoding="utf-8")), file.name


def run_cli(*argv: str) -> tuple[int, str]:
    """``sessionmig ARGV`` in this process: (exit code, stdout + stderr)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue() + err.getvalue()


@pytest.mark.parametrize(
    "form", ["bad_percent_escape", "unencoded_at", "key_value_unquoted_words", "sqlalchemy_url"]
)
def test_cli_verbs_say_one_line_without_the_password(
    form: str, tmp_path: Path, small_backup: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SMTEST_DSN", DSN_FORMS[form])
    env = str(env_file(tmp_path, small_backup))
    for argv in (
        ("migrate", "--env", env, "-p", "max_retries=0"),
        ("reconcile", "--env", env),
        ("query", "active_at", "--env", env),
    ):
        code, said = run_cli(*argv)
        assert code == 2, (argv, said)
        assert not leaked(said), (argv, said)
        assert "Traceback" not in said and len(said.strip().splitlines()) == 1, said
        assert said.startswith(f"sessionmig {argv[0]}: "), said


def test_uncaught_error_in_a_subprocess_is_one_redacted_line(
    tmp_path: Path, small_backup: Path
) -> None:
    """The real process: stderr as the operator's terminal gets it."""
    env = env_file(tmp_path, small_backup)
    done = subprocess.run(
        [sys.executable, "-m", "sessionmig.cli", "reconcile", "--env", str(env)],
        cwd=ROOT,
        env={**_environ(), "SMTEST_DSN": DSN_FORMS["bad_percent_escape"]},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert not leaked(done.stdout + done.stderr), done.stderr
    assert "percent-encode the password" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def _environ() -> dict[str, str]:
    import os

    return dict(os.environ)


@pytest.mark.slow
@pytest.mark.parametrize("form", ["bad_percent_escape", "unencoded_at", "key_value_unquoted_words"])
def test_malformed_dsn_never_reaches_the_run_folder(
    form: str, tmp_path: Path, small_backup: Path
) -> None:
    env = env_file(tmp_path, small_backup, database_url_env="SMTEST_TARGET_URL")
    reports = tmp_path / "reports"
    done = subprocess.run(
        [sys.executable, "-m", "sessionmig.cli", "run", "--env", str(env)]
        + ["--steps", "preflight,migrate", "-p", "max_retries=0", "--reports-dir", str(reports)],
        cwd=ROOT,
        env={**_environ(), "SMTEST_TARGET_URL": DSN_FORMS[form]},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 2, done.stderr
    assert not leaked(done.stdout + done.stderr), done.stderr
    files = [f for f in reports.rglob("*") if f.is_file()]
    assert {f.name for f in files} >= {"manifest.json", "index.html", "00_preflight.ipynb"}
    for file in files:
        text = file.read_text(encoding="utf-8", errors="replace")
        assert not leaked(text), (file.name, [m.start() for m in re.finditer(HEAD, text)])
