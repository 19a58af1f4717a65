"""End to end: ``sessionmig run`` executes every notebook with papermill on a real server."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from conftest import ROOT, TEST_PASSWORD, dsn_with_password, env_file, rows_of, sessionmig_process

from sessionmig.postgres import embedded
from sessionmig.runbook.manifest import verify
from sessionmig.sqlite import sample

pytestmark = pytest.mark.slow
PASSWORD = TEST_PASSWORD


def with_password(url: str) -> str:
    """The same DSN carrying a password (trust auth ignores it; reports must never show it)."""
    parts = urlsplit(url)
    user = parts.username or "postgres"
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{user}" + ":" + PASSWORD + "@" + host))


def write_env(tmp_path: Path, backup: Path, **extra) -> Path:
    """The test environment: the target is whatever ``sessionmig(..., dsn=)`` exports."""
    return env_file(
        tmp_path, backup, **{"database_url_env": "SMTEST_TARGET_URL", "batch_rows": 100, **extra}
    )


def sessionmig(*args: str, dsn: str | None = None) -> subprocess.CompletedProcess:
    return sessionmig_process(*args, extra_env={"SMTEST_TARGET_URL": dsn or ""})


def run_dir_of(result: subprocess.CompletedProcess) -> Path:
    match = re.search(r"reports: (.*)/index.html", result.stdout)
    assert match, result.stdout + result.stderr
    return Path(match.group(1))


def test_full_run_migrates_reports_and_keeps_secrets_out(tmp_path, small_backup, dsn) -> None:
    env = write_env(tmp_path, small_backup)
    before = small_backup.read_bytes()
    result = sessionmig(
        "run", "--env", str(env), "--reports-dir", str(tmp_path / "reports"), dsn=with_password(dsn)
    )
    assert result.returncode == 0, result.stderr
    run = run_dir_of(result)
    manifest = json.loads((run / "manifest.json").read_text())
    assert [(s["name"], s["status"], s["verdict"]) for s in manifest["steps"]] == [
        ("preflight", "passed", "GO"),
        ("inspect", "passed", "PASS_WITH_WARNINGS"),
        ("migrate", "passed", "PASS_WITH_WARNINGS"),
        ("reconcile", "passed", "PASS_WITH_WARNINGS"),
    ]
    assert manifest["verdict"] == "PASS_WITH_WARNINGS" and manifest["exit_code"] == 0
    assert manifest["source"]["sha256_before"] == manifest["source"]["sha256_after"]
    assert manifest["parameters"]["database_url_env"] == "SMTEST_TARGET_URL"
    assert manifest["git"]["commit"] and len(manifest["id_salt_sha256"]) == 64
    assert small_backup.read_bytes() == before
    # The terminal: each step named as it starts and ends; a summary a ticket can take, with
    # the sha256 the next runbook command needs; plain text (not a terminal here).
    for step in ("preflight", "inspect", "migrate", "reconcile"):
        assert f"sessionmig run: {step}: running" in result.stderr
    assert "sessionmig run: migrate: PASS_WITH_WARNINGS in " in result.stderr
    assert "(rows read 400, inserted 393, unchanged 0, rejected 7)" in result.stderr
    assert "  rows read 400, landed 393 (393 new, 0 already there), rejected 7" in result.stdout
    assert f"  source sha256 {manifest['source']['sha256_before']}" in result.stdout
    assert "\x1b[" not in result.stdout + result.stderr
    assert "\r" not in result.stdout + result.stderr  # no redraws: progress as plain lines
    assert re.search(r"^  migrate: committed: 100%", result.stderr, re.M), result.stderr
    # The rows in PostgreSQL: every landable sample row, the 7 oddities as rejects.
    assert rows_of(dsn, "SELECT count(*) FROM sessions") == [(393,)]
    assert rows_of(
        dsn, "SELECT count(*), count(DISTINCT reason) FROM session_migration_rejects"
    ) == [(7, 7)]
    assert rows_of(dsn, "SELECT run_id, inserted, rejected FROM session_migration_runs") == [
        (manifest["run_id"], 393, 7)
    ]
    # Reports: every step rendered, sealed, offline, free of the password and of session ids.
    names = {p.name for p in run.iterdir()}
    for stem in ("00_preflight", "01_inspect", "02_migrate", "03_reconcile"):
        assert {f"{stem}.ipynb", f"{stem}.html"} <= names
    assert verify(run).ok
    for file in run.iterdir():
        text = file.read_text(encoding="utf-8", errors="replace")
        assert PASSWORD not in text, file.name
        assert not re.search(r"session-[0-9a-f]{8}-", text), file.name
        assert not re.search(r'(src|href)="https?://', text), file.name
    assert "<img" in (run / "01_inspect.html").read_text()  # the plots are embedded
    # A reviewer re-verifies the folder; one edited byte is caught and named.
    assert sessionmig("verify", str(run)).returncode == 0
    page = run / "02_migrate.html"
    data = bytearray(page.read_bytes())
    data[100] ^= 1
    page.write_bytes(bytes(data))
    tampered = sessionmig("verify", str(run))
    assert tampered.returncode == 1
    assert "02_migrate.html: sha256 differs from the manifest" in tampered.stdout


def test_password_stays_out_of_reports_when_a_step_fails(tmp_path, small_backup) -> None:
    env = write_env(tmp_path, small_backup)
    reports = tmp_path / "reports"
    result = sessionmig(
        "run",
        "--env",
        str(env),
        "--steps",
        "migrate",
        "-p",
        "max_retries=0",
        "--reports-dir",
        str(reports),
        dsn=dsn_with_password("app", PASSWORD, "127.0.0.1:1/sessions"),
    )
    assert result.returncode == 2
    assert "gave up after 1 attempt" in result.stderr
    assert PASSWORD not in result.stdout + result.stderr
    files = [f for f in reports.rglob("*") if f.is_file()]
    assert len(files) >= 4  # notebook, HTML, index, manifest
    html = next(f for f in files if f.name == "02_migrate.html").read_text()
    assert "could not be carried out" in html and "Traceback" in html
    for file in files:
        assert PASSWORD not in file.read_text(encoding="utf-8", errors="replace"), file.name


def test_unknown_parameter_is_refused_before_anything_runs(tmp_path, small_backup) -> None:
    env = write_env(tmp_path, small_backup)
    result = sessionmig(
        "run",
        "--env",
        str(env),
        "--steps",
        "inspect",
        "-p",
        "batchrows=10",
        "--reports-dir",
        str(tmp_path / "reports"),
    )
    assert result.returncode == 2
    assert "batchrows" in result.stderr and "not a parameter of the selected steps" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "reports").exists()


def test_bad_parameter_value_names_the_parameter(tmp_path, small_backup) -> None:
    env = write_env(tmp_path, small_backup, source_timezone="Seoul")
    result = sessionmig("run", "--env", str(env), "--reports-dir", str(tmp_path / "r"))
    assert result.returncode == 2
    assert "source_timezone='Seoul' is not an IANA zone" in result.stderr


def test_corrupt_source_stops_at_inspect_with_a_message(tmp_path, dsn) -> None:
    bad = tmp_path / "sessions.db"
    bad.write_bytes(b"SQLite format 3\x00" + b"\x00" * 2000)
    env = write_env(tmp_path, bad)
    result = sessionmig(
        "run",
        "--env",
        str(env),
        "--steps",
        "inspect",
        "--reports-dir",
        str(tmp_path / "reports"),
        dsn=dsn,
    )
    assert result.returncode == 2
    assert "inspect" in result.stderr
    html = (run_dir_of(result) / "01_inspect.html").read_text()
    assert "could not be carried out" in html or "ERROR" in html


def test_reconcile_fail_exits_1(tmp_path, small_backup, dsn) -> None:
    env = write_env(tmp_path, small_backup)
    reports = str(tmp_path / "reports")
    assert (
        sessionmig(
            "run", "--env", str(env), "--steps", "migrate", "--reports-dir", reports, dsn=dsn
        ).returncode
        == 0
    )
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "DELETE FROM sessions WHERE session_id = (SELECT min(session_id) FROM sessions)"
        )
    result = sessionmig(
        "run", "--env", str(env), "--steps", "reconcile", "--reports-dir", reports, dsn=dsn
    )
    assert result.returncode == 1
    assert "FAIL" in result.stderr and "1 missing" in result.stderr
    manifest = json.loads((run_dir_of(result) / "manifest.json").read_text())
    assert manifest["verdict"] == "FAIL" and manifest["steps"][0]["verdict"] == "FAIL"


def test_embedded_demo_path_with_fresh_database(tmp_path, backend) -> None:
    if backend != "embedded":
        pytest.skip("the null database_url_env path is the embedded server's")
    backup = tmp_path / "demo.db"
    sample.generate(backup, rows=300, seed=9)
    env = write_env(tmp_path, backup, database_url_env=None)
    reports = str(tmp_path / "reports")
    command = (
        "run",
        "--env",
        str(env),
        "--fresh",
        "--steps",
        "migrate,reconcile",
        "--reports-dir",
        reports,
    )
    first, second = sessionmig(*command), sessionmig(*command)  # the demo, twice
    assert first.returncode == second.returncode == 0, second.stderr
    assert run_dir_of(first) != run_dir_of(second)
    url = embedded.with_database(embedded.start().get_uri(), embedded.DEFAULT_DATABASE)
    assert rows_of(url, "SELECT count(*) FROM sessions") == [(293,)]
    assert rows_of(url, "SELECT count(*) FROM session_migration_runs") == [(1,)]


def test_a_notebook_runs_alone_with_papermill(tmp_path, small_backup) -> None:
    """The README's command: papermill, an environment file, one -p."""
    out = tmp_path / "inspect.ipynb"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "papermill",
            "notebooks/01_inspect.ipynb",
            str(out),
            "-f",
            "runbook/environments/local.yaml",
            "-p",
            "sqlite_path",
            str(small_backup),
            "--no-progress-bar",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # The environment file carries only what every notebook declares: papermill has nothing
    # to warn about (it would name each parameter the notebook does not declare).
    assert "Passed unknown parameter" not in result.stderr
    text = out.read_text()
    assert "PASS_WITH_WARNINGS" in text and "invalid_json" in text


def test_inspect_says_when_a_wal_file_holds_rows(tmp_path) -> None:
    import sqlite3

    from sessionmig.rules.transform import Rules
    from sessionmig.runbook.params import zone
    from sessionmig.sqlite.inspection import inspect_backup

    live = tmp_path / "live.db"
    sample.generate(live, rows=30, oddities=0)
    writer = sqlite3.connect(live)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("PRAGMA wal_autocheckpoint=0")
    writer.execute("DELETE FROM sessions WHERE rowid = 1")
    writer.commit()
    backup = tmp_path / "backup.db"
    backup.write_bytes(live.read_bytes())
    Path(str(backup) + "-wal").write_bytes(Path(str(live) + "-wal").read_bytes())
    writer.close()
    from datetime import UTC, datetime

    result = inspect_backup(
        backup, Rules(zone("Asia/Seoul")), datetime(2026, 1, 15, tzinfo=UTC), "Asia/Seoul"
    )
    side = [f for f in result.findings if f.code == "side_files"]
    assert side and "backup.db-wal" in side[0].message
    assert result.census.rows == 29  # the WAL's committed delete is included
