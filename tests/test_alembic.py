"""Alembic as its users expect — the installed ``alembic.ini`` drives the plain
``alembic`` command against ``DATABASE_URL``, and ``schema.db_*`` are the same commands."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import psycopg
from conftest import TEST_PASSWORD, sessionmig_tables
from psycopg import sql
from psycopg.conninfo import make_conninfo

import sessionstore
from sessionmig.postgres import schema
from sessionmig.postgres.connect import parse

ALEMBIC = Path(sys.executable).parent / "alembic"
INI = Path(sessionstore.__file__).parent / "alembic.ini"


def alembic(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """The plain ``alembic`` command with the installed ini, run from elsewhere."""
    clean = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    return subprocess.run(
        [str(ALEMBIC), "-c", str(INI), *args],
        cwd=cwd,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_ini_is_installed_with_the_store() -> None:
    shipped = resources.files("sessionstore").joinpath("alembic.ini")
    assert shipped.is_file() and Path(str(shipped)) == INI == schema.ALEMBIC_INI
    assert "script_location = %(here)s/migrations" in shipped.read_text()


def test_alembic_current_reads_a_database_sessionmig_migrated(dsn: str, tmp_path: Path) -> None:
    assert schema.upgrade(dsn, "app13") == schema.HEAD == "0004"
    done = alembic("-x", "schema=app13", "current", cwd=tmp_path, DATABASE_URL=dsn)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0004", "(head)"]
    # Any DSN form libpq accepts, and the password never printed.
    key_value = make_conninfo(dsn, password=TEST_PASSWORD)  # trust auth ignores it
    done = alembic("-x", "schema=app13", "current", cwd=tmp_path, DATABASE_URL=key_value)
    assert done.returncode == 0, done.stderr
    assert "0004 (head)" in done.stdout
    assert TEST_PASSWORD not in done.stdout + done.stderr
    # Another schema of the same database was never migrated: no revision, and not created.
    done = alembic("-x", "schema=never13", "current", cwd=tmp_path, DATABASE_URL=dsn)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT to_regnamespace('never13')").fetchone() == (None,)
    assert schema.db_current(dsn, "app13") == "0004"
    assert schema.db_current(dsn, "never13") is None


def test_alembic_upgrade_head_creates_the_tables_in_an_empty_schema(
    dsn: str, tmp_path: Path
) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier("empty13")))
    done = alembic("-x", "schema=empty13", "upgrade", "head", cwd=tmp_path, DATABASE_URL=dsn)
    assert done.returncode == 0, done.stderr
    assert sessionmig_tables(dsn, "empty13") == [
        "session_migration_manifests",
        "session_migration_rejects",
        "session_migration_runs",
        "sessions",
    ]
    assert sessionmig_tables(dsn, "public") == []
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT version_num FROM empty13.alembic_version").fetchall() == [
            ("0004",)
        ]
    # What sessionmig does next finds the schema at head and changes nothing.
    assert schema.upgrade_detail(dsn, "empty13").created_tables == ()


def test_the_database_may_be_named_by_x_or_by_libpqs_environment(dsn: str, tmp_path: Path) -> None:
    done = alembic("-x", f"dsn={dsn}", "-x", "schema=xarg13", "upgrade", "head", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert schema.db_current(dsn, "xarg13") == "0004"
    parts = parse(dsn)
    env = {"PGDATABASE": parts["dbname"]}
    for name, key in (("PGHOST", "host"), ("PGPORT", "port"), ("PGUSER", "user")):
        if key in parts:
            env[name] = parts[key]
    done = alembic("-x", "schema=xarg13", "current", cwd=tmp_path, DATABASE_URL="", **env)
    assert done.returncode == 0, done.stderr
    assert "0004 (head)" in done.stdout


def test_alembic_without_a_database_says_what_to_do(tmp_path: Path) -> None:
    clean = {k: "" for k in ("PGHOST", "PGSERVICE", "PGDATABASE")}
    done = alembic("current", cwd=tmp_path, **clean)
    assert done.returncode != 0
    assert "export DATABASE_URL=" in done.stderr and "Traceback" not in done.stderr


def test_db_history_lists_every_revision_oldest_first() -> None:
    lines = schema.db_history()
    assert [line.split(":")[0].split()[0] for line in lines] == ["0001", "0002", "0003", "0004"]
    assert lines[0].startswith("0001 (base): Create sessions")
    assert lines[-1].startswith("0004 (head): ")
