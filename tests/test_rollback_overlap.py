"""Rollback during a live cutover's overlap: PostgreSQL's changes since the last catch-up base
are merged into the SQLite file the old colour still writes, losing nothing on either side."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import rows_of

from sessionmig.engines.catchup import BaseNotCurrent as CatchupBaseNotCurrent
from sessionmig.engines.overlap import MARKER_TABLE, BaseNotCurrentError, rollback_live
from sessionmig.errors import ParameterError, SourceError
from sessionmig.runbook import steps
from sessionmig.runbook.steps import catchup_step
from sessionmig.sqlite.snapshot import snapshot
from sessionmig.sqlite.source import sha256_file
from sessionmig.store import LegacySQLiteSessionManager, SessionManager

pytestmark = pytest.mark.slow
START = datetime(2026, 1, 15, 3, tzinfo=UTC)  # TEST_ENV's as_of: every session active
ZONE = "Asia/Seoul"


def legacy(live: Path, now: datetime) -> LegacySQLiteSessionManager:
    return LegacySQLiteSessionManager(live, ttl_hours=24, zone=ZONE, clock=lambda: now)


def sqlite_view(live: Path, ids: list[str], now: datetime) -> dict[str, dict | None]:
    async def read() -> dict[str, dict | None]:
        store = legacy(live, now)
        try:
            return {sid: await store.get_session(sid) for sid in ids}
        finally:
            await store.close()

    return asyncio.run(read())


class OldColour(threading.Thread):
    """The old colour serving: validates its sessions through the legacy manager, in a loop,
    and counts every validation that succeeded (its ledger)."""

    def __init__(self, live: Path, sids: list[str], now: datetime) -> None:
        super().__init__(daemon=True)
        self.live, self.sids, self.now = live, sids, now
        self.ledger = dict.fromkeys(sids, 0)
        self.stop = threading.Event()
        self.failures: list[BaseException] = []

    def run(self) -> None:
        async def serve() -> None:
            store = legacy(self.live, self.now)
            try:
                while not self.stop.is_set():
                    for sid in self.sids:
                        if await store.validate_session(sid):
                            self.ledger[sid] += 1
            finally:
                await store.close()

        try:
            asyncio.run(serve())
        except BaseException as exc:  # the test fails on any error the app would have seen
            self.failures.append(exc)

    def wait_for(self, n: int, timeout: float = 120.0) -> None:
        """Until ``n`` validations in all succeeded (bounded: a stalled colour fails the test)."""
        deadline = time.monotonic() + timeout
        while sum(self.ledger.values()) < n and self.is_alive():
            assert time.monotonic() < deadline, f"the old colour stalled below {n} validations"
            self.stop.wait(0.01)


@pytest.fixture
def overlap(tmp_path: Path, target, dsn: str):
    """A live store of 30 sessions, snapshotted, migrated, one catch-up pass carried."""
    live = tmp_path / "app" / "sessions.db"
    live.parent.mkdir()

    async def setup() -> list[str]:
        store = legacy(live, START)
        made = [(await store.create_session(f"u{i}", {"i": i}))[0] for i in range(30)]
        for sid in made[:10]:
            assert await store.validate_session(sid)
        await store.close()
        return made

    ids = asyncio.run(setup())
    snap0 = tmp_path / "snapshots" / "snap0.db"
    snapshot(live, snap0)
    settings = target(snap0)
    assert steps.migrate(settings, progress=False).verdict == "PASS"
    state = tmp_path / "state"
    # The old colour keeps serving; a catch-up pass carries its changes into PostgreSQL.
    later = START + timedelta(minutes=5)

    async def old_colour_before_pass() -> None:
        store = legacy(live, later)
        assert await store.validate_session(ids[0])
        await store.close()

    asyncio.run(old_colour_before_pass())
    assert catchup_step(settings, str(live), str(state)).committed
    return live, snap0, settings, state, dsn, ids


def rollback_overlap(settings, live: Path, state: Path, snap0: Path, **given):
    """The rollback during the overlap, as the runbook runs it on this fixture's files."""
    return rollback_live(
        settings.dsn(),
        sqlite_path=settings.sqlite_path,
        live_sqlite_path=str(live),
        state_dir=str(state),
        expected_sha256=sha256_file(snap0),
        rules=settings.rules,
        **given,
    )


