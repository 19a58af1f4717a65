"""Passwords out of every output: the one redaction path, :func:`redact`.

It knows the actual secret values, read from each DSN *as libpq parses it* and as a person
meant it (the two differ exactly when the DSN is malformed: an unencoded ``@`` or ``/``, a bad
``%xx`` escape, an unquoted space), and replaces them in every spelling a message can carry
them in (raw, percent-decoded, JSON-, HTML- and repr-escaped). libpq's own errors quote the
token they choke on (``invalid percent-encoded token: "…"``, ``missing "=" after "…"``,
``failed to resolve host '…'``): any quoted token that is a piece of a password is masked too.
Patterns (``scheme://user:…@``, ``password=…``, ``'password': '…'``) are the safety net for
secrets it was not told about.

The store's connections register their DSN here (``sessionstore.connect``), so every message
the store raises is redacted; sessionmig's ``mask`` builds its report scrubbing on top.
"""

from __future__ import annotations

import html
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote, unquote

MASK = "***"
# Shorter secrets are masked only where they stand as a password (patterns, quoted tokens):
# replacing two letters everywhere would garble every report and still hide nothing.
MIN_SECRET = 4
# A quoted token shorter than this is never taken for a piece of a password: HTML is full of
# ``"1"`` and ``'a'``, and two characters of a password tell nothing.
MIN_PIECE = 3

_URL_SCHEME = re.compile(r"^\s*postgres(?:ql)?(?:\+\w+)?://", re.IGNORECASE)
_KV_PASSWORD = re.compile(r"(?i)(?:^|(?<=\s))password\s*=\s*")
_NEXT_KEYWORD = re.compile(r"\s+[A-Za-z_]\w*\s*=")
_QUERY_PASSWORD = re.compile(r"[?&]password=", re.IGNORECASE)
_NEXT_QUERY_KEYWORD = re.compile(r"&[A-Za-z_]\w*=")
_QUERY_START = re.compile(r"\?[A-Za-z_]\w*=")
_PIECE_SPLIT = re.compile(r"[@/:?#&=\s]+")
_LOOKS_LIKE_DSN = re.compile(
    r"^\s*postgres(?:ql)?(?:\+\w+)?://|(?i:(?:^|\s)password\s*=)", re.IGNORECASE
)

# The safety net: password-shaped text wherever it appears.
_SAFETY_NET = (
    # scheme://user:PASSWORD@ — up to the last @ of the token, as a person reads it.
    (re.compile(r"(postgres(?:ql)?(?:\+\w+)?://[^:/@\s'\"]*:)[^\s'\"]*(@)", re.I), r"\1***\2"),
    # password=VALUE in a key/value DSN or a URL query; PGPASSWORD=VALUE in an environment.
    (re.compile(r"(?i)(password\s*=\s*)('(?:[^'\\]|\\.)*'?|\S+)"), r"\1***"),
    # 'password': 'VALUE' in the repr of a dict (conninfo_to_dict, connection kwargs).
    (re.compile(r"""(?i)((['"])password\2\s*:\s*)(['"]).*?(?<!\\)\3"""), r"\1'***'"),
    # libpq's parse errors quote a raw piece of the DSN, which may be (part of) the password.
    (
        re.compile(
            r"((?:invalid percent-encoded token|forbidden value %00 in percent-encoded value"
            r"|separator \"=\" in URI query parameter|invalid URI query parameter"
            r"|missing \"=\" after):? )\"[^\"\n]*\""
        ),
        r'\1"***"',
    ),
)
# A token libpq, psycopg or Python quoted: "x", 'x', and their HTML-escaped forms.
_QUOTED = re.compile(
    r"\"([^\"\n]{1,300})\"|'([^'\n]{1,300})'|&quot;(.{1,300}?)&quot;|&#x27;(.{1,300}?)&#x27;"
    r"|&#39;(.{1,300}?)&#39;"
)


