"""A failover under load, as a managed service or Patroni performs one, measured: the session
store on a multi-host DSN (``target_session_attrs=read-write``) over a primary and its
synchronous standby, the open-loop load of ``benchmarks/bench_store.py`` (users × one request
per interval, each request sent at its scheduled time whatever the earlier ones are doing), the
primary stopped at once (``pg_ctl stop -m immediate``: a crash), the standby promoted after a
delay. Used by ``tests/test_failover.py`` (which asserts) and ``bench_store.py --failover``
(which prints the figures for ``benchmarks/STORE.md``).

Every user works on sessions of its own, and keeps a ledger of what the store acknowledged:
sessions created and deleted, validations counted. A write whose answer was lost is reported
by the store as an unknown outcome (it took effect at most once): the ledger counts those apart,
so the check is exact — each row's ``request_count`` lies between what was acknowledged and
that plus the unknown outcomes on that session, every acknowledged session is there, every
acknowledged logout is gone.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import psycopg

from sessionmig.errors import StoreUnavailable
from sessionmig.store import SessionManager

UNKNOWN_OUTCOME = "outcome is unknown"


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile (q in 0..1) of ``values`` (0 for none)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@dataclass
class Request:
    at: float  # scheduled start (loop time)
    done: float  # answered (loop time)
    ok: bool
    kind: str


@dataclass
class User:
    sessions: list[str] = field(default_factory=list)
    ending: set[str] = field(default_factory=set)  # a logout was sent


@dataclass
class Ledger:
    created: set[str] = field(default_factory=set)
    ended: set[str] = field(default_factory=set)
    validated: Counter[str] = field(default_factory=Counter)
    unknown: Counter[str] = field(default_factory=Counter)  # writes of unknown outcome
    unknown_ends: set[str] = field(default_factory=set)
    # Logins whose insert may have committed, its id never handed out (a session no one holds).
    unknown_creates: int = 0
    invalidated: list[str] = field(default_factory=list)  # a valid session reported invalid
    errors: list[str] = field(default_factory=list)  # anything but StoreUnavailable


class Records(logging.Handler):
    """The WARNING-or-worse records of the store and of psycopg's pool during the run."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(("sessionstore", "sessionmig", "psycopg")):
            self.records.append(record)


@dataclass
class Figures:
    t_stop: float
    t_promote: float
    requests: list[Request]
    ledger: Ledger
    records: list[str]
    rows: dict[str, int]

    def phase(self, name: str) -> list[Request]:
        return [
            r
            for r in self.requests
            if (name == "before" and r.at < self.t_stop)
            or (name == "during" and self.t_stop <= r.at < self.t_promote)
            or (name == "after" and r.at >= self.t_promote)
        ]

    def p99_ms(self, name: str) -> float:
        return percentile([r.done - r.at for r in self.phase(name)], 0.99) * 1000

    @property
    def longest_wait_s(self) -> float:
        return max(r.done - r.at for r in self.requests)

    @property
    def gap_s(self) -> float:
        """From the last success answered before the stop to the first answered after it."""
        last = max(r.done for r in self.requests if r.ok and r.done <= self.t_stop)
        first = min(r.done for r in self.requests if r.ok and r.done > self.t_stop)
        return first - last

    @property
    def back_after_promote_s(self) -> float:
        """From the promotion to the first success answered after it."""
        return min(r.done for r in self.requests if r.ok and r.done > self.t_promote) - (
            self.t_promote
        )

    @property
    def failed_after(self) -> list[Request]:
        """Requests sent 3 s or more after the promotion that were not served."""
        return [r for r in self.requests if not r.ok and r.at >= self.t_promote + 3.0]

    def check_ledger(self) -> tuple[list[str], list[str], list[str]]:
        """(lost, invented, miscounted) session ids, by the ledger."""
        led = self.ledger
        alive = led.created - led.ended
        lost = sorted(s for s in alive if s not in self.rows and s not in led.unknown_ends)
        invented = sorted(s for s in self.rows if s not in alive)
        # At most one orphan per login of unknown outcome, never validated (no one has its id).
        orphans = [s for s in invented if self.rows[s] == 0][: led.unknown_creates]
        invented = [s for s in invented if s not in orphans]
        miscounted = sorted(
            s
            for s, count in self.rows.items()
            if not led.validated[s] <= count <= led.validated[s] + led.unknown[s]
        )
        return lost, invented, miscounted

    def table(self) -> str:
        ops = Counter(r.ok for r in self.requests)
        lost, invented, miscounted = self.check_ledger()
        return "\n".join(
            [
                f"requests: {len(self.requests)} ({ops[True]} served, {ops[False]} answered "
                "StoreUnavailable)",
                f"p99 before / during / after: {self.p99_ms('before'):.1f} / "
                f"{self.p99_ms('during'):.1f} / {self.p99_ms('after'):.1f} ms",
                f"longest wait for an answer: {self.longest_wait_s * 1000:.0f} ms",
                f"gap (last success before the stop to first after): {self.gap_s:.2f} s, "
                f"promotion {self.t_promote - self.t_stop:.1f} s after the stop",
                f"first success after the promotion: {self.back_after_promote_s * 1000:.0f} ms",
                f"lost / invented / miscounted sessions: {len(lost)} / {len(invented)} / "
                f"{len(miscounted)}; writes of unknown outcome: "
                f"{sum(self.ledger.unknown.values()) + len(self.ledger.unknown_ends)}, "
                f"logins of unknown outcome: {self.ledger.unknown_creates}",
                f"valid sessions reported invalid: {len(self.ledger.invalidated)}",
                f"log records (warning or worse): {len(self.records)}",
            ]
        )


