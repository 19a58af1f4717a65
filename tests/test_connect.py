"""Connections: one helper opens every connection, names it after the user's own
application, takes every DSN form libpq takes, and fails with our exceptions, redacted."""

from __future__ import annotations

import asyncio

import psycopg
import pytest
from conftest import TEST_PASSWORD, dsn_with_password
from psycopg.conninfo import make_conninfo
from sqlalchemy import create_engine, text

from sessionmig.errors import (
    EXIT_ERROR,
    TargetError,
    TargetRefused,
    TargetUnreachable,
    TransientTargetError,
)
from sessionmig.postgres import connect as C
from sessionmig.store import SessionManager

CLOSED = "127.0.0.1:1"  # nothing listens there


def _with_query(dsn: str, query: str) -> str:
    return f"{dsn}{'&' if '?' in dsn else '?'}{query}"


def _seen_by_server(dsn: str, conn: psycopg.Connection) -> str:
    """``application_name`` of ``conn`` as another session sees it in pg_stat_activity."""
    with psycopg.connect(dsn) as other:
        row = other.execute(
            "SELECT application_name FROM pg_stat_activity WHERE pid = %s",
            (conn.info.backend_pid,),
        ).fetchone()
    assert row is not None
    return row[0]


def test_application_name_is_appended_to_the_users_own(dsn: str) -> None:
    with C.connect(_with_query(dsn, "application_name=myapp"), "migrate") as conn:
        assert conn.execute("SHOW application_name").fetchone() == ("myapp/sessionmig-migrate",)
        assert _seen_by_server(dsn, conn) == "myapp/sessionmig-migrate"
    with C.connect(dsn, "query") as conn:  # no name of the user's: ours alone
        assert _seen_by_server(dsn, conn) == "sessionmig-query"


