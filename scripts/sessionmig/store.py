"""The application's session store: the async ``SessionManager`` on PostgreSQL, and the legacy
SQLite one behind the same interface (the rollback target), chosen by ``get_session_manager``.

Semantics (the digest's seven methods, all instants timezone-aware UTC): a session is *active*
while ``expires_at > now``; at ``expires_at`` it has expired. ``validate_session`` is one atomic
statement — an expired session is deleted, an active one has ``last_activity`` bumped and
``request_count`` incremented — so concurrent validations each count. Transient connection
errors are retried a bounded number of times; a database that stays down raises
:class:`~sessionmig.errors.StoreUnavailable` after the connect timeout, never hangs.

``now`` is the database's clock, read inside the statement itself (``statement_timestamp()``),
so a call that queued for a pool connection is judged at the moment it reaches the server, and
every app host shares one clock. ``last_activity`` only ever moves forward and ``request_count``
stops at 2³¹−1 (the column's ``integer``) instead of failing. A session id comes from a cookie,
so anything at all may arrive: a value that cannot be a stored session id (not text, a NUL,
a lone surrogate, longer than any stored id can be, or not representable in the database's
encoding) is simply not a session — False or None — and never an exception.
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

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    DateTime,
    Integer,
    and_,
    delete,
    func,
    insert,
    literal,
    select,
    text,
    update,
)
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
# The server could not turn the id into its own encoding (a database that is not UTF8): such an
# id cannot be stored there, so it names no session.
UNREPRESENTABLE_SQLSTATES = {"22P05", "22021"}
# request_count is an ``integer``: it saturates here rather than overflow (and fail every call).
MAX_REQUEST_COUNT = 2**31 - 1
# No stored id is longer: PostgreSQL's primary-key btree refuses entries over 2,704 bytes even
# after compression (at most ~255:1, lz4), and the app's own ids are 44 characters. Checking
# the length first keeps a hostile multi-megabyte cookie off the wire and out of SQLite's
# "string or blob too big". A length on the model's column, if it ever gets one, is tighter.
MAX_SESSION_ID_BYTES = 1 << 20
MAX_SESSION_ID_CHARS: int | None = getattr(SESSIONS.c.session_id.type, "length", None)
TIMESTAMPTZ = DateTime(timezone=True)


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


def usable_session_id(value: object) -> str | None:
    """``value`` as a plain ``str`` if it could be a stored session id, else None.

    Both stores hold the same ids (the rollback carries PostgreSQL's back to SQLite), so one
    rule serves both: text that PostgreSQL can store (no NUL, valid UTF-8, so no lone
    surrogates) and no longer than any stored id can be. Anything else names no session.
    """
    if not isinstance(value, str):
        return None
    # A str subclass could override encode/__eq__ and send the driver something else.
    plain = str.__str__(value)
    if MAX_SESSION_ID_CHARS is not None and len(plain) > MAX_SESSION_ID_CHARS:
        return None
    # UTF-8 needs at least one byte per character: a cheap bound before encoding it.
    if len(plain) > MAX_SESSION_ID_BYTES or "\x00" in plain:
        return None
    try:
        encoded = plain.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: not text any database can hold
        return None
    return plain if len(encoded) <= MAX_SESSION_ID_BYTES else None


def exact_interval(span: timedelta) -> ColumnElement[Any]:
    """``span`` as an SQL interval of microseconds only. psycopg sends a timedelta as
    ``N days …``, and ``timestamptz + '1 day'`` is a calendar day in the session's TimeZone
    (23 or 25 hours across a DST change); a TTL is an exact duration."""
    micros = (span.days * 86_400 + span.seconds) * 1_000_000 + span.microseconds
    return literal(micros, BigInteger) * text("interval '1 microsecond'")


def _unrepresentable(exc: DBAPIError) -> bool:
    return getattr(exc.orig, "sqlstate", None) in UNREPRESENTABLE_SQLSTATES


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
        clock: Clock | None = None,
    ) -> None:
        self.ttl = timedelta(hours=ttl_hours)
        self.retries = retries
        # None (production): the database's clock. A clock given here (tests, a replayed
        # instant) is read inside the transaction too, once a connection is held.
        self.clock = clock
        self.engine: AsyncEngine = create_async_engine(
            sqlalchemy_url(url),
            pool_size=pool_size,
            max_overflow=pool_size // 2,
            pool_timeout=30,
            pool_pre_ping=True,
            connect_args={
                "connect_timeout": connect_timeout_s,
                # TimeZone=UTC: the instants handed back are UTC whatever the server's default.
                "options": f"-c statement_timeout={statement_timeout_ms} -c TimeZone=UTC",
                "application_name": "sessionmig-store",
                # Python text is Unicode: send it as UTF-8 whatever the database's encoding, so
                # a value that database cannot hold is refused by the server with a SQLSTATE
                # (22P05) instead of a UnicodeEncodeError raised inside the driver.
                "client_encoding": "UTF8",
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

    def _now(self) -> ColumnElement[datetime]:
        """The instant a statement runs at. Call it inside ``work``: only then is a pool
        connection held, so queueing for one never makes the time stale."""
        if self.clock is None:
            # One value for the whole statement, taken when it reaches the server; stable,
            # so the expired and the active branch of validate see the same instant.
            return func.statement_timestamp(type_=TIMESTAMPTZ)
        return literal(self.clock(), TIMESTAMPTZ)

    async def _by_id(self, work: Callable[[Any], Awaitable[T]], absent: T) -> T:
        """``_run`` for a call keyed by a session id that the server may not represent."""
        try:
            return await self._run(work)
        except DBAPIError as exc:
            if _unrepresentable(exc):
                return absent
            raise

    async def create_session(
        self, user_id: str | None = None, metadata: Any = None
    ) -> tuple[str, datetime]:
        session_id = new_session_id()

        async def work(conn: Any) -> datetime:
            now = self._now()
            statement = (
                insert(SESSIONS)
                .values(
                    session_id=session_id,
                    user_id=user_id,
                    metadata=metadata,
                    created_at=now,
                    expires_at=now + exact_interval(self.ttl),
                    last_activity=now,
                    request_count=0,
                )
                .returning(SESSIONS.c.expires_at)
            )
            return (await conn.execute(statement)).scalar_one()

        return session_id, await self._run(work)

    async def validate_session(self, session_id: object) -> bool:
        sid = usable_session_id(session_id)
        if sid is None:
            return False

        async def work(conn: Any) -> bool:
            now = self._now()
            expired = (
                delete(SESSIONS)
                .where(SESSIONS.c.session_id == sid, SESSIONS.c.expires_at <= now)
                .returning(SESSIONS.c.session_id)
                .cte("expired")
            )
            bumped = (
                update(SESSIONS)
                .where(SESSIONS.c.session_id == sid, SESSIONS.c.expires_at > now)
                .values(
                    # A validation that waited on the row lock behind a later one must not
                    # move last_activity back.
                    last_activity=func.greatest(SESSIONS.c.last_activity, now),
                    # least() first, so the + 1 itself can never overflow the integer.
                    request_count=func.least(
                        SESSIONS.c.request_count, literal(MAX_REQUEST_COUNT - 1, Integer)
                    )
                    + 1,
                )
                .returning(SESSIONS.c.session_id)
                .cte("bumped")
            )
            # One statement: the delete-if-expired and the bump cannot interleave with anything.
            statement = select(
                select(func.count()).select_from(bumped).scalar_subquery(),
                select(func.count()).select_from(expired).scalar_subquery(),
            )
            valid, _ = (await conn.execute(statement)).one()
            return valid == 1

        return await self._by_id(work, False)

    async def get_session(self, session_id: object) -> dict[str, Any] | None:
        sid = usable_session_id(session_id)
        if sid is None:
            return None

        async def work(conn: Any) -> dict[str, Any] | None:
            row = (
                (await conn.execute(select(SESSIONS).where(SESSIONS.c.session_id == sid)))
                .mappings()
                .first()
            )
            return dict(row) if row else None

        return await self._by_id(work, None)

    async def delete_session(self, session_id: object) -> bool:
        sid = usable_session_id(session_id)
        if sid is None:
            return False

        async def work(conn: Any) -> bool:
            result = await conn.execute(delete(SESSIONS).where(SESSIONS.c.session_id == sid))
            return result.rowcount == 1

        return await self._by_id(work, False)

    async def cleanup_expired_sessions(self) -> int:
        async def work(conn: Any) -> int:
            query = delete(SESSIONS).where(SESSIONS.c.expires_at <= self._now())
            return (await conn.execute(query)).rowcount

        return await self._run(work)

    async def extend_session(self, session_id: object, hours: float = 24) -> bool:
        sid = usable_session_id(session_id)
        if sid is None:
            return False
        extra = exact_interval(timedelta(hours=hours))

        async def work(conn: Any) -> bool:
            result = await conn.execute(
                update(SESSIONS)
                .where(SESSIONS.c.session_id == sid, SESSIONS.c.expires_at > self._now())
                .values(expires_at=SESSIONS.c.expires_at + extra)
            )
            return result.rowcount == 1

        return await self._by_id(work, False)

    async def get_active_session_count(self) -> int:
        async def work(conn: Any) -> int:
            query = (
                select(func.count())
                .select_from(SESSIONS)
                .where(SESSIONS.c.expires_at > self._now())
            )
            return (await conn.execute(query)).scalar_one()

        return await self._run(work)

    async def active_among(self, session_ids: Iterable[str], at: datetime) -> set[str]:
        """Which of ``session_ids`` ``validate_session`` would accept at ``at`` — read only:
        the same predicate, no counter touched (for the runbook's application check)."""
        # An id no store can hold is not active; leaving it out keeps the query from failing.
        ids = [sid for sid in map(usable_session_id, session_ids) if sid is not None]

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

    def _last_instant(self, stored: object) -> datetime | None:
        """A stored ``last_activity`` as an instant, or None when the legacy row holds
        something unreadable there (then it is simply overwritten, as the legacy app did)."""
        try:
            return self._instant(stored) if isinstance(stored, str) else None
        except (ValueError, OverflowError):
            return None

    async def _call(self, work: Callable[[sqlite3.Connection], T], *, write: bool = False) -> T:
        """Run ``work`` under the lock, in one transaction. ``work`` reads the clock itself,
        so its time is the time of the change, never the time it started queueing."""

        def locked() -> T:
            with self._lock, self._conn:
                if write:
                    # Other processes share the file: take SQLite's write lock before reading,
                    # so a busy wait (up to the 30 s timeout) is over before the time is read
                    # and nothing changes between the read and the write.
                    self._conn.execute("BEGIN IMMEDIATE")
                return work(self._conn)

        return await asyncio.to_thread(locked)

    async def create_session(
        self, user_id: str | None = None, metadata: Any = None
    ) -> tuple[str, datetime]:
        session_id = new_session_id()
        meta = None if metadata is None else json.dumps(metadata, ensure_ascii=False)

        def work(c: sqlite3.Connection) -> datetime:
            now = self.clock()
            expires = now + self.ttl
            c.execute(
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
            return expires

        return session_id, await self._call(work, write=True)

    async def validate_session(self, session_id: object) -> bool:
        sid = usable_session_id(session_id)
        if sid is None:
            return False

        def work(c: sqlite3.Connection) -> bool:
            now = self.clock()
            row = c.execute(
                "SELECT expires_at, last_activity FROM sessions WHERE session_id = ?", (sid,)
            ).fetchone()
            if row is None:
                return False
            if self._instant(row[0]) <= now:
                c.execute("DELETE FROM sessions WHERE session_id = ?", (sid,))
                return False
            last = self._last_instant(row[1])
            # Never backwards, even if this host's clock was stepped back since the last call.
            bump_last = last is None or now > last
            # SQLite's integers are 64-bit, but the contract (and PostgreSQL's column) stops at
            # 2**31 - 1; a NULL count stays NULL, as the legacy app left it.
            c.execute(
                "UPDATE sessions SET "
                "last_activity = CASE WHEN ? THEN ? ELSE last_activity END, "
                "request_count = CASE WHEN request_count < ? THEN request_count + 1 "
                "ELSE request_count END "
                "WHERE session_id = ?",
                (bump_last, self._local(now), MAX_REQUEST_COUNT, sid),
            )
            return True

        return await self._call(work, write=True)

    async def get_session(self, session_id: object) -> dict[str, Any] | None:
        sid = usable_session_id(session_id)
        if sid is None:
            return None

        def work(c: sqlite3.Connection) -> dict[str, Any] | None:
            row = c.execute("SELECT * FROM sessions WHERE session_id = ?", (sid,)).fetchone()
            if row is None:
                return None
            found, user, meta, created, expires, last, count = row
            return {
                "session_id": found,
                "user_id": user,
                "metadata": None if meta is None else json.loads(meta),
                "created_at": self._instant(created),
                "expires_at": self._instant(expires),
                "last_activity": self._instant(last),
                "request_count": count,
            }

        return await self._call(work)

    async def delete_session(self, session_id: object) -> bool:
        sid = usable_session_id(session_id)
        if sid is None:
            return False
        return await self._call(
            lambda c: c.execute("DELETE FROM sessions WHERE session_id = ?", (sid,)).rowcount == 1,
            write=True,
        )

    async def cleanup_expired_sessions(self) -> int:
        def work(c: sqlite3.Connection) -> int:
            now = self.clock()
            expired = [
                sid
                for sid, exp in c.execute("SELECT session_id, expires_at FROM sessions")
                if self._instant(exp) <= now
            ]
            c.executemany("DELETE FROM sessions WHERE session_id = ?", [(s,) for s in expired])
            return len(expired)

        return await self._call(work, write=True)

    async def extend_session(self, session_id: object, hours: float = 24) -> bool:
        sid = usable_session_id(session_id)
        if sid is None:
            return False

        def work(c: sqlite3.Connection) -> bool:
            now = self.clock()
            row = c.execute(
                "SELECT expires_at FROM sessions WHERE session_id = ?", (sid,)
            ).fetchone()
            if row is None or self._instant(row[0]) <= now:
                return False
            later = self._instant(row[0]) + timedelta(hours=hours)
            c.execute(
                "UPDATE sessions SET expires_at = ? WHERE session_id = ?",
                (self._local(later), sid),
            )
            return True

        return await self._call(work, write=True)

    async def get_active_session_count(self) -> int:
        def work(c: sqlite3.Connection) -> int:
            now = self.clock()
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
