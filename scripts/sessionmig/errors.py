"""The small exception hierarchy every layer raises, and the exit code each one means.

Exit codes follow the datacompy convention the runbook promises operators:
0 the step passed (warnings allowed), 1 a verdict is FAIL, 2 the run could not be carried out.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_ERROR = 2


class SessionmigError(Exception):
    """Base class: something stopped the run; the message says what, where and what to do."""

    exit_code = EXIT_ERROR


class ParameterError(SessionmigError):
    """A parameter (environment file or ``-p``) is missing, unknown or has a bad value."""


class SourceError(SessionmigError):
    """The SQLite backup cannot be read or does not have the expected shape."""


class TargetError(SessionmigError):
    """The PostgreSQL target cannot be reached or used."""


class MigrationConflict(SessionmigError):
    """Rows already in the target differ from the source and ``on_conflict`` says to stop."""


class TransientTargetError(TargetError):
    """The connection to the target was lost or refused; retrying the whole load is safe."""


class LockHeld(TargetError):
    """Another migration holds the advisory lock on this target."""


class StoreUnavailable(SessionmigError):
    """The session database cannot be reached (after bounded retries) or is misconfigured."""


class VerdictFailed(SessionmigError):
    """A step reached a verdict of FAIL: the data cannot be trusted as migrated."""

    exit_code = EXIT_FAIL
