"""The application store under an attacker's cookie and under load.

A session id comes straight from a cookie, so any value at all must make the store answer
"no such session" rather than raise; ``request_count`` must stop at 2³¹−1; and time is read
when the change happens (the database's clock on PostgreSQL, inside SQLite's write lock on the
legacy store), so a call that queued does not accept an expired session or move
``last_activity`` back.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import rows_of
from psycopg import sql

from sessionmig.postgres import embedded, schema
from sessionmig.store import LegacySQLiteSessionManager, SessionManager

START = datetime(2026, 1, 15, 3, 0, tzinfo=UTC)
INT_MAX = 2**31 - 1


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: datetime = START) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Store:
    """A manager, and a way to read and write its table behind its back."""

    manager: SessionManager | LegacySQLiteSessionManager
    clock: Clock
    # (sql with %s / ? placeholders as the backend wants, params) -> rows
    raw: Callable[[str, tuple], list[tuple]]
    kind: str


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def _sqlite_raw(path: Path) -> Callable[[str, tuple], list[tuple]]:
    def raw(query: str, params: tuple = ()) -> list[tuple]:
        with sqlite3.connect(path) as conn:
            return conn.execute(query.replace("%s", "?"), params).fetchall()

    return raw


def _pg_raw(dsn: str) -> Callable[[str, tuple], list[tuple]]:
    def raw(query: str, params: tuple = ()) -> list[tuple]:
        with psycopg.connect(dsn, autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    return raw


@pytest.fixture(params=["postgres", "sqlite"])
def store(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> Iterator[Store]:
    """Each store with a hand clock; the PostgreSQL one on every server under test."""
    clock = Clock()
    if request.param == "postgres":
        dsn = request.getfixturevalue("dsn")
        schema.upgrade(dsn)
        made = Store(SessionManager(dsn, clock=clock), clock, _pg_raw(dsn), "postgres")
    else:
        path = tmp_path / "sessions.db"
        manager = LegacySQLiteSessionManager(path, zone="Asia/Seoul", clock=clock)
        made = Store(manager, clock, _sqlite_raw(path), "sqlite")
    yield made
    run(made.manager.close())


class Cookie(str):
    """A str subclass, as a web framework's cookie type may be."""


# Every kind of value a hostile or broken client can put where a session id goes.
HOSTILE_IDS = {
    "nul": "abc\x00def",
    "nul_after_real_prefix": "session-\x00",
    "lone_high_surrogate": "\ud800",
    "lone_low_surrogate_inside": "session-\udfff-x",
    "str_subclass_with_nul": Cookie("abc\x00def"),
    "huge_ascii": "s" * (2**20 + 1),
    "huge_in_bytes_only": "가" * (2**20 // 3 + 1),  # under the limit in characters, over in bytes
    "long_beyond_100_chars": "session-" + "x" * 5000,
    "int": 12345,
    "none": None,
    "bytes": b"session-abc",
    "list": ["session-abc"],
    "dict": {"session_id": "session-abc"},
    "float_nan": float("nan"),
}


@pytest.mark.parametrize("hostile", list(HOSTILE_IDS.values()), ids=list(HOSTILE_IDS))
def test_hostile_session_ids_are_no_session_never_an_error(store: Store, hostile: object) -> None:
    manager = store.manager

    async def scenario() -> tuple[Any, ...]:
        real, _ = await manager.create_session("victim")
        answers = (
            await manager.validate_session(hostile),  # type: ignore[arg-type]
            await manager.get_session(hostile),  # type: ignore[arg-type]
            await manager.delete_session(hostile),  # type: ignore[arg-type]
            await manager.extend_session(hostile, 2),  # type: ignore[arg-type]
        )
        return real, answers

    real, answers = run(scenario())
    assert answers == (False, None, False, False)
    # Nothing was touched on the way: the real session is exactly as created.
    assert store.raw(
        "SELECT user_id, request_count FROM sessions WHERE session_id = %s", (real,)
    ) == [("victim", 0)]
    assert store.raw("SELECT count(*) FROM sessions", ()) == [(1,)]


def test_validate_with_nul_id_returns_false(store: Store) -> None:
    assert run(store.manager.validate_session("abc\x00def")) is False


def test_validate_with_lone_surrogate_id_returns_false(store: Store) -> None:
    assert run(store.manager.validate_session("\udcff")) is False


def test_an_id_still_works_through_a_str_subclass(store: Store) -> None:
    """The guard turns a str subclass into plain text; it must not lock real users out."""

    async def scenario() -> tuple[bool, Any]:
        sid, _ = await store.manager.create_session("u")
        ok = await store.manager.validate_session(Cookie(sid))
        return ok, await store.manager.get_session(Cookie(sid))

    ok, row = run(scenario())
    assert ok is True and row.request_count == 1


def test_id_the_database_cannot_encode_is_no_session(server_url: str) -> None:
    """In a LATIN1 database a Hangul id cannot even be sent as a parameter (22P05)."""
    name = f"smtest_latin1_{uuid.uuid4().hex[:10]}"
    admin = embedded.with_database(server_url, "postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                "CREATE DATABASE {} ENCODING 'LATIN1' LOCALE 'C' "
                "LOCALE_PROVIDER libc TEMPLATE template0"
            ).format(sql.Identifier(name))
        )
    dsn = embedded.with_database(server_url, name)
    try:
        schema.upgrade(dsn)
        manager = SessionManager(dsn, clock=Clock())

        async def scenario() -> tuple[Any, ...]:
            real, _ = await manager.create_session("u")
            answers = (
                await manager.validate_session("세션-토큰"),
                await manager.get_session("세션-토큰"),
                await manager.delete_session("세션-토큰"),
                await manager.extend_session("세션-토큰", 1),
                await manager.validate_session(real),
            )
            await manager.close()
            return answers

        assert run(scenario()) == (False, None, False, False, True)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.mark.parametrize("start_count", [INT_MAX - 1, INT_MAX])
