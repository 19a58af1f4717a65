"""The store's errors: what an app catches, and the root of the one error tree sessionmig's
runbook extends (``sessionmig.errors`` derives its own from :class:`StoreError`).

What an app does with each:

- :class:`StoreUnavailable` — **try again later**. The database cannot be reached, is failing
  over, or is too slow right now; nothing is known about any session, so this never means
  "invalid session": answer HTTP 503 (``Retry-After``) or close a WebSocket with 1013, and keep
  the client's token.
- :class:`StoreNotReady` — **fix the deployment**. Raised by ``SessionManager.open()`` at
  start-up: the database answers, but its sessions table is missing or at a revision this store
  was not written for. The message names what is wrong and the command that fixes it.
- :class:`TargetUnreachable` / :class:`TargetRefused` — a connection could not be made (worth
  trying again / not). The store turns them into ``StoreUnavailable`` for the app; the runbook
  meets them directly.

Every message says what was wrong, where (host, port, database, user — never a password) and
what to do. ``exit_code`` is what a command line exits with when one stops it (2: the work
could not be carried out).
"""

from __future__ import annotations

EXIT_ERROR = 2


class StoreError(Exception):
    """Base class: something stopped the work; the message says what, where and what to do."""

    exit_code = EXIT_ERROR


class TargetError(StoreError):
    """The PostgreSQL database cannot be reached or used."""


class TransientTargetError(TargetError):
    """The connection to the database was lost or refused; retrying the whole work is safe."""


class TargetUnreachable(TransientTargetError):
    """No connection to the database could be made (refused, timed out, the server starting,
    shutting down or full); the same connection may succeed later."""


class TargetRefused(TargetError):
    """The database refused the login (password, role, database, ``pg_hba.conf``) or the DSN
    is malformed; trying again unchanged fails again."""


class StoreUnavailable(StoreError):
    """Try again later: the session database cannot be reached (after bounded retries), is
    too slow, or is misconfigured. Never an answer about a session: an outage ends none."""


class StoreNotReady(StoreError):
    """The session database answers but is not ready for this store: the sessions table is
    missing, or its Alembic revision is not the one the store expects. Raised by
    ``SessionManager.open()`` at start-up; the message names the fix (``alembic upgrade
    head`` with the store's ``alembic.ini``, or ``sessionmig db upgrade``). Not a
    :class:`StoreUnavailable`: waiting does not fix it, a deployment step does."""


# SQLSTATEs after which the same work may succeed on a new connection: the connection itself
# (class 08), the server shutting down or starting (57P01-57P03), too many connections (53300).
# A refusal of the data (22 data exception, 23 integrity, 54 program limit …) is never one:
# retrying would refuse it again, and calling it a lost connection hides the reason.
_TRANSIENT_STATES = ("57P01", "57P02", "57P03", "53300")


def is_connection_loss(sqlstate: str | None) -> bool:
    """Whether an error with this SQLSTATE means the connection, not the work, failed
    (``None``: the client lost the connection before the server could say anything)."""
    return sqlstate is None or sqlstate.startswith("08") or sqlstate in _TRANSIENT_STATES
