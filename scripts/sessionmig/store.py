"""Kept for apps written against ``sessionmig.store``: the session store now lives in its own
distribution, ``sessionstore`` (install it alone; import from it in new code). This module only
re-exports its public names, so existing imports keep working."""

from sessionstore import (
    LegacySQLiteSessionManager,
    Session,
    SessionManager,
    SessionStore,
    StoreNotReady,
    StoreUnavailable,
    get_session_manager,
)
from sessionstore.manager import DEFAULT_POOL_SIZE

__all__ = [
    "DEFAULT_POOL_SIZE",
    "LegacySQLiteSessionManager",
    "Session",
    "SessionManager",
    "SessionStore",
    "StoreNotReady",
    "StoreUnavailable",
    "get_session_manager",
]
