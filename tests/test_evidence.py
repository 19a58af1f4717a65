"""A run folder is evidence that holds.

An interrupted run still seals its folder with what the database says happened; the folder is
private (0640/0750); its manifest's digest is kept in the target, so a re-sealed folder is
caught; the manifest names the database that received the data; operator mistakes end in one
line and the right exit code; DDL never queues the application behind a lock.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest
import yaml
from conftest import (
    ROOT,
    TEST_ENV,
    TEST_PASSWORD,
    dsn_with_password,
    env_file,
    rows_of,
    sessionmig_process,
)
from psycopg import sql
from sqlalchemy import create_engine, text

from sessionmig import cli
from sessionmig.engines.rollback import migrated_sha256
from sessionmig.errors import ParameterError, TargetError
from sessionmig.postgres import schema
from sessionmig.runbook import manifest, orchestrate
from sessionmig.runbook.manifest import read_manifest
from sessionmig.runbook.params import sqlalchemy_url
from sessionmig.sqlite import sample
from sessionstore import migrate


def run_cli(*argv: str) -> tuple[int, str, str]:
    """``sessionmig ARGV`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


def with_password(url: str) -> str:
    """The test database's URL carrying the per-run password (trust auth ignores it)."""
    scheme, rest = url.split("://", 1)
    user_host = rest.split("@", 1)
    user, host = (user_host[0], user_host[1]) if len(user_host) == 2 else ("postgres", rest)
    return dsn_with_password(user.split(":")[0], TEST_PASSWORD, host, scheme=scheme)


def sessionmig(*args: str, target: str | None = None, **kw) -> subprocess.CompletedProcess:
    return sessionmig_process(*args, extra_env={"SMTEST_TARGET_URL": target or ""}, **kw)


def run_dir_of(stdout: str) -> Path:
    match = re.search(r"reports: (.*)/index.html", stdout)
    assert match, stdout
    return Path(match.group(1))


def write_env(tmp_path: Path, backup: Path, **extra) -> Path:
    return env_file(
        tmp_path, backup, **{"database_url_env": "SMTEST_TARGET_URL", "batch_rows": 500, **extra}
    )


# --- 15, 19, 21: one whole run, then what a reviewer and an attacker do with its folder ------


@pytest.mark.slow
def test_a_run_folder_is_private_names_its_target_and_its_digest_is_kept(
    tmp_path: Path, small_backup: Path, dsn: str
) -> None:
    env = write_env(tmp_path, small_backup)
    result = sessionmig(
        "run",
        "--env",
        str(env),
        "--steps",
        "preflight,migrate",
        "--reports-dir",
        str(tmp_path / "reports"),
        target=with_password(dsn),
    )
    assert result.returncode == 0, result.stderr
    run = run_dir_of(result.stdout)
    data = json.loads((run / "manifest.json").read_text())

    # 15: folder 0750, every file 0640 (newly made parents too), and the manifest says so.
    for path in [tmp_path / "reports", run.parent, run]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o750, path
    for file in run.iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o640, file.name
    assert data["permissions"]["files"] == "0640"
    assert data["permissions"]["directories"] == "0750"

    # 21: the database that received the data, by the server's own word; no user, no password.
    with psycopg.connect(dsn) as conn:
        version = conn.execute("SHOW server_version").fetchone()[0]
        system = str(
            conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()[0]
        )
        host, port, dbname, user = (
            conn.info.host,
            conn.info.port,
            conn.info.dbname,
            conn.info.user,
        )
    target = data["target_database"]
    assert target == {
        "host": host,
        "port": port,
        "dbname": dbname,
        "server_version": version,
        "system_identifier": system,
    }
    page = (run / "index.html").read_text()
    assert dbname in page and system in page and version in page
    for file in run.iterdir():
        assert TEST_PASSWORD not in file.read_text(encoding="utf-8", errors="replace")
    assert user not in json.dumps(target)

    # 19: the digest was recorded in the target when the run was sealed ...
    assert rows_of(
        dsn,
        "SELECT manifest_sha256, verdict FROM session_migration_manifests WHERE run_id = %s",
        (data["run_id"],),
    ) == [(data["manifest_sha256"], "PASS_WITH_WARNINGS")]
    assert data["manifest_record"]["recorded"] is True
    # ... so the untouched folder verifies against it,
    checked = sessionmig("verify", str(run), "--env", str(env), target=with_password(dsn))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"its digest is the one run {data['run_id']} recorded in {dbname}" in checked.stdout
    # ... and one edited and re-sealed with the package's own write_manifest does not.
    forged = tmp_path / "forged"
    shutil.copytree(run, forged)
    body = json.loads((forged / "manifest.json").read_text())
    body["steps"][1]["reason"] = "0 rejected"
    for key in ("files", manifest.DIGEST_FIELD, "permissions"):
        body.pop(key)
    manifest.write_manifest(forged, body)
    alone = sessionmig("verify", str(forged))
    assert alone.returncode == 0
    assert "only its self-consistency was checked" in alone.stdout
    caught = sessionmig("verify", str(forged), "--env", str(env), target=with_password(dsn))
    assert caught.returncode == 1, caught.stdout + caught.stderr
    assert "the folder was re-sealed after the run" in caught.stdout


def seal_by_hand(run: Path, run_id: str, verdict: str = "FAIL") -> dict:
    run.mkdir()
    (run / "03_reconcile.html").write_text("<html>reconcile</html>")
    data = {
        "run_id": run_id,
        "environment": "env",
        "verdict": verdict,
        "started_at": "t",
        "steps": [{"name": "reconcile", "status": "failed", "verdict": verdict, "outputs": []}],
    }
    manifest.write_index(run, data)
    manifest.write_manifest(run, data)
    return json.loads((run / "manifest.json").read_text())


def test_resealed_fail_run_that_says_pass_fails_verify_env(
    tmp_path: Path, small_backup: Path, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attack of the issue, without a whole run: a FAIL run edited to PASS and re-sealed."""
    monkeypatch.setenv("SMTEST_DSN", dsn)
    env = str(env_file(tmp_path, small_backup))
    assert schema.upgrade(dsn) == "0004"
    run = tmp_path / "run"
    sealed = seal_by_hand(run, "20261127T000000Z-abcd")
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        manifest.record_digest(
            conn, "public", sealed["run_id"], sealed[manifest.DIGEST_FIELD], "env", "FAIL"
        )
    code, out, err = run_cli("verify", str(run), "--env", env)
    assert code == 0, out + err
    assert "recorded in" in out

    forged = json.loads((run / "manifest.json").read_text())
    forged["verdict"] = "PASS"
    for key in ("files", manifest.DIGEST_FIELD, "permissions"):
        forged.pop(key)
    manifest.write_manifest(run, forged)
    assert manifest.verify(run).ok  # self-consistent again: that is the attack
    code, out, _ = run_cli("verify", str(run))
    assert code == 0 and "only its self-consistency was checked" in out
    code, out, err = run_cli("verify", str(run), "--env", env)
    assert code == 1, out + err
    assert "the folder was re-sealed after the run" in out
    assert "1 problem(s)" in err

    # A folder whose run never recorded a digest cannot be vouched for either.
    other = tmp_path / "other"
    seal_by_hand(other, "20261127T000000Z-ffff", verdict="PASS")
    code, out, _ = run_cli("verify", str(other), "--env", env)
    assert code == 1 and "has no recorded digest for run 20261127T000000Z-ffff" in out


def test_revision_0003_and_the_model_agree(dsn: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    assert schema.upgrade(dsn) == schema.HEAD == "0004"
    engine = create_engine(sqlalchemy_url(dsn))
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), schema.Base.metadata)
    engine.dispose()
    assert diff == []
    assert "session_migration_manifests" in schema.TABLES


@pytest.mark.skipif(not shutil.which("ssh-keygen"), reason="needs OpenSSH's ssh-keygen")
def test_ssh_signature_is_checked_and_catches_a_resealed_manifest(tmp_path: Path) -> None:
    key = tmp_path / "reviewer"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "rev", "-f", str(key)], check=True
    )
    signers = tmp_path / "allowed_signers"
    public = (tmp_path / "reviewer.pub").read_text().split()
    signers.write_text(
        f'reviewer@example namespaces="{manifest.SIGNATURE_NAMESPACE}" {public[0]} {public[1]}\n'
    )
    run = tmp_path / "run"
    seal_by_hand(run, "20261127T000000Z-5151")
    code, out, err = run_cli("sign", str(run), "--key", str(key))
    assert code == 0, out + err
    assert (run / manifest.SIGNATURE).exists()
    code, out, err = run_cli("verify", str(run), "--allowed-signers", str(signers))
    assert code == 0, out + err
    assert "signed by reviewer@example" in out

    forged = json.loads((run / "manifest.json").read_text())
    forged["verdict"] = "PASS"
    for key_name in ("files", manifest.DIGEST_FIELD, "permissions"):
        forged.pop(key_name)
    manifest.write_manifest(run, forged)
    code, out, _ = run_cli("verify", str(run), "--allowed-signers", str(signers))
    assert code == 1 and "manifest.json.sig: does not verify" in out
    code, out, _ = run_cli("verify", str(run))
    assert code == 1 and "manifest.json.sig: does not match manifest.json" in out


def test_system_identifier_without_privilege_is_said_so(dsn: str) -> None:
    role = f"smtest_noctl_{os.urandom(4).hex()}"
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(role)))
        admin.execute("REVOKE EXECUTE ON FUNCTION pg_control_system() FROM PUBLIC")
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
            identity = manifest.target_identity(conn)
        assert identity["system_identifier"] == "unknown (no privilege)"
        assert identity["dbname"] == psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
        assert identity["server_version"]
    finally:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute("GRANT EXECUTE ON FUNCTION pg_control_system() TO PUBLIC")
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_write_manifest_makes_the_folder_private(tmp_path: Path) -> None:
    run = tmp_path / "run"
    old = os.umask(0o022)
    try:
        seal_by_hand(run, "r")
        (run / "sub").mkdir()
    finally:
        os.umask(old)
    data = json.loads((run / "manifest.json").read_text())
    manifest.write_manifest(run, {k: v for k, v in data.items() if k != "files"})
    assert stat.S_IMODE(run.stat().st_mode) == 0o750
    assert stat.S_IMODE((run / "sub").stat().st_mode) == 0o750
    for name in ("manifest.json", "index.html", "03_reconcile.html"):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o640, name


# --- 9: interrupted runs are sealed with what the database says happened ---------------------


def wait_for(dsn: str, query: str, timeout: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:
            with contextlib.suppress(psycopg.errors.UndefinedTable):
                if conn.execute(query).fetchone():
                    return True
            time.sleep(0.02)
    return False


def interrupt_run(
    tmp_path: Path, backup: Path, dsn: str, steps_: str, when: str, signum: int
) -> tuple[subprocess.CompletedProcess, Path]:
    """Start ``sessionmig run``, send ``signum`` as soon as ``when`` holds in the target."""
    env = write_env(tmp_path, backup, batch_rows=5000)
    process = subprocess.Popen(
        [sys.executable, "-m", "sessionmig.cli", "run", "--env", str(env)]
        + ["--steps", steps_, "--reports-dir", str(tmp_path / "reports")],
        cwd=ROOT,
        env={
            **os.environ,
            "SMTEST_TARGET_URL": with_password(dsn),
            "PYTHONFAULTHANDLER": "1",  # a hang below shows every thread's stack
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A shell that starts the suite in the background ignores SIGINT, and children inherit
        # that: the operator's terminal delivers Ctrl-C, so the run must get it here too.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert wait_for(dsn, when), "the run never reached the point to interrupt"
        process.send_signal(signum)
        try:
            stdout, stderr = process.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGABRT)
            stdout, stderr = process.communicate(timeout=60)
            pytest.fail(f"the interrupted run did not end:\n{stdout}\n{stderr}")
    finally:
        if process.poll() is None:
            process.kill()
    done = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    return done, run_dir_of(stdout + stderr)


@pytest.mark.slow
def test_ctrl_c_after_the_commit_seals_the_folder_and_says_it_committed(
    tmp_path: Path, dsn: str
) -> None:
    backup = tmp_path / "sessions.db"
    sample.generate(backup, rows=3000, seed=3)
    done, run = interrupt_run(
        tmp_path,
        backup,
        dsn,
        "migrate,reconcile",
        "SELECT 1 FROM session_migration_runs",
        signal.SIGINT,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "nothing partial was committed" not in done.stderr
    assert "committed" in done.stderr and "audit row" in done.stderr, done.stderr
    assert manifest.verify(run).ok
    data = json.loads((run / "manifest.json").read_text())
    assert data["verdict"] == "INTERRUPTED" and data["exit_code"] == 2
    assert data["interrupted"]["committed"] is True
    (row,) = data["interrupted"]["audit_rows"]
    assert row["inserted"] == rows_of(dsn, "SELECT count(*) FROM sessions")[0][0]
    migrate = next(s for s in data["steps"] if s["name"] == "migrate")
    assert migrate["status"] == "passed"
    assert {"02_migrate.html", "02_migrate.ipynb", "index.html"} <= {p.name for p in run.iterdir()}
    # The folder is what a rollback needs: its migrate_manifest.
    assert migrated_sha256(read_manifest(run)) == data["source"]["sha256_before"]
    assert "INTERRUPTED" in (run / "index.html").read_text()


@pytest.mark.slow
def test_termination_before_the_commit_seals_the_folder_and_says_nothing_committed(
    tmp_path: Path, dsn: str
) -> None:
    backup = tmp_path / "sessions.db"
    sample.generate(backup, rows=60_000, seed=4, oddities=0)
    done, run = interrupt_run(
        tmp_path,
        backup,
        dsn,
        "migrate",
        "SELECT 1 FROM pg_stat_activity WHERE application_name = 'sessionmig-migrate' "
        "AND state = 'active' AND datname = current_database()",
        signal.SIGTERM,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "nothing of this run was committed" in done.stderr, done.stderr
    assert manifest.verify(run).ok
    data = json.loads((run / "manifest.json").read_text())
    assert data["verdict"] == "INTERRUPTED"
    assert data["interrupted"]["committed"] is False
    assert data["interrupted"]["audit_rows"] == []
    with psycopg.connect(dsn) as conn:
        present = conn.execute("SELECT to_regclass('public.sessions') IS NOT NULL").fetchone()[0]
        if present:  # the tables are removed once steps.migrate uses schema.provisional
            assert conn.execute("SELECT count(*) FROM sessions").fetchone()[0] == 0


def tables_in(dsn: str, name: str = "public") -> set[str]:
    return {
        r[0] for r in rows_of(dsn, "SELECT tablename FROM pg_tables WHERE schemaname = %s", (name,))
    }


def test_interrupted_first_load_leaves_no_tables_behind(dsn: str) -> None:
    with pytest.raises(KeyboardInterrupt), schema.provisional(dsn, "fresh") as revision:
        assert revision == "0004"
        assert "sessions" in tables_in(dsn, "fresh")
        raise KeyboardInterrupt
    assert tables_in(dsn, "fresh") == set()
    assert rows_of(dsn, "SELECT to_regnamespace('fresh') IS NULL") == [(True,)]

    # Tables that were there before are never touched; a block that completes keeps them.
    schema.upgrade(dsn)
    with pytest.raises(RuntimeError), schema.provisional(dsn):
        raise RuntimeError("the load failed")
    assert "sessions" in tables_in(dsn)


def test_a_commit_inside_the_block_is_never_undone(dsn: str) -> None:
    with pytest.raises(KeyboardInterrupt), schema.provisional(dsn):
        with psycopg.connect(dsn) as conn:
            conn.execute(
                "INSERT INTO session_migration_runs VALUES ('r', 'migrate', now(), now(), false, "
                "'p', 's', 'UTC', 1, 1, 0, 0, 0, 0, '{}', 'op', 'h')"
            )
        raise KeyboardInterrupt  # after the commit, as in the issue
    assert rows_of(dsn, "SELECT run_id FROM session_migration_runs") == [("r",)]


def test_interrupted_migrate_verb_asks_the_audit_row(
    tmp_path: Path, small_backup: Path, target, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``sessionmig migrate`` (the migrate step of a run of its own) interrupted before and
    after its commit says which, from the target's audit row of that very run."""
    target(small_backup)  # points $SMTEST_DSN at this test's database
    env = str(env_file(tmp_path, small_backup))
    reports = str(tmp_path / "reports")
    real_step = orchestrate.execute_step

    def ctrl_c_before(record: orchestrate.StepRecord, *args, **kwargs) -> None:
        raise KeyboardInterrupt

    def ctrl_c_after(record: orchestrate.StepRecord, *args, **kwargs) -> None:
        real_step(record, *args, **kwargs)
        record.interrupted = True  # a Ctrl-C as the step's last cell ended

    monkeypatch.setattr(orchestrate, "execute_step", ctrl_c_before)
    code, _, err = run_cli("migrate", "--env", env, "--reports-dir", reports)
    assert code == 2
    assert "INTERRUPTED" in err and "nothing of this run was committed" in err, err
    monkeypatch.setattr(orchestrate, "execute_step", ctrl_c_after)
    code, _, err = run_cli("migrate", "--env", env, "--reports-dir", reports)
    assert code == 2
    assert "nothing of this run was committed" not in err
    assert "migrate had committed" in err and "393 inserted" in err, err


# --- 22: operator mistakes: one line, exit 2, and -p values kept as typed ---------------------


def test_unwritable_reports_dir_is_one_line_and_exit_2(tmp_path: Path, small_backup: Path) -> None:
    env = write_env(tmp_path, small_backup)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = sessionmig(
        "run", "--env", str(env), "--steps", "inspect", "--reports-dir", str(blocker / "reports")
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("sessionmig run: --reports-dir ")
    assert "give a folder you can write to" in result.stderr


def test_read_only_reports_dir_is_a_parameter_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read-only mount (EROFS) or a folder without write permission (EACCES) — as root the
    latter cannot be made for real, so the refusal is the operating system's, simulated."""
    import errno

    def refuse(self: Path, *args, **kwargs) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(ParameterError, match=r"cannot write the run folder .*Read-only file"):
        orchestrate.make_run_dir(tmp_path / "ro", "staging", "run-1")
    if os.geteuid() != 0:
        monkeypatch.undo()
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        with pytest.raises(ParameterError, match="Permission denied"):
            orchestrate.make_run_dir(locked, "staging", "run-1")


def test_verify_without_a_manifest_exits_2(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in (empty, tmp_path / "missing"):
        code, out, err = run_cli("verify", str(folder))
        assert code == 2, out + err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    code, _, err = run_cli("verify", str(empty))
    assert "no manifest.json here" in err


def test_path_parameters_are_strings_as_typed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the CLI's own parsing into the settings a step runs with."""
    odd = tmp_path / "x #c.db"
    sample.generate(odd, rows=20, oddities=0)
    monkeypatch.chdir(tmp_path)
    on = tmp_path / "on"
    on.write_bytes(odd.read_bytes())
    env = tmp_path / "e.yaml"
    env.write_text(yaml.safe_dump({**TEST_ENV, "sqlite_path": "unused"}))
    args = cli.parser().parse_args(
        ["migrate", "--env", str(env), "-p", f"sqlite_path={odd}", "-p", "run_id=0123"]
    )
    settings = cli._settings(args)
    assert settings.sqlite_path == str(odd) and settings.run_id == "0123"
    args = cli.parser().parse_args(["migrate", "--env", str(env), "-p", "sqlite_path=on"])
    assert cli._settings(args).sqlite_path == str(on)


# --- 23: DDL against a live target never queues the application behind it -------------------


def upgrade_in_background(call) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def work() -> None:
        started = time.monotonic()
        try:
            box["result"] = call()
        except BaseException as exc:
            box["error"] = exc
        box["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread, box


def alembic_upgrade(dsn: str, revision: str) -> None:
    """Alembic through migrations/env.py on a connection with no lock_timeout of its own."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(schema.MIGRATIONS))
    engine = create_engine(sqlalchemy_url(dsn))
    try:
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, revision)
    finally:
        engine.dispose()


@pytest.mark.parametrize("path", ["schema.upgrade", "migrations/env.py"])
def test_ddl_gives_up_on_a_lock_the_application_holds(
    path: str, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    alembic_upgrade(dsn, "0001")
    monkeypatch.setattr(migrate, "LOCK_TIMEOUT", "300ms", raising=False)
    app = psycopg.connect(dsn)  # the application, mid-transaction on sessions
    app.execute("SELECT count(*) FROM sessions").fetchone()
    try:
        call = (
            (lambda: schema.upgrade(dsn))
            if path == "schema.upgrade"
            else (lambda: alembic_upgrade(dsn, "head"))
        )
        thread, box = upgrade_in_background(call)
        # The application holds its lock until the end of this block: a DDL that queued
        # behind it would never end. Generous bounds, for a loaded machine's slow imports.
        thread.join(60)
        assert not thread.is_alive(), "the DDL waited on the application's lock"
        assert "error" in box and box["seconds"] < 30
        message = str(box["error"])
        assert "lock" in message.lower()
        if path == "schema.upgrade":
            assert isinstance(box["error"], TargetError) and "lock_timeout" in message
    finally:
        app.rollback()
        app.close()
        if "thread" in locals():
            thread.join(30)
    assert rows_of(dsn, "SELECT version_num FROM alembic_version") == [("0001",)]
    assert schema.upgrade(dsn) == "0004"  # once the application lets go, it goes through
    engine = create_engine(sqlalchemy_url(dsn))
    with engine.connect() as conn:
        assert conn.execute(text("SHOW lock_timeout")).scalar() == "0"  # nothing leaked
    engine.dispose()