async def _operation(store: SessionManager, user: User, ledger: Ledger, rng: random.Random) -> str:
    roll = rng.random()
    if not user.sessions or roll < 0.08:
        try:
            sid, _ = await store.create_session(f"user-{id(user)}", {"roll": roll})
        except StoreUnavailable as exc:
            if UNKNOWN_OUTCOME in str(exc):
                ledger.unknown_creates += 1
            raise
        ledger.created.add(sid)
        user.sessions.append(sid)
        return "create"
    if roll < 0.12 and len(user.sessions) > 1:
        sid = user.sessions.pop(rng.randrange(len(user.sessions)))
        user.ending.add(sid)
        try:
            if not await store.delete_session(sid):
                ledger.errors.append("a logout found no session")
        except StoreUnavailable as exc:
            if UNKNOWN_OUTCOME in str(exc):
                ledger.unknown_ends.add(sid)
            else:
                user.sessions.append(sid)  # not sent, or not run: still there
                user.ending.discard(sid)
            raise
        ledger.ended.add(sid)
        return "delete"
    sid = user.sessions[rng.randrange(len(user.sessions))]
    if roll < 0.22:
        if await store.get_session(sid) is None and sid not in user.ending:
            ledger.invalidated.append(sid)
        return "get"
    try:
        valid = await store.validate_session(sid)
    except StoreUnavailable as exc:
        if UNKNOWN_OUTCOME in str(exc):
            ledger.unknown[sid] += 1
        raise
    if valid:
        ledger.validated[sid] += 1
    elif sid not in user.ending:
        ledger.invalidated.append(sid)
    return "validate"


async def failover_under_load(
    dsn: str,
    stop_primary: Any,
    promote_standby: Any,
    *,
    users: int = 100,
    interval_s: float = 0.2,
    before_s: float = 3.0,
    promote_after_s: float = 3.0,
    after_s: float = 4.0,
) -> tuple[list[Request], Ledger, float, float, list[str]]:
    """Run the load on ``dsn``; stop the primary ``before_s`` in, promote the standby
    ``promote_after_s`` later, go on ``after_s``. Returns the requests, the ledger, the stop
    and promotion instants (loop time) and the log records."""
    store = SessionManager(dsn)
    loop = asyncio.get_running_loop()
    ledger = Ledger()
    people = [User() for _ in range(users)]
    rngs = [random.Random(n) for n in range(users)]
    requests: list[Request] = []
    handler = Records()
    logging.getLogger().addHandler(handler)
    try:
        # Warm: the pool full and every user with a session, as a running app.
        for n, person in enumerate(people):
            await _operation(store, person, ledger, rngs[n])
        total = before_s + promote_after_s + after_s
        start = loop.time() + 0.05
        phase = random.Random(7)
        schedule = sorted(
            (start + phase.uniform(0, interval_s) + k * interval_s, n)
            for n in range(users)
            for k in range(max(1, round(total / interval_s)))
        )

        async def request(at: float, n: int) -> None:
            try:
                kind = await _operation(store, people[n], ledger, rngs[n])
                requests.append(Request(at, loop.time(), True, kind))
            except StoreUnavailable:
                requests.append(Request(at, loop.time(), False, "?"))
            except Exception as exc:  # anything else is a failure of the store
                ledger.errors.append(f"{type(exc).__name__}: {exc}")
                requests.append(Request(at, loop.time(), False, "error"))

        instants: dict[str, float] = {}

        async def failover() -> None:
            await asyncio.sleep(start + before_s - loop.time())
            await asyncio.to_thread(stop_primary)
            # Stopped: pg_ctl stop -w returns once the server is gone.
            instants["stop"] = loop.time()
            await asyncio.sleep(instants["stop"] + promote_after_s - loop.time())
            # From here a server may become writable (the promotion itself takes a moment:
            # the time to the first success counts it).
            instants["promote"] = loop.time()
            await asyncio.to_thread(promote_standby)

        manager = asyncio.create_task(failover())
        tasks = []
        for at, n in schedule:
            delay = at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(request(at, n)))
        await asyncio.gather(*tasks)
        await manager
    finally:
        logging.getLogger().removeHandler(handler)
        await store.close()
    records = [f"{r.name} {r.levelname}: {r.getMessage()}" for r in handler.records]
    return requests, ledger, instants["stop"], instants["promote"], records


def rows_of(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        return dict(conn.execute("SELECT session_id, request_count FROM sessions").fetchall())


def measure(dsn: str, stop_primary: Any, promote_standby: Any, **load: Any) -> Figures:
    requests, ledger, t_stop, t_promote, records = asyncio.run(
        failover_under_load(dsn, stop_primary, promote_standby, **load)
    )
    return Figures(t_stop, t_promote, requests, ledger, records, rows_of(dsn))
