"""What a session is to the app: the typed record ``get_session`` returns, the interface both
managers implement (:class:`SessionStore`), and the one rule for what can be a session id.

A session is *active* while ``expires_at > now``; at ``expires_at`` it has expired. Instants
are timezone-aware UTC. A session id comes from a cookie, so anything at all may arrive: a value
that cannot be a stored session id (not text, a NUL, a lone surrogate, longer than any stored id
can be) is simply not a session — False or None — and never an exception.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, cast

from sqlalchemy import Table

from .model import SessionRecord

Clock = Callable[[], datetime]
# A declarative class's table is a Table (the ORM types it as the wider FromClause).
SESSIONS = cast(Table, SessionRecord.__table__)
# request_count is an ``integer``: it saturates here rather than overflow (and fail every call).
MAX_REQUEST_COUNT = 2**31 - 1
# No stored id is longer: PostgreSQL's primary-key btree refuses entries over 2,704 bytes even
# after compression (at most ~255:1, lz4), and the app's own ids are 44 characters. Checking
# the length first keeps a hostile multi-megabyte cookie off the wire and out of SQLite's
# "string or blob too big". A length on the model's column, if it ever gets one, is tighter.
MAX_SESSION_ID_BYTES = 1 << 20
MAX_SESSION_ID_CHARS: int | None = getattr(SESSIONS.c.session_id.type, "length", None)


@dataclass(frozen=True, slots=True)
class Session:
    """One stored session, as ``get_session`` returns it (instants timezone-aware UTC).

    ``metadata`` is the JSON value the app gave ``create_session`` (a dict, usually), or None.
    ``request_count`` is how many times ``validate_session`` accepted it (None only in a legacy
    SQLite row that never had one)."""

    session_id: str
    user_id: str | None
    metadata: Any
    created_at: datetime
    expires_at: datetime
    last_activity: datetime
    request_count: int | None

    def as_dict(self) -> dict[str, Any]:
        """The record as the plain dict ``get_session`` returned before it was typed (JSON
        answers, comparisons with rows read another way)."""
        return {name: getattr(self, name) for name in self.__slots__}


def utc_now() -> datetime:
    return datetime.now(UTC)


class SessionStore(Protocol):
    """What the web app calls; both managers implement it. ``open()`` (or ``async with``)
    checks the store at start-up; every call may raise ``StoreUnavailable`` (try again later)."""

    async def create_session(
        self, user_id: str | None = None, metadata: Any = None
    ) -> tuple[str, datetime]: ...
    async def validate_session(self, session_id: str) -> bool: ...
    async def get_session(self, session_id: str) -> Session | None: ...
    async def delete_session(self, session_id: str) -> bool: ...
    async def cleanup_expired_sessions(self) -> int: ...
    async def extend_session(self, session_id: str, hours: float = 24) -> bool: ...
    async def get_active_session_count(self) -> int: ...
    async def open(self) -> SessionStore: ...
    async def close(self) -> None: ...
    async def __aenter__(self) -> SessionStore: ...
    async def __aexit__(self, *exc: object) -> None: ...


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
