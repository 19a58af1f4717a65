"""Generate a realistic sample backup in exactly the legacy SQLite schema, deterministically.

Rows look as the legacy ``SessionManager`` wrote them: ``session-<uuid4>`` ids, naive local
``datetime`` values as Python's sqlite3 adapter stores them (``YYYY-MM-DD HH:MM:SS[.ffffff]``),
about a quarter anonymous, JSON metadata of ~200 bytes, a 24 h TTL, some sessions extended, some
active and most expired at ``as_of``. ``oddities`` rows are then damaged in the ways a years-old
backup is, so inspect has findings to show and migrate has rejects to keep.
"""

from __future__ import annotations

import json
import random
import sqlite3
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

LEGACY_SCHEMA = """
CREATE TABLE sessions (
    session_id TEXT PRIMARY KEY,
    user_id TEXT,
    metadata TEXT,                -- JSON string
    created_at TIMESTAMP NOT NULL,
    expires_at TIMESTAMP NOT NULL,
    last_activity TIMESTAMP NOT NULL,
    request_count INTEGER DEFAULT 0
);
CREATE INDEX idx_expires_at ON sessions(expires_at);
"""
DEFAULT_AS_OF = "2026-01-15T12:00:00+09:00"
DEFAULT_ZONE = "Asia/Seoul"
TTL = timedelta(hours=24)
AGENTS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64)",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4)",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4)",
    "okhttp/4.12.0",
)
LOCALES = ("ko-KR", "ko-KR", "ko-KR", "en-US", "ja-JP")
REGIONS = ("서울 강남구", "서울 마포구", "경기 성남시", "부산 해운대구", "인천 연수구")


@dataclass(frozen=True)
class Oddity:
    """One deliberate defect: its name, whether the row can still land, and the SQL that makes it.

    ``sql`` runs with ``(rowid,)`` bound, or ``(value, rowid)`` when ``value`` is given.
    """

    name: str
    lands: bool
    sql: str
    value: object = None


ODDITIES: tuple[Oddity, ...] = (
    Oddity(
        "invalid_json",
        False,
        'UPDATE sessions SET metadata = \'{"theme": "dark",\' WHERE rowid = ?',
    ),
    Oddity(
        "iso_t_and_z",
        True,
        "UPDATE sessions SET created_at = replace(created_at, ' ', 'T') || 'Z' WHERE rowid = ?",
    ),
    Oddity(
        "expires_before_created",
        True,
        "UPDATE sessions SET expires_at = datetime(created_at, '-1 hour') WHERE rowid = ?",
    ),
    Oddity(
        "invalid_utf8_user",
        False,
        "UPDATE sessions SET user_id = CAST(? AS TEXT) WHERE rowid = ?",
        b"user-\xff\xfe",
    ),
    Oddity("fractional_count", False, "UPDATE sessions SET request_count = 12.5 WHERE rowid = ?"),
    Oddity("negative_count", True, "UPDATE sessions SET request_count = -3 WHERE rowid = ?"),
    Oddity(
        "unparseable_timestamp",
        False,
        "UPDATE sessions SET last_activity = 'yesterday' WHERE rowid = ?",
    ),
    Oddity("null_metadata", True, "UPDATE sessions SET metadata = NULL WHERE rowid = ?"),
    Oddity(
        "impossible_date",
        False,
        "UPDATE sessions SET created_at = '2025-02-30 10:00:00' WHERE rowid = ?",
    ),
    Oddity(
        "activity_after_expiry",
        True,
        "UPDATE sessions SET last_activity = datetime(expires_at, '+2 hours') WHERE rowid = ?",
    ),
    Oddity("epoch_timestamp", False, "UPDATE sessions SET expires_at = 1767225600 WHERE rowid = ?"),
    Oddity("null_session_id", False, "UPDATE sessions SET session_id = NULL WHERE rowid = ?"),
)


def _stamp(moment: datetime) -> str:
    """How Python's sqlite3 default adapter stores a naive datetime."""
    return moment.isoformat(" ")


def _metadata(rng: random.Random) -> str:
    meta = {
        "ip": f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}",
        "user_agent": rng.choice(AGENTS),
        "locale": rng.choice(LOCALES),
        "client": {
            "app": "real-estate-chat",
            "version": f"2.{rng.randrange(10)}.{rng.randrange(20)}",
        },
        "search": {"region": rng.choice(REGIONS), "max_price": rng.randrange(1, 200) * 10_000_000},
    }
    if rng.random() < 0.3:
        meta["tags"] = rng.sample(["apartment", "officetel", "villa", "jeonse", "wolse"], 2)
    return json.dumps(meta, ensure_ascii=False)


def _rows(n: int, rng: random.Random, as_of_local: datetime, users: int):
    for _ in range(n):
        # ~10% of sessions started within the TTL (mostly still active), the rest over 30 days.
        age = (
            timedelta(seconds=rng.uniform(0, 86_400))
            if rng.random() < 0.1
            else timedelta(seconds=rng.uniform(0, 30 * 86_400))
        )
        created = (as_of_local - age).replace(microsecond=rng.choice((0, rng.randrange(10**6))))
        expires = (
            created
            + TTL
            + (timedelta(hours=rng.choice((1, 2, 24))) if rng.random() < 0.05 else timedelta(0))
        )
        end = min(expires, as_of_local)
        last = created + (end - created) * rng.random()
        user = None if rng.random() < 0.25 else f"user-{rng.randrange(users):06d}"
        yield (
            f"session-{uuid.UUID(int=rng.getrandbits(128), version=4)}",
            user,
            _metadata(rng),
            _stamp(created),
            _stamp(expires),
            _stamp(last),
            rng.randrange(0, 200),
        )


APPLICATION_ID = 0x534D4753  # "SMGS" in the file's header: a sample this module wrote


def is_sample(path: str | Path) -> bool:
    """Whether ``path`` is a SQLite file this module wrote (its header's application id), read
    from the header alone: a real store is never taken for one."""
    try:
        with open(path, "rb") as file:
            header = file.read(100)
    except OSError:
        return False
    return (
        len(header) == 100
        and header.startswith(b"SQLite format 3\x00")
        and int.from_bytes(header[68:72], "big") == APPLICATION_ID
    )


def generate(
    out: str | Path,
    rows: int = 1000,
    seed: int = 7,
    as_of: str = DEFAULT_AS_OF,
    zone: str = DEFAULT_ZONE,
    oddities: int = len(ODDITIES),
) -> list[tuple[int, Oddity]]:
    """Write a sample backup to ``out`` (replacing it) and return ``(rowid, oddity)`` applied."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-journal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    rng = random.Random(seed)
    as_of_local = datetime.fromisoformat(as_of).astimezone(ZoneInfo(zone)).replace(tzinfo=None)
    conn = sqlite3.connect(path)
    try:
        conn.executescript(LEGACY_SCHEMA)
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.executemany(
            "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?)",
            _rows(rows, rng, as_of_local, max(rows // 5, 1)),
        )
        targets = rng.sample(range(1, rows + 1), min(oddities, rows))
        applied = []
        for index, rowid in enumerate(targets):
            oddity = ODDITIES[index % len(ODDITIES)]
            args = (rowid,) if oddity.value is None else (oddity.value, rowid)
            conn.execute(oddity.sql, args)
            applied.append((rowid, oddity))
        conn.commit()
    finally:
        conn.close()
    return applied