def _count(dsn: str, sid: str) -> int:
    return rows_of(dsn, "SELECT request_count FROM sessions WHERE session_id = %s", (sid,))[0][0]


def test_rollback_during_the_overlap_loses_nothing_on_either_side(overlap) -> None:
    live, snap0, settings, state, dsn, ids = overlap
    now = START + timedelta(minutes=10)
    shared, extended, ended_in_pg, ended_in_sqlite, busy, pg_only = ids[:6]
    base_counts = {sid: _count(dsn, sid) for sid in ids[:6]}  # PostgreSQL == base after the pass

    async def new_colour() -> str:
        manager = SessionManager(dsn, clock=lambda: now)
        try:
            created, _ = await manager.create_session("after-cutover", {"k": "새 세션"})
            for _ in range(2):
                assert await manager.validate_session(shared)
            assert await manager.validate_session(pg_only)
            assert await manager.extend_session(extended, 6)
            assert await manager.delete_session(ended_in_pg)
            return created
        finally:
            await manager.close()

    async def old_colour_after_pass() -> str:
        store = legacy(live, now)
        try:
            for _ in range(3):
                assert await store.validate_session(shared)
            assert await store.validate_session(ended_in_pg)  # then PostgreSQL ends it
            assert await store.delete_session(ended_in_sqlite)
            return (await store.create_session("old-colour", None))[0]
        finally:
            await store.close()

    created_in_pg = asyncio.run(new_colour())
    created_in_sqlite = asyncio.run(old_colour_after_pass())
    pg_expires = rows_of(dsn, "SELECT expires_at FROM sessions WHERE session_id = %s", (extended,))

    # The old colour keeps validating while the rollback runs.
    serving = OldColour(live, [shared, busy], now)
    serving.start()
    serving.wait_for(20)
    result = rollback_overlap(settings, live, state, snap0, run_id="r-overlap")
    during = sum(serving.ledger.values())
    serving.wait_for(during + 20)
    serving.stop.set()
    serving.join(60)
    assert not serving.is_alive() and not serving.failures, serving.failures

    assert result.catchup_pass == 1
    assert (result.inserted, result.changed, result.ended) == (1, 3, 1)
    assert result.stays_ended == 0 and result.conflicts == 0
    view = sqlite_view(
        live, [*ids[:6], created_in_pg, created_in_sqlite], now + timedelta(seconds=1)
    )
    # Requests counted on both colours, and during the rollback, all add up.
    assert view[shared].request_count == base_counts[shared] + 2 + 3 + serving.ledger[shared]
    assert view[busy].request_count == base_counts[busy] + serving.ledger[busy]
    assert view[pg_only].request_count == base_counts[pg_only] + 1
    assert view[extended].expires_at == pg_expires[0][0]
    assert view[ended_in_pg] is None  # validated on SQLite, ended on PostgreSQL: stays ended
    assert view[ended_in_sqlite] is None
    assert view[created_in_sqlite].user_id == "old-colour"  # SQLite's own change kept
    assert view[created_in_pg].user_id == "after-cutover"
    assert view[created_in_pg].metadata == {"k": "새 세션"}
    assert rows_of(
        dsn,
        "SELECT run_id, inserted, updated, parameters->>'mode', parameters->>'state' "
        "FROM session_migration_runs WHERE step = 'rollback' ORDER BY run_id",
    ) == [  # the intent, written before the live file was touched, and the record
        ("r-overlap-rollback-overlap", 1, 3, "overlap", "done"),
        ("r-overlap-rollback-overlap-intent", 0, 0, "overlap", "intent"),
    ]

    # Exactly once: the same rollback again is refused and changes nothing.
    before = sha256_file(live)
    with pytest.raises(BaseNotCurrentError, match="already carried"):
        rollback_overlap(settings, live, state, snap0)
    assert sha256_file(live) == before
    assert len(rows_of(dsn, "SELECT 1 FROM session_migration_runs WHERE step = 'rollback'")) == 2
    import sqlite3

    with sqlite3.connect(live) as conn:
        marks = conn.execute(f"SELECT catchup_pass FROM {MARKER_TABLE}").fetchall()
    assert marks == [(1,)]

    # The file's own marker can be lost (a copy from before, a dropped table): the target's
    # audit row still refuses a second rollback, and the file stays as it is.
    with sqlite3.connect(live) as conn:
        conn.execute(f"DROP TABLE {MARKER_TABLE}")
    conn.close()
    before = sha256_file(live)
    with pytest.raises(BaseNotCurrentError, match="r-overlap-rollback-overlap"):
        rollback_overlap(settings, live, state, snap0)
    assert sha256_file(live) == before

    # After a rollback no catch-up pass may follow: what it carried back would count twice.
    counts_after = _count(dsn, ids[0])
    with pytest.raises(CatchupBaseNotCurrent, match="rolled the target back"):
        catchup_step(settings, str(live), str(state))
    assert sha256_file(live) == before
    assert _count(dsn, ids[0]) == counts_after