def test_request_count_saturates_at_int_max(store: Store, start_count: int) -> None:
    manager = store.manager
    sid, _ = run(manager.create_session("busy"))
    store.raw("UPDATE sessions SET request_count = %s WHERE session_id = %s", (start_count, sid))

    async def scenario() -> list[bool]:
        return [await manager.validate_session(sid) for _ in range(3)]

    assert run(scenario()) == [True, True, True]
    assert store.raw("SELECT request_count FROM sessions WHERE session_id = %s", (sid,)) == [
        (INT_MAX,)
    ]
    assert run(manager.get_session(sid)).request_count == INT_MAX


def test_request_count_still_counts_below_the_limit(store: Store) -> None:
    """The saturation must not cost the ordinary increment."""
    sid, _ = run(store.manager.create_session())
    store.raw("UPDATE sessions SET request_count = %s WHERE session_id = %s", (INT_MAX - 3, sid))
    run(store.manager.validate_session(sid))
    assert store.raw("SELECT request_count FROM sessions WHERE session_id = %s", (sid,)) == [
        (INT_MAX - 2,)
    ]


def test_last_activity_never_moves_backwards(store: Store) -> None:
    """A validation that committed with a later time first (PostgreSQL: another one that got
    the row lock first; SQLite: this host's clock stepped back) is never undone."""
    manager, clock = store.manager, store.clock
    sid, _ = run(manager.create_session())
    later = START + timedelta(hours=2)
    stored_later = later if store.kind == "postgres" else manager._local(later)
    store.raw("UPDATE sessions SET last_activity = %s WHERE session_id = %s", (stored_later, sid))
    clock.now = START + timedelta(hours=1)
    assert run(manager.validate_session(sid)) is True
    got = run(manager.get_session(sid))
    assert got.last_activity == later and got.request_count == 1
    # And it still moves forward when the time does.
    clock.now = START + timedelta(hours=3)
    assert run(manager.validate_session(sid)) is True
    assert run(manager.get_session(sid)).last_activity == START + timedelta(hours=3)


async def _db_now(conn: psycopg.AsyncConnection[Any]) -> datetime:
    """The database's clock, read on ``conn`` (a connection of the store's own pool)."""
    cur = await conn.execute("SELECT clock_timestamp()")
    return (await cur.fetchone())[0]  # type: ignore[index]


def test_pg_validate_waiting_for_the_pool_rejects_a_session_that_expired_meanwhile(
    dsn: str,
) -> None:
    """The only pool connection is held; validate queues for it; the session expires (by the
    database's clock) while it waits; once it runs, the session is refused and deleted."""
    schema.upgrade(dsn)
    # The database's clock; a pool wait long enough for the session to expire meanwhile.
    manager = SessionManager(dsn, ttl_hours=2 / 3600, pool_size=1, pool_timeout_s=60)

    async def scenario() -> tuple[bool, bool, Any]:
        sid, expires = await manager.create_session("u")
        async with manager.connection() as held:
            waiting = asyncio.create_task(manager.validate_session(sid))
            await asyncio.sleep(0.2)
            queued = not waiting.done()
            while not await _db_now(held) > expires:
                await asyncio.sleep(0.05)
        valid = await asyncio.wait_for(waiting, 20)
        row = await manager.get_session(sid)
        await manager.close()
        return queued, valid, row

    queued, valid, row = run(scenario())
    assert queued  # it really did wait for the connection
    assert valid is False and row is None


