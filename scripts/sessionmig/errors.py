"""The small exception hierarchy every layer raises, and the exit code each one means.

One tree: its root and the database errors are the session store's (``sessionstore.errors``,
re-exported here), so the runbook catches what the store raises without a second hierarchy;
the runbook's own errors derive from the same root.

Exit codes follow the datacompy convention the runbook promises operators:
0 the step passed (warnings allowed), 1 a verdict is FAIL, 2 the run could not be carried out.
"""

from __future__ import annotations

from sessionstore.errors import (
    EXIT_ERROR,
    StoreError,
    StoreNotReady,
    StoreUnavailable,
    TargetError,
    TargetRefused,
    TargetUnreachable,
    TransientTargetError,
    is_connection_loss,
)

__all__ = [
    "EXIT_ERROR",
    "EXIT_FAIL",
    "EXIT_OK",
    "LockHeld",
    "MigrationConflict",
    "ParameterError",
    "SessionmigError",
    "SourceError",
    "StoreNotReady",
    "StoreUnavailable",
    "TargetError",
    "TargetRefused",
    "TargetUnreachable",
    "TransientTargetError",
    "VerdictFailed",
    "is_connection_loss",
]

EXIT_OK = 0
EXIT_FAIL = 1

# The root of the tree is the store's: ``except SessionmigError`` catches the store's errors too.
SessionmigError = StoreError


class ParameterError(SessionmigError):
    """A parameter (environment file or ``-p``) is missing, unknown or has a bad value."""


class SourceError(SessionmigError):
    """The SQLite backup cannot be read or does not have the expected shape."""


class MigrationConflict(SessionmigError):
    """Rows already in the target differ from the source and ``on_conflict`` says to stop."""


class LockHeld(TargetError):
    """Another migration holds the advisory lock on this target."""


class VerdictFailed(SessionmigError):
    """A step reached a verdict of FAIL: the data cannot be trusted as migrated."""

    exit_code = EXIT_FAIL
