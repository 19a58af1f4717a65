"""One contract, two stores: the async PostgreSQL SessionManager and the legacy SQLite one."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from conftest import TEST_PASSWORD, dsn_with_password, rows_of

from sessionmig.errors import StoreUnavailable
from sessionmig.postgres import schema
from sessionmig.postgres.schema import SessionRecord
from sessionmig.store import LegacySQLiteSessionManager, SessionManager, get_session_manager

START = datetime(2026, 1, 15, 3, 0, tzinfo=UTC)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture(params=["postgres", "sqlite"])
def store(request, backend: str, tmp_path: Path):
    """Each store with a clock; the PostgreSQL one on every server under test."""
    clock = Clock()
    if request.param == "postgres":
        dsn = request.getfixturevalue("dsn")
        schema.upgrade(dsn)
        manager = SessionManager(dsn, ttl_hours=24, clock=clock)
    else:
        manager = LegacySQLiteSessionManager(
            tmp_path / "sessions.db", ttl_hours=24, zone="Asia/Seoul", clock=clock
        )
    yield manager, clock
    asyncio.run(manager.close())


def run(coro):
    return asyncio.run(coro)


def test_create_get_validate_counts_requests(store) -> None:
    manager, clock = store
    meta = {"locale": "ko-KR", "search": {"region": "서울 강남구", "tags": ["아파트", 1, None]}}

    async def scenario():
        sid, expires = await manager.create_session("user-1", meta)
        assert sid.startswith("session-") and expires == START + timedelta(hours=24)
        clock.now = START + timedelta(hours=1)
        assert await manager.validate_session(sid)
        assert await manager.validate_session(sid)
        got = await manager.get_session(sid)
        await manager.close()
        return sid, got

    sid, got = run(scenario())
    assert got.session_id == sid and got.user_id == "user-1"
    assert got.metadata == meta
    assert got.request_count == 2
    assert got.last_activity == START + timedelta(hours=1)
    assert got.created_at == START and got.created_at.utcoffset() == timedelta(0)


def test_expiry_is_exclusive_at_the_boundary_and_deletes(store) -> None:
    manager, clock = store

    async def scenario():
        sid, expires = await manager.create_session()
        clock.now = expires - timedelta(microseconds=1)
        before = (await manager.validate_session(sid), await manager.get_active_session_count())
        clock.now = expires
        at = (await manager.validate_session(sid), await manager.get_session(sid))
        await manager.close()
        return before, at

    before, at = run(scenario())
    assert before == (True, 1)
    assert at == (False, None)  # expired at expires_at, and deleted by validate


def test_unknown_ids_are_simply_false_or_none(store) -> None:
    manager, _ = store

    async def scenario():
        result = (
            await manager.validate_session("session-nope"),
            await manager.get_session("session-nope"),
            await manager.delete_session("session-nope"),
            await manager.extend_session("session-nope", 2),
        )
        await manager.close()
        return result

    assert run(scenario()) == (False, None, False, False)


def test_extend_delete_cleanup_and_count(store) -> None:
    manager, clock = store

    async def scenario():
        keep, _ = await manager.create_session("a")
        short, _ = await manager.create_session("b")
        gone, _ = await manager.create_session(None, {"x": 1})
        assert await manager.extend_session(keep, 10)
        assert await manager.delete_session(gone)
        assert await manager.get_active_session_count() == 2
        clock.now = START + timedelta(hours=25)
        counts = (
            await manager.get_active_session_count(),
            await manager.cleanup_expired_sessions(),
        )
        left = await manager.get_session(keep), await manager.get_session(short)
        await manager.close()
        return counts, left

    (active, removed), (kept, short) = run(scenario())
    assert (active, removed) == (1, 1)
    assert kept.expires_at == START + timedelta(hours=34) and short is None


def test_concurrent_clients_count_every_validation(store) -> None:
    """100 concurrent clients for a bounded number of operations each: create, validate, extend,
    delete. Afterwards no errors, and each surviving session's request_count equals the
    validations that succeeded for it."""
    manager, _ = store
    rng = random.Random(5)

    async def scenario():
        ids = [(await manager.create_session(f"user-{i}"))[0] for i in range(20)]
        deleted: set[str] = set()
        succeeded: Counter[str] = Counter()
        errors: list[BaseException] = []

        async def client(n: int) -> None:
            for _ in range(15):
                sid = rng.choice(ids)
                roll = rng.random()
                try:
                    if roll < 0.75:
                        if await manager.validate_session(sid):
                            succeeded[sid] += 1
                    elif roll < 0.85:
                        await manager.extend_session(sid, 1)
                    elif roll < 0.95:
                        ids.append((await manager.create_session(f"client-{n}"))[0])
                    elif sid not in deleted and len(deleted) < 5:
                        deleted.add(sid)
                        await manager.delete_session(sid)
                except Exception as exc:  # counted: the test demands none
                    errors.append(exc)

        await asyncio.gather(*(client(n) for n in range(100)))
        rows = {sid: await manager.get_session(sid) for sid in set(ids)}
        await manager.close()
        return errors, succeeded, rows, deleted

    errors, succeeded, rows, deleted = run(scenario())
    assert errors == []
    assert sum(succeeded.values()) > 500
    for sid, row in rows.items():
        if sid in deleted:
            assert row is None
        else:
            assert row.request_count == succeeded[sid], sid


def test_postgres_store_rows_are_what_migrate_would_write(dsn) -> None:
    schema.upgrade(dsn)
    manager = SessionManager(dsn, clock=Clock())
    sid, _ = run(manager.create_session("u", {"k": [1, 2]}))
    run(manager.close())
    assert rows_of(
        dsn,
        "SELECT metadata, created_at, request_count FROM sessions WHERE session_id = %s",
        (sid,),
    ) == [({"k": [1, 2]}, START, 0)]


def test_legacy_store_writes_naive_local_text(tmp_path: Path) -> None:
    manager = LegacySQLiteSessionManager(tmp_path / "s.db", zone="Asia/Seoul", clock=Clock())
    sid, _ = run(manager.create_session("u"))
    run(manager.close())
    import sqlite3

    row = (
        sqlite3.connect(tmp_path / "s.db")
        .execute("SELECT created_at, expires_at FROM sessions WHERE session_id = ?", (sid,))
        .fetchone()
    )
    assert row == ("2026-01-15 12:00:00", "2026-01-16 12:00:00")


def test_a_database_that_is_down_fails_fast_with_a_clear_error() -> None:
    manager = SessionManager(
        dsn_with_password("nobody", TEST_PASSWORD, "127.0.0.1:1/none"),
        retries=1,
        connect_timeout_s=2,
    )
    started = datetime.now(UTC)
    with pytest.raises(StoreUnavailable, match="unavailable after 2 attempts") as caught:
        run(manager.get_active_session_count())
    assert datetime.now(UTC) - started < timedelta(seconds=10)
    assert TEST_PASSWORD not in str(caught.value)
    run(manager.close())


def test_get_session_manager_follows_the_environment(tmp_path: Path) -> None:
    legacy = get_session_manager(
        {
            "SESSION_DB_TYPE": "sqlite",
            "SESSION_TTL_HOURS": "2",
            "SESSION_SQLITE_PATH": str(tmp_path / "x.db"),
        }
    )
    assert isinstance(legacy, LegacySQLiteSessionManager) and legacy.ttl == timedelta(hours=2)
    run(legacy.close())
    pg = get_session_manager({"DATABASE_URL": "postgresql://u@h/db"})
    assert isinstance(pg, SessionManager) and pg.ttl == timedelta(hours=24)
    run(pg.close())
    with pytest.raises(StoreUnavailable, match="needs DATABASE_URL"):
        get_session_manager({})
    with pytest.raises(StoreUnavailable, match="use postgres or sqlite"):
        get_session_manager({"SESSION_DB_TYPE": "redis"})


# --- the PostgreSQL store's fast path keeps every guarantee ----------------------------------


def test_postgres_rows_have_exactly_the_models_columns(dsn) -> None:
    """The statements are compiled from the model: get_session answers with its columns."""
    schema.upgrade(dsn)
    manager = SessionManager(dsn, clock=Clock())

    async def scenario():
        sid, _ = await manager.create_session("u", {"k": 1})
        row = await manager.get_session(sid)
        await manager.close()
        return row

    row = run(scenario())
    assert list(row.as_dict()) == [c.name for c in SessionRecord.__table__.columns]


def test_postgres_metadata_none_is_stored_as_the_model_stores_it(dsn) -> None:
    """``metadata=None`` goes through the model's own jsonb conversion (a JSON null), as it
    did when SQLAlchemy ran the statement itself."""
    schema.upgrade(dsn)
    manager = SessionManager(dsn, clock=Clock())
    sid, _ = run(manager.create_session("u"))
    run(manager.close())
    assert rows_of(
        dsn, "SELECT jsonb_typeof(metadata) FROM sessions WHERE session_id = %s", (sid,)
    ) == [("null",)]


STORE_BACKENDS = (
    "FROM pg_stat_activity "
    "WHERE datname = current_database() AND application_name = 'sessionmig-store'"
)


def _terminate_store_backends(dsn: str) -> int:
    """Terminate every connection of the store to this test's database; how many there were."""
    return len(rows_of(dsn, f"SELECT pg_terminate_backend(pid) {STORE_BACKENDS}"))


