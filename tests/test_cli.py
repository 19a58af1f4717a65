"""``sessionmig`` as an operator meets it: ``--help`` written for operators, ``--version``, the
``db`` verbs, and the analysts' ``query`` edges (an empty JSON result, PostgreSQL without the
backup file, the backup's analysis copy reused)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
from importlib.metadata import version
from pathlib import Path

import pytest
from conftest import env_file, sessionmig_process

from sessionmig import cli
from sessionmig.engines import queries
from sessionmig.errors import EXIT_ERROR, EXIT_FAIL, EXIT_OK
from sessionmig.postgres import schema
from sessionmig.runbook import orchestrate

RUNBOOK_ORDER = (
    "run",
    "migrate",
    "reconcile",
    "query",
    "snapshot",
    "catchup",
    "verify",
    "sign",
    "db",
    "sample",
)


def run_cli(*argv: str) -> tuple[int, str, str]:
    """``sessionmig ARGV`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(argv))
        except SystemExit as exc:  # --help and --version end through argparse
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


def verbs() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


# --- --help ------------------------------------------------------------------------------------


def test_top_help_says_what_it_is_lists_the_verbs_in_runbook_order_and_exit_codes() -> None:
    code, out, _ = run_cli("--help")
    assert code == 0
    assert out.splitlines()[2].startswith("sessionmig moves the web app's sessions")
    listed = [line.split()[0] for line in out.splitlines() if re.match(r"^ {4}\S", line)]
    assert listed == list(RUNBOOK_ORDER)
    assert list(verbs()) == list(RUNBOOK_ORDER)
    assert f"  {EXIT_OK}  passed" in out
    assert f"  {EXIT_FAIL}  a verdict is FAIL:" in out
    assert f"  {EXIT_ERROR}  could not be carried out" in out
    assert "examples:\n  sessionmig run --env" in out


@pytest.mark.parametrize("verb", RUNBOOK_ORDER)
def test_every_verb_explains_itself_its_options_exit_codes_and_two_examples(verb: str) -> None:
    parser = verbs()[verb]
    for action in parser._actions:
        assert action.help and action.help != argparse.SUPPRESS, (verb, action.dest)
    code, out, _ = run_cli(verb, "--help")
    assert code == 0
    said = " ".join(out.split("\n\n")[1].split())  # the paragraph after the usage
    assert said == " ".join(parser.description.split()) and len(said) > 40
    assert all(len(line) <= 100 for line in out.splitlines()), verb
    examples = out.split("examples:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert len(examples) == 2 and all(e.startswith(f"  sessionmig {verb}") for e in examples)
    assert "exit codes:" in out and f"  {EXIT_ERROR}  could not be carried out" in out
    if verb in ("run", "migrate", "reconcile", "verify"):
        assert f"  {EXIT_FAIL}  a verdict is FAIL" in out
        assert "--format {text,json}" in out


def test_run_steps_help_lists_every_step_of_the_orchestrator() -> None:
    _, out, _ = run_cli("run", "--help")
    steps_help = " ".join(
        out.split("\n  --steps STEP,STEP", 1)[1].split("\n  --reports-dir")[0].split()
    )
    for name in orchestrate.STEPS:
        assert name in steps_help, name
    for name in orchestrate.DEFAULT_STEPS:
        assert f"{name} (default)" in steps_help
    assert steps_help.index("preflight") < steps_help.index("finalize")


def test_reports_dir_and_sample_and_verify_options_are_explained() -> None:
    _, out, _ = run_cli("migrate", "--help")
    assert "--reports-dir DIR" in out and "DIR/ENV/RUN_ID" in out
    _, out, _ = run_cli("sample", "--help")
    for option in ("--rows", "--seed", "--as-of", "--timezone", "--oddities"):
        assert option in out
    assert "0 for a clean file" in " ".join(out.split())
    _, out, _ = run_cli("verify", "--help")
    assert "the run folder (REPORTS_DIR/ENV/RUN_ID)" in " ".join(out.split())


def test_version_is_the_installed_one() -> None:
    code, out, _ = run_cli("--version")
    assert code == 0 and out.strip() == f"sessionmig {version('sessionmig')}"
    done = sessionmig_process("--version", timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == f"sessionmig {version('sessionmig')}"


# --- db ----------------------------------------------------------------------------------------


def test_db_verbs_upgrade_show_and_list_the_revisions(
    tmp_path: Path, small_backup: Path, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SMTEST_DSN", dsn)
    env = str(env_file(tmp_path, small_backup, target_schema="app"))
    history = schema.db_history()
    head = history[-1].split(" ")[0]
    code, out, _ = run_cli("db", "history")
    assert code == 0 and out.splitlines() == history and "(head)" in out.splitlines()[-1]
    code, out, _ = run_cli("db", "current", "--env", env)
    assert (code, out.strip()) == (0, "app: not migrated")
    code, out, _ = run_cli("db", "upgrade", "--env", env)
    assert (code, out.strip()) == (0, f"app: at revision {head}")
    code, out, _ = run_cli("db", "current", "--env", env)
    assert (code, out.strip()) == (0, f"app: at revision {head}")
    assert schema.db_current(dsn, "app") == head
    code, _, err = run_cli("db", "current")
    assert code == EXIT_ERROR and "needs --env" in err


# --- query -------------------------------------------------------------------------------------


def test_query_json_of_an_empty_result_is_an_empty_list(
    tmp_path: Path, small_backup: Path, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SMTEST_DSN", dsn)
    env = str(env_file(tmp_path, small_backup))
    assert run_cli("db", "upgrade", "--env", env)[0] == 0
    code, out, err = run_cli(
        "query", "user_sessions", "--env", env, "-p", "user_id=nobody", "--format", "json"
    )
    assert code == 0, err
    assert json.loads(out) == []
    assert queries.to_text(queries.pd.DataFrame({"a": []}), "json") == "[]"


def test_query_on_postgres_needs_no_backup_file(
    tmp_path: Path, small_backup: Path, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The RUNBOOK's `cutover_watch --env prod` once the backup is archived."""
    monkeypatch.setenv("SMTEST_DSN", dsn)
    migrated = str(env_file(tmp_path, small_backup))
    assert run_cli("migrate", "--env", migrated, "--reports-dir", str(tmp_path / "r"))[0] == 0
    gone = tmp_path / "archived" / "sessions.db"
    env = str(env_file(tmp_path, gone))
    code, out, err = run_cli("query", "anomalies", "--env", env, "--format", "json")
    assert code == 0, err
    assert json.loads(out)["rows"] == 393
    code, _, err = run_cli("query", "anomalies", "--env", env, "--source", "sqlite")
    assert code == EXIT_ERROR and "no such file" in err  # the backup is needed only there


def test_query_on_the_backup_reuses_its_analysis_copy(
    tmp_path: Path, small_backup: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second query on the same backup does not normalise it again."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("SMTEST_DSN", "postgresql://nobody@127.0.0.1:1/none")
    env = str(env_file(tmp_path, small_backup))
    command = ("query", "anomalies", "--env", env, "--source", "sqlite", "--format", "json")
    code, first, err = run_cli(*command)
    assert code == 0, err
    built = list((tmp_path / "cache" / "sessionmig" / "analysis").iterdir())
    assert len(built) == 1

    def refill(*args, **kwargs):
        raise AssertionError("the backup was normalised again")

    monkeypatch.setattr(queries, "_fill", refill)
    code, second, err = run_cli(*command)
    assert code == 0, err
    assert second == first and json.loads(second)["rows"] == 393


def test_sample_never_overwrites_a_file_it_did_not_write(tmp_path: Path) -> None:
    """A typo naming the live store must not replace real sessions."""
    import sqlite3

    live = tmp_path / "sessions.db"
    with sqlite3.connect(live) as conn:
        conn.execute("CREATE TABLE sessions (session_id TEXT PRIMARY KEY)")
        conn.execute("INSERT INTO sessions VALUES ('session-real')")
    conn.close()
    before = live.read_bytes()
    for extra in ((), ("--replace",)):
        code, _, err = run_cli("sample", "--rows", "5", "--out", str(live), *extra)
        assert code == 2 and "sessions.db exists" in err
        assert live.read_bytes() == before
    made = tmp_path / "sample.db"
    assert run_cli("sample", "--rows", "5", "--out", str(made))[0] == 0
    assert run_cli("sample", "--rows", "5", "--out", str(made))[0] == 2  # not without --replace
    assert run_cli("sample", "--rows", "7", "--out", str(made), "--replace")[0] == 0


def test_help_says_what_each_exit_code_means_as_the_run_exits() -> None:
    """NO-GO ends a run with 2 (it could not be carried out), as README and RUNBOOK say."""
    _, out, _ = run_cli("run", "--help")
    assert "1  a verdict is FAIL:" in out
    assert "2  could not be carried out (preflight's NO-GO" in out
