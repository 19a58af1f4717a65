"""The store's retries: an acknowledged operation happens exactly once, an
unacknowledged one at most once — checked on the rows PostgreSQL holds, read directly.

A fault proxy sits between the store and the server. ``after``: the server runs the statement
and its answer is lost (the connection drops); ``before``: the statement never reaches the
server and the connection drops. The store cannot tell the two apart, so after either a write
is either made idempotent (create) or reported as not acknowledged (StoreUnavailable); a read,
or a statement on a connection found dead before it was sent, is retried.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from conftest import rows_of
from faultproxy import Fault, FaultProxy

from sessionmig.errors import StoreUnavailable
from sessionmig.postgres import schema
from sessionmig.store import SessionManager

USER = "exactly-once"
EXTRA = timedelta(hours=5)


def on_the_wire(sql: str) -> str:
    """A pattern for the store's statement ``sql`` as it reaches the server: psycopg sends its
    ``%(name)s`` placeholders as ``$n``."""
    parts = re.split(r"%\(\w+\)s", sql)
    return "^" + r"\$\d+".join(re.escape(part.replace("%%", "%")) for part in parts) + "$"


def _direct(dsn: str, query: str, params: tuple = ()) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(query, params)


@dataclass(frozen=True)
class Operation:
    """One write of the store: how to set it up, call it, and count it in the table."""

    name: str
    statement: str  # the attribute of ``manager.sql`` the fault is armed on
    call: Callable[[SessionManager, str], Awaitable[Any]]
    # How many times the operation shows in the table (0 or 1; 2 = applied twice).
    applied: Callable[[str, str, Any], int]
    # The answer of one application (given the session the setup made).
    answer: Callable[[str, str], Any]
    # Sent again after a lost answer (idempotent: create, keyed by its own id), so still
    # acknowledged; the others report the outcome unknown instead.
    resent: bool = False


def _created_rows(dsn: str, sid: str, answer: Any) -> int:
    [(count,)] = rows_of(dsn, "SELECT count(*) FROM sessions WHERE user_id = %s", (USER,))
    return count


def _created_answer(dsn: str, sid: str) -> Any:
    [row] = rows_of(dsn, "SELECT session_id, expires_at FROM sessions WHERE user_id = %s", (USER,))
    return row


def _request_count(dsn: str, sid: str, answer: Any) -> int:
    [(count,)] = rows_of(dsn, "SELECT request_count FROM sessions WHERE session_id = %s", (sid,))
    return count


def _extensions(dsn: str, sid: str, answer: Any) -> int:
    [(span,)] = rows_of(
        dsn, "SELECT expires_at - created_at FROM sessions WHERE session_id = %s", (sid,)
    )
    extra = span - timedelta(hours=24)
    assert extra % EXTRA == timedelta(0)
    return extra // EXTRA


def _deleted(dsn: str, sid: str, answer: Any) -> int:
    [(count,)] = rows_of(dsn, "SELECT count(*) FROM sessions WHERE session_id = %s", (sid,))
    return 1 - count


def _cleaned(dsn: str, sid: str, answer: Any) -> int:
    [(expired,)] = rows_of(dsn, "SELECT count(*) FROM sessions WHERE expires_at <= now()")
    return 1 if expired == 0 else 0


OPERATIONS = [
    Operation(
        "create_session",
        "create",
        lambda m, sid: m.create_session(USER, {"k": [1, "two"]}),
        _created_rows,
        _created_answer,
        resent=True,
    ),
    Operation(
        "validate_session",
        "validate",
        lambda m, sid: m.validate_session(sid),
        _request_count,
        lambda dsn, sid: True,
    ),
    Operation(
        "extend_session",
        "extend",
        lambda m, sid: m.extend_session(sid, EXTRA.total_seconds() / 3600),
        _extensions,
        lambda dsn, sid: True,
    ),
    Operation(
        "delete_session",
        "delete",
        lambda m, sid: m.delete_session(sid),
        _deleted,
        lambda dsn, sid: True,
    ),
    Operation(
        "cleanup_expired_sessions",
        "cleanup",
        lambda m, sid: m.cleanup_expired_sessions(),
        _cleaned,
        lambda dsn, sid: 2,
    ),
]


def _through_proxy(
    dsn: str, operation: Operation, point: str
) -> tuple[bool, Any, str, StoreUnavailable | None, bool]:
    """Set up, arm the fault on the operation's statement, call it once through the proxy.
    (acknowledged, its answer, the session's id, the error if any, whether the fault fired)."""
    schema.upgrade(dsn)
    with FaultProxy.for_dsn(dsn) as proxy:
        manager = SessionManager(proxy.dsn(dsn), pool_size=2, retries=3)
        faults: list[Fault] = []

        async def scenario() -> tuple[bool, Any, str, StoreUnavailable | None]:
            try:
                sid, _ = await manager.create_session("someone")
                if operation.name == "cleanup_expired_sessions":
                    for _ in range(2):
                        await manager.create_session("expired")
                    await asyncio.to_thread(
                        _direct,
                        dsn,
                        "UPDATE sessions SET expires_at = now() - interval '1 hour' "
                        "WHERE user_id = 'expired'",
                    )
                statement = getattr(manager.sql, operation.statement)
                faults.append(proxy.arm(on_the_wire(statement.sql), point))
                try:
                    answer = await operation.call(manager, sid)
                except StoreUnavailable as exc:
                    return False, None, sid, exc
                return True, answer, sid, None
            finally:
                await manager.close()

        acknowledged, answer, sid, error = asyncio.run(scenario())
        return acknowledged, answer, sid, error, faults[0].fired.is_set()


@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda o: o.name)
def test_a_write_whose_answer_is_lost_is_applied_at_most_once(dsn, operation) -> None:
    """The server ran it, the answer never came: it shows exactly once in the table (never
    twice), and an answer the store does give is that of one application."""
    acknowledged, answer, sid, error, fired = _through_proxy(dsn, operation, "after")
    assert fired
    assert operation.applied(dsn, sid, answer) == 1
    assert acknowledged is operation.resent
    if acknowledged:
        assert answer == operation.answer(dsn, sid)
    else:
        assert error is not None and "unknown" in str(error)


