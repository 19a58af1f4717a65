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


class TargetUnreachable(TransientTargetError):
    """No connection to the target could be made (refused, timed out, the server starting,
    shutting down or full); the same connection may succeed later."""


class TargetRefused(TargetError):
    """The target refused the login (password, role, database, ``pg_hba.conf``) or the DSN
    is malformed; trying again unchanged fails again."""


class LockHeld(TargetError):
    """Another migration holds the advisory lock on this target."""


class StoreUnavailable(SessionmigError):
    """The session database cannot be reached (after bounded retries) or is misconfigured."""


class VerdictFailed(SessionmigError):
    """A step reached a verdict of FAIL: the data cannot be trusted as migrated."""

    exit_code = EXIT_FAIL


# SQLSTATEs after which the same work may succeed on a new connection: the connection itself
# (class 08), the server shutting down or starting (57P01-57P03), too many connections (53300).
# A refusal of the data (22 data exception, 23 integrity, 54 program limit …) is never one:
# retrying would refuse it again, and calling it a lost connection hides the reason.
_TRANSIENT_STATES = ("57P01", "57P02", "57P03", "53300")


def is_connection_loss(sqlstate: str | None) -> bool:
    """Whether an error with this SQLSTATE means the connection, not the work, failed
    (``None``: the client lost the connection before the server could say anything)."""
    return sqlstate is None or sqlstate.startswith("08") or sqlstate in _TRANSIENT_STATES
