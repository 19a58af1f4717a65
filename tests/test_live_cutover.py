"""The live cutover under traffic: no session lost, no request uncounted.

Concurrent clients run the digest's mix (create, validate, extend, delete) through the legacy
SQLite manager on a live file while the test snapshots it, migrates, reconciles and runs
catch-up passes; then both colours serve the *same* sessions — some clients on the PostgreSQL
``SessionManager``, others still on the legacy one — with catch-up passes in between; then the
old colour stops and a final pass runs while the new colour keeps serving. Every client keeps a
ledger of its successful operations, and PostgreSQL must match it exactly.

It cannot pass by luck: the ledger is exact whatever the interleaving, and the test also
requires that the interesting interleavings happened (sessions validated on both colours,
extended on both, ended on each, created on each).
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest
from conftest import rows_of

from sessionmig.engines.catchup import CatchupResult
from sessionmig.engines.catchup import passes as the_pass
from sessionmig.rules.mask import mask_id
from sessionmig.runbook import steps
from sessionmig.runbook.steps import catchup_step
from sessionmig.sqlite.snapshot import snapshot
from sessionmig.store import LegacySQLiteSessionManager, SessionManager

pytestmark = pytest.mark.slow
ZONE = "Asia/Seoul"
OLD_CLIENTS, NEW_CLIENTS = 6, 4
# The digest's mix, mostly validations.
CREATE, VALIDATE, EXTEND = 0.12, 0.85, 0.96  # cumulative; the rest are logouts
TIME_LIMIT_S = 600  # a hang guard: a loaded machine only makes the overlap last longer
OVERLAP_LIMIT_S = 180


@dataclass
class Ledger:
    """Every successful operation, by colour ("old" = SQLite, "new" = PostgreSQL)."""

    created: dict[str, tuple[str, dict, str]] = field(default_factory=dict)  # user, meta, by
    validations: dict[str, Counter[str]] = field(default_factory=dict)  # sid -> by colour
    expires_seen: dict[str, list[datetime]] = field(default_factory=dict)
    extended_by: dict[str, set[str]] = field(default_factory=dict)
    ended: dict[str, str] = field(default_factory=dict)  # sid -> colour that ended it
    pool: list[str] = field(default_factory=list)  # sessions clients pick from
    ops: Counter[str] = field(default_factory=Counter)

    def alive(self) -> set[str]:
        return set(self.created) - set(self.ended)


async def client(store, colour: str, stop: asyncio.Event, ledger: Ledger, seed: int) -> None:
    """One client of one colour, until told to stop; the ledger only records successes."""
    rng = random.Random(seed)
    n = 0
    while not stop.is_set():
        n += 1
        r = rng.random()
        if r < CREATE or not ledger.pool:
            user, meta = f"{colour}-{seed}-{n}", {"n": n, "by": colour, "region": "서울"}
            sid, expires = await store.create_session(user, meta)
            ledger.created[sid] = (user, meta, colour)
            ledger.expires_seen[sid] = [expires]
            ledger.validations[sid] = Counter()
            ledger.pool.append(sid)
            ledger.ops[f"create {colour}"] += 1
        else:
            sid = rng.choice(ledger.pool)
            if r < VALIDATE:
                if await store.validate_session(sid):
                    ledger.validations[sid][colour] += 1
                    ledger.ops[f"validate {colour}"] += 1
            elif r < EXTEND:
                if await store.extend_session(sid, 24):
                    # Read back: a value this session's expires_at really took (this
                    # extension's, or a later one's); the final value is the greatest.
                    found = await store.get_session(sid)
                    if found is not None:
                        ledger.expires_seen[sid].append(found.expires_at)
                        ledger.extended_by.setdefault(sid, set()).add(colour)
                        ledger.ops[f"extend {colour}"] += 1
            elif await store.delete_session(sid):
                ledger.ended.setdefault(sid, colour)
                if sid in ledger.pool:
                    ledger.pool.remove(sid)
                ledger.ops[f"delete {colour}"] += 1
        await asyncio.sleep(rng.random() * 0.004)


def overlapped(ledger: Ledger) -> bool:
    """The interleavings the test requires below have happened, with a margin for sessions the
    new colour may still end after the old one stops."""
    alive = ledger.alive()
    both = [s for s, c in ledger.validations.items() if c["old"] and c["new"] and s in alive]
    return (
        len(both) >= 20
        and any(by == {"old", "new"} for by in ledger.extended_by.values())
        and {"old", "new"} <= set(ledger.ended.values())
        and ledger.ops["create new"] > 0
        and ledger.ops["validate old"] > 100
    )


@pytest.mark.parametrize(
    ("journal_mode", "part_rows"),
    [("delete", None), ("wal", None), ("wal", 5)],
    ids=["delete", "wal", "wal-in-parts-of-5"],
)
def test_live_cutover_loses_no_session_and_no_request(
    tmp_path: Path,
    target,
    dsn: str,
    journal_mode: str,
    part_rows: int | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if part_rows:  # every pass crosses many commits while both colours write
        for name in ("FIRST_PART_ROWS", "MIN_PART_ROWS", "MAX_PART_ROWS"):
            monkeypatch.setattr(the_pass, name, part_rows)
    live = tmp_path / "app" / "sessions.db"
    live.parent.mkdir()
    asyncio.run(LegacySQLiteSessionManager(live).close())  # the app's schema
    with sqlite3.connect(live) as conn:
        assert conn.execute(f"PRAGMA journal_mode={journal_mode}").fetchone()[0] == journal_mode
    state = tmp_path / "catchup-state"
    ledger = Ledger()
    passes: list[CatchupResult] = []
    facts: dict = {}

    async def cutover() -> None:
        loop = asyncio.get_running_loop()
        # The legacy manager's calls and the steps each take a thread.
        loop.set_default_executor(ThreadPoolExecutor(max_workers=OLD_CLIENTS + 8))
        stop_old, stop_new = asyncio.Event(), asyncio.Event()
        # Each old client is an app worker of its own: its own connection to the live file.
        old_stores = [LegacySQLiteSessionManager(live, zone=ZONE) for _ in range(OLD_CLIENTS)]
        old = [
            asyncio.create_task(client(store, "old", stop_old, ledger, k))
            for k, store in enumerate(old_stores)
        ]
        while len(ledger.created) < 150:
            await asyncio.sleep(0.05)

        # While the old colour serves: snapshot, migrate, reconcile, catch up twice.
        snap0 = tmp_path / "snapshots" / "snap0.db"
        taken = await asyncio.to_thread(snapshot, live, snap0)
        facts["snap0"] = taken
        settings = target(snap0)
        migrated = await asyncio.to_thread(steps.migrate, settings, False)
        assert migrated.verdict == "PASS", migrated.outcome
        reconciled = await asyncio.to_thread(steps.reconcile_step, settings, False)
        assert reconciled.verdict == "PASS", reconciled.reason
        for _ in range(2):
            passes.append(await asyncio.to_thread(catchup_step, settings, str(live), str(state)))
            await asyncio.sleep(0.3)

        # The overlap: the new colour serves the same sessions; passes carry the old one's.
        new_store = SessionManager(dsn)
        new = [
            asyncio.create_task(client(new_store, "new", stop_new, ledger, 100 + k))
            for k in range(NEW_CLIENTS)
        ]
        for _ in range(3):
            await asyncio.sleep(0.6)
            passes.append(await asyncio.to_thread(catchup_step, settings, str(live), str(state)))
        await asyncio.sleep(0.6)
        # The overlap lasts until both colours have really shared the sessions, however slowly
        # a loaded machine runs the clients (bounded; the assertions below then judge).
        deadline = loop.time() + OVERLAP_LIMIT_S
        while not overlapped(ledger) and loop.time() < deadline:
            await asyncio.sleep(0.1)

        # Drain the old colour, then the final pass while the new colour keeps serving.
        stop_old.set()
        await asyncio.gather(*old)
        for store in old_stores:
            await store.close()
        passes.append(await asyncio.to_thread(catchup_step, settings, str(live), str(state)))
        await asyncio.sleep(0.3)
        stop_new.set()
        await asyncio.gather(*new)
        await new_store.close()

    asyncio.run(asyncio.wait_for(cutover(), TIME_LIMIT_S))

    # Every pass proved itself and committed, chained one after the other.
    assert [p.pass_number for p in passes] == [1, 2, 3, 4, 5, 6]
    assert all(p.verdict == "PASS" and p.committed for p in passes), [p.reason for p in passes]
    if part_rows:
        assert max(p.parts for p in passes) > 1
    assert all(b.base_sha256 == a.live_sha256 for a, b in zip(passes, passes[1:], strict=False))
    assert sum(p.inserted for p in passes) > 0 and sum(p.ended for p in passes) > 0
    assert sum(p.changed for p in passes[2:]) > 0

    # PostgreSQL matches the ledger exactly.
    pg = {
        r[0]: r
        for r in rows_of(
            dsn,
            "SELECT session_id, user_id, metadata, expires_at, request_count FROM sessions",
        )
    }
    alive = ledger.alive()
    # Counted, never listed: the ids are bearer tokens.
    lost, extra = len(alive - set(pg)), len(set(pg) - alive)
    assert (lost, extra) == (0, 0), f"{lost} sessions lost, {extra} invented or not ended"
    wrong = []
    for sid in alive:
        user, meta, _ = ledger.created[sid]
        _, pg_user, pg_meta, pg_expires, pg_count = pg[sid]
        expected_count = sum(ledger.validations[sid].values())
        expected_expires = max(ledger.expires_seen[sid])
        if (pg_user, pg_meta, pg_expires, pg_count) != (
            user,
            meta,
            expected_expires,
            expected_count,
        ):
            wrong.append(
                f"{mask_id(sid)}: count {pg_count} vs ledger {expected_count}, expires "
                f"{pg_expires} vs {expected_expires}, "
                f"user/meta equal: {(pg_user, pg_meta) == (user, meta)}"
            )
    assert wrong == [], wrong[:10]

    # The interleavings that matter happened (else the exact match would prove little).
    both = [sid for sid, c in ledger.validations.items() if c["old"] and c["new"] and sid in pg]
    assert len(both) >= 10, ledger.ops
    assert any(by == {"old", "new"} for by in ledger.extended_by.values()), ledger.ops
    assert {"old", "new"} <= set(ledger.ended.values()), ledger.ops
    assert ledger.ops["create new"] > 0 and ledger.ops["validate old"] > 100
    # Some sessions came by the migration, others only by the passes.
    with sqlite3.connect(facts["snap0"].path) as first:
        migrated = {sid for (sid,) in first.execute("SELECT session_id FROM sessions")}
    assert len(migrated & alive) > 0 and len(alive - migrated) > 0
