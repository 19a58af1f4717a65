"""Real clients for the example app, each keeping a ledger of what succeeded, and the two
colours as uvicorn processes.

A client logs in over HTTP, chats over the WebSocket (the connection and each message are a
validation), extends and logs out — the digest's mix — against one colour's URL. Several clients
share one pool of sessions, so during an overlap the blue and the green colour serve the *same*
sessions. Only acknowledged successes enter the ledger; anything unexpected is recorded as an
error (the ledger is exact only if there are none). :func:`compare` then says how PostgreSQL
differs from the ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from sessionmig.rules.mask import mask_id
from sessionstore import LegacySQLiteSessionManager

EXAMPLES = Path(__file__).resolve().parent.parent
# The digest's mix (cumulative): logins, chats over the WebSocket, extensions; rest logouts.
CREATE, CHAT, EXTEND = 0.12, 0.84, 0.95
STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0


@dataclass
class Ledger:
    """Every acknowledged success, by colour ("blue" = SQLite, "green" = PostgreSQL)."""

    created: dict[str, tuple[str | None, Any, str]] = field(default_factory=dict)
    initial: dict[str, int] = field(default_factory=dict)  # request_count before any traffic
    validations: dict[str, Counter[str]] = field(default_factory=dict)
    expires_seen: dict[str, list[datetime]] = field(default_factory=dict)
    extended_by: dict[str, set[str]] = field(default_factory=dict)
    ended: dict[str, str] = field(default_factory=dict)  # session -> colour that ended it
    pool: list[str] = field(default_factory=list)  # the sessions clients pick from
    # Sessions clients validate and extend but never log out, so that some sessions with counts
    # from before the traffic are always left to check, however the dice fall.
    keep: set[str] = field(default_factory=set)
    # Sessions a colour refused after their expiry: deleted there, rightly absent.
    expired: set[str] = field(default_factory=set)
    ops: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)

    def alive(self) -> set[str]:
        return set(self.created) - set(self.ended)

    def refused(self, sid: str) -> None:
        """A colour refused ``sid``: when its latest expiry seen has passed, that colour has
        deleted it (the store's rule for an expired session presented), so it may be absent."""
        if max(self.expires_seen[sid]) <= datetime.now(UTC):
            self.expired.add(sid)

    def add(self, sid: str, user: str | None, meta: Any, by: str, expires: datetime) -> None:
        self.created[sid] = (user, meta, by)
        self.initial.setdefault(sid, 0)
        self.validations[sid] = Counter()
        self.expires_seen[sid] = [expires]
        self.pool.append(sid)

    def expected(self, sid: str) -> tuple[str | None, Any, datetime, int]:
        """What PostgreSQL must hold for a live session: user, metadata, expiry, count."""
        user, meta, _ = self.created[sid]
        count = self.initial[sid] + sum(self.validations[sid].values())
        return user, meta, max(self.expires_seen[sid]), count


async def seed(path: Path, sessions: int, zone: str, ledger: Ledger, rng: random.Random) -> None:
    """Sessions that existed before any of this traffic, with requests already counted (so the
    snapshot carries counts the ledger did not see being made)."""
    store = LegacySQLiteSessionManager(path, zone=zone)
    try:
        for n in range(sessions):
            user, meta = f"seed-{n}", {"n": n, "by": "seed", "region": "부산"}
            sid, expires = await store.create_session(user, meta)
            ledger.add(sid, user, meta, "seed", expires)
            ledger.initial[sid] = rng.randrange(1, 500)
            if n % 4 == 0:
                ledger.keep.add(sid)
    finally:
        await store.close()
    with sqlite3.connect(path) as conn:
        conn.executemany(
            "UPDATE sessions SET request_count = ? WHERE session_id = ?",
            [(count, sid) for sid, count in ledger.initial.items()],
        )
    conn.close()


def adopt(path: Path, zone: str, ledger: Ledger, now: datetime) -> int:
    """Put the sessions already in the store at ``path`` into the ledger as they are (their
    counts and expiries the starting point); the active ones join the pool. How many joined."""
    local = ZoneInfo(zone)
    joined = 0
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        for sid, user, meta, expires, count in conn.execute(
            "SELECT session_id, user_id, metadata, expires_at, request_count FROM sessions"
        ):
            at = datetime.fromisoformat(expires).replace(tzinfo=local)
            ledger.add(sid, user, None if meta is None else json.loads(meta), "before", at)
            ledger.initial[sid] = count
            if at <= now:
                ledger.pool.pop()  # expired (the app would refuse and delete it): not used
            else:
                joined += 1
    return joined


async def _chat(base_ws: str, sid: str, colour: str, ledger: Ledger, messages: int) -> None:
    try:
        async with connect(f"{base_ws}/ws/{sid}", open_timeout=30) as ws:
            hello = json.loads(await ws.recv())
            if hello.get("type") != "connected":
                ledger.errors.append(f"chat {colour}: unexpected greeting {hello.get('type')}")
                return
            ledger.validations[sid][colour] += 1
            ledger.ops[f"validate {colour}"] += 1
            for k in range(messages):
                await ws.send(json.dumps({"text": f"안녕 {k}"}))
                answer = json.loads(await ws.recv())
                if answer.get("type") != "reply":
                    ledger.refused(sid)
                    return  # ended meanwhile: not a validation
                ledger.validations[sid][colour] += 1
                ledger.ops[f"validate {colour}"] += 1
    except InvalidStatus as exc:
        if exc.response.status_code != 403:  # 403: refused, the session is not valid here
            ledger.errors.append(f"chat {colour}: handshake answered {exc.response.status_code}")
        else:
            ledger.refused(sid)
    except ConnectionClosed as exc:
        if exc.rcvd is None or exc.rcvd.code != 1008:
            ledger.errors.append(f"chat {colour}: connection closed ({exc})")
        else:
            ledger.refused(sid)


async def client(
    url: str, colour: str, stop: asyncio.Event, ledger: Ledger, seed_: int, pace_s: float = 0.004
) -> None:
    """One user agent on one colour, until ``stop``; the ledger records acknowledged successes."""
    rng = random.Random(seed_)
    base_ws = "ws" + url.removeprefix("http")
    n = 0
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        while not stop.is_set():
            n += 1
            roll = rng.random()
            try:
                if roll < CREATE or not ledger.pool:
                    user = None if n % 4 == 0 else f"{colour}-{seed_}-{n}"
                    meta = {"n": n, "by": colour, "region": "서울"}
                    answer = await http.post("/login", json={"user_id": user, "metadata": meta})
                    answer.raise_for_status()
                    body = answer.json()
                    expires = datetime.fromisoformat(body["expires_at"])
                    ledger.add(body["session_id"], user, meta, colour, expires)
                    ledger.ops[f"create {colour}"] += 1
                else:
                    sid = rng.choice(ledger.pool)
                    if roll < CHAT or (roll >= EXTEND and sid in ledger.keep):
                        await _chat(base_ws, sid, colour, ledger, rng.randrange(0, 4))
                    elif roll < EXTEND:
                        answer = await http.post(f"/sessions/{sid}/extend", json={"hours": 24})
                        answer.raise_for_status()
                        body = answer.json()
                        if body["extended"] and body["expires_at"] is not None:
                            seen = datetime.fromisoformat(body["expires_at"])
                            ledger.expires_seen[sid].append(seen)
                            ledger.extended_by.setdefault(sid, set()).add(colour)
                            ledger.ops[f"extend {colour}"] += 1
                        else:
                            ledger.refused(sid)
                    else:
                        answer = await http.post(f"/sessions/{sid}/logout")
                        answer.raise_for_status()
                        if answer.json()["ended"]:
                            ledger.ended.setdefault(sid, colour)
                            with contextlib.suppress(ValueError):
                                ledger.pool.remove(sid)
                            ledger.ops[f"delete {colour}"] += 1
                        else:
                            ledger.refused(sid)
            except (httpx.HTTPError, OSError, KeyError, ValueError) as exc:
                ledger.errors.append(f"{colour}: {type(exc).__name__}: {exc}")
            await asyncio.sleep(rng.random() * pace_s)


def compare(ledger: Ledger, rows: dict[str, tuple]) -> tuple[int, int, list[str]]:
    """How PostgreSQL (``rows``: session_id -> (user_id, metadata, expires_at, request_count))
    differs from the ledger: sessions lost, sessions there that should not be (invented or not
    ended), and one line per live session whose values differ (ids hashed).

    A session a colour refused after its expiry may be absent (``Ledger.refused``): the app
    deletes an expired session when it is presented, and tells the client only "not valid"."""
    alive, expired = ledger.alive(), ledger.expired
    lost, extra = len(alive - expired - set(rows)), len(set(rows) - alive)
    wrong = []
    for sid in sorted(alive & set(rows)):
        user, meta, expires, count = ledger.expected(sid)
        pg_user, pg_meta, pg_expires, pg_count = rows[sid]
        if (pg_user, pg_meta, pg_expires, pg_count) != (user, meta, expires, count):
            wrong.append(
                f"{mask_id(sid)}: count {pg_count} vs ledger {count}, expires {pg_expires} vs "
                f"{expires}, user/metadata equal: {(pg_user, pg_meta) == (user, meta)}"
            )
    return lost, extra, wrong


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Colour:
    """One uvicorn process of the example app."""

    name: str
    env: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes] | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Colour:
        for _ in range(3):  # a port taken between choosing and binding: choose another
            self.port = _free_port()
            command = [
                sys.executable,
                "-m",
                "uvicorn",
                "--app-dir",
                str(EXAMPLES),
                "--factory",
                "session_app.app:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                # The access log would print request paths, and they carry session ids.
                "--no-access-log",
                "--log-level",
                "warning",
            ]
            with self.log.open("ab") as log:
                self.process = subprocess.Popen(
                    command,
                    env={**os.environ, **self.env, "APP_COLOUR": self.name},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            if self._answers():
                return self
            self.stop()
        raise RuntimeError(f"{self.name} did not start; its log: {self.log}")

    def _answers(self) -> bool:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                return False
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return True
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        """Stop it as a deploy drains a colour: SIGTERM, uvicorn finishes what is in flight."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