@dataclass(frozen=True)
class DsnSecrets:
    """What of one DSN must never be shown.

    ``passwords`` are the values libpq would send; ``regions`` the raw text a person meant as
    the password (it differs from libpq's reading when the DSN is malformed, and libpq then
    quotes pieces of it in its errors); ``pieces`` the parts of a malformed password that
    libpq split off into another field (a host, a port, a keyword).
    """

    passwords: tuple[str, ...] = ()
    regions: tuple[str, ...] = ()
    pieces: tuple[str, ...] = ()


def _kv_value(text: str, start: int) -> str:
    """The value libpq's key/value parser reads at ``start`` (quoted or with ``\\`` escapes)."""
    out: list[str] = []
    i = start
    if i < len(text) and text[i] == "'":
        i += 1
        while i < len(text):
            c = text[i]
            if c == "\\" and i + 1 < len(text):
                out.append(text[i + 1])
                i += 2
            elif c == "'":
                break
            else:
                out.append(c)
                i += 1
        return "".join(out)
    while i < len(text) and not text[i].isspace():
        if text[i] == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _until(text: str, start: int, stop: re.Pattern[str]) -> str:
    found = stop.search(text, start)
    return text[start : found.start() if found else len(text)]


def dsn_secrets(dsn: str) -> DsnSecrets:
    """The secret parts of ``dsn``, read as libpq reads it and as its author meant it."""
    passwords: set[str] = set()
    regions: set[str] = set()
    scheme = _URL_SCHEME.match(dsn)
    if scheme:
        rest = dsn[scheme.end() :]
        # libpq: credentials end at the first '@' met before any '/' (conninfo_uri_parse).
        libpq_password = None
        stop = re.search(r"[@/]", rest)
        if stop and stop.group() == "@":
            user_info = rest[: stop.start()]
            if ":" in user_info:
                libpq_password = user_info.split(":", 1)[1]
                passwords.update((libpq_password, unquote(libpq_password)))
        # The author: credentials end at the last '@' (unless that '@' is in the query).
        last = rest.rfind("@")
        if last >= 0:
            user_info = rest[:last]
            if ":" in user_info and not _QUERY_START.search(user_info):
                region = user_info.split(":", 1)[1]
                regions.add(region)
                passwords.update((region, unquote(region)))
        for found in _QUERY_PASSWORD.finditer(rest):
            raw = _until(rest, found.end(), _NEXT_QUERY_KEYWORD)
            regions.add(raw)
            libpq_value = raw.split("&", 1)[0]
            passwords.update((raw, unquote(raw), libpq_value, unquote(libpq_value)))
    else:
        for found in _KV_PASSWORD.finditer(dsn):
            value = _kv_value(dsn, found.end())
            raw = _until(dsn, found.end(), _NEXT_KEYWORD).strip()
            if raw.startswith("'"):
                raw = raw[1:-1] if raw.endswith("'") and len(raw) > 1 else raw[1:]
            passwords.update((value, raw))
            regions.add(raw)
    passwords.discard("")
    regions.discard("")
    # A malformed password: libpq read something other than what was meant, so pieces of it
    # end up in other fields (host, port, dbname, a keyword) and in messages about them.
    pieces = {p for region in regions for p in _PIECE_SPLIT.split(region) if p}
    return DsnSecrets(
        tuple(sorted(passwords, key=len, reverse=True)),
        tuple(sorted(regions, key=len, reverse=True)),
        tuple(sorted(pieces - passwords, key=len, reverse=True)),
    )


def _spellings(secret: str) -> set[str]:
    """Every way a message, a JSON file or an HTML page can spell ``secret``."""
    out = {
        secret,
        html.escape(secret),
        html.escape(secret, quote=False),
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
        repr(secret)[1:-1],
        quote(secret, safe=""),
        quote(secret),
    }
    out.add(html.escape(json.dumps(secret)[1:-1]))
    return out


