"""The AS-IS store, kept as the rollback target: the legacy SQLite ``SessionManager`` behind the
same async interface as the PostgreSQL one (:class:`~sessionstore.record.SessionStore`)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

from .record import MAX_REQUEST_COUNT, Clock, Session, new_session_id, usable_session_id, utc_now

T = TypeVar("T")


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

    async def get_session(self, session_id: object) -> Session | None:
        sid = usable_session_id(session_id)
        if sid is None:
            return None

        def work(c: sqlite3.Connection) -> Session | None:
            row = c.execute("SELECT * FROM sessions WHERE session_id = ?", (sid,)).fetchone()
            if row is None:
                return None
            found, user, meta, created, expires, last, count = row
            return Session(
                session_id=found,
                user_id=user,
                metadata=None if meta is None else json.loads(meta),
                created_at=self._instant(created),
                expires_at=self._instant(expires),
                last_activity=self._instant(last),
                request_count=count,
            )

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

    async def open(self) -> LegacySQLiteSessionManager:
        """Nothing to check: the legacy table is created when missing, as the legacy app did."""
        return self

    async def __aenter__(self) -> LegacySQLiteSessionManager:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await asyncio.to_thread(self._conn.close)
