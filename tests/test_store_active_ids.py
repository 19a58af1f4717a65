"""``SessionManager.active_ids``: the store's own predicate over the whole table, read only, in
one snapshot, streamed in bounded lists; an outage is StoreUnavailable, never a partial answer
taken for a whole one."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from conftest import TEST_PASSWORD, dsn_with_password, rows_of

from sessionmig.errors import StoreUnavailable
from sessionmig.postgres import schema
from sessionmig.store import SessionManager

AT = datetime(2026, 1, 15, 3, 0, tzinfo=UTC)


def collect(manager: SessionManager, at: datetime, chunk: int) -> list[list[str]]:
    async def scenario() -> list[list[str]]:
        try:
            return [ids async for ids in manager.active_ids(at, chunk=chunk)]
        finally:
            await manager.close()

    return asyncio.run(scenario())


def test_every_active_session_once_in_lists_of_at_most_chunk_and_nothing_moved(dsn) -> None:
    schema.upgrade(dsn)
    with psycopg.connect(dsn) as conn:
        for i in range(23):
            expires = AT + timedelta(minutes=i - 11)  # 12 expired (AT itself too), 11 active
            conn.execute(
                "INSERT INTO sessions VALUES (%s, NULL, '{}', %s, %s, %s, 0)",
                (f"s{i:02}", AT - timedelta(days=1), expires, AT - timedelta(hours=1)),
            )
    before = rows_of(dsn, "SELECT * FROM sessions ORDER BY session_id")
    lists = collect(SessionManager(dsn), AT, chunk=5)
    assert [len(ids) for ids in lists] == [5, 5, 1]
    assert sorted(sid for ids in lists for sid in ids) == [f"s{i:02}" for i in range(12, 23)]
    assert rows_of(dsn, "SELECT * FROM sessions ORDER BY session_id") == before


def test_an_empty_table_yields_nothing(dsn) -> None:
    schema.upgrade(dsn)
    assert collect(SessionManager(dsn), AT, chunk=5) == []


def test_a_database_that_is_down_is_store_unavailable() -> None:
    manager = SessionManager(
        dsn_with_password("nobody", TEST_PASSWORD, "127.0.0.1:1/none"), connect_timeout_s=2
    )
    with pytest.raises(StoreUnavailable) as caught:
        collect(manager, AT, chunk=5)
    assert TEST_PASSWORD not in str(caught.value)
