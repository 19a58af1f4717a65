"""The application's session store on PostgreSQL: the async ``SessionManager``.

Start it with ``await manager.open()`` (or ``async with SessionManager(url) as manager:``, a
FastAPI lifespan): the pool is made and the database checked once — the sessions table exists
at the Alembic revision the store is written for — so a deployment that forgot its migrations
fails at start-up with one :class:`~sessionstore.errors.StoreNotReady`, and an unreachable
database with :class:`~sessionstore.errors.StoreUnavailable`. A manager never opened opens its
pool on first use (without the check), as before.

Semantics (the digest's seven methods, all instants timezone-aware UTC): a session is *active*
while ``expires_at > now``; at ``expires_at`` it has expired. ``validate_session`` is one atomic
statement — an expired session is deleted, an active one has ``last_activity`` bumped and
``request_count`` incremented — so concurrent validations each count.

An acknowledged operation happens exactly once; an unacknowledged one at most once. So a
statement is sent again (a bounded number of times) only when that cannot apply it twice: when
it never left (the pool could not connect, or the connection was found closed by the server
before the statement was sent: one poll of its socket, no round trip), when the server answered
that it did not run it (a serialization failure or deadlock it rolled back; its FATAL error,
shutting the session down, as the whole answer — see :func:`_may_have_run`), or when running it
twice is running it once — a read, and the insert of ``create_session``, keyed by the id it
made (``ON CONFLICT DO NOTHING``; an insert that finds its id taken reads back whether the row
is its own). A write whose connection was lost after it was sent — validate, extend, delete,
cleanup: the server may have run it, only its answer lost — is never sent again: it raises
:class:`~sessionstore.errors.StoreUnavailable` saying the outcome is unknown. Nothing else is
retried — a data error is raised at once. A database that
stays down, a pool that frees no connection in time, or a statement past its timeout raises
:class:`~sessionstore.errors.StoreUnavailable`, never hangs.

An outage (no writable server accepts a connection: the database is down, or a primary failed
and no standby is promoted yet) is answered at once: the first call that finds a connection
lost asks, for every call, whether a writable server accepts one (libpq tries each host of a
multi-host DSN; ``target_session_attrs=read-write`` refuses a standby); if none does, every
call raises ``StoreUnavailable`` without waiting on the pool, the pool of dead connections is
closed, and a new one is made as soon as a server accepts (tried every
:data:`OUTAGE_RETRY_S`) — so a failover is followed without a restart. Said once in the log
when it starts and once when it ends. Behind a transaction pooler (PgBouncer) the store sets
its session settings per transaction instead of at startup: see :class:`SessionManager`.

``now`` is the database's clock, read inside the statement itself (``statement_timestamp()``),
so a call that queued for a pool connection is judged at the moment it reaches the server, and
every app host shares one clock. ``last_activity`` only ever moves forward and ``request_count``
stops at 2³¹−1 (the column's ``integer``) instead of failing. A session id comes from a cookie,
so anything at all may arrive: a value that cannot be a stored session id (not text, a NUL,
a lone surrogate, longer than any stored id can be, or not representable in the database's
encoding) is simply not a session — False or None — and never an exception.

The hot path (``benchmarks/STORE.md`` has the profile and the figures): every statement is
built once from the SQLAlchemy model (:class:`~sessionstore.model.SessionRecord`, still the one
definition of the table) and compiled to SQL text (``statements``) when a manager is made; each
call then only binds its values and runs that text on a connection of a fixed-size psycopg
``AsyncConnectionPool`` in autocommit — one round trip, a server-side prepared statement, the
answer through ``RETURNING`` — with no ORM, no per-call compilation, no greenlet bridge and no
BEGIN/COMMIT/pre-ping round trips.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select as _select
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, TypeVar, cast

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolClosed, PoolTimeout

from . import defaults as D
from .connect import aconnect, conninfo
from .errors import StoreUnavailable, TargetError, TargetRefused, TargetUnreachable
from .readiness import check_ready
from .record import Clock, Session, new_session_id, usable_session_id
from .redact import redact
from .statements import Statement, micros, statements

T = TypeVar("T")
# A lost connection: it broke or could not be made (no SQLSTATE: the client saw the socket
# fail), class 08 (connection exception), or the server ended the session (shutdown, crash,
# still starting). Retried when the statement was never sent, or is safe to send again (see the
# module's docstring); a write already sent may have run, so it is not. A serialization failure
# or deadlock is retried: the server rolled the statement back and asks for it (neither can
# really happen to these one-row autocommit statements). Anything else — a data error, a
# constraint — is raised at once.
CONNECTION_LOST_SQLSTATES = {"57P01", "57P02", "57P03"}
ROLLED_BACK_SQLSTATES = {"40001", "40P01"}
log = logging.getLogger(__name__)
POOL_NAME = "sessionmig-store"
# An outage (no writable server accepts a connection): a call that finds a connection lost asks
# whether a writable server accepts one, and waits at most this long for the answer; meanwhile
# and afterwards every call is answered at once, and a new pool is made as soon as one accepts
# (tried this often: a connection attempt to a server that is down costs little).
OUTAGE_PROBE_S = 1.5
OUTAGE_RETRY_S = 0.2
# Every connection the store's pools made (their log records are the store's to tell).
_STORE_CONNECTIONS: weakref.WeakSet[psycopg.AsyncConnection[Any]] = weakref.WeakSet()


def _ours(arg: object) -> bool:
    """Whether a log record's argument is the store's pool, one of its connections, or a
    pipeline on one."""
    if arg == POOL_NAME:
        return True
    conn = getattr(arg, "_conn", arg)  # a pipeline names its connection
    return isinstance(conn, psycopg.AsyncConnection) and conn in _STORE_CONNECTIONS


class _PoolLogDemoted(logging.Filter):
    """psycopg's pool warns once per connection attempt and per dead connection: during an
    outage of the store's database that is a warning per pool slot every backoff step. The
    store says it once itself (:meth:`SessionManager._mark_down`, and when it is over), so the
    pool's records about the store's own pool and connections go down to DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if record.levelno > logging.DEBUG and any(_ours(arg) for arg in args):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            # Handlers do not look at the logger's level again: kept only when asked for.
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