def test_application_name_from_pgappname_and_cut_to_keep_ours(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGAPPNAME", "billing-cron")
    with C.connect(dsn, "catchup") as conn:
        assert _seen_by_server(dsn, conn) == "billing-cron/sessionmig-catchup"
    monkeypatch.setenv("PGAPPNAME", "x" * 80)
    with C.connect(dsn, "catchup") as conn:
        seen = _seen_by_server(dsn, conn)
    # The server keeps 63 bytes: the user's part is shortened so that ours survives.
    assert seen.endswith("/sessionmig-catchup") and seen.startswith("xxx") and len(seen) == 63


def test_a_key_value_dsn_works_for_psycopg_sqlalchemy_and_the_store(dsn: str) -> None:
    key_value = make_conninfo(dsn, application_name="kv app")
    assert not key_value.startswith("postgresql:")
    database = C.parse(dsn)["dbname"]
    with C.connect(key_value, "query", read_only=True, statement_timeout_ms=1234) as conn:
        row = conn.execute(
            "SELECT current_database(), current_setting('application_name'), "
            "current_setting('statement_timeout'), current_setting('transaction_read_only')"
        ).fetchone()
    assert row == (database, "kv app/sessionmig-query", "1234ms", "on")

    engine = C.engine(key_value, "schema")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT current_database()")).scalar() == database
    engine.dispose()
    plain = create_engine(C.sqlalchemy_url(key_value))  # for code that wants a URL
    with plain.connect() as conn:
        assert conn.execute(text("SELECT current_database()")).scalar() == database
    plain.dispose()

    async def store_name() -> str:
        manager = SessionManager(key_value, pool_size=1)
        try:
            async with manager.connection() as conn:
                cur = await conn.execute("SELECT current_setting('application_name')")
                row = await cur.fetchone()
                return row[0] if row else ""
        finally:
            await manager.close()

    assert asyncio.run(store_name()) == "kv app/sessionmig-store"


def test_the_dsns_own_options_are_kept_beside_ours(dsn: str) -> None:
    with_options = _with_query(dsn, "options=-c%20work_mem%3D7MB")
    with C.connect(with_options, "query", lock_timeout_ms=2500) as conn:
        row = conn.execute(
            "SELECT current_setting('work_mem'), current_setting('lock_timeout')"
        ).fetchone()
    assert row == ("7MB", "2500ms")


def test_an_empty_dsn_means_libpqs_environment(dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    parts = C.parse(dsn)
    for name, key in (("PGHOST", "host"), ("PGPORT", "port"), ("PGUSER", "user")):
        if key in parts:
            monkeypatch.setenv(name, parts[key])
    monkeypatch.setenv("PGDATABASE", parts["dbname"])
    with C.connect("", "query") as conn:
        assert conn.execute("SELECT current_database()").fetchone() == (parts["dbname"],)
    with C.connect(None, "query") as conn:
        assert conn.execute("SELECT current_database()").fetchone() == (parts["dbname"],)
    engine = C.engine("", "schema")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT current_database()")).scalar() == parts["dbname"]
    engine.dispose()


def test_a_refused_login_says_where_and_what_to_do_without_the_password(dsn: str) -> None:
    parts = C.parse(dsn)
    rest = f"{parts.get('host', 'localhost')}:{parts.get('port', '5432')}/{parts['dbname']}"
    bad = dsn_with_password("no_such_role_13", TEST_PASSWORD, rest)
    with pytest.raises(TargetRefused) as caught:
        C.connect(bad, "migrate")
    message = str(caught.value)
    assert TEST_PASSWORD not in message
    assert "no_such_role_13" in message and parts["dbname"] in message
    assert "sessionmig-migrate" in message and "pg_hba.conf" in message
    assert caught.value.exit_code == EXIT_ERROR
    assert not isinstance(caught.value, TransientTargetError)  # retrying cannot help

    missing = C.with_database(dsn, "no_such_database_13")
    with pytest.raises(TargetRefused, match="create that database"):
        C.connect(missing, "query")


def test_an_unreachable_server_is_transient_and_redacted() -> None:
    with pytest.raises(TargetUnreachable) as caught:
        C.connect(dsn_with_password("app", TEST_PASSWORD, f"{CLOSED}/db"), "lock")
    message = str(caught.value)
    assert isinstance(caught.value, TransientTargetError)
    assert TEST_PASSWORD not in message
    assert "host 127.0.0.1 port 1 database 'db' user 'app'" in message
    assert "server is running" in message

    async def attempt() -> None:
        await C.aconnect(f"host=127.0.0.1 port=1 password={TEST_PASSWORD}", "store")

    with pytest.raises(TargetUnreachable) as caught:
        asyncio.run(attempt())
    assert TEST_PASSWORD not in str(caught.value)


@pytest.mark.parametrize(
    "bad",
    [
        f"postgresql://app@{CLOSED}/db?password={TEST_PASSWORD}",
        f"postgresql://app@{CLOSED}/db?sslmode=disable&password={TEST_PASSWORD}",
        f"host=127.0.0.1 port=1 user=app password='{TEST_PASSWORD}' dbname=x",
        dsn_with_password("app", TEST_PASSWORD, f"{CLOSED}/db", "postgresql+psycopg"),
        # Malformed: libpq quotes a piece of the password in its own error.
        dsn_with_password("app", f"{TEST_PASSWORD[:9]}%zz{TEST_PASSWORD[9:]}", f"{CLOSED}/db"),
        f"host=127.0.0.1 port=1 password={TEST_PASSWORD[:9]} {TEST_PASSWORD[9:]}x7Q dbname=x",
    ],
)
def test_every_failure_hides_the_password_in_any_dsn_form(bad: str) -> None:
    with pytest.raises(TargetError) as caught:
        C.connect(bad, "query", connect_timeout=2)
    message = str(caught.value)
    for piece in (TEST_PASSWORD, TEST_PASSWORD[:9], TEST_PASSWORD[9:]):
        assert piece not in message, message
    assert "sessionmig-query" in message


def test_sqlalchemy_url_spells_every_form() -> None:
    assert C.sqlalchemy_url("") == "postgresql+psycopg://"
    assert C.sqlalchemy_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert (
        C.sqlalchemy_url("host=h port=6543 user=u dbname=d sslmode=require")
        == "postgresql+psycopg://u@h:6543/d?sslmode=require"
    )
    assert C.sqlalchemy_url("host=/run/pg dbname=d") == "postgresql+psycopg:///d?host=%2Frun%2Fpg"
    assert C.libpq_dsn("postgresql+psycopg://u@h/db") == "postgresql://u@h/db"
    assert C.with_database("host=h dbname=a", "b") == "dbname=b host=h"
    assert C.with_database("postgresql://h/a?sslmode=disable", "b") == (
        "postgresql://h/b?sslmode=disable"
    )