def test_pg_validate_waiting_for_the_pool_stamps_the_time_it_ran(dsn: str) -> None:
    """last_activity is the database's time when the statement ran, not when the call began
    queueing: never earlier than a database time read just before the connection is freed."""
    schema.upgrade(dsn)
    manager = SessionManager(dsn, pool_size=1, pool_timeout_s=60)

    async def scenario() -> tuple[Any, Any, bool]:
        sid, _ = await manager.create_session("u")
        async with manager.connection() as held:
            waiting = asyncio.create_task(manager.validate_session(sid))
            await asyncio.sleep(0.5)
            released_at = await _db_now(held)
        valid = await asyncio.wait_for(waiting, 20)
        await manager.close()
        return sid, released_at, valid

    sid, released_at, valid = run(scenario())
    after = rows_of(dsn, "SELECT clock_timestamp()")[0][0]
    [(last, count, created)] = rows_of(
        dsn,
        "SELECT last_activity, request_count, created_at FROM sessions WHERE session_id = %s",
        (sid,),
    )
    assert valid is True and count == 1
    assert released_at <= last <= after
    assert last - created >= timedelta(seconds=0.5)


def test_pg_times_come_from_the_database_clock(dsn: str) -> None:
    """Without an injected clock every instant the store writes is the server's own."""
    schema.upgrade(dsn)
    manager = SessionManager(dsn, ttl_hours=1)
    before = rows_of(dsn, "SELECT clock_timestamp()")[0][0]

    async def scenario() -> tuple[str, datetime, bool]:
        sid, expires = await manager.create_session()
        ok = await manager.validate_session(sid)
        await manager.close()
        return sid, expires, ok

    sid, expires, ok = run(scenario())
    after = rows_of(dsn, "SELECT clock_timestamp()")[0][0]
    [(created, stored_expires, last)] = rows_of(
        dsn,
        "SELECT created_at, expires_at, last_activity FROM sessions WHERE session_id = %s",
        (sid,),
    )
    assert ok is True
    assert before <= created <= last <= after
    assert expires == stored_expires == created + timedelta(hours=1)


def test_pg_ttl_and_extension_are_exact_hours_on_a_dst_timezone_server(dsn: str) -> None:
    """Now that the server adds the TTL, durations must be exact (24 h is not "1 day" of a DST
    zone), and instants still come back in UTC."""
    schema.upgrade(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        [(database,)] = conn.execute("SELECT current_database()").fetchall()
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET timezone = 'America/New_York'").format(
                sql.Identifier(database)
            )
        )
    # 2026-03-08 07:00 UTC is the US spring-forward: a calendar day across it is 23 hours.
    clock = Clock(datetime(2026, 3, 7, 12, 0, tzinfo=UTC))
    manager = SessionManager(dsn, ttl_hours=24, clock=clock)

    async def scenario() -> tuple[str, datetime, str, bool]:
        across, across_expires = await manager.create_session()  # its TTL spans the change
        clock.now = datetime(2026, 3, 6, 12, 0, tzinfo=UTC)
        before, _ = await manager.create_session()  # expires before the change ...
        extended = await manager.extend_session(before, 48)  # ... and is extended across it
        row = await manager.get_session(before)
        await manager.close()
        return across, across_expires, row, extended

    across, across_expires, row, extended = run(scenario())
    assert across_expires == datetime(2026, 3, 8, 12, 0, tzinfo=UTC) and extended is True
    # The store hands back UTC instants even though the server's zone is New York.
    assert row.expires_at.utcoffset() == timedelta(0)
    assert row.created_at.utcoffset() == timedelta(0)
    assert rows_of(
        dsn,
        "SELECT session_id = %s, expires_at FROM sessions ORDER BY session_id = %s",
        (across, across),
    ) == [
        (False, datetime(2026, 3, 9, 12, 0, tzinfo=UTC)),
        (True, datetime(2026, 3, 8, 12, 0, tzinfo=UTC)),
    ]


def test_legacy_validate_reads_the_clock_after_waiting_for_the_write_lock(
    tmp_path: Path,
) -> None:
    """Another process holds SQLite's write lock; validate waits; the session expires
    meanwhile; once it gets the lock, the session is refused and deleted."""
    path = tmp_path / "sessions.db"
    clock = Clock()
    manager = LegacySQLiteSessionManager(path, zone="Asia/Seoul", clock=clock)
    sid, expires = run(manager.create_session("u"))
    other = sqlite3.connect(path, isolation_level=None)

    async def scenario() -> tuple[bool, bool]:
        other.execute("BEGIN IMMEDIATE")
        try:
            waiting = asyncio.create_task(manager.validate_session(sid))
            await asyncio.sleep(0.3)
            queued = not waiting.done()
            clock.now = expires  # expired while it waited
        finally:
            other.execute("COMMIT")
        return queued, await asyncio.wait_for(waiting, 20)

    queued, valid = run(scenario())
    other.close()
    row = run(manager.get_session(sid))
    run(manager.close())
    assert queued and valid is False and row is None
    assert _sqlite_raw(path)("SELECT count(*) FROM sessions", ()) == [(0,)]
