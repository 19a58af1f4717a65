"""What a report may show of a secret: session ids as keyed hashes, passwords never.

Session ids (bearer tokens) are shown as a short keyed hash. The key is one random salt per run,
passed to notebook kernels in ``SESSIONMIG_ID_SALT`` (never as a parameter), and recorded in the
manifest only as its own sha256. The same id therefore masks to the same text in every step of
one run, so a reviewer can correlate rows without ever seeing a token.

Passwords go through one redaction path, :func:`redact`, used for every output: the terminal
(``cli`` wraps stdout and stderr), notebooks and their HTML, ``index.html``, ``manifest.json``
and log lines. It is the session store's (``sessionstore.redact``: the store's own errors go
through it too), re-exported here; :func:`scrub` and :func:`redact_html` apply it to a
report's values and pages.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Iterable
from typing import Any

from sessionstore.redact import MASK as MASK
from sessionstore.redact import MIN_PIECE as MIN_PIECE
from sessionstore.redact import MIN_SECRET as MIN_SECRET
from sessionstore.redact import DsnSecrets as DsnSecrets
from sessionstore.redact import Redactor as Redactor
from sessionstore.redact import dsn_secrets as dsn_secrets
from sessionstore.redact import known_dsns as known_dsns
from sessionstore.redact import redact as redact
from sessionstore.redact import redactor
from sessionstore.redact import register_dsn as register_dsn

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


# Base64 image data: text by type, but no message; a short secret matching inside it by chance
# must not corrupt a figure.
BINARY_KEYS = frozenset({"image/png", "image/jpeg", "image/gif", "application/pdf"})
_DATA_URI = re.compile(r"data:[\w/+.-]+;base64,[A-Za-z0-9+/=\s]+")


def scrub(value: Any, extra: Iterable[str] = ()) -> Any:
    """:func:`redact` applied to every string in a JSON-like value (keys included), except the
    base64 payloads of images."""
    clean = redactor(extra)

    def walk(item: Any) -> Any:
        if isinstance(item, str):
            return clean(item)
        if isinstance(item, list | tuple):
            return [walk(v) for v in item]
        if isinstance(item, dict):
            return {
                (walk(k) if isinstance(k, str) else k): (v if k in BINARY_KEYS else walk(v))
                for k, v in item.items()
            }
        return item

    return walk(value)


def redact_html(page: str, extra: Iterable[str] = ()) -> str:
    """:func:`redact` for an HTML page, leaving its embedded ``data:`` images intact."""
    clean = redactor(extra)
    out: list[str] = []
    last = 0
    for found in _DATA_URI.finditer(page):
        out.append(clean(page[last : found.start()]))
        out.append(found.group())
        last = found.end()
    out.append(clean(page[last:]))
    return "".join(out)