def test_rollback_before_any_pass_takes_the_migrated_snapshot_as_base(
    tmp_path: Path, target, dsn: str
) -> None:
    live = tmp_path / "live.db"

    async def setup() -> list[str]:
        store = legacy(live, START)
        made = [(await store.create_session(f"u{i}", None))[0] for i in range(5)]
        await store.close()
        return made

    ids = asyncio.run(setup())
    snap0 = tmp_path / "snap0.db"
    snapshot(live, snap0)
    settings = target(snap0)
    steps.migrate(settings, progress=False)

    async def both() -> None:
        store = legacy(live, START)
        manager = SessionManager(dsn, clock=lambda: START)
        try:
            assert await store.validate_session(ids[0])
            assert await manager.validate_session(ids[0])
            assert await manager.validate_session(ids[0])
        finally:
            await store.close()
            await manager.close()

    asyncio.run(both())
    kwargs = dict(
        sqlite_path=settings.sqlite_path,
        state_dir=str(tmp_path / "state"),
        expected_sha256=sha256_file(snap0),
        rules=settings.rules,
    )
    with pytest.raises(ParameterError, match="the migrated snapshot is evidence"):
        rollback_live(settings.dsn(), live_sqlite_path=str(snap0), **kwargs)
    with pytest.raises(SourceError, match="migrate_manifest recorded"):
        rollback_live(
            settings.dsn(), live_sqlite_path=str(live), **{**kwargs, "expected_sha256": "0" * 64}
        )
    result = rollback_live(settings.dsn(), live_sqlite_path=str(live), **kwargs)
    assert result.catchup_pass == 0 and result.changed == 1
    assert sqlite_view(live, ids[:1], START)[ids[0]].request_count == 3


def test_rollback_refuses_a_postgres_that_went_back_and_leaves_the_live_file_as_it_was(
    overlap,
) -> None:
    """PostgreSQL with a count lower than the base carried (changed by hand, or another
    database behind the DSN): merged into the live file, it would count requests back down."""
    live, snap0, settings, state, dsn, ids = overlap
    rows_of(  # committed as the connection closes
        dsn,
        "UPDATE sessions SET request_count = request_count - 1 WHERE session_id = %s "
        "RETURNING request_count",
        (ids[0],),
    )
    before = sha256_file(live)
    with pytest.raises(SourceError, match="PostgreSQL is not a later state") as refused:
        rollback_overlap(settings, live, state, snap0, run_id="r-back")
    assert "request_count went back in 1 session" in str(refused.value)
    assert ids[0] not in str(refused.value)
    assert sha256_file(live) == before
    recorded = "SELECT count(*) FROM session_migration_runs WHERE run_id LIKE %s"
    assert rows_of(dsn, recorded, ("r-back%",)) == [(0,)]