# psycopg.pool's records, and psycopg's own about a pipeline whose connection broke ("error
# ignored terminating …"): a filter on a logger sees only what is logged on that very logger.
for _name in ("psycopg.pool", "psycopg"):
    _logger = logging.getLogger(_name)
    if not any(isinstance(f, _PoolLogDemoted) for f in _logger.filters):
        _logger.addFilter(_PoolLogDemoted())


async def _close_quietly(pool: AsyncConnectionPool[Any]) -> None:
    with contextlib.suppress(Exception):
        await pool.close(timeout=1.0)


# How the store is told about a pooler in front of PostgreSQL (see SessionManager).
POOLER_MODES = ("auto", "transaction", "none")
PREPARE_SETTINGS: dict[str, bool | None] = {"auto": None, "on": True, "off": False}
# PgBouncer's answer to startup options it was not told to ignore (its default).
POOLER_REFUSAL = "unsupported startup parameter"
# A prepared statement of the store met a server connection that has not got it, or has one of
# that name already: what prepared statements do behind a transaction pooler.
PREPARED_STATEMENT_SQLSTATES = {"26000", "42P05"}
# statement_timeout fired: the database is too slow right now. Retrying would only add load.
STATEMENT_TIMEOUT_SQLSTATE = "57014"
# The server could not turn the id into its own encoding (a database that is not UTF8): such an
# id cannot be stored there, so it names no session.
UNREPRESENTABLE_SQLSTATES = {"22P05", "22021"}
# Pool size, per app process. Most of the store's calls are one-row writes whose time is the
# WAL flush at commit, not CPU, and commits waiting on one flush share it (group commit): a pool
# must hold about offered rate × commit latency connections (Little's law) to ride out a slow
# flush, and not so many that CPU-bound work queues inside the server. Measured with client and
# server on 2 cores, 8 beat 2 and 4 (slower to drain a flush stall) and matched 16; 20 + 10
# behind SQLAlchemy was the slowest. How to size it: benchmarks/STORE.md.
DEFAULT_POOL_SIZE = 8


_STREAM_SETTINGS = "SELECT pg_catalog.set_config('idle_in_transaction_session_timeout', '0', true)"
_NO_TRANSACTION_TIMEOUT = "SELECT pg_catalog.set_config('transaction_timeout', '0', true)"


def _closed_by_the_server(conn: psycopg.AsyncConnection[Any]) -> bool:
    """Whether this idle pool connection is already gone: closed on our side, or anything to
    read on its socket — the server sends an idle autocommit connection nothing unasked but
    the error that ends it and the end itself (the store never LISTENs). One poll of the
    socket, no round trip; a connection that answers a poll this way never got a statement."""
    if conn.closed or conn.broken:
        return True
    try:
        fd = conn.pgconn.socket
    except psycopg.OperationalError:
        return True
    if hasattr(_select, "poll"):
        poller = _select.poll()
        poller.register(fd, _select.POLLIN | _select.POLLPRI)
        return bool(poller.poll(0))
    return bool(_select.select([fd], [], [], 0)[0])


class _Cursor(psycopg.AsyncCursor[Any]):
    """The store's cursor. It notes whether the server's answer held a completed command
    (``completed``, set when psycopg checks the results of an execution), which is what tells,
    when that answer ends in the server's own FATAL error, whether the statement ran."""

    completed: bool | None = None

    def _check_results(self, results: list[Any]) -> None:
        self.completed = any(r.status in _COMPLETED for r in results)
        super()._check_results(results)


_COMPLETED = (psycopg.pq.ExecStatus.COMMAND_OK, psycopg.pq.ExecStatus.TUPLES_OK)


