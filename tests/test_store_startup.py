"""The store checked at start-up: ``open()`` / ``async with`` makes the pool and checks the
sessions table and its Alembic revision once, failing with one error that says what is wrong
and what to do — never a raw ``UndefinedTable`` on the first request."""

from __future__ import annotations

import asyncio
import socket
import time

import psycopg
import pytest

from sessionstore import SessionManager, StoreNotReady, StoreUnavailable
from sessionstore.migrate import HEAD, upgrade


def _start(url: str, **options: object) -> SessionManager:
    async def scenario() -> SessionManager:
        manager = SessionManager(url, **options)  # type: ignore[arg-type]
        return await manager.open()

    return asyncio.run(scenario())


def _not_ready(url: str, **options: object) -> str:
    with pytest.raises(StoreNotReady) as caught:
        _start(url, **options)
    return str(caught.value)


def test_open_refuses_a_database_without_the_sessions_table(dsn: str) -> None:
    message = _not_ready(dsn)
    assert "no table 'sessions'" in message and "schema 'public'" in message
    assert "upgrade head" in message and "sessionmig db upgrade" in message
    # It names the database, never its password.
    assert psycopg.conninfo.conninfo_to_dict(dsn).get("dbname", "") in message


def test_open_refuses_a_database_at_an_older_revision(dsn: str) -> None:
    assert upgrade(dsn, revision="0002") == "0002"
    message = _not_ready(dsn)
    assert "revision 0002" in message and f"older than the {HEAD}" in message
    assert "upgrade head" in message


def test_open_refuses_a_revision_it_does_not_know(dsn: str) -> None:
    upgrade(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '0099'")
    message = _not_ready(dsn)
    assert "revision 0099" in message and "does not know" in message


def test_open_refuses_a_table_made_outside_the_migrations(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE sessions (session_id text PRIMARY KEY)")
    message = _not_ready(dsn)
    assert "alembic_version is missing" in message and f"revision {HEAD}" in message


def test_open_checks_the_schema_it_was_given(dsn: str) -> None:
    upgrade(dsn)  # public is migrated; the app's schema is not
    message = _not_ready(dsn, schema="app_sessions")
    assert "schema 'app_sessions'" in message and "-x schema=app_sessions" in message


def test_open_passes_on_a_migrated_database_and_async_with_closes(dsn: str) -> None:
    upgrade(dsn, "app_sessions")

    async def scenario() -> tuple[str, bool, bool, int]:
        async with SessionManager(dsn, schema="app_sessions") as store:
            sid, _ = await store.create_session("u-1")
            valid = await store.validate_session(sid)
            count = await store.get_active_session_count()
        # Closed by the block: nothing of the pool is left open.
        return sid, valid, store._pools == {}, count

    sid, valid, closed, count = asyncio.run(scenario())
    assert sid.startswith("session-") and valid and closed and count == 1


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_open_says_try_again_later_when_the_server_is_unreachable() -> None:
    url = f"postgresql://nobody@127.0.0.1:{_closed_port()}/sessions"
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as caught:
        _start(url, connect_timeout_s=2)
    assert not isinstance(caught.value, StoreNotReady)
    assert "127.0.0.1" in str(caught.value) and time.monotonic() - started < 10
