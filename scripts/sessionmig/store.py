"""The application's session store: the async ``SessionManager`` on PostgreSQL, and the legacy
SQLite one behind the same interface (the rollback target), chosen by ``get_session_manager``.

Semantics (the digest's seven methods, all instants timezone-aware UTC): a session is *active*
while ``expires_at > now``; at ``expires_at`` it has expired. ``validate_session`` is one atomic
statement — an expired session is deleted, an active one has ``last_activity`` bumped and
``request_count`` incremented — so concurrent validations each count. Transient connection
errors are retried a bounded number of times; a database that stays down raises
:class:`~sessionmig.errors.StoreUnavailable` after the connect timeout, never hangs.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any, Protocol, TypeVar
from zoneinfo import ZoneInfo

from sqlalchemy import and_, delete, func, insert, select, update
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from .errors import StoreUnavailable
from .params import redact, sqlalchemy_url
from .schema import SessionRecord

T = TypeVar("T")
Clock = Callable[[], datetime]
SESSIONS = SessionRecord.__table__
# Retried: the connection broke or could not be made, or the server asked us to retry
# (serialization failure, deadlock). Anything else is a bug or bad input and is raised at once.
RETRY_SQLSTATES = {"40001", "40P01", "57P01", "08000", "08003", "08006", "08001", "08004"}


def utc_now() -> datetime:
    return datetime.now(UTC)


class SessionStore(Protocol):
    """What the web app calls; both managers implement it."""

    async def create_session(
        self, user_id: str | None = None, metadata: Any = None
    ) -> tuple[str, datetime]: ...
    async def validate_session(self, session_id: str) -> bool: ...
    async def get_session(self, session_id: str) -> dict[str, Any] | None: ...
    async def delete_session(self, session_id: str) -> bool: ...
    async def cleanup_expired_sessions(self) -> int: ...
    async def extend_session(self, session_id: str, hours: float = 24) -> bool: ...
    async def get_active_session_count(self) -> int: ...
    async def close(self) -> None: ...


def new_session_id() -> str:
    return f"session-{uuid.uuid4()}"


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, OperationalError | DBAPIError) and getattr(
        exc, "connection_invalidated", False
    ):
        return True
    sqlstate = getattr(getattr(exc, "orig", None), "sqlstate", None)
    return sqlstate in RETRY_SQLSTATES or (isinstance(exc, OperationalError) and sqlstate is None)


class SessionManager:
    """Sessions in PostgreSQL through a pooled async SQLAlchemy engine (psycopg 3)."""

    def __init__(
        self,
        url: str,
        *,
        ttl_hours: float = 24,
        schema: str = "public",
        pool_size: int = 20,
        connect_timeout_s: int = 5,
        statement_timeout_ms: int = 5000,
        retries: int = 3,
        clock: Clock = utc_now,
    ) -> None:
        self.ttl = timedelta(hours=ttl_hours)
        self.retries = retries
        self.clock = clock
        self.engine: AsyncEngine = create_async_engine(
            sqlalchemy_url(url),
            pool_size=pool_size,
            max_overflow=pool_size // 2,
            pool_timeout=30,
            pool_pre_ping=True,
            connect_args={
                "connect_timeout": connect_timeout_s,
                "options": f"-c statement_timeout={statement_timeout_ms}",
                "application_name": "sessionmig-store",
            },
            execution_options={"schema_translate_map": {None: schema}},
        )

    async def _run(self, work: Callable[[Any], Awaitable[T]]) -> T:
        """Run ``work(connection)`` in one transaction, retrying transient failures."""
        for attempt in range(self.retries + 1):
            try:
                async with self.engine.begin() as conn:
                    return await work(conn)
            except (OperationalError, DBAPIError) as exc:
                if not _transient(exc):
                    raise
                if attempt == self.retries:
                    raise StoreUnavailable(
                        f"the session database is unavailable after {attempt + 1} attempts: "
                        f"{redact(str(exc.orig or exc)).strip()}"
                    ) from None
                await asyncio.sleep(0.05 * 2**attempt)
        raise AssertionError("unreachable")

    async def create_session(
        self, user_id: str | None = None, metadata: Any = None
    ) -> tuple[str, datetime]:
        session_id, now = new_session_id(), self.clock()
        expires = now + self.ttl
        statement = insert(SESSIONS).values(
            session_id=session_id,
            user_id=user_id,
            metadata=metadata,
            created_at=now,
            expires_at=expires,
            last_activity=now,
            request_count=0,
        )

        async def work(conn: Any) -> None:
            await conn.execute(statement)

        await self._run(work)
        return session_id, expires

    async def validate_session(self, session_id: str) -> bool:
        now = self.clock()
        expired = (
            delete(SESSIONS)
            .where(SESSIONS.c.session_id == session_id, SESSIONS.c.expires_at <= now)
            .returning(SESSIONS.c.session_id)
            .cte("expired")
        )
        bumped = (
            update(SESSIONS)
            .where(SESSIONS.c.session_id == session_id, SESSIONS.c.expires_at > now)
            .values(last_activity=now, request_count=SESSIONS.c.request_count + 1)
            .returning(SESSIONS.c.session_id)
            .cte("bumped")
        )
        # One statement: the delete-if-expired and the bump cannot interleave with anything.
        statement = select(
            select(func.count()).select_from(bumped).scalar_subquery(),
            select(func.count()).select_from(expired).scalar_subquery(),
        )

        async def work(conn: Any) -> bool:
            valid, _ = (await conn.execute(statement)).one()
            return valid == 1

        return await self._run(work)

    async def get_session(self, session_id: str) -> dict[str, Any] | None:
        async def work(conn: Any) -> dict[str, Any] | None:
            row = (
                (await conn.execute(select(SESSIONS).where(SESSIONS.c.session_id == session_id)))
                .mappings()
                .first()
            )
            return dict(row) if row else None

        return await self._run(work)

    async def delete_session(self, session_id: str) -> bool:
        async def work(conn: Any) -> bool:
            result = await conn.execute(delete(SESSIONS).where(SESSIONS.c.session_id == session_id))
            return result.rowcount == 1

        return await self._run(work)

    async def cleanup_expired_sessions(self) -> int:
        now = self.clock()

        async def work(conn: Any) -> int:
            return (
                await conn.execute(delete(SESSIONS).where(SESSIONS.c.expires_at <= now))
            ).rowcount

        return await self._run(work)

    async def extend_session(self, session_id: str, hours: float = 24) -> bool:
        now = self.clock()

        async def work(conn: Any) -> bool:
            result = await conn.execute(
                update(SESSIONS)
                .where(SESSIONS.c.session_id == session_id, SESSIONS.c.expires_at > now)
                .values(expires_at=SESSIONS.c.expires_at + timedelta(hours=hours))
            )
            return result.rowcount == 1

        return await self._run(work)

    async def get_active_session_count(self) -> int:
        now = self.clock()

        async def work(conn: Any) -> int:
            query = select(func.count()).select_from(SESSIONS).where(SESSIONS.c.expires_at > now)
            return (await conn.execute(query)).scalar_one()

        return await self._run(work)

    async def active_among(self, session_ids: Iterable[str], at: datetime) -> set[str]:
        """Which of ``session_ids`` ``validate_session`` would accept at ``at`` — read only:
        the same predicate, no counter touched (for the runbook's application check)."""
        ids = list(session_ids)

        async def work(conn: Any) -> set[str]:
            query = select(SESSIONS.c.session_id).where(
                and_(SESSIONS.c.session_id.in_(ids), SESSIONS.c.expires_at > at)
            )
            return {r[0] for r in await conn.execute(query)}

        return await self._run(work) if ids else set()

    async def close(self) -> None:
        await self.engine.dispose()


class LegacySQLiteSessionManager:
    """The AS-IS store: synchronous sqlite3 over the original schema, naive wall-clock times in
    ``zone`` written as Python's sqlite3 adapter writes them, wrapped in the async interface."""

    def __init__(
        self,
        path: str | Path,
        *,
        ttl_hours: float = 24,
        zone: tzinfo | str = "UTC",
        clock: Clock = utc_now,
    ) -> None:
        self.path = Path(path)
        self.ttl = timedelta(hours=ttl_hours)
        self.zone = ZoneInfo(zone) if isinstance(zone, str) else zone
        self.clock = clock
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS sessions (session_id TEXT PRIMARY KEY, user_id TEXT, "
            "metadata TEXT, created_at TIMESTAMP NOT NULL, expires_at TIMESTAMP NOT NULL, "
            "last_activity TIMESTAMP NOT NULL, request_count INTEGER DEFAULT 0)"
        )
        self._conn.execute("CREATE INDEX IF NOT EXISTS idx_expires_at ON sessions(expires_at)")
        self._conn.commit()

    def _local(self, moment: datetime) -> str:
        return moment.astimezone(self.zone).replace(tzinfo=None).isoformat(" ")

    def _instant(self, text: str) -> datetime:
        parsed = datetime.fromisoformat(text)
        return (parsed if parsed.tzinfo else parsed.replace(tzinfo=self.zone)).astimezone(UTC)

    async def _call(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def locked() -> T:
            with self._lock, self._conn:
                return work(self._conn)

        return await asyncio.to_thread(locked)

    async def create_session(
        self, user_id: str | None = None, metadata: Any = None
    ) -> tuple[str, datetime]:
        session_id, now = new_session_id(), self.clock()
        expires = now + self.ttl
        meta = None if metadata is None else json.dumps(metadata, ensure_ascii=False)
        await self._call(
            lambda c: c.execute(
                "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, 0)",
                (
                    session_id,
                    user_id,
                    meta,
                    self._local(now),
                    self._local(expires),
                    self._local(now),
                ),
            )
        )
        return session_id, expires

    async def validate_session(self, session_id: str) -> bool:
        now = self.clock()

        def work(c: sqlite3.Connection) -> bool:
            row = c.execute(
                "SELECT expires_at FROM sessions WHERE session_id = ?", (session_id,)
            ).fetchone()
            if row is None:
                return False
            if self._instant(row[0]) <= now:
                c.execute("DELETE FROM sessions WHERE session_id = ?", (session_id,))
                return False
            c.execute(
                "UPDATE sessions SET last_activity = ?, request_count = request_count + 1 "
                "WHERE session_id = ?",
                (self._local(now), session_id),
            )
            return True

        return await self._call(work)

    async def get_session(self, session_id: str) -> dict[str, Any] | None:
        def work(c: sqlite3.Connection) -> dict[str, Any] | None:
            row = c.execute("SELECT * FROM sessions WHERE session_id = ?", (session_id,)).fetchone()
            if row is None:
                return None
            sid, user, meta, created, expires, last, count = row
            return {
                "session_id": sid,
                "user_id": user,
                "metadata": None if meta is None else json.loads(meta),
                "created_at": self._instant(created),
                "expires_at": self._instant(expires),
                "last_activity": self._instant(last),
                "request_count": count,
            }

        return await self._call(work)

    async def delete_session(self, session_id: str) -> bool:
        return await self._call(
            lambda c: (
                c.execute("DELETE FROM sessions WHERE session_id = ?", (session_id,)).rowcount == 1
            )
        )

    async def cleanup_expired_sessions(self) -> int:
        now = self.clock()

        def work(c: sqlite3.Connection) -> int:
            expired = [
                sid
                for sid, exp in c.execute("SELECT session_id, expires_at FROM sessions")
                if self._instant(exp) <= now
            ]
            c.executemany("DELETE FROM sessions WHERE session_id = ?", [(s,) for s in expired])
            return len(expired)

        return await self._call(work)

    async def extend_session(self, session_id: str, hours: float = 24) -> bool:
        now = self.clock()

        def work(c: sqlite3.Connection) -> bool:
            row = c.execute(
                "SELECT expires_at FROM sessions WHERE session_id = ?", (session_id,)
            ).fetchone()
            if row is None or self._instant(row[0]) <= now:
                return False
            later = self._instant(row[0]) + timedelta(hours=hours)
            c.execute(
                "UPDATE sessions SET expires_at = ? WHERE session_id = ?",
                (self._local(later), session_id),
            )
            return True

        return await self._call(work)

    async def get_active_session_count(self) -> int:
        now = self.clock()

        def work(c: sqlite3.Connection) -> int:
            return sum(
                self._instant(e) > now for (e,) in c.execute("SELECT expires_at FROM sessions")
            )

        return await self._call(work)

    async def close(self) -> None:
        await asyncio.to_thread(self._conn.close)


def get_session_manager(environ: dict[str, str] | None = None) -> SessionStore:
    """The store the environment asks for: ``SESSION_DB_TYPE`` = ``postgres`` (default, with
    ``DATABASE_URL``) or ``sqlite`` (the rollback switch, with ``SESSION_SQLITE_PATH`` and
    ``SESSION_TIMEZONE``); ``SESSION_TTL_HOURS`` (default 24) for both."""
    env = os.environ if environ is None else environ
    kind = env.get("SESSION_DB_TYPE", "postgres").strip().lower()
    ttl = float(env.get("SESSION_TTL_HOURS", "24"))
    if kind == "postgres":
        url = env.get("DATABASE_URL")
        if not url:
            raise StoreUnavailable("SESSION_DB_TYPE=postgres needs DATABASE_URL to be set")
        return SessionManager(url, ttl_hours=ttl)
    if kind == "sqlite":
        path = env.get("SESSION_SQLITE_PATH", "backend/data/system/sessions/sessions.db")
        return LegacySQLiteSessionManager(
            path, ttl_hours=ttl, zone=env.get("SESSION_TIMEZONE", "UTC")
        )
    raise StoreUnavailable(f"SESSION_DB_TYPE={kind!r}: use postgres or sqlite")