def _store_backends_left(dsn: str) -> int:
    """The store's connections still open, once those closed have had time to go (bounded,
    generously: a loaded server may take a while to end their backends)."""
    deadline = time.monotonic() + 60
    while True:
        [(left,)] = rows_of(dsn, f"SELECT count(*) {STORE_BACKENDS}")
        if left == 0 or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def test_lost_connections_are_retried_and_count_once(dsn) -> None:
    """The server drops every pooled connection (a restart, a failover): the next calls
    still answer, each validation counted exactly once."""
    schema.upgrade(dsn)
    manager = SessionManager(dsn, pool_size=3, retries=5)

    async def scenario():
        sid, _ = await manager.create_session("u")
        assert await manager.validate_session(sid)
        dropped = await asyncio.to_thread(_terminate_store_backends, dsn)
        answers = [await manager.validate_session(sid) for _ in range(4)]
        row = await manager.get_session(sid)
        await manager.close()
        return dropped, answers, row

    dropped, answers, row = run(scenario())
    assert dropped >= 1
    assert answers == [True] * 4 and row.request_count == 5


def test_a_data_error_is_raised_at_once_never_retried(dsn) -> None:
    """jsonb cannot hold \\u0000: the server refuses the value; that is no connection loss."""
    schema.upgrade(dsn)
    manager = SessionManager(dsn, retries=3)
    retried: list[bool] = []
    original = manager._after_connection_lost

    async def counting() -> None:
        retried.append(True)
        await original()

    manager._after_connection_lost = counting  # type: ignore[method-assign]

    async def scenario():
        try:
            await manager.create_session("u", {"bad": "nul \x00 inside"})
        finally:
            await manager.close()

    with pytest.raises(psycopg.errors.UntranslatableCharacter):
        run(scenario())
    assert retried == []
    assert rows_of(dsn, "SELECT count(*) FROM sessions") == [(0,)]


