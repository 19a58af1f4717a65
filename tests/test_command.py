"""``sessionmig.command``: each verb called as a library user calls it — plain values in, a
result object out, exit codes as the command line returns them — and the command line as
parsing plus one dispatch table over those same functions."""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import env_file

from sessionmig import cli, command
from sessionmig.errors import EXIT_ERROR, EXIT_FAIL, EXIT_OK, ParameterError
from sessionmig.postgres import schema
from sessionmig.rules.verdict import Verdict
from sessionmig.runbook.manifest import write_index, write_manifest
from sessionmig.sqlite import sample

# --- the command line is a dispatch table over the commands -------------------------------------


def test_every_verb_is_dispatched_to_its_command_whose_docstring_is_its_help() -> None:
    action = next(a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert list(action.choices) == list(cli.VERBS)
    for verb, (function, handler) in cli.VERBS.items():
        assert function.__module__ == "sessionmig.command" and function.__name__ == verb
        first = " ".join(function.__doc__.split("\n\n")[0].split())
        assert " ".join(action.choices[verb].description.split()) == first, verb
        assert handler.__module__ == "sessionmig.cli"


def test_commands_take_plain_values_never_a_namespace() -> None:
    for function, _ in cli.VERBS.values():
        for parameter in inspect.signature(function).parameters.values():
            assert "Namespace" not in str(parameter.annotation), (function, parameter)
            assert parameter.name != "args", function


@pytest.mark.parametrize("argv", [["--help"], ["db", "--help"], ["db", "history"]])
def test_help_and_db_load_no_pandas_or_papermill(argv: list[str]) -> None:
    """Start-up speed: the command line imports the heavy modules only for a verb that runs
    steps or queries."""
    probe = (
        "import sys\nfrom sessionmig.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "heavy = ('pandas', 'papermill', 'matplotlib', 'nbconvert', 'jupyter_client')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]", done.stdout[-500:]


# --- sample -------------------------------------------------------------------------------------


def test_sample_returns_what_it_wrote_and_never_overwrites_a_real_store(tmp_path: Path) -> None:
    out = tmp_path / "s.db"
    result = command.sample(out, 25, seed=3)
    planted = sample.ODDITIES
    assert result.path == str(out) and result.rows == 25 and result.exit_code == EXIT_OK
    assert result.oddities == len(planted)
    assert result.cannot_land == sum(not o.lands for o in planted) > 0
    assert result.as_of == sample.DEFAULT_AS_OF and sample.is_sample(out)
    with pytest.raises(ParameterError, match="never overwrites a file"):
        command.sample(out, 5)
    again = command.sample(out, 7, oddities=0, replace=True)
    assert (again.rows, again.oddities, again.cannot_land) == (7, 0, 0)
    real = tmp_path / "live.db"
    real.write_bytes(b"SQLite format 3\x00" + bytes(100))
    with pytest.raises(ParameterError, match="is not a sample sessionmig wrote"):
        command.sample(real, 5, replace=True)
    assert real.read_bytes().startswith(b"SQLite format 3\x00")  # untouched


# --- snapshot -----------------------------------------------------------------------------------


def test_snapshot_result_names_the_copy_and_its_sha256(tmp_path: Path) -> None:
    live = tmp_path / "live.db"
    sample.generate(live, rows=40, oddities=0)
    result = command.snapshot(live, tmp_path / "snap.db")
    copied = Path(result.path)
    assert copied == tmp_path / "snap.db"
    assert result.sha256 == hashlib.sha256(copied.read_bytes()).hexdigest()
    assert result.sessions == 40


# --- query ----------------------------------------------------------------------------------------


def test_list_queries_names_each_query_first() -> None:
    lines = command.list_queries()
    assert lines and all(" — " in line for line in lines)
    assert any(line.startswith("anomalies — ") for line in lines)


def test_query_on_the_backup_returns_its_rows_and_says_when_there_are_more(
    tmp_path: Path, small_backup: Path
) -> None:
    env = str(env_file(tmp_path, small_backup))
    by_day = {"unit": "day"}
    whole = command.query("sessions_started", env, by_day, source="sqlite", limit=1000)
    assert len(whole.frame) > 1 and not whole.more and whole.exit_code == EXIT_OK
    first = command.query("sessions_started", env, by_day, source="sqlite", limit=1)
    assert len(first.frame) == 1 and first.more
    # JSON is one object a row: the first row is the same row either way.
    rows = whole.text("json").splitlines()
    assert len(rows) == len(whole.frame) and first.text("json") == rows[0]
    assert json.loads(rows[0])["unit"] == "day"


def test_query_refuses_before_reading_anything(tmp_path: Path) -> None:
    env = str(env_file(tmp_path, tmp_path / "absent.db"))
    with pytest.raises(ParameterError, match="give a query name and --env"):
        command.query_kinds(None, env)
    with pytest.raises(ParameterError, match="no query named 'nosuch'"):
        command.query("nosuch", env)
    with pytest.raises(ParameterError, match="no such file"):  # the backup is read: it must exist
        command.query("anomalies", env, source="sqlite")


# --- db -----------------------------------------------------------------------------------------


def test_db_results_carry_the_revision(
    tmp_path: Path, small_backup: Path, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SMTEST_DSN", dsn)
    env = str(env_file(tmp_path, small_backup, target_schema="app"))
    history = command.db("history")
    assert list(history.history) == schema.db_history() and history.exit_code == EXIT_OK
    head = history.history[-1].split(" ")[0]
    assert command.db("current", env) == command.DbResult("current", "app", None)
    assert command.db("upgrade", env).revision == head
    assert command.db("current", env) == command.DbResult("current", "app", head)
    with pytest.raises(ParameterError, match="db upgrade needs --env ENV"):
        command.db("upgrade")


# --- verify and sign ------------------------------------------------------------------------------


def _sealed(tmp_path: Path) -> Path:
    """A sealed run folder as the orchestrator leaves one (one step, its index, manifest)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "01_inspect.html").write_text("<html>inspect</html>")
    data = {
        "run_id": "r1",
        "environment": "local",
        "verdict": "PASS",
        "started_at": "t",
        "source": {"sha256_before": "ab" * 32},
        "steps": [
            {
                "name": "inspect",
                "status": "passed",
                "verdict": "PASS",
                "reason": "ok",
                "duration_s": 1.0,
                "outputs": ["01_inspect.html"],
            }
        ],
    }
    write_index(run, data)
    write_manifest(run, data)
    return run


def test_verify_result_passes_a_sealed_folder_and_names_an_edit(tmp_path: Path) -> None:
    run = _sealed(tmp_path)
    clean = command.verify(run)
    # the step's report and index.html
    assert clean.problems == () and clean.exit_code == EXIT_OK and clean.checked == 2
    assert "without --env ENV" in clean.notes
    report = clean.json()
    assert report["verdict"] == Verdict.PASS and report["run_verdict"] == "PASS"
    assert report["source_sha256"] == "ab" * 32
    assert report["steps"] == [{"name": "inspect", "verdict": "PASS"}]
    (run / "01_inspect.html").write_text("<html>edited</html>")
    edited = command.verify(run)
    assert edited.exit_code == EXIT_FAIL
    assert any("01_inspect.html" in p for p in edited.problems)
    assert edited.json()["verdict"] == Verdict.FAIL and edited.json()["exit_code"] == EXIT_FAIL
    with pytest.raises(ParameterError, match="no such folder"):
        command.verify(tmp_path / "absent")


def test_sign_refuses_a_folder_that_does_not_verify(tmp_path: Path) -> None:
    run = _sealed(tmp_path)
    (run / "01_inspect.html").write_text("<html>edited</html>")
    refused = command.sign(run, tmp_path / "no-key")
    assert refused.signature is None and refused.exit_code == EXIT_FAIL
    assert any("01_inspect.html" in p for p in refused.problems)
    assert not (run / "manifest.json.sig").exists()


# --- run, migrate, reconcile: the same functions the command line calls -------------------------


@pytest.mark.slow
def test_migrate_then_reconcile_as_a_library_user_calls_them(
    tmp_path: Path, clean_backup: Path, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SMTEST_DSN", dsn)
    monkeypatch.chdir(tmp_path)
    env = str(env_file(tmp_path, clean_backup))
    reports = tmp_path / "reports"
    migrated = command.migrate(env, {"batch_rows": 100}, reports)
    assert migrated.exit_code == EXIT_OK, migrated.message
    assert [r.name for r in migrated.steps] == ["migrate"]
    assert command.counts_of(migrated.steps) == {"read": 300, "landed": 300, "rejected": 0}
    reconciled = command.reconcile(env, {}, reports)
    assert reconciled.exit_code == EXIT_OK and reconciled.verdict == Verdict.PASS
    summary = command.outcome_json(reconciled)
    assert summary["counts"] == {"read": 300, "landed": 300, "rejected": 0}
    assert summary["steps"][0]["name"] == "reconcile" and summary["exit_code"] == EXIT_OK
    checked = command.verify(reconciled.run_dir, env)
    assert checked.problems == () and checked.exit_code == EXIT_OK
    with pytest.raises(ParameterError, match="not a parameter of the selected steps") as refused:
        command.migrate(env, {"no_such_parameter": 1}, reports)
    assert refused.value.exit_code == EXIT_ERROR  # what the command line exits with
