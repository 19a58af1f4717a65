"""Show a session id (a bearer token) in a report only as a short keyed hash.

The key is one random salt per run, passed to notebook kernels in ``SESSIONMIG_ID_SALT`` (never
as a parameter), and recorded in the manifest only as its own sha256. The same id therefore
masks to the same text in every step of one run, so a reviewer can correlate rows without ever
seeing a token.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets

SALT_VARIABLE = "SESSIONMIG_ID_SALT"


def run_salt() -> str:
    """This run's salt: inherited from the orchestrator, else made once per process."""
    salt = os.environ.get(SALT_VARIABLE)
    if not salt:
        salt = secrets.token_hex(16)
        os.environ[SALT_VARIABLE] = salt
    return salt


def salt_fingerprint(salt: str | None = None) -> str:
    """What the manifest records of the salt: its sha256, enough to tell runs apart."""
    return hashlib.sha256((salt or run_salt()).encode()).hexdigest()


def mask_id(session_id: str | None, salt: str | None = None) -> str:
    """``sid:`` and 10 hex digits of HMAC-SHA256(salt, id); ``(null)`` for a missing id."""
    if session_id is None:
        return "(null)"
    key = (salt or run_salt()).encode()
    return (
        "sid:"
        + hmac.new(key, session_id.encode("utf-8", "surrogatepass"), "sha256").hexdigest()[:10]
    )
