"""What the operator's terminal (or a CI log) gets from ``sessionmig run``, ``migrate`` and
``reconcile``: each step named with its progress, a summary with the sha256, plain text when not
a terminal or under ``NO_COLOR``, one JSON object under ``--format json``; and every action,
``migrate`` and ``reconcile`` alone included, leaves a sealed report folder."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import psycopg
import pytest
from conftest import env_file, sessionmig_process

from sessionmig.runbook.manifest import verify

pytestmark = pytest.mark.slow


def sessionmig(*args: str, dsn: str, **extra: str) -> subprocess.CompletedProcess:
    return sessionmig_process(*args, extra_env={"SMTEST_DSN": dsn, **extra})


def plain(result: subprocess.CompletedProcess) -> None:
    """No escape code and no carriage-return redraw anywhere in what it printed."""
    said = result.stdout + result.stderr
    assert "\x1b" not in said and "\r" not in said, said


def folder_of(result: subprocess.CompletedProcess, stream: str = "stdout") -> Path:
    match = re.search(r"reports: (.*)/index.html", getattr(result, stream))
    assert match, result.stdout + result.stderr
    return Path(match.group(1))


def test_run_under_no_color_names_each_step_and_ends_with_the_sha256(
    tmp_path: Path, small_backup: Path, dsn: str
) -> None:
    env = env_file(tmp_path, small_backup)
    result = sessionmig(
        "run", "--env", str(env), "--reports-dir", str(tmp_path / "r"), dsn=dsn, NO_COLOR="1"
    )
    assert result.returncode == 0, result.stderr
    plain(result)
    for step in ("preflight", "inspect", "migrate", "reconcile"):
        assert f"sessionmig run: {step}: running 0" in result.stderr
        assert re.search(rf"sessionmig run: {step}: (GO|PASS\w*) in \d+\.\d s", result.stderr)
    # The progress of each step that reads rows, as plain lines, with its phases.
    assert re.search(r"^  inspect: .*rows", result.stderr, re.M), result.stderr
    assert re.search(r"^  migrate: committed: 100%", result.stderr, re.M), result.stderr
    assert re.search(r"^  reconcile: .*rows", result.stderr, re.M), result.stderr
    sealed = json.loads((folder_of(result) / "manifest.json").read_text())
    sha = sealed["source"]["sha256_before"]
    tail = result.stdout.splitlines()[-6:]
    assert tail == [
        "PASS_WITH_WARNINGS: every step passed",
        tail[1],
        # The README's words: read / landed / rejected, and whether the partition holds.
        "  rows read 400, landed 393 (393 new, 0 already there), rejected 7",
        "  partition (source rows = migrated + rejected): ✔ 400 = 393 + 7 — holds: every source "
        "row is accounted for once",
        tail[4],
        f"  source sha256 {sha}",
    ]
    assert tail[4].startswith("  verify: ") and "--env" in tail[4]
    assert re.fullmatch(
        r"  preflight GO [\d.]+ s · inspect PASS_WITH_WARNINGS [\d.]+ s · migrate "
        r"PASS_WITH_WARNINGS [\d.]+ s · reconcile PASS_WITH_WARNINGS [\d.]+ s",
        tail[1],
    )


def test_migrate_and_reconcile_leave_sealed_folders_and_json(
    tmp_path: Path, small_backup: Path, dsn: str
) -> None:
    env = str(env_file(tmp_path, small_backup))
    reports = str(tmp_path / "reports")
    migrated = sessionmig("migrate", "--env", env, "--reports-dir", reports, dsn=dsn)
    assert migrated.returncode == 0, migrated.stderr
    plain(migrated)
    assert "sessionmig migrate: migrate: running 02_migrate.ipynb" in migrated.stderr
    assert "sessionmig migrate: migrate: PASS_WITH_WARNINGS in " in migrated.stderr
    assert re.search(r"^  migrate: committed: 100%", migrated.stderr, re.M)
    run = folder_of(migrated)
    assert {p.name for p in run.iterdir()} == {
        "02_migrate.html",
        "02_migrate.ipynb",
        "index.html",
        "manifest.json",
    }
    assert verify(run).ok
    sealed = json.loads((run / "manifest.json").read_text())
    assert [(s["name"], s["verdict"]) for s in sealed["steps"]] == [
        ("migrate", "PASS_WITH_WARNINGS")
    ]

    checked = sessionmig(
        "reconcile", "--env", env, "--reports-dir", reports, "--format", "json", dsn=dsn
    )
    assert checked.returncode == 0, checked.stderr
    plain(checked)
    summary = json.loads(checked.stdout)  # stdout is the JSON alone; the text went to stderr
    folder = Path(summary["run_folder"])
    assert folder == folder_of(checked, "stderr") and folder != run
    assert {p.name for p in folder.iterdir()} >= {"03_reconcile.html", "index.html"}
    assert verify(folder).ok
    assert summary["verdict"] == "PASS_WITH_WARNINGS" and summary["exit_code"] == 0
    assert summary["counts"] == {"read": 400, "landed": 393, "rejected": 7}
    assert summary["source_sha256"] == sealed["source"]["sha256_before"]
    assert [(s["name"], s["verdict"]) for s in summary["steps"]] == [
        ("reconcile", "PASS_WITH_WARNINGS")
    ]
    assert (
        "  partition (source rows = migrated + rejected): ✔ 400 = 393 + 7 — holds: every "
        "source row is accounted for once" in checked.stderr
    )

    # A difference: reconcile exits 1, and says FAIL in its JSON and its folder.
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "DELETE FROM sessions WHERE session_id = (SELECT min(session_id) FROM sessions)"
        )
    failed = sessionmig(
        "reconcile", "--env", env, "--reports-dir", reports, "--format", "json", dsn=dsn
    )
    assert failed.returncode == 1, failed.stderr
    summary = json.loads(failed.stdout)
    assert (summary["verdict"], summary["exit_code"]) == ("FAIL", 1)
    assert summary["steps"][0]["verdict"] == "FAIL"
    assert json.loads((Path(summary["run_folder"]) / "manifest.json").read_text())["verdict"] == (
        "FAIL"
    )

    # verify, for the pipeline that checks the evidence.
    verified = sessionmig("verify", str(run), "--format", "json", dsn=dsn)
    assert verified.returncode == 0, verified.stderr
    report = json.loads(verified.stdout)
    assert report["verdict"] == "PASS" and report["problems"] == []
    assert report["files_checked"] == 3 and report["run_verdict"] == "PASS_WITH_WARNINGS"
    assert report["source_sha256"] == sealed["source"]["sha256_before"]
    (run / "02_migrate.html").write_text("edited")
    tampered = json.loads(sessionmig("verify", str(run), "--format", "json", dsn=dsn).stdout)
    assert tampered["verdict"] == "FAIL" and tampered["exit_code"] == 1
    assert any("02_migrate.html" in p for p in tampered["problems"])


def test_run_json_and_an_error_in_json(tmp_path: Path, small_backup: Path, dsn: str) -> None:
    env = str(env_file(tmp_path, small_backup))
    reports = str(tmp_path / "reports")
    done = sessionmig(
        "run",
        "--env",
        env,
        "--steps",
        "inspect,migrate",
        "-p",
        "dry_run=true",
        "--reports-dir",
        reports,
        "--format",
        "json",
        dsn=dsn,
    )
    assert done.returncode == 0, done.stderr
    plain(done)
    summary = json.loads(done.stdout)
    assert summary["counts"] == {"read": 400, "landed": 393, "rejected": 7}
    assert [s["name"] for s in summary["steps"]] == ["inspect", "migrate"]
    assert len(summary["source_sha256"]) == 64
    assert "sessionmig run: inspect: running" in done.stderr
    # Could not be carried out: still one JSON object on stdout, the reason on stderr.
    bad = sessionmig(
        "run",
        "--env",
        env,
        "-p",
        "batchrows=1",
        "--reports-dir",
        reports,
        "--format",
        "json",
        dsn=dsn,
    )
    assert bad.returncode == 2
    answer = json.loads(bad.stdout)
    assert answer["verdict"] == "ERROR" and answer["exit_code"] == 2
    assert "batchrows" in answer["message"] and "batchrows" in bad.stderr
