"""Shared fixtures: real PostgreSQL servers (never mocks) and small sample backups.

Every database test runs against the embedded PostgreSQL 18 server, and also against the server
at ``SESSIONMIG_TEST_DSN`` (or ``--dsn``) when given — CI points it at the system PostgreSQL 15.
Each test gets a database of its own, created and dropped here, so runs never collide.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from sessionmig.postgres import embedded
from sessionmig.sqlite import sample

ROOT = Path(__file__).resolve().parent.parent
TEST_PGDATA = ROOT / ".sessionmig" / "pgdata-test"
# The passwords the secret-handling tests guard are made per run, never written in a file.
TEST_PASSWORD = os.environ.get("SESSIONMIG_TEST_PASSWORD") or "pw-" + secrets.token_hex(8)


def dsn_with_password(user: str, password: str, rest: str, scheme: str = "postgresql") -> str:
    """``scheme://user:password@rest``, assembled at run time from its parts."""
    return f"{scheme}://{user}" + ":" + password + "@" + rest


os.environ.setdefault(embedded.PGDATA_VARIABLE, str(TEST_PGDATA))
# Analysis copies (private, cached per backup) go to a cache of the test run's own.
os.environ["XDG_CACHE_HOME"] = str(ROOT / ".sessionmig" / "test-cache")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--dsn",
        default=os.environ.get("SESSIONMIG_TEST_DSN", ""),
        help="also run database tests against this PostgreSQL server",
    )


def _backends(config: pytest.Config) -> list[str]:
    return ["embedded"] + (["external"] if config.getoption("--dsn") else [])


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", _backends(metafunc.config), scope="session")


@pytest.fixture(scope="session")
def server_url(backend: str, request: pytest.FixtureRequest) -> str:
    """Admin URL (database ``postgres``) of the server under test."""
    if backend == "embedded":
        return embedded.start().get_uri("postgres")
    return request.config.getoption("--dsn")


@pytest.fixture
def dsn(server_url: str) -> Iterator[str]:
    """A fresh, empty database on the server under test, dropped afterwards."""
    name = f"smtest_{uuid.uuid4().hex[:12]}"
    embedded.ensure_database(server_url, name)
    yield embedded.with_database(server_url, name)
    with psycopg.connect(embedded.with_database(server_url, "postgres"), autocommit=True) as c:
        c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def small_backup(tmp_path: Path) -> Path:
    """A 400-row sample with every kind of oddity (7 of them cannot land)."""
    path = tmp_path / "sessions.db"
    sample.generate(path, rows=400, seed=11)
    return path


@pytest.fixture
def clean_backup(tmp_path: Path) -> Path:
    """A 300-row sample without oddities."""
    path = tmp_path / "clean.db"
    sample.generate(path, rows=300, seed=5, oddities=0)
    return path


# The parameters every database test shares; the target is this test's database.
TEST_ENV = {
    "database_url_env": "SMTEST_DSN",
    "source_timezone": "Asia/Seoul",
    "as_of": "2026-01-15T12:00:00+09:00",
}


def env_file(tmp_path: Path, backup: Path, **extra) -> Path:
    """An environment file for ``backup`` targeting the database in ``$SMTEST_DSN``."""
    import yaml

    path = tmp_path / "env.yaml"
    path.write_text(yaml.safe_dump({**TEST_ENV, "sqlite_path": str(backup), **extra}))
    return path


@pytest.fixture
def target(dsn: str, monkeypatch: pytest.MonkeyPatch):
    """Make step settings for a backup, aimed at this test's database."""
    from sessionmig.runbook import steps

    monkeypatch.setenv("SMTEST_DSN", dsn)

    def make(backup: Path, **overrides) -> steps.Settings:
        return steps.settings(**{**TEST_ENV, "sqlite_path": str(backup), **overrides})

    return make


def rows_of(url: str, query: str, params: tuple = ()) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(query, params).fetchall()


def sessionmig_tables(url: str, schema: str = "public") -> list[str]:
    """The sessionmig tables that exist in ``schema`` (none after a first run that failed)."""
    with psycopg.connect(url) as conn:
        return [
            r[0]
            for r in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = %s "
                "AND (table_name = 'sessions' OR table_name LIKE 'session\\_migration\\_%%') "
                "ORDER BY 1",
                (schema,),
            )
        ]


def sessionmig_process(
    *args: str, extra_env: dict[str, str] | None = None, **kw
) -> subprocess.CompletedProcess:
    """``sessionmig ARGS`` as an operator runs it: its own process, from the checkout."""
    return subprocess.run(
        [sys.executable, "-m", "sessionmig.cli", *args],
        cwd=kw.pop("cwd", ROOT),
        env={**os.environ, **(extra_env or {})},
        capture_output=True,
        text=True,
        timeout=kw.pop("timeout", 600),
        **kw,
    )