@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda o: o.name)
def test_a_write_that_never_reached_the_server_is_applied_at_most_once(dsn, operation) -> None:
    """The connection dropped as the statement was sent: either it was retried and applied
    once (acknowledged), or it was not applied and the store says so."""
    acknowledged, answer, sid, error, fired = _through_proxy(dsn, operation, "before")
    assert fired
    applied = operation.applied(dsn, sid, answer)
    if acknowledged:
        assert applied == 1 and answer == operation.answer(dsn, sid)
    else:
        assert applied == 0 and error is not None


def test_reads_are_retried_after_a_lost_answer(dsn) -> None:
    schema.upgrade(dsn)
    with FaultProxy.for_dsn(dsn) as proxy:
        manager = SessionManager(proxy.dsn(dsn), pool_size=2, retries=3)

        async def scenario() -> tuple[Any, int]:
            try:
                sid, _ = await manager.create_session("reader")
                proxy.arm(on_the_wire(manager.sql.get.sql), "after")
                proxy.arm(on_the_wire(manager.sql.count.sql), "after")
                return await manager.get_session(sid), await manager.get_active_session_count()
            finally:
                await manager.close()

        row, count = asyncio.run(scenario())
    assert row.user_id == "reader" and row.request_count == 0
    assert count == 1


def test_connections_dropped_while_idle_are_replaced_and_the_write_retried(dsn) -> None:
    """Every pooled connection drops while idle (a restart, a failover, a proxy): the server
    never got the next statement, so it is sent again on a new connection, and counted once."""
    schema.upgrade(dsn)
    with FaultProxy.for_dsn(dsn) as proxy:
        manager = SessionManager(proxy.dsn(dsn), pool_size=2, retries=3)

        async def scenario() -> list[bool]:
            try:
                sid, _ = await manager.create_session("idle")
                answers = []
                for _ in range(3):
                    proxy.cut_all()
                    await asyncio.sleep(0.05)  # the drop reaches the client's sockets
                    answers.append(await manager.validate_session(sid))
                return answers
            finally:
                await manager.close()

        answers = asyncio.run(scenario())
    assert answers == [True] * 3
    assert rows_of(dsn, "SELECT request_count FROM sessions WHERE user_id = 'idle'") == [(3,)]


def test_a_write_the_server_ended_before_it_completed_is_sent_again(dsn) -> None:
    """The server terminates the backend while validate waits on a row lock: its FATAL
    error is the whole answer, so nothing ran; the store sends it again and it counts once."""
    schema.upgrade(dsn)
    manager = SessionManager(dsn, pool_size=1, retries=3)

    def terminate_the_waiting_backend() -> int:
        with psycopg.connect(dsn, autocommit=True) as conn:
            for _ in range(200):
                pids = conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                    "AND application_name = 'sessionmig-store' AND wait_event_type = 'Lock'"
                ).fetchall()
                if pids:
                    conn.execute("SELECT pg_terminate_backend(%s)", pids[0])
                    return len(pids)
                conn.execute("SELECT pg_sleep(0.05)")
        return 0

    async def scenario() -> tuple[bool, int]:
        try:
            sid, _ = await manager.create_session("locked")
            locker = await psycopg.AsyncConnection.connect(dsn)
            await locker.execute("SELECT 1 FROM sessions WHERE session_id = %s FOR UPDATE", (sid,))
            validating = asyncio.create_task(manager.validate_session(sid))
            terminated = await asyncio.to_thread(terminate_the_waiting_backend)
            await asyncio.sleep(0.2)  # the store sends it again: it waits on the lock anew
            await locker.rollback()
            await locker.close()
            return await validating, terminated
        finally:
            await manager.close()

    answer, terminated = asyncio.run(scenario())
    assert terminated == 1 and answer is True
    assert rows_of(dsn, "SELECT request_count FROM sessions WHERE user_id = 'locked'") == [(1,)]


def test_the_store_cursor_sees_whether_a_command_completed(dsn) -> None:
    """The store tells a FATAL that ended a statement before it completed from one after it by
    what psycopg's result check saw; if psycopg stopped calling it, this fails."""
    from sessionstore.manager import _Cursor

    async def scenario() -> tuple[bool | None, bool | None]:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            done = _Cursor(conn)
            await done.execute("SELECT %s::int", (1,), prepare=True)
            failed = _Cursor(conn)
            with pytest.raises(psycopg.errors.DivisionByZero):
                await failed.execute("SELECT 1 / %s::int", (0,))
            return done.completed, failed.completed

    assert asyncio.run(scenario()) == (True, False)
