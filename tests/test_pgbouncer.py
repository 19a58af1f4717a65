"""The session store behind PgBouncer in transaction mode, configured only through the app's
environment (``get_session_manager``), as a managed deployment puts it.

PgBouncer at its defaults refuses the startup ``options`` the store used to carry its time zone
and statement timeout in; told to ignore them, it drops them silently and mixes the store's
prepared statements across server connections. The store must detect the pooler, set what
it needs per transaction, prepare nothing, count every request exactly once, and name a
deterministic refusal at once instead of retrying it as if the server were down.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from pgbouncer import needs_pgbouncer, pgbouncer
from pgcluster import needs_pg_bin, server
from psycopg import sql

from sessionmig.errors import StoreUnavailable, TargetRefused
from sessionmig.postgres import connect, schema
from sessionmig.store import SessionManager, get_session_manager

pytestmark = needs_pgbouncer

# PgBouncer at its defaults (transaction mode), and the same told to ignore the startup options.
CONFIGS = {"defaults": {}, "ignoring options": {"ignore_startup_parameters": "options"}}
CLIENTS, OPS = 50, 60


def hostile_defaults(dsn: str) -> None:
    """Server-side defaults the store must not depend on: a zone with an offset, a DateStyle
    psycopg cannot read as text, no statement timeout."""
    name = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        for setting, value in (("TimeZone", "America/New_York"), ("DateStyle", "SQL, DMY")):
            conn.execute(
                sql.SQL("ALTER DATABASE {} SET {} = {}").format(
                    sql.Identifier(str(name)), sql.Identifier(setting), sql.Literal(value)
                )
            )


def rows_of(dsn: str, query: str) -> list[tuple]:
    """The rows of ``query``, read directly (the test's own settings over the hostile ones)."""
    with psycopg.connect(dsn, options="-c DateStyle=ISO -c TimeZone=UTC") as conn:
        return conn.execute(query).fetchall()


@pytest.mark.parametrize("config", CONFIGS)
def test_store_through_pgbouncer_counts_every_request_once(
    tmp_path: Path, dsn: str, config: str
) -> None:
    schema.upgrade(dsn)
    hostile_defaults(dsn)
    with pgbouncer(tmp_path, dsn, **CONFIGS[config]) as bouncer:
        store = get_session_manager({"DATABASE_URL": bouncer.url, "SESSION_TTL_HOURS": "2"})
        assert isinstance(store, SessionManager)
        validated: Counter[str] = Counter()
        created: dict[str, object] = {}
        ended: set[str] = set()
        failures: list[str] = []

        async def client(k: int) -> None:
            rng = random.Random(k)
            mine: list[str] = []
            for n in range(OPS):
                try:
                    if not mine or rng.random() < 0.1:
                        sid, expires = await store.create_session(f"user-{k}", {"n": n, "k": k})
                        assert expires.utcoffset() == timedelta(0), expires
                        created[sid] = expires
                        mine.append(sid)
                    elif rng.random() < 0.05:
                        sid = mine.pop(rng.randrange(len(mine)))
                        assert await store.delete_session(sid)
                        ended.add(sid)
                    else:
                        sid = rng.choice(mine)
                        assert await store.validate_session(sid)
                        validated[sid] += 1
                except Exception as exc:  # every failure is counted, none hidden
                    failures.append(f"{type(exc).__name__}: {exc}")

        async def scenario() -> dict[str, object]:
            await asyncio.gather(*(client(k) for k in range(CLIENTS)))
            assert failures == [], (len(failures), failures[:5])
            some = next(iter(set(created) - ended))
            got = await store.get_session(some)
            assert got is not None
            await store.close()
            return got

        got = asyncio.run(scenario())
        assert failures == [], (len(failures), failures[:5])
        assert store.pooled and not store.prepare, "the pooler was not detected"

    rows = {
        sid: (count, expires)
        for sid, count, expires in rows_of(
            dsn, "SELECT session_id, request_count, expires_at FROM sessions"
        )
    }
    assert set(rows) == set(created) - ended
    # Every acknowledged validation counted exactly once, every expiry handed back as stored.
    assert {sid: count for sid, (count, _) in rows.items()} == {sid: validated[sid] for sid in rows}
    assert all(created[sid] == expires for sid, (_, expires) in rows.items())
    for key in ("created_at", "expires_at", "last_activity"):
        assert getattr(got, key).utcoffset() == timedelta(0)
    assert got.expires_at - got.created_at == timedelta(hours=2)  # type: ignore[operator]


@pytest.mark.parametrize("config", CONFIGS)
def test_statement_timeout_is_in_force_behind_pgbouncer(
    tmp_path: Path, dsn: str, config: str
) -> None:
    """A validation stuck behind a row lock ends at the store's statement timeout, though no
    startup option carried it."""
    schema.upgrade(dsn)
    hostile_defaults(dsn)
    with pgbouncer(tmp_path, dsn, **CONFIGS[config]) as bouncer:
        store = SessionManager(bouncer.url, statement_timeout_ms=700)
        locked, release = threading.Event(), threading.Event()

        def hold_lock(sid: str) -> None:
            with psycopg.connect(dsn) as conn:
                conn.execute("SELECT 1 FROM sessions WHERE session_id = %s FOR UPDATE", (sid,))
                locked.set()
                release.wait(10)

        async def scenario() -> tuple[float, str]:
            sid, _ = await store.create_session("u", None)
            holder = threading.Thread(target=hold_lock, args=(sid,))
            holder.start()
            try:
                await asyncio.to_thread(locked.wait, 10)
                started = time.monotonic()
                with pytest.raises(StoreUnavailable) as caught:
                    await store.validate_session(sid)
                return time.monotonic() - started, str(caught.value)
            finally:
                release.set()
                await asyncio.to_thread(holder.join)
                await store.close()

        waited, message = asyncio.run(scenario())
    assert "700 ms (statement_timeout)" in message
    assert 0.6 < waited < 3.0, waited
    # The lock gone, the refused validation left no trace: nothing was counted.
    assert rows_of(dsn, "SELECT request_count FROM sessions") == [(0,)]


def test_a_refusal_by_pgbouncer_is_named_and_not_retried(tmp_path: Path, dsn: str) -> None:
    schema.upgrade(dsn)
    with pgbouncer(tmp_path, dsn) as bouncer:
        unknown = bouncer.url.rsplit("/", 1)[0] + "/no_such_db"
        store = get_session_manager({"DATABASE_URL": unknown})
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as caught:
            asyncio.run(store.validate_session("session-x"))
        elapsed = time.monotonic() - started
        message = str(caught.value)
        assert "no such database" in message and "[databases]" in message, message
        assert "check that the server is running" not in message, message
        assert elapsed < 1.0, elapsed
        # One login to that database: the refusal was not tried again.
        assert bouncer.log_text().count("pooler error: no such database: no_such_db") == 1
        before = len(bouncer.log_text())

        # Told there is no pooler, the store's startup options are refused: named, once.
        direct = get_session_manager({"DATABASE_URL": bouncer.url, "SESSION_DB_POOLER": "none"})
        with pytest.raises(StoreUnavailable) as caught:
            asyncio.run(direct.create_session())
        message = str(caught.value)
        assert "unsupported startup parameter" in message and "pooler" in message, message
        assert "attempts" not in message, message
        assert bouncer.log_text()[before:].count("pooler error: unsupported startup") == 1

        # The runbook's own connections (preflight, migrate …) need a session of their own:
        # refused at once with the fix, a direct DSN.
        with pytest.raises(TargetRefused) as refused:
            connect.connect(bouncer.url, "preflight")
        assert "direct DSN" in str(refused.value), refused.value

        with pytest.raises(StoreUnavailable, match="SESSION_DB_POOLER='session'"):
            get_session_manager({"DATABASE_URL": bouncer.url, "SESSION_DB_POOLER": "session"})


def test_preflight_refuses_a_target_behind_a_pooler(
    tmp_path: Path, dsn: str, small_backup: Path, target, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runbook's steps need a server session of their own: through PgBouncer (told to let
    the startup options pass, so the connection itself succeeds) preflight says no-go and
    names the fix."""
    from sessionmig.runbook import steps

    settings = target(small_backup)
    assert not [c for c in steps.preflight(settings).checks if c.name == "direct connection"]
    with pgbouncer(tmp_path, dsn, **CONFIGS["ignoring options"]) as bouncer:
        monkeypatch.setenv("SMTEST_DSN", bouncer.url)
        result = steps.preflight(settings)
    pooled = [c for c in result.checks if c.name == "direct connection"]
    assert len(pooled) == 1 and not pooled[0].ok, result.checks
    assert "direct DSN" in pooled[0].detail
    assert not result.go


# What the RUNBOOK asks of a PgBouncer in front of the store: a query waiting for a server is
# answered within a second (not after the default 120 s), and a failed server login is retried
# after a second (not 15).
OUTAGE_READY = {"query_wait_timeout": "1", "server_login_retry": "1"}


@needs_pg_bin
def test_an_outage_behind_pgbouncer_is_told_within_2_s_and_said_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The server behind PgBouncer stops: the pooler still accepts logins, so only a statement
    tells; every call is answered StoreUnavailable within 2 s, the store says so once (and once
    when it is over), and the sessions carry on when the server is back."""
    with server(tmp_path) as pg, pgbouncer(tmp_path, pg.url(), **OUTAGE_READY) as bouncer:
        schema.upgrade(pg.url())
        store = SessionManager(bouncer.url)

        async def scenario() -> tuple[list[float], float, int]:
            sid, _ = await store.create_session("u", None)
            assert await store.validate_session(sid)
            await asyncio.to_thread(pg.stop, "fast")
            waits = []
            for _ in range(8):
                began = time.monotonic()
                with pytest.raises(StoreUnavailable):
                    await store.validate_session(sid)
                waits.append(time.monotonic() - began)
                await asyncio.sleep(0.1)
            await asyncio.to_thread(pg.start)
            began = time.monotonic()
            while True:
                try:
                    assert await store.validate_session(sid)
                    break
                except StoreUnavailable:
                    assert time.monotonic() - began < 5.0, "not back within 5 s"
                    await asyncio.sleep(0.05)
            back = time.monotonic() - began
            got = await store.get_session(sid)
            await store.close()
            assert got is not None
            return waits, back, got.request_count

        with caplog.at_level(logging.WARNING):
            waits, back, count = asyncio.run(scenario())
    assert max(waits) < 2.0, waits
    assert back < 5.0
    # Acknowledged: the first validation and the one after; none of the refused ones counted
    # (the pooler never found a server for them).
    assert count == 2
    said = [
        r for r in caplog.records if r.name.startswith(("sessionstore", "sessionmig", "psycopg"))
    ]
    assert [r.getMessage()[:40] for r in said] == [
        "the session database is unreachable or n",
        "the session database answers again after",
    ], [r.getMessage() for r in said]
