"""sessionstore: the web app's session store — the async PostgreSQL ``SessionManager``, the
legacy SQLite one (the rollback target), the table's model and its Alembic migrations.

    async with SessionManager(os.environ["DATABASE_URL"]) as store:
        session_id, expires_at = await store.create_session("user-1", {"ip": "…"})

Errors (``sessionstore.errors``): ``StoreUnavailable`` means try again later, never "invalid
session"; ``StoreNotReady`` (from ``open()``) means the database needs its migrations.
"""

from .environ import get_session_manager
from .errors import StoreError, StoreNotReady, StoreUnavailable
from .legacy import LegacySQLiteSessionManager
from .manager import SessionManager
from .record import Session, SessionStore

__all__ = [
    "LegacySQLiteSessionManager",
    "Session",
    "SessionManager",
    "SessionStore",
    "StoreError",
    "StoreNotReady",
    "StoreUnavailable",
    "get_session_manager",
]