def _may_have_run(exc: psycopg.Error, cur: _Cursor, extended: bool) -> bool:
    """Whether a statement sent on a connection that was then lost may have run.

    It has not when the server itself ended the session (shutdown, a terminated backend:
    its FATAL error) without first completing the statement, in the extended protocol (a
    prepared statement, or one with parameters): there the server commits at the Sync after
    queueing the Execute's CommandComplete, and an error it raises later is queued behind that,
    so an answer that is only the error means rolled back, or never started. Any other loss
    (the socket failed, no SQLSTATE) may have come after the commit."""
    ended_first = exc.sqlstate in CONNECTION_LOST_SQLSTATES and cur.completed is not True
    return not (extended and ended_first)


async def _behind_a_pooler(conn: psycopg.AsyncConnection[Any]) -> bool:
    """Whether ``conn`` goes through a pooler: a pooler announces a backend pid of its own at
    login, which the server's ``pg_backend_pid()`` is not. (PgBouncer told to ignore the startup
    options let them through unapplied: only this tells.)"""
    cur = await conn.execute("SELECT pg_catalog.pg_backend_pid()")
    row = await cur.fetchone()
    return row is not None and row[0] != conn.info.backend_pid


def _first_line(exc: BaseException) -> str:
    lines = redact(str(exc)).strip().splitlines()
    return lines[0].strip() if lines else type(exc).__name__


def _connection_lost(exc: psycopg.Error) -> bool:
    state = exc.sqlstate
    if state is None:
        # No SQLSTATE: the client itself saw the connection fail (refused, reset, closed).
        return isinstance(exc, psycopg.OperationalError)
    return state.startswith("08") or state in CONNECTION_LOST_SQLSTATES


@dataclass
class _LoopPool:
    """The pool of one event loop. psycopg's pool runs tasks on the loop it was opened on, and
    each ``asyncio.run`` is a new loop, so a manager keeps one pool per loop it is used from."""

    loop: asyncio.AbstractEventLoop
    opening: asyncio.Task[AsyncConnectionPool[Any]] | None = None
    pool: AsyncConnectionPool[Any] | None = None
    # Every connection the pool made, so those of a loop that is gone can still be closed.
    connections: weakref.WeakSet[psycopg.AsyncConnection[Any]] = field(
        default_factory=weakref.WeakSet
    )
    checking: asyncio.Task[None] | None = None
    guard: asyncio.Task[None] | None = None
    # The outage: since when no writable server has answered (monotonic; None while up),
    # what said so, how many calls were answered StoreUnavailable at once meanwhile, and the
    # task that makes a new pool as soon as a writable server accepts a connection.
    down_since: float | None = None
    down_reason: str = ""
    refused: int = 0
    reviving: asyncio.Task[None] | None = None
    probing: asyncio.Task[bool] | None = None

    def finish(self) -> None:
        """Close, without the loop, every connection of this pool still open."""
        for conn in list(self.connections):
            if not conn.closed:
                conn.pgconn.finish()


Reader = Callable[[psycopg.AsyncCursor[Any]], Awaitable[T]]


async def _first_value(cur: psycopg.AsyncCursor[Any]) -> Any:
    row = await cur.fetchone()
    return None if row is None else row[0]


async def _one_row(cur: psycopg.AsyncCursor[Any]) -> Any:
    return await cur.fetchone()


async def _one_row_changed(cur: psycopg.AsyncCursor[Any]) -> bool:
    return cur.rowcount == 1


async def _rows_changed(cur: psycopg.AsyncCursor[Any]) -> int:
    return cur.rowcount