def test_a_statement_past_its_timeout_is_store_unavailable(dsn) -> None:
    """Another transaction holds the session's row lock: validate waits, the server cancels it
    at statement_timeout, and the app gets StoreUnavailable (not retried, the row untouched)."""
    schema.upgrade(dsn)
    manager = SessionManager(dsn, statement_timeout_ms=300)
    sid, _ = run(manager.create_session("u"))
    with psycopg.connect(dsn) as locker:
        locker.execute("SELECT 1 FROM sessions WHERE session_id = %s FOR UPDATE", (sid,))
        with pytest.raises(StoreUnavailable, match="did not answer within 300 ms"):
            run(manager.validate_session(sid))
    assert run(manager.get_session(sid)).request_count == 0
    run(manager.close())


def test_a_pool_with_no_free_connection_is_store_unavailable(dsn) -> None:
    """Every pool connection is busy past pool_timeout_s: StoreUnavailable, never a hang."""
    schema.upgrade(dsn)
    manager = SessionManager(dsn, pool_size=1, pool_timeout_s=0.3)

    async def scenario():
        sid, _ = await manager.create_session("u")
        async with manager.connection():
            with pytest.raises(StoreUnavailable, match="no connection of the session store"):
                await manager.validate_session(sid)
        ok = await manager.validate_session(sid)  # free again: served
        await manager.close()
        return ok

    assert run(scenario()) is True


def test_one_manager_serves_successive_event_loops(dsn) -> None:
    """Each asyncio.run is a new loop; the manager opens a pool there and lets the old go."""
    schema.upgrade(dsn)
    manager = SessionManager(dsn, pool_size=2)
    sid, _ = run(manager.create_session("u"))
    assert [run(manager.validate_session(sid)) for _ in range(3)] == [True] * 3
    assert run(manager.get_session(sid)).request_count == 3
    run(manager.close())
    run(manager.close())  # twice is fine
    # Nothing of the earlier loops' pools is left connected.
    assert _store_backends_left(dsn) == 0


def test_a_schema_other_than_public(dsn) -> None:
    """The compiled statements name the manager's schema (appcheck passes one)."""
    schema.upgrade(dsn)  # public.sessions, which must stay empty
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute('CREATE SCHEMA "app ""sessions"""')
        conn.execute(
            'CREATE TABLE "app ""sessions""".sessions (LIKE public.sessions INCLUDING ALL)'
        )
    manager = SessionManager(dsn, schema='app "sessions"', clock=Clock())

    async def scenario():
        sid, _ = await manager.create_session("u")
        found = await manager.active_among([sid, "session-nope"], START)
        await manager.close()
        return sid, found

    sid, found = run(scenario())
    assert found == {sid}
    assert rows_of(dsn, 'SELECT count(*) FROM "app ""sessions""".sessions') == [(1,)]
    assert rows_of(dsn, "SELECT count(*) FROM public.sessions") == [(0,)]


def test_get_session_manager_reads_the_pool_size() -> None:
    pg = get_session_manager({"DATABASE_URL": "postgresql://u@h/db", "SESSION_POOL_SIZE": "7"})
    assert isinstance(pg, SessionManager) and pg.pool_size == 7
    run(pg.close())
