"""PostgreSQL is down after the cutover: the RUNBOOK's two choices, tried and measured.

The backup is migrated into a server the test starts; the app's store then serves on it (new
logins, validations, logouts — a ledger of what it acknowledged); the server stops. What each
choice keeps and loses is counted against the ledger, not asserted from the design:

- *switch the app back to the SQLite backup at once* (the only "fallback" possible while
  PostgreSQL cannot be read: the rollback step needs it) — logs out everyone who logged in
  after the cutover, brings back sessions that were logged out, and loses every count;
- *wait* until PostgreSQL (or a promoted standby) answers — keeps everything; costs the outage;
- *roll back with the rollback step once PostgreSQL is readable again* — keeps everything too,
  in the legacy file.

The RUNBOOK's section "PostgreSQL is down after the cutover" quotes these figures.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from conftest import env_file
from pgcluster import needs_pg_bin, server

from sessionmig.errors import SessionmigError, StoreUnavailable
from sessionmig.runbook import orchestrate, steps
from sessionmig.store import LegacySQLiteSessionManager, SessionManager

pytestmark = [needs_pg_bin, pytest.mark.slow]
AS_OF = datetime(2026, 1, 15, 3, tzinfo=UTC)  # the test environment's as_of
ZONE = "Asia/Seoul"
NEW, VALIDATED, ENDED_OLD, ENDED_NEW = 20, 30, 5, 5


def tally(found: dict[str, dict | None], alive: set[str], ended: set[str], counts: dict) -> dict:
    """What a store holds, against the ledger: sessions kept, lost (a live one absent: its user
    logged out), resurrected (a logged-out one present again), counts that differ."""
    return {
        "kept": sum(found[s] is not None for s in alive),
        "lost": sum(found[s] is None for s in alive),
        "resurrected": sum(found[s] is not None for s in ended),
        "miscounted": sum(
            found[s] is not None and found[s].request_count != counts[s]  # type: ignore[union-attr]
            for s in alive
        ),
    }


def test_postgres_down_after_cutover_each_choice_measured(
    tmp_path: Path, clean_backup: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with server(tmp_path) as pg:
        dsn = pg.url()
        monkeypatch.setenv("SMTEST_DSN", dsn)
        env = env_file(tmp_path, clean_backup)
        outcome = orchestrate.run(str(env), ["migrate", "reconcile"], {}, tmp_path / "reports")
        assert outcome.exit_code == 0, outcome.message
        settings = steps.settings(**yaml.safe_load(env.read_text()))
        clock = [AS_OF]
        store = SessionManager(dsn, clock=lambda: clock[0])

        async def after_cutover() -> tuple[dict[str, int], set[str], list[float]]:
            counts: dict[str, int] = {}
            migrated = [sid for sid in await store.active_among(await _ids(store, dsn), AS_OF)]
            migrated.sort()
            for sid in migrated:
                counts[sid] = (await store.get_session(sid)).request_count  # type: ignore[union-attr]
            new = []
            for n in range(NEW):
                sid, _ = await store.create_session(f"after-{n}", {"n": n})
                counts[sid] = 0
                new.append(sid)
            clock[0] = AS_OF + timedelta(minutes=5)
            for sid in migrated[: VALIDATED // 2] + new[: VALIDATED // 2]:
                assert await store.validate_session(sid)
                counts[sid] += 1
            ended = set(migrated[-ENDED_OLD:]) | set(new[-ENDED_NEW:])
            for sid in ended:
                assert await store.delete_session(sid)
                del counts[sid]

            # The outage: every call told at once, none answered "not valid".
            await asyncio.to_thread(pg.stop, "fast")
            waits = []
            for sid in list(counts)[:20]:
                began = time.monotonic()
                with pytest.raises(StoreUnavailable):
                    await store.validate_session(sid)
                waits.append(time.monotonic() - began)
            return counts, ended, waits

        counts, ended, waits = asyncio.run(after_cutover())
        alive = set(counts)
        assert max(waits) < 2.0, waits

        # Choice 1 while PostgreSQL is down: the rollback step cannot run (it reads PostgreSQL)
        # and writes nothing; switching the app to the backup as it was is what is left.
        refused_to = tmp_path / "refused" / "sessions.db"
        refused_to.parent.mkdir()
        with pytest.raises(SessionmigError):
            steps.rollback_step(
                settings, restore_path=str(refused_to), migrate_manifest=str(outcome.run_dir)
            )
        assert not refused_to.exists()
        as_it_was = tmp_path / "as-it-was" / "sessions.db"
        as_it_was.parent.mkdir()
        shutil.copyfile(clean_backup, as_it_was)
        switch_back = tally(
            asyncio.run(_legacy_view(as_it_was, alive | ended)), alive, ended, counts
        )

        # PostgreSQL answers again (restarted, or a standby promoted).
        pg.start()
        wait = tally(asyncio.run(_pg_view(store, alive | ended)), alive, ended, counts)

        # Choice 3: the rollback step, PostgreSQL readable again.
        restored_to = tmp_path / "restored" / "sessions.db"
        restored_to.parent.mkdir()
        restored, check = steps.rollback_step(
            settings, restore_path=str(restored_to), migrate_manifest=str(outcome.run_dir)
        )
        assert check is not None and check.partition_holds
        rolled_back = tally(
            asyncio.run(_legacy_view(restored_to, alive | ended)), alive, ended, counts
        )

    print({"switch back at once": switch_back, "wait": wait, "rollback step": rolled_back})
    assert len(alive) > NEW
    # Waiting, and the rollback step once PostgreSQL reads: every session as the ledger says.
    whole = {"kept": len(alive), "lost": 0, "resurrected": 0, "miscounted": 0}
    assert wait == whole
    assert rolled_back == whole
    assert (restored.carried_new, restored.carried_ended) == (NEW - ENDED_NEW, ENDED_OLD)
    # Switching back to the backup at once: everyone who logged in after the cutover is
    # logged out, logouts are undone, the validations since the cutover are not counted.
    assert switch_back == {
        "kept": len(alive) - (NEW - ENDED_NEW),
        "lost": NEW - ENDED_NEW,
        "resurrected": ENDED_OLD,
        "miscounted": VALIDATED // 2,
    }


async def _ids(store: SessionManager, dsn: str) -> list[str]:
    async with store.connection() as conn:
        cur = await conn.execute("SELECT session_id FROM public.sessions ORDER BY 1")
        return [r[0] for r in await cur.fetchall()]


async def _pg_view(store: SessionManager, ids: set[str]) -> dict[str, dict | None]:
    deadline = time.monotonic() + 10
    while True:
        try:
            found = {sid: await store.get_session(sid) for sid in ids}
            await store.close()
            return found
        except StoreUnavailable:
            assert time.monotonic() < deadline, "the store did not come back"
            await asyncio.sleep(0.1)


async def _legacy_view(path: Path, ids: set[str]) -> dict[str, dict | None]:
    legacy = LegacySQLiteSessionManager(path, zone=ZONE, clock=lambda: AS_OF)
    try:
        return {sid: await legacy.get_session(sid) for sid in ids}
    finally:
        await legacy.close()
