"""The runbook's suggested first step, a dry run, passes when the real run
would: reconcile, with nothing written to compare, is skipped and says so; the run keeps
migrate's verdict; and a skipped reconcile can never stand in for the PASS finalize needs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import ROOT, env_file, rows_of

from sessionmig.engines.appcheck import AppCheck, combined_verdict
from sessionmig.engines.rollback import finalize
from sessionmig.errors import VerdictFailed
from sessionmig.runbook import steps
from sessionmig.runbook.manifest import read_manifest

SKIPPED_REASON = (
    "skipped: dry run, nothing was written (migrate rolled its rows back), so there is nothing "
    "to reconcile; run without dry_run to migrate and reconcile"
)


def test_reconcile_after_a_dry_run_is_skipped_not_failed(small_backup, target, dsn):
    s = target(small_backup, dry_run=True)
    migrated = steps.migrate(s, progress=False)
    assert (migrated.verdict, migrated.outcome.inserted) == ("PASS_WITH_WARNINGS", 393)
    assert rows_of(dsn, "SELECT count(*) FROM sessions") == [(0,)]  # rolled back
    result = steps.reconcile_step(s, progress=False)
    assert (result.verdict, result.reason) == ("SKIPPED", SKIPPED_REASON)
    assert (result.source_rows, result.differences) == (0, [])
    # The app check's view cannot turn a skipped reconcile into a FAIL either.
    app = AppCheck(
        checked=393, expected_active=40, accepted_active=0, wrongly_rejected=40, wrongly_accepted=0
    )
    assert combined_verdict(result.verdict, result.reason, app) == ("SKIPPED", SKIPPED_REASON)
    # A real run still reconciles.
    real = target(small_backup)
    steps.migrate(real, progress=False)
    assert steps.reconcile_step(real, progress=False).verdict == "PASS_WITH_WARNINGS"


@pytest.mark.slow
def test_dry_run_as_the_runbook_suggests_passes(tmp_path, small_backup, dsn) -> None:
    env = env_file(tmp_path, small_backup, database_url_env="SMTEST_TARGET_URL", batch_rows=100)
    result = subprocess.run(
        [sys.executable, "-m", "sessionmig.cli", "run", "--env", str(env), "-p", "dry_run=true"]
        + ["--reports-dir", str(tmp_path / "reports")],
        cwd=ROOT,
        env={**os.environ, "SMTEST_TARGET_URL": dsn},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    run = Path(re.search(r"reports: (.*)/index.html", result.stdout).group(1))  # type: ignore[union-attr]
    manifest = json.loads((run / "manifest.json").read_text())
    assert [(s["name"], s["status"], s["verdict"]) for s in manifest["steps"]] == [
        ("preflight", "passed", "GO"),
        ("inspect", "passed", "PASS_WITH_WARNINGS"),
        ("migrate", "passed", "PASS_WITH_WARNINGS"),
        ("reconcile", "passed", "SKIPPED"),
    ]
    assert manifest["steps"][3]["reason"] == SKIPPED_REASON
    assert manifest["steps"][2]["reason"].endswith("(dry run: rolled back, nothing written)")
    assert (manifest["verdict"], manifest["exit_code"]) == ("PASS_WITH_WARNINGS", 0)
    assert "skipped: dry run" in (run / "03_reconcile.html").read_text()
    assert rows_of(dsn, "SELECT count(*) FROM sessions") == [(0,)]
    # Finalize reads the reconcile verdict from a manifest: a dry run's is not a PASS.
    live = tmp_path / "live.db"
    live.write_bytes(small_backup.read_bytes())
    with pytest.raises(VerdictFailed, match="finalize needs a reconcile PASS"):
        finalize(live, tmp_path / "archive", read_manifest(run), 0, datetime.now(UTC), "r")
    assert live.exists()