class SessionManager:
    """Sessions in PostgreSQL: the model's statements, compiled once, run on a fixed-size
    psycopg ``AsyncConnectionPool`` (autocommit: each statement is its own transaction).

    Timeouts: ``connect_timeout_s`` for making a connection; ``statement_timeout_ms`` for each
    statement on the server; ``pool_timeout_s`` for waiting for a free pool connection (when
    every one is busy: the app is over what the pool and the database serve). ``pool_size``:
    see :data:`DEFAULT_POOL_SIZE`.

    Behind a transaction pooler (PgBouncer ``pool_mode=transaction``; ``pooler``: ``"auto"``
    detects one, ``"transaction"`` says there is one, ``"none"`` that there is not): a pooler
    refuses the startup ``options`` that carry the time zone and the statement timeout (or, told
    to ignore them, silently drops them), and hands each transaction a different server
    connection, on which a prepared statement of the last one does not exist. So there the
    store sends no startup options and sets ``statement_timeout``, ``TimeZone`` and
    ``search_path`` in each statement's own transaction (``set_config(..., true)`` pipelined
    before it: still one round trip), reads answers in binary (independent of the server's
    ``DateStyle``), and prepares nothing. ``"auto"`` knows a pooler by its refusal of the
    options, or by the backend pid it announced differing from the server's own
    (``pg_backend_pid()``). ``prepare``: server-side prepared statements; None (default) is on
    directly and off behind a pooler.
    """

    def __init__(
        self,
        url: str,
        *,
        ttl_hours: float = 24,
        schema: str = D.TARGET_SCHEMA,
        pool_size: int = DEFAULT_POOL_SIZE,
        connect_timeout_s: int = 5,
        statement_timeout_ms: int = 5000,
        pool_timeout_s: float = 5.0,
        retries: int = 3,
        prepare: bool | None = None,
        pooler: str = "auto",
        clock: Clock | None = None,
    ) -> None:
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        if pooler not in POOLER_MODES:
            raise ValueError(f"pooler={pooler!r}: use one of {', '.join(POOLER_MODES)}")
        self.ttl = timedelta(hours=ttl_hours)
        self.schema = schema
        self.pool_size = pool_size
        self.connect_timeout_s = connect_timeout_s
        self.statement_timeout_ms = statement_timeout_ms
        self.pool_timeout_s = pool_timeout_s
        self.retries = retries
        self.pooler = pooler
        self._prepare_asked = prepare
        # Decided when the pool opens (see _open); until then what a direct connection gets.
        self.pooled = pooler == "transaction"
        self.prepare = (not self.pooled) if prepare is None else prepare
        # Behind a pooler, what the startup options would have fixed, for each transaction.
        self._per_transaction = (
            "SELECT pg_catalog.set_config('statement_timeout', "
            f"'{int(statement_timeout_ms)}', true), "
            "pg_catalog.set_config('TimeZone', 'UTC', true), "
            "pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true)"
        )
        # None (production): the database's clock. A clock given here (tests, a replayed
        # instant) is read once a connection is held, just before the statement is sent.
        self.clock = clock
        self.sql = statements(schema, clock is None)
        self._ttl_us = micros(self.ttl)
        # Any DSN form libpq accepts, and SQLAlchemy's postgresql+psycopg:// spelling.
        self._url = url
        self._libpq: dict[str, Any] = {
            "connect_timeout": connect_timeout_s,
            "statement_timeout_ms": int(statement_timeout_ms),
            # TimeZone=UTC: the instants handed back are UTC whatever the server's default.
            "options": "-c TimeZone=UTC",
            # Python text is Unicode: send it as UTF-8 whatever the database's encoding, so
            # a value that database cannot hold is refused by the server with a SQLSTATE
            # (22P05) instead of a UnicodeEncodeError raised inside the driver.
            "client_encoding": "UTF8",
        }
        self._pools: dict[asyncio.AbstractEventLoop, _LoopPool] = {}
        self._current: _LoopPool | None = None

    # --- the pool -----------------------------------------------------------------------------

    def _driver(self) -> dict[str, Any]:
        # One statement per call, each its own transaction: no BEGIN/COMMIT round trips.
        driver: dict[str, Any] = {"autocommit": True}
        if not self.prepare:
            # Behind a pooler that cannot keep them: no prepared statement at all, not even
            # psycopg's automatic ones. Otherwise the store's own are prepared on first use.
            driver["prepare_threshold"] = None
        return driver

    def _connection_settings(self) -> dict[str, Any]:
        """libpq's parameters: with the startup options directly, without behind a pooler."""
        # The runbook's own defaults (no timeouts …) are not the app's: the DBA's stay.
        if self.pooled:
            pooled = {k: v for k, v in self._libpq.items() if k != "options"}
            return {
                **pooled,
                "statement_timeout_ms": None,
                "startup_options": False,
                "runbook_defaults": False,
            }
        return {**self._libpq, "runbook_defaults": False}

    async def _probe(self) -> None:
        """One connection, in the calling task: a database that is down or refuses us fails the
        call now, with the server's own reason, instead of after the pool's wait. With
        ``pooler="auto"`` it also tells whether a transaction pooler is in front (and so how
        every connection of the pool is made: :attr:`pooled`)."""
        if not self.pooled:
            try:
                probe = await aconnect(
                    self._url, "store", autocommit=True, **self._connection_settings()
                )
            except TargetRefused as exc:
                # PgBouncer's default: it refuses the startup options outright.
                if self.pooler != "auto" or POOLER_REFUSAL not in str(exc):
                    raise
                self._use_pooler()
            else:
                try:
                    if self.pooler == "auto" and await _behind_a_pooler(probe):
                        self._use_pooler()
                finally:
                    await probe.close()
                if not self.pooled:
                    return
        probe = await aconnect(self._url, "store", autocommit=True, **self._connection_settings())
        await probe.close()

    def _use_pooler(self) -> None:
        self.pooled = True
        if self._prepare_asked is None:
            self.prepare = False

    async def _open(self, lp: _LoopPool) -> AsyncConnectionPool[Any]:
        pool = await self._new_pool(lp)
        lp.pool = pool
        lp.guard = asyncio.get_running_loop().create_task(self._close_with_loop(lp))
        return pool

    async def _new_pool(self, lp: _LoopPool) -> AsyncConnectionPool[Any]:
        """A pool with all its connections made (after :meth:`_probe`)."""
        await self._probe()

        async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
            lp.connections.add(conn)
            _STORE_CONNECTIONS.add(conn)

        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            conninfo(self._url, "store", **self._connection_settings()),
            kwargs=self._driver(),
            # Fixed size: connections are made once and kept; the size is the concurrency the
            # database is given, and anything over it waits in the pool, not in the server.
            min_size=self.pool_size,
            max_size=self.pool_size,
            timeout=self.pool_timeout_s,
            configure=configure,
            name=POOL_NAME,
            open=False,
        )
        try:
            # Every connection made before the first call is served: no request queues behind
            # the pool's own connecting, and none is left half made when a short loop ends.
            await pool.open(wait=True, timeout=2.0 * self.connect_timeout_s)
        except PoolTimeout:
            # Reachable a moment ago, yet not all connections could be made (max_connections?).
            with contextlib.suppress(Exception):
                await pool.close(timeout=0)
            raise psycopg.OperationalError(
                f"the pool could not make its {self.pool_size} connections within "
                f"{2 * self.connect_timeout_s} s"
            ) from None
        return pool

    # --- an outage: answered at once, said once, over as soon as a server answers --------------

    async def _reachable(self, lp: _LoopPool) -> bool:
        """Whether a writable server accepts a connection now (one probe at a time, however many
        calls ask; bounded by :data:`OUTAGE_PROBE_S`, so no call waits longer to be told)."""
        if lp.probing is None or lp.probing.done():
            lp.probing = asyncio.get_running_loop().create_task(self._try_connect())
        try:
            return await asyncio.wait_for(asyncio.shield(lp.probing), OUTAGE_PROBE_S)
        except TimeoutError:
            return False

    async def _try_connect(self) -> bool:
        try:
            conn = await aconnect(
                self._url, "store", autocommit=True, **self._connection_settings()
            )
        except (TargetError, psycopg.Error):
            return False
        try:
            if self.pooled:
                # A pooler accepts logins whatever the server behind it does: only a statement
                # that reaches the server tells (any ServerError or a lost connection: no).
                await conn.execute("SELECT 1", prepare=False)
        except psycopg.Error:
            return False
        finally:
            await conn.close()
        return True

    def _mark_down(self, lp: _LoopPool, reason: str) -> None:
        """No writable server answers: from now on every call is answered StoreUnavailable at
        once (none waits on the pool, none is queued to be served late), the pool that holds
        dead connections is closed (its waiting calls are told now, its reconnecting stops),
        and a new one is made as soon as a server accepts. Logged once, not per call."""
        if lp.down_since is not None:
            return
        lp.down_since, lp.down_reason, lp.refused = time.monotonic(), reason, 0
        log.warning(
            "the session database is unreachable or not writable (%s): the store answers "
            "StoreUnavailable at once and tries to connect every %g s until a writable server "
            "accepts",
            reason,
            OUTAGE_RETRY_S,
        )
        old, lp.pool = lp.pool, None
        loop = asyncio.get_running_loop()
        if old is not None:
            loop.create_task(_close_quietly(old))
        lp.reviving = loop.create_task(self._revive(lp))

    async def _revive(self, lp: _LoopPool) -> None:
        while True:
            await asyncio.sleep(OUTAGE_RETRY_S)
            try:
                # A server must answer a statement first: behind a pooler a login alone says
                # nothing (the pooler accepts it with no server behind).
                if not await asyncio.wait_for(self._try_connect(), OUTAGE_PROBE_S):
                    continue
                pool = await asyncio.wait_for(self._new_pool(lp), OUTAGE_PROBE_S + 2.0)
            except (TargetError, psycopg.Error, TimeoutError):
                continue
            down = time.monotonic() - (lp.down_since or time.monotonic())
            lp.pool, lp.down_since = pool, None
            log.warning(
                "the session database answers again after %.1f s of outage (%d calls were "
                "answered StoreUnavailable meanwhile)",
                down,
                lp.refused,
            )
            return

    def _unavailable(self, lp: _LoopPool) -> StoreUnavailable:
        lp.refused += 1
        since = time.monotonic() - (lp.down_since or time.monotonic())
        return StoreUnavailable(
            f"the session database has been unreachable or not writable for {since:.1f} s "
            f"({lp.down_reason}); the store reconnects on its own as soon as a writable server "
            "accepts: try again in a moment"
        )

    @staticmethod
    async def _close_with_loop(lp: _LoopPool) -> None:
        """Wait for the end of the loop (``asyncio.run`` cancels every task then) and close the
        pool with it, so an app or test that never calls ``close()`` neither leaves the pool's
        tasks behind (one cancelled while connecting can keep the loop from ending) nor its
        connections open."""
        try:
            await asyncio.get_running_loop().create_future()
        finally:
            if lp.reviving is not None:
                lp.reviving.cancel()
            if lp.pool is not None:
                with contextlib.suppress(BaseException):  # its tasks are being cancelled too
                    await lp.pool.close(timeout=1.0)
            lp.finish()

    def _ready_pool(self) -> AsyncConnectionPool[Any] | None:
        """The open pool of the running loop, if there is one (the hot path: no await)."""
        lp = self._current
        if lp is not None and lp.pool is not None and lp.loop is asyncio.get_running_loop():
            return lp.pool
        return None

    async def _pool(self) -> AsyncConnectionPool[Any]:
        loop = asyncio.get_running_loop()
        lp = self._pools.get(loop)
        if lp is not None and lp.down_since is not None:
            self._current = lp
            raise self._unavailable(lp)
        if lp is None or lp.opening is None or (lp.opening.done() and lp.pool is None):
            # First use from this loop, or the last opening failed: open (again). Pools of
            # loops that are closed (an earlier asyncio.run) are let go here.
            self._let_go_of_closed_loops()
            lp = self._pools[loop] = _LoopPool(loop)
            lp.opening = loop.create_task(self._open(lp))
        self._current = lp
        # Many callers may wait for one opening; none of them may cancel it for the others.
        opened = await asyncio.shield(lp.opening)
        # After an outage the pool is a new one (see _revive).
        return lp.pool if lp.pool is not None else opened

    def _let_go_of_closed_loops(self) -> None:
        for loop, lp in list(self._pools.items()):
            if loop.is_closed():
                # Closed without its tasks cancelled first (not by asyncio.run): only the
                # sockets are left to close.
                lp.finish()
                del self._pools[loop]

    async def _after_connection_lost(self) -> None:
        """A connection was lost: the database may have restarted and taken every connection
        with it. Check the idle ones once (one check at a time) so a retry gets a live one."""
        lp = self._current
        if lp is None or lp.pool is None:
            return
        if lp.checking is None or lp.checking.done():
            lp.checking = asyncio.get_running_loop().create_task(lp.pool.check())
        with contextlib.suppress(Exception):  # the retry itself will tell
            await asyncio.wait_for(asyncio.shield(lp.checking), self.connect_timeout_s)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A connection of the store's pool (autocommit, UTC, the store's timeouts), for a
        statement of the app's own; it goes back to the pool afterwards. Behind a transaction
        pooler (:attr:`pooled`) it carries none of those settings: set them in the statement's
        own transaction (``set_config(..., true)``)."""
        try:
            pool = self._ready_pool() or await self._pool()
        except TargetError as exc:
            raise StoreUnavailable(f"the session database is unavailable: {exc}") from None
        except PoolClosed:
            raise StoreUnavailable("the session store is closed or in an outage") from None
        try:
            conn = await pool.getconn()
        except PoolTimeout:
            raise self._pool_exhausted() from None
        try:
            yield conn
        finally:
            await pool.putconn(conn)

    def _pool_exhausted(self) -> StoreUnavailable:
        return StoreUnavailable(
            f"no connection of the session store's pool ({self.pool_size}) was free within "
            f"{self.pool_timeout_s:g} s: the database is too slow or unreachable, or the pool "
            "is too small for the app's load"
        )

    # --- running a statement ------------------------------------------------------------------

    async def _run(
        self, statement: Statement, params: Callable[[], dict[str, Any]], read: Reader[T]
    ) -> T:
        """Run ``statement`` with ``params()`` (made again for each attempt) and ``read`` its
        answer; retry a lost connection when that cannot apply the statement twice (it was
        never sent, or it is ``resend_safe``), turn every way of being unavailable into
        :class:`StoreUnavailable`."""
        for attempt in range(self.retries + 1):
            sent: _Cursor | None = None  # once sent, the server may run it, answer or not
            try:
                pool = self._ready_pool() or await self._pool()
                conn = await pool.getconn()
                try:
                    if _closed_by_the_server(conn):
                        await conn.close()  # the pool replaces it
                        raise psycopg.OperationalError("the server had closed the connection")
                    values = statement.bind(params())
                    if self.clock is not None:
                        # Read only now that a connection is held: queueing never makes it stale.
                        values["now"] = self.clock()
                    # (psycopg's row factories serve both kinds of cursor; its types say sync.)
                    factory = cast(Any, statement.row_factory)
                    sent = cur = _Cursor(conn, row_factory=factory)
                    if self.pooled:
                        # The settings and the statement in one implicit transaction (one
                        # Sync, one round trip): the pooler gives both the same server
                        # connection, and the settings end with the transaction.
                        async with conn.pipeline():
                            await conn.execute(self._per_transaction, prepare=False)
                            await cur.execute(statement.sql, values, prepare=False, binary=True)
                    else:
                        await cur.execute(statement.sql, values, prepare=self.prepare)
                    return await read(cur)
                finally:
                    await pool.putconn(conn)
            except PoolTimeout:
                # Waiting longer, or again, would only lengthen the queue behind a slow database.
                raise self._pool_exhausted() from None
            except TargetRefused as exc:
                # The first connection of a pool was refused (login, database): so is a retry.
                raise StoreUnavailable(f"the session database is unavailable: {exc}") from None
            except TargetUnreachable as exc:
                if attempt == self.retries:
                    raise StoreUnavailable(
                        f"the session database is unavailable after {attempt + 1} attempts: {exc}"
                    ) from None
                await asyncio.sleep(0.05 * 2**attempt)
            except psycopg.Error as exc:
                if exc.sqlstate == STATEMENT_TIMEOUT_SQLSTATE:
                    raise StoreUnavailable(
                        "the session database did not answer within "
                        f"{self.statement_timeout_ms} ms (statement_timeout)"
                    ) from None
                if exc.sqlstate in PREPARED_STATEMENT_SQLSTATES and self.prepare:
                    raise StoreUnavailable(
                        "the session store's prepared statement was missing or already there "
                        f"({redact(str(exc)).strip()}): a transaction pooler in front of "
                        "PostgreSQL gives each transaction another server connection; turn "
                        "the store's prepared statements off (SESSION_PREPARE=off, or leave "
                        "SESSION_DB_POOLER=auto to detect the pooler)"
                    ) from None
                lost = _connection_lost(exc) or isinstance(exc, PoolClosed)
                if not (lost or exc.sqlstate in ROLLED_BACK_SQLSTATES):
                    raise
                lp = self._current
                down = False
                if lost and lp is not None and lp.loop is asyncio.get_running_loop():
                    # A lost connection, or a database gone? Asked once for all calls, and
                    # answered within OUTAGE_PROBE_S: an outage is told at once, not after
                    # the retries and the pool's wait.
                    if lp.down_since is None and not await self._reachable(lp):
                        self._mark_down(lp, _first_line(exc))
                    down = lp.down_since is not None
                may_have_run = (
                    lost
                    and sent is not None
                    and _may_have_run(
                        exc,
                        cast(_Cursor, sent),
                        extended=self.prepare or self.pooled or bool(values),
                    )
                )
                if may_have_run and not statement.resend_safe:
                    # Sending it again could run it twice.
                    raise StoreUnavailable(
                        "the connection to the session database was lost after the statement "
                        "was sent: its outcome is unknown (it took effect at most once; it was "
                        f"not sent again): {redact(str(exc)).strip()}"
                    ) from None
                if down:
                    if may_have_run and statement is self.sql.create:
                        # Sent again it would find its own row, but there is no server to send
                        # it to: the login may have made a session whose id no one was given.
                        raise StoreUnavailable(
                            "the session database became unreachable after a login's insert "
                            "was sent: its outcome is unknown (at most one session was made; "
                            "its id was not handed out, so it expires unused)"
                        ) from None
                    raise self._unavailable(cast(_LoopPool, lp)) from None
                if attempt == self.retries:
                    raise StoreUnavailable(
                        f"the session database is unavailable after {attempt + 1} attempts: "
                        f"{redact(str(exc)).strip()}"
                    ) from None
                if lost:
                    await self._after_connection_lost()
                await asyncio.sleep(0.05 * 2**attempt)
        raise AssertionError("unreachable")

    async def _by_id(
        self, statement: Statement, params: dict[str, Any], read: Reader[T], absent: T
    ) -> T:
        """``_run`` for a call keyed by a session id that the server may not represent."""
        try:
            return await self._run(statement, lambda: dict(params), read)
        except psycopg.Error as exc:
            if exc.sqlstate in UNREPRESENTABLE_SQLSTATES:
                return absent
            raise

    # --- the seven methods --------------------------------------------------------------------

    async def create_session(
        self, user_id: str | None = None, metadata: Any = None
    ) -> tuple[str, datetime]:
        for _ in range(3):
            # One id for every attempt of this insert: one sent again after a lost answer
            # finds the row the first one committed and inserts nothing.
            values = {"session_id": new_session_id(), "user_id": user_id, "metadata": metadata}
            row = await self._run(
                self.sql.create, partial(dict, values, ttl_us=self._ttl_us), _one_row
            )
            if row is None:
                # The id is taken: by this very insert, committed by an attempt whose answer
                # was lost (then the row holds our values), or by another session (random
                # 122-bit ids: never seen) — then a new id.
                row = await self._run(self.sql.created, partial(dict, values), _one_row)
            if row is not None:
                # UTC whatever zone the connection reports (behind a pooler: the server's).
                return row[0], row[1].astimezone(UTC)
        raise AssertionError("three random session ids were all taken")

    async def validate_session(self, session_id: object) -> bool:
        sid = usable_session_id(session_id)
        if sid is None:
            return False
        valid = await self._by_id(self.sql.validate, {"session_id": sid}, _first_value, 0)
        return valid == 1

    async def get_session(self, session_id: object) -> Session | None:
        sid = usable_session_id(session_id)
        if sid is None:
            return None
        found = await self._by_id(self.sql.get, {"session_id": sid}, _one_row, None)
        if found is None:
            return None
        # UTC whatever zone the connection reports (behind a pooler: the server's).
        for key in ("created_at", "expires_at", "last_activity"):
            found[key] = found[key].astimezone(UTC)
        return Session(**found)

    async def delete_session(self, session_id: object) -> bool:
        sid = usable_session_id(session_id)
        if sid is None:
            return False
        return await self._by_id(self.sql.delete, {"session_id": sid}, _one_row_changed, False)

    async def cleanup_expired_sessions(self) -> int:
        return await self._run(self.sql.cleanup, dict, _rows_changed)

    async def extend_session(self, session_id: object, hours: float = 24) -> bool:
        sid = usable_session_id(session_id)
        if sid is None:
            return False
        params = {"session_id": sid, "extra_us": micros(timedelta(hours=hours))}
        return await self._by_id(self.sql.extend, params, _one_row_changed, False)

    async def get_active_session_count(self) -> int:
        return await self._run(self.sql.count, dict, _first_value)

    async def active_among(self, session_ids: Iterable[str], at: datetime) -> set[str]:
        """Which of ``session_ids`` ``validate_session`` would accept at ``at`` — read only:
        the same predicate, no counter touched (for the runbook's application check)."""
        # An id no store can hold is not active; leaving it out keeps the query from failing.
        ids = [sid for sid in map(usable_session_id, session_ids) if sid is not None]
        if not ids:
            return set()

        async def found(cur: psycopg.AsyncCursor[Any]) -> set[str]:
            return {r[0] for r in await cur.fetchall()}

        return await self._run(self.sql.active_among, lambda: {"ids": ids, "at": at}, found)

    async def active_ids(self, at: datetime, chunk: int = 10_000) -> AsyncIterator[list[str]]:
        """Every session ``validate_session`` would accept at ``at`` — read only, in one
        snapshot: the store's own predicate over the whole table, streamed in lists of at most
        ``chunk`` ids, so memory stays flat whatever the table holds (the runbook's application
        check). Not retried: a stream cut half-way cannot resume in the same snapshot; every
        way of being unavailable is :class:`StoreUnavailable`."""
        statement = self.sql.active_at
        try:
            pool = self._ready_pool() or await self._pool()
            async with pool.connection() as conn:
                # The rows are read at the caller's pace: the server may have sent them all
                # and wait, idle in this transaction, until the caller is done. BEGIN and the
                # settings that allow it go in one round trip (one Sync): the transaction is
                # never idle before its own timeouts are off, whatever the database's.
                async with conn.pipeline():
                    await conn.execute("BEGIN", prepare=False)
                    if self.pooled:
                        await conn.execute(self._per_transaction, prepare=False)
                    await conn.execute(_STREAM_SETTINGS, prepare=False)
                    if conn.info.server_version >= 170000:
                        await conn.execute(_NO_TRANSACTION_TIMEOUT, prepare=False)
                try:
                    ids: list[str] = []
                    values = statement.bind({"at": at})
                    # Rows a chunk at a time where libpq can (17 and later), else one by one.
                    size = chunk if psycopg.pq.version() >= 170000 else 1
                    async for (sid,) in conn.cursor().stream(statement.sql, values, size=size):
                        ids.append(sid)
                        if len(ids) == chunk:
                            yield ids
                            ids = []
                    if ids:
                        yield ids
                except BaseException:
                    if not conn.broken:
                        with contextlib.suppress(psycopg.Error):
                            await conn.execute("ROLLBACK", prepare=False)
                    raise
                await conn.execute("COMMIT", prepare=False)
        except PoolTimeout:
            raise self._pool_exhausted() from None
        except (TargetRefused, TargetUnreachable) as exc:
            raise StoreUnavailable(f"the session database is unavailable: {exc}") from None
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(
                f"the session database stopped answering: {redact(_first_line(exc))}"
            ) from None

    async def open(self) -> SessionManager:
        """Make the pool of the running loop and check the database once: the sessions table
        exists in :attr:`schema` at the revision the store is written for
        (:data:`~sessionstore.migrate.HEAD`). Raises :class:`StoreNotReady` (the message says
        what is wrong and the command that fixes it) or :class:`StoreUnavailable` (no
        connection: try again later), leaving nothing open. Returns the manager."""
        try:
            async with self.connection() as conn:
                await check_ready(conn, self.schema)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aenter__(self) -> SessionManager:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the pool of the running loop (and what is left of pools of closed loops).
        Safe to call twice; a manager used again afterwards opens a new pool."""
        running = asyncio.get_running_loop()
        pools, self._pools, self._current = self._pools, {}, None
        for loop, lp in pools.items():
            if loop is running:
                if lp.reviving is not None and not lp.reviving.done():
                    lp.reviving.cancel()  # no new pool after this
                    with contextlib.suppress(BaseException):
                        await lp.reviving
                    lp.finish()  # what a cancelled opening had made
                if lp.opening is not None:
                    with contextlib.suppress(Exception):  # an opening that failed left nothing
                        await asyncio.shield(lp.opening)
                if lp.pool is not None:
                    await lp.pool.close()
                if lp.guard is not None:
                    lp.guard.cancel()  # nothing left for it to close
            elif loop.is_closed():
                lp.finish()
            elif lp.pool is not None:
                # A loop still running in another thread: ask it to close its own pool.
                asyncio.run_coroutine_threadsafe(lp.pool.close(), loop)