_PART_EDGE = re.compile(r"[@/:?#&=\s%]")


def _whole_part(token: str, region: str) -> bool:
    """Whether ``token`` is a part of ``region`` as a parser cuts it: starting and ending at the
    region's edges or at a separator. libpq quotes what it split off, never three letters from
    the middle of a word; a bare substring test would mask ``class="bad"`` on every page of a
    run whose password merely contains ``bad``, and strip the page of its warnings."""
    start = region.find(token)
    while start >= 0:
        end = start + len(token)
        before = (
            start == 0
            or bool(_PART_EDGE.match(region[start - 1]))
            or bool(_PART_EDGE.match(token[0]))
        )
        after = (
            end == len(region)
            or bool(_PART_EDGE.match(region[end]))
            or bool(_PART_EDGE.match(token[-1]))
        )
        if before and after:
            return True
        start = region.find(token, start + 1)
    return False


class Redactor:
    """Replaces known secret values, then password-shaped text, then quoted password pieces."""

    def __init__(self, found: Iterable[DsnSecrets] = (), extra: Iterable[str] = ()) -> None:
        found = tuple(found)
        plain: set[str] = set(extra)
        regions: set[str] = set()
        pieces: set[str] = set()
        for item in found:
            plain.update(item.passwords)
            regions.update(item.regions)
            pieces.update(item.pieces)
        plain.update(p for p in pieces if len(p) >= MIN_SECRET)
        spelled = {s for secret in plain if secret for s in _spellings(secret)}
        self.values = tuple(sorted((s for s in spelled if len(s) >= MIN_SECRET), key=len)[::-1])
        self.regions = tuple(r for r in regions | plain if r)
        self.pieces = tuple(p for p in pieces | plain if len(p) >= MIN_PIECE)

    def _token(self, match: re.Match[str]) -> str:
        token = next(g for g in match.groups() if g is not None)
        secret = (
            len(token) >= MIN_PIECE and any(_whole_part(token, region) for region in self.regions)
        ) or any(piece in token for piece in self.pieces)
        if not secret:
            return match.group(0)
        start, end = match.span(match.lastindex or 0)
        whole = match.group(0)
        offset = match.start()
        return whole[: start - offset] + MASK + whole[end - offset :]

    def __call__(self, text: str) -> str:
        for value in self.values:
            if value in text:
                text = text.replace(value, MASK)
        for pattern, replacement in _SAFETY_NET:
            text = pattern.sub(replacement, text)
        if self.regions:
            text = _QUOTED.sub(self._token, text)
        return text


_registered: set[str] = set()
_cache: dict[tuple[str, ...], Redactor] = {}


def register_dsn(dsn: str | None) -> None:
    """Remember a DSN this process read, so its secrets are redacted from every output."""
    if dsn:
        _registered.add(dsn)


def known_dsns() -> tuple[str, ...]:
    """The DSNs this process knows: registered ones and any DSN-shaped environment value."""
    found = set(_registered)
    found.update(v for v in os.environ.values() if v and _LOOKS_LIKE_DSN.search(v))
    return tuple(sorted(found))


def redactor(extra: Iterable[str] = ()) -> Redactor:
    """The redactor for what this process knows now (cached until that changes)."""
    key = (*known_dsns(), "\0", os.environ.get("PGPASSWORD", ""), "\0", *sorted(set(extra)))
    cached = _cache.get(key)
    if cached is None:
        password = os.environ.get("PGPASSWORD", "")
        cached = Redactor(
            (dsn_secrets(d) for d in known_dsns()), [*extra, *([password] if password else [])]
        )
        if len(_cache) > 32:
            _cache.clear()
        _cache[key] = cached
    return cached


def redact(text: str, extra: Iterable[str] = ()) -> str:
    """``text`` with every password this process knows of, and every password-shaped text,
    replaced by ``***``."""
    return redactor(extra)(text)
