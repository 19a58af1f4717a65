"""Catch-up passes against real servers: what the old colour wrote to SQLite arrives in
PostgreSQL exactly once, composed with what the new colour did meanwhile, or nothing at all."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from conftest import ROOT, TEST_ENV, rows_of
from psycopg import sql
from psycopg.types.json import Jsonb

from sessionmig.engines import catchup
from sessionmig.engines.catchup import BaseNotCurrent, catchup_tables
from sessionmig.engines.catchup import apply as part_transaction
from sessionmig.engines.catchup import delta as pass_delta
from sessionmig.engines.catchup import passes as the_pass
from sessionmig.engines.catchup import state as pass_files
from sessionmig.errors import LockHeld, ParameterError, SourceError, TargetError
from sessionmig.rules.mask import mask_id
from sessionmig.runbook import steps
from sessionmig.runbook.steps import catchup_step
from sessionmig.sqlite import source
from sessionmig.sqlite.snapshot import snapshot
from sessionmig.sqlite.source import sha256_file
from sessionmig.store import LegacySQLiteSessionManager, SessionManager

START = datetime(2026, 1, 15, 3, tzinfo=UTC)  # TEST_ENV's as_of: every session active
H = timedelta(hours=1)
ZONE = "Asia/Seoul"


class Clock:
    """A clock the test moves by hand (both stores read it inside their transactions)."""

    def __init__(self, now: datetime = START) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def legacy(live: Path, clock=None) -> LegacySQLiteSessionManager:
    """The old colour's store on the live file."""
    if clock is None:
        return LegacySQLiteSessionManager(live, ttl_hours=24, zone=ZONE)
    return LegacySQLiteSessionManager(live, ttl_hours=24, zone=ZONE, clock=clock)


@dataclass
class Migrated:
    """A live store, its first snapshot migrated into this test's database, a state_dir."""

    live: Path
    snap0: Path
    settings: steps.Settings
    state: Path
    dsn: str
    ids: list[str]
    clock: Clock

    def run(self, **overrides) -> catchup.CatchupResult:
        s = self.settings if not overrides else steps.settings(
            **{**TEST_ENV, "sqlite_path": self.settings.sqlite_path, **overrides}
        )  # fmt: skip
        return catchup_step(s, str(self.live), str(self.state))

    def pg(self) -> dict[str, tuple]:
        return pg_rows(self.dsn)

    def validate_on_old(self, *sids: str) -> None:
        """The old colour validates each of ``sids`` once, in order (each must succeed)."""

        async def on_old() -> None:
            old = legacy(self.live, self.clock)
            for sid in sids:
                assert await old.validate_session(sid)
            await old.close()

        asyncio.run(on_old())


def pg_rows(dsn: str) -> dict[str, tuple]:
    return {
        r[0]: r
        for r in rows_of(
            dsn,
            "SELECT session_id, user_id, metadata::text, created_at, expires_at, last_activity, "
            "request_count FROM sessions",
        )
    }


def catchup_runs(dsn: str) -> list[tuple]:
    return rows_of(
        dsn,
        "SELECT run_id, source_sha256, parameters FROM session_migration_runs "
        "WHERE step = 'catchup' ORDER BY (parameters->>'catchup_pass')::int",
    )


async def _create(manager, n: int, prefix: str = "user") -> list[str]:
    made = []
    for i in range(n):
        sid, _ = await manager.create_session(f"{prefix}-{i}", {"i": i, "region": "서울"})
        made.append(sid)
    return made


@pytest.fixture
def migrated(tmp_path: Path, target, dsn: str) -> Migrated:
    """40 sessions on the live store, snapshotted and migrated; the store stays live."""
    live = tmp_path / "app" / "sessions.db"
    live.parent.mkdir()
    clock = Clock()

    async def setup() -> list[str]:
        store = legacy(live, clock)
        made = await _create(store, 40)
        for sid in made[:10]:
            assert await store.validate_session(sid)
        await store.close()
        return made

    ids = asyncio.run(setup())
    snap0 = tmp_path / "snapshots" / "snap0.db"
    taken = snapshot(live, snap0)
    assert taken.sessions == 40
    settings = target(snap0)
    assert steps.migrate(settings, progress=False).verdict == "PASS"
    return Migrated(live, snap0, settings, tmp_path / "state", dsn, ids, clock)


def test_a_pass_carries_creations_changes_and_logouts_composed_with_postgres(
    migrated: Migrated,
) -> None:
    m = migrated
    a, b, c, d = m.ids[:4]
    before = m.pg()

    async def both_colours() -> tuple[str, str]:
        m.clock.now = START + H
        old = legacy(m.live, m.clock)
        created, _ = await old.create_session("user-new", {"new": True})
        for _ in range(3):
            assert await old.validate_session(a)
        assert await old.extend_session(b, 24)
        assert await old.delete_session(c)
        await old.close()
        m.clock.now = START + 2 * H
        new = SessionManager(m.dsn, clock=m.clock)
        for _ in range(2):
            assert await new.validate_session(a)
        assert await new.delete_session(d)
        pg_only, _ = await new.create_session("user-pg", None)
        await new.close()
        return created, pg_only

    created, pg_only = asyncio.run(both_colours())
    result = m.run()
    assert (result.verdict, result.committed, result.pass_number) == ("PASS", True, 1)
    assert result.counts == {
        "inserted": 1,
        "changed": 2,
        "ended": 1,
        "stays_ended": 0,
        "recreated": 0,
        "conflicts": 0,
        "unchanged": 37,  # the 40 migrated, less a, b (changed) and c (ended)
        "rejected": 0,
    }
    after = m.pg()
    assert after[a][6] == before[a][6] + 3 + 2  # both colours' validations
    assert after[a][5] == START + 2 * H  # the later last_activity
    assert after[b][4] == before[b][4] + 24 * H  # the old colour's extension
    assert c not in after and d not in after  # ended on either colour: ended
    assert after[created][1:3] == ("user-new", '{"new": true}') and after[created][6] == 0
    assert pg_only in after  # the new colour's own session: untouched
    untouched = set(before) - {a, b, c, d}
    assert all(after[sid] == before[sid] for sid in untouched)
    # The audit row chains the pass to the migrated snapshot; the snapshot is kept privately.
    (run_id, live_sha, params), = catchup_runs(m.dsn)  # fmt: skip
    kept = Path(result.live_snapshot)
    assert run_id == result.run_id and live_sha == result.live_sha256 == sha256_file(kept)
    assert params["base_sha256"] == sha256_file(m.snap0) == result.base_sha256
    assert params["catchup_pass"] == 1 and params["live_sha256"] == live_sha
    assert kept.parent == m.state and kept.name == f"{live_sha}.db"
    assert (m.state.stat().st_mode & 0o777, kept.stat().st_mode & 0o777) == (0o700, 0o600)
    tables = catchup_tables(result)
    assert tables["counts"].loc["inserted", "count"] == 1
    assert tables["snapshots"].loc["live snapshot (next pass's base)", "sha256"] == live_sha

    # The same command again: its base is the last pass's snapshot; nothing new to carry.
    again = m.run()
    assert again.verdict == "PASS" and again.pass_number == 2
    assert again.base_sha256 == live_sha and again.base_path == str(kept)
    assert again.counts["inserted"] + again.counts["changed"] + again.counts["ended"] == 0
    assert m.pg() == after

    # One more validation on the old colour: carried once, not the earlier ones again.
    async def one_more() -> None:
        old = legacy(m.live, m.clock)
        assert await old.validate_session(a)
        await old.close()

    asyncio.run(one_more())
    third = m.run()
    assert third.counts["changed"] == 1 and m.pg()[a][6] == after[a][6] + 1
    assert [r[2]["catchup_pass"] for r in catchup_runs(m.dsn)] == [1, 2, 3]
    # Only the head and its base are kept: older snapshots hold tokens nobody needs.
    assert sorted(p.name for p in m.state.iterdir()) == sorted(
        {Path(third.live_snapshot).name, Path(third.base_path).name}
    )


def test_conflicts_are_won_by_the_newer_last_activity_and_named(migrated: Migrated) -> None:
    m = migrated
    e, f = m.ids[20], m.ids[21]
    local = (START + 5 * H).astimezone(__import__("zoneinfo").ZoneInfo(ZONE))
    with sqlite3.connect(m.live) as old:  # the old colour changes user_id (a re-login)
        old.execute(
            "UPDATE sessions SET user_id = 'old-colour', last_activity = ? WHERE session_id = ?",
            (local.replace(tzinfo=None).isoformat(" "), e),
        )
        old.execute("UPDATE sessions SET user_id = 'old-colour' WHERE session_id = ?", (f,))
    with psycopg.connect(m.dsn) as new:
        new.execute(
            "UPDATE sessions SET user_id = 'new-colour', last_activity = %s "
            "WHERE session_id = ANY(%s)",
            (START + 3 * H, [e, f]),
        )
    result = m.run()
    assert result.verdict == "PASS_WITH_WARNINGS" and result.conflicts == 2
    after = m.pg()
    assert after[e][1] == "old-colour" and after[e][5] == START + 5 * H  # live was newer
    assert after[f][1] == "new-colour" and after[f][5] == START + 3 * H  # PostgreSQL was newer
    named = {(c.session, c.column, c.winner) for c in result.conflict_details}
    assert named == {(mask_id(e), "user_id", "live"), (mask_id(f), "user_id", "postgres")}
    assert "2 sessions changed on both colours" in result.reason


def test_a_live_row_the_rules_refuse_is_left_alone_and_named(migrated: Migrated) -> None:
    m = migrated
    g = m.ids[30]
    before = m.pg()
    with sqlite3.connect(m.live) as old:
        old.execute("UPDATE sessions SET metadata = '{broken' WHERE session_id = ?", (g,))
    result = m.run()
    assert result.verdict == "PASS_WITH_WARNINGS" and result.rejected == 1
    assert result.rejected_examples == (mask_id(g),)
    assert m.pg() == before  # neither changed nor taken for a logout


def test_the_app_waits_only_on_the_rows_a_pass_changes(
    migrated: Migrated, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a pass holds its transaction open, the new colour validates a session the pass
    does not touch at once, and one it changes right after the commit — both counted."""
    m = migrated
    touched, untouched = m.ids[0], m.ids[39]

    m.validate_on_old(touched)
    before = m.pg()

    def validate(sid: str, out: dict) -> None:
        async def go() -> None:
            new = SessionManager(m.dsn, clock=m.clock)
            out["ok"] = await new.validate_session(sid)
            out["at"] = time.perf_counter()
            await new.close()

        asyncio.run(go())

    seen: dict = {}
    prove = part_transaction._prove

    def prove_while_the_app_works(conn, schema, kinds, done, **given):
        free: dict = {}
        blocked: dict = {}
        validate(untouched, free)  # returns: that row is not locked
        waiter = threading.Thread(target=validate, args=(touched, blocked))
        waiter.start()
        waiter.join(0.5)
        seen.update(free=free, blocked_done_early="ok" in blocked, waiter=waiter, blocked=blocked)
        seen["committing_at"] = time.perf_counter()
        return prove(conn, schema, kinds, done, **given)

    monkeypatch.setattr(part_transaction, "_prove", prove_while_the_app_works)
    result = m.run()
    seen["waiter"].join(60)
    assert not seen["waiter"].is_alive(), "the waiting validation never finished"
    assert result.verdict == "PASS" and result.changed == 1
    assert seen["free"]["ok"] and not seen["blocked_done_early"]
    assert seen["blocked"]["ok"] and seen["blocked"]["at"] > seen["committing_at"]
    after = m.pg()
    assert after[untouched][6] == before[untouched][6] + 1
    assert after[touched][6] == before[touched][6] + 1 + 1  # the old colour's, then the new's


def test_the_app_is_not_kept_waiting_while_a_pass_merges(
    migrated: Migrated, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rules run and the expected rows are copied before any row is locked: the app
    validates a session the pass is merging at once (a 300 ms statement timeout would stop it
    otherwise), and the pass merges that session again from the locked row, so the validation
    and the old colour's request both count."""
    m = migrated
    touched = m.ids[0]
    m.validate_on_old(touched)
    before = m.pg()
    merge, seen = part_transaction.M.merge, {}

    def merge_while_the_app_validates(base, live, target):
        if not seen:

            async def go() -> None:
                new = SessionManager(m.dsn, clock=m.clock, statement_timeout_ms=300)
                try:
                    seen["ok"] = await new.validate_session(touched)
                except Exception as exc:  # noqa: BLE001 — what the app would have met
                    seen["error"] = type(exc).__name__
                finally:
                    await new.close()

            asyncio.run(go())
        return merge(base, live, target)

    monkeypatch.setattr(part_transaction.M, "merge", merge_while_the_app_validates)
    result = m.run()
    assert seen == {"ok": True}, seen
    assert result.verdict == "PASS" and result.changed == 1 and result.remerged == 1
    # migrated count + the old colour's validation + the new colour's, during the merge
    assert m.pg()[touched][6] == before[touched][6] + 1 + 1


def test_a_logout_during_the_merge_ends_the_session_for_good(
    migrated: Migrated, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new colour logs out a session the pass is merging (before its row locks): the pass
    sees the row gone when it locks, merges again with PostgreSQL's "ended", and the session
    stays ended — the old colour's later request never brings a logged-out token back."""
    m = migrated
    touched = m.ids[1]
    m.validate_on_old(touched)
    merge, seen = part_transaction.M.merge, {}

    def merge_while_the_app_logs_out(base, live, target):
        if not seen:

            async def go() -> None:
                new = SessionManager(m.dsn, clock=m.clock, statement_timeout_ms=300)
                try:
                    seen["deleted"] = await new.delete_session(touched)
                finally:
                    await new.close()

            asyncio.run(go())
        return merge(base, live, target)

    monkeypatch.setattr(part_transaction.M, "merge", merge_while_the_app_logs_out)
    result = m.run()
    assert seen == {"deleted": True}
    assert result.verdict == "PASS" and result.remerged == 1
    assert result.stays_ended == 1 and result.changed == 0
    assert touched not in m.pg()


def test_a_dba_default_of_repeatable_read_does_not_starve_the_pass(
    migrated: Migrated, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``default_transaction_isolation = 'repeatable read'`` set on the database, the
    pass's row locks would meet every write the app made since its unlocked read as a
    serialization failure, attempt after attempt. Its connection reads committed whatever the
    database says: the app's write is merged again under the lock and counted once."""
    m = migrated
    touched = m.ids[2]
    m.validate_on_old(touched)
    before = m.pg()
    with psycopg.connect(m.dsn, autocommit=True) as conn:
        name = conn.execute("SELECT current_database()").fetchone()[0]  # type: ignore[index]
        conn.execute(
            sql.SQL(
                "ALTER DATABASE {} SET default_transaction_isolation = 'repeatable read'"
            ).format(sql.Identifier(name))
        )
    read, writes = part_transaction._read_targets, []

    def read_then_the_app_writes(conn, schema, only=None):
        found = read(conn, schema, only)
        if only is None:  # the unlocked read of each attempt: the app validates right after

            async def go() -> None:
                new = SessionManager(m.dsn, clock=m.clock)
                writes.append(await new.validate_session(touched))
                await new.close()

            asyncio.run(go())
        return found

    monkeypatch.setattr(part_transaction, "_read_targets", read_then_the_app_writes)
    result = m.run()
    assert result.verdict == "PASS" and result.remerged == 1 and writes == [True]
    # migrated count + the old colour's validation + the new colour's, between read and lock
    assert m.pg()[touched][6] == before[touched][6] + 1 + 1


def test_a_session_ended_and_created_again_around_the_lock_is_merged_locked(
    migrated: Migrated, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new colour logs a session out before the pass's lock and creates it again (same id)
    right after: the pass reads it again *locked*, so the app's next write waits for the commit
    and lands on top of the pass's — never overwritten by a merge made from a stale row."""
    m = migrated
    touched = m.ids[0]
    m.validate_on_old(touched)
    lock, read = part_transaction._lock_targets, part_transaction._read_targets
    kept: dict = {}
    later: list[threading.Thread] = []

    def app(statement: str, params: tuple) -> None:
        with psycopg.connect(m.dsn, autocommit=True) as conn:
            conn.execute(statement, params)

    def logout_then_login_again(conn, schema):
        with psycopg.connect(m.dsn) as c:
            kept["row"] = c.execute(
                "SELECT * FROM public.sessions WHERE session_id = %s", (touched,)
            ).fetchone()
        app("DELETE FROM public.sessions WHERE session_id = %s", (touched,))
        found = lock(conn, schema)
        r = kept["row"]
        app(
            "INSERT INTO public.sessions VALUES (%s, %s, %s, %s, %s, %s, 0)",
            (r[0], r[1], Jsonb(r[2]), r[3], r[4], r[5]),
        )
        return found

    def then_a_validation(conn, schema, only=None):
        found = read(conn, schema, only)
        if only is not None:  # the re-read: the app's +100 must wait for the pass's commit
            update = "UPDATE public.sessions SET request_count = request_count + 100 "
            thread = threading.Thread(
                target=app, args=(update + "WHERE session_id = %s", (touched,))
            )
            thread.start()
            later.append(thread)
            time.sleep(0.3)
            kept["waited"] = thread.is_alive()
        return found

    monkeypatch.setattr(part_transaction, "_lock_targets", logout_then_login_again)
    monkeypatch.setattr(part_transaction, "_read_targets", then_a_validation)
    result = m.run()
    for thread in later:
        thread.join(30)
    assert kept["waited"], "the session read again was not locked"
    assert result.verdict == "PASS" and result.remerged == 1
    # the new session (0) + the old colour's request + the app's 100, after the commit
    assert m.pg()[touched][6] == 0 + 1 + 100


def test_the_proof_catches_a_merge_that_disagrees_with_the_writes(
    migrated: Migrated, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writes are computed in SQL from the locked rows and the expected rows by the rules
    in Python: a rule that goes wrong on one side is a FAIL, nothing committed."""
    m = migrated
    touched = m.ids[0]
    m.validate_on_old(touched)
    before = m.pg()
    merge = part_transaction.M.merge

    def inventing_requests(base, live, target):
        out = merge(base, live, target)
        if out.kind == part_transaction.M.CHANGED and out.row is not None:
            row = (*out.row[:6], out.row[6] + 1000)
            return part_transaction.M.Outcome(out.kind, row, out.conflicts)  # type: ignore[arg-type]
        return out

    monkeypatch.setattr(part_transaction.M, "merge", inventing_requests)
    result = m.run()
    assert result.verdict == "FAIL" and not result.committed
    assert any(mask_id(touched) in p and "request_count" in p for p in result.mismatches)
    assert m.pg() == before


def test_a_pass_stopped_while_it_holds_the_app_s_rows_lets_them_go(
    migrated: Migrated, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operator's process stops under the row locks (Ctrl-Z): the server ends the pass's
    session once it has idled in its transaction for IDLE_IN_TRANSACTION, the app's rows are
    free again, nothing was committed, and the same command then carries the pass once."""
    m = migrated
    touched = m.ids[3]
    m.validate_on_old(touched)
    before = m.pg()
    monkeypatch.setattr(part_transaction, "IDLE_IN_TRANSACTION", "1s")
    apply = part_transaction._apply_statements

    def stopped_under_the_locks(conn, schema):
        time.sleep(2.5)
        return apply(conn, schema)

    monkeypatch.setattr(part_transaction, "_apply_statements", stopped_under_the_locks)
    with pytest.raises(TargetError, match="nothing was committed"):
        m.run()
    with psycopg.connect(m.dsn, autocommit=True) as conn:
        conn.execute("SET lock_timeout = '1s'")  # the app's write goes through at once
        conn.execute(
            "UPDATE public.sessions SET request_count = request_count + 1 WHERE session_id = %s",
            (touched,),
        )
    monkeypatch.setattr(part_transaction, "_apply_statements", apply)
    result = m.run()
    assert result.verdict == "PASS" and result.pass_number == 1
    assert m.pg()[touched][6] == before[touched][6] + 1 + 1


@pytest.mark.slow
def test_a_pass_composes_with_concurrent_validations(
    migrated: Migrated, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new colour validates the very sessions a pass changes, all the while — between the
    pass's snapshot and its row locks, against those locks, and after: every request is
    counted once."""
    m = migrated

    async def old_colour() -> None:
        old = legacy(m.live, m.clock)
        more = await _create(old, 400, "bulk")
        for sid in m.ids + more:
            assert await old.validate_session(sid)
        await old.close()

    asyncio.run(old_colour())
    with sqlite3.connect(m.live) as conn:
        live_counts = dict(conn.execute("SELECT session_id, request_count FROM sessions"))
    before = m.pg()
    done = threading.Event()
    counted: dict[str, int] = {}
    progress = {"started": 0, "finished": 0, "ok": 0}

    async def new_colour() -> None:
        # A slowed pass may hold its locks for seconds: the app waits, as it would (the test is
        # about counting, not about the production timeout).
        new = SessionManager(m.dsn, clock=m.clock, statement_timeout_ms=120_000)
        sids = list(live_counts)

        async def client(k: int) -> None:
            i = k
            deadline = time.monotonic() + 300
            while not done.is_set() and time.monotonic() < deadline:
                sid = sids[i % len(sids)]
                i += 7
                progress["started"] += 1
                if await new.validate_session(sid):
                    counted[sid] = counted.get(sid, 0) + 1
                    progress["ok"] += 1
                progress["finished"] += 1
                await asyncio.sleep(0)

        await asyncio.gather(*(client(k) for k in range(8)))
        await new.close()

    phases: dict[str, int] = {}
    lock, prove = part_transaction._lock_targets, part_transaction._prove

    def lock_after_the_app_moved(conn, schema):
        # Validations land between the pass's snapshot and its locks: the pass must build on
        # them (they are in "PostgreSQL before"), never overwrite them.
        seen = progress["ok"]
        deadline = time.monotonic() + 60
        while progress["ok"] < seen + 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        phases["before_lock"] = progress["ok"] - seen
        return lock(conn, schema)

    def prove_while_the_app_waits(conn, schema, kinds, done_ids, **given):
        # The app's validations of the changed sessions queue on our locks.
        deadline = time.monotonic() + 60
        while progress["started"] - progress["finished"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        phases["waiting_on_locks"] = progress["started"] - progress["finished"]
        phases["ok_at_commit"] = progress["ok"]
        return prove(conn, schema, kinds, done_ids, **given)

    monkeypatch.setattr(part_transaction, "_lock_targets", lock_after_the_app_moved)
    monkeypatch.setattr(part_transaction, "_prove", prove_while_the_app_waits)
    app = threading.Thread(target=lambda: asyncio.run(new_colour()))
    app.start()
    result = m.run()
    deadline = time.monotonic() + 60
    while progress["ok"] < phases["ok_at_commit"] + 20 and time.monotonic() < deadline:
        time.sleep(0.01)  # and validations after the commit, on the carried rows too
    done.set()
    app.join(120)
    assert not app.is_alive(), "the app's clients never finished"
    assert result.verdict == "PASS" and result.inserted == 400 and result.changed == 40
    # those validations moved rows the pass had already merged: merged again, under the lock
    assert result.remerged >= 1
    assert phases["before_lock"] >= 20 and phases["waiting_on_locks"] > 0
    assert progress["ok"] >= phases["ok_at_commit"] + 20
    after = m.pg()
    for sid in live_counts:
        # The count in live (the migrated snapshot's + the old colour's since) + every
        # validation the new colour made, before, during or after the pass.
        expected = live_counts[sid] + counted.get(sid, 0)
        assert after[sid][6] == expected, (mask_id(sid), after[sid][6], expected)
    assert set(after) == set(before) | set(live_counts)


def test_a_pass_on_a_base_already_carried_is_refused(migrated: Migrated) -> None:
    m = migrated

    m.validate_on_old(m.ids[5])
    first = m.run()
    assert first.changed == 1
    after_first = m.pg()
    with pytest.raises(BaseNotCurrent, match="pass 1 already carried"):
        catchup.catchup(
            m.settings.dsn(),
            sqlite_path=m.snap0,
            live_sqlite_path=m.live,
            state_dir=m.state,
            rules=m.settings.rules,
            run_id="again",
            source_timezone=ZONE,
            base_path=m.snap0,  # the migrated snapshot, already carried by pass 1
        )
    assert m.pg() == after_first and len(catchup_runs(m.dsn)) == 1
    # The files kept are still the chain's: the refused pass left no snapshot behind.
    assert [p.name for p in m.state.iterdir()] == [Path(first.live_snapshot).name]


def test_the_first_base_must_be_the_migrated_snapshot(migrated: Migrated, tmp_path) -> None:
    m = migrated
    other = tmp_path / "snapshots" / "later.db"
    snapshot(m.live, other)
    with sqlite3.connect(other) as changed:  # not byte-identical to what migrate loaded
        changed.execute("UPDATE sessions SET request_count = request_count + 1")
    with pytest.raises(BaseNotCurrent, match="is not the backup the latest migrate run"):
        m.run(sqlite_path=str(other))
    assert catchup_runs(m.dsn) == []


def test_a_pass_killed_before_its_commit_changes_nothing_and_the_rerun_applies_once(
    migrated: Migrated, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = migrated
    a = m.ids[7]

    async def on_old() -> None:
        old = legacy(m.live, m.clock)
        for _ in range(4):
            assert await old.validate_session(a)
        assert await old.delete_session(m.ids[8])
        await old.close()

    asyncio.run(on_old())
    before = m.pg()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-way")

    record = the_pass._record_pass
    monkeypatch.setattr(the_pass, "_record_pass", killed)
    with pytest.raises(KeyboardInterrupt):
        m.run()
    assert m.pg() == before and catchup_runs(m.dsn) == []
    assert list(m.state.iterdir()) == []  # the uncommitted snapshot is no base: removed
    monkeypatch.setattr(the_pass, "_record_pass", record)
    result = m.run()
    assert (result.changed, result.ended, result.pass_number) == (1, 1, 1)
    assert m.pg()[a][6] == before[a][6] + 4 and m.ids[8] not in m.pg()


@pytest.mark.slow
def test_a_pass_whose_process_is_killed_commits_nothing(migrated: Migrated) -> None:
    """SIGKILL inside the transaction, just before the commit: the server rolls back, the
    advisory lock goes with the connection, and the same command then applies once."""
    m = migrated
    a = m.ids[9]
    m.validate_on_old(a, a, a)
    before = m.pg()
    driver = (
        "import json, os, signal, sys\n"
        "from sessionmig.engines.catchup import passes as the_pass\n"
        "from sessionmig.runbook import steps\n"
        "the_pass._record_pass = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
        "s = steps.settings(**json.loads(sys.argv[1]))\n"
        "steps.catchup_step(s, sys.argv[2], sys.argv[3])\n"
    )
    params = {**TEST_ENV, "sqlite_path": m.settings.sqlite_path}
    proc = subprocess.run(
        [sys.executable, "-c", driver, json.dumps(params), str(m.live), str(m.state)],
        cwd=ROOT,
        env={**os.environ, "SMTEST_DSN": m.dsn},
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert m.pg() == before and catchup_runs(m.dsn) == []
    deadline = time.monotonic() + 60
    while True:  # the server notices the dead connection (and frees its lock) promptly
        try:
            result = m.run()
            break
        except LockHeld:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    assert result.changed == 1 and result.pass_number == 1
    assert m.pg()[a][6] == before[a][6] + 3


def test_the_proof_rolls_back_writes_that_differ_from_the_rules(
    migrated: Migrated, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = migrated
    a, untouched = m.ids[11], m.ids[12]

    m.validate_on_old(a)
    before = m.pg()
    apply = part_transaction._apply_statements

    def wrong_count(conn, schema):
        done = apply(conn, schema)
        conn.execute(
            "UPDATE public.sessions SET request_count = request_count + 1 WHERE session_id = %s",
            (a,),
        )
        return done

    monkeypatch.setattr(part_transaction, "_apply_statements", wrong_count)
    result = m.run()
    assert result.verdict == "FAIL" and not result.committed
    assert any(mask_id(a) in p and "request_count" in p for p in result.mismatches)
    assert a not in " ".join(result.mismatches)  # ids only masked
    assert m.pg() == before and catchup_runs(m.dsn) == []

    def stray_write(conn, schema):
        done = apply(conn, schema)
        conn.execute(
            "UPDATE public.sessions SET last_activity = last_activity WHERE session_id = %s",
            (untouched,),
        )
        return done

    monkeypatch.setattr(part_transaction, "_apply_statements", stray_write)
    result = m.run()  # caught by PostgreSQL's count of the rows this transaction wrote
    assert result.verdict == "FAIL"
    assert any("something else was written" in p for p in result.mismatches)
    assert m.pg() == before and catchup_runs(m.dsn) == []
    monkeypatch.setattr(part_transaction, "_COUNTS_TRUSTED", False)
    result = m.run()  # and, without those counts, by the rows that carry its xmin
    assert result.verdict == "FAIL"
    assert "1 sessions outside the pass's set were written by it" in result.mismatches
    assert m.pg() == before and catchup_runs(m.dsn) == []
    monkeypatch.setattr(part_transaction, "_apply_statements", apply)
    assert m.run().verdict == "PASS" and m.pg()[a][6] == before[a][6] + 1


def test_a_dry_run_reports_the_pass_and_commits_nothing(migrated: Migrated) -> None:
    m = migrated

    async def on_old() -> None:
        old = legacy(m.live, m.clock)
        assert await old.delete_session(m.ids[13])
        await old.close()

    asyncio.run(on_old())
    before = m.pg()
    result = m.run(dry_run=True)
    assert result.ended == 1 and not result.committed and result.reason.startswith("dry run")
    assert m.pg() == before and catchup_runs(m.dsn) == [] and list(m.state.iterdir()) == []


def test_state_dir_must_be_private_and_outside_reports(migrated: Migrated, tmp_path) -> None:
    m = migrated
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    with pytest.raises(ParameterError, match="chmod 700"):
        catchup_step(m.settings, str(m.live), str(shared))
    report = tmp_path / "reports" / "run"
    report.mkdir(parents=True)
    (report / "manifest.json").write_text("{}")
    with pytest.raises(ParameterError, match="report folder"):
        catchup_step(m.settings, str(m.live), str(report / "state"))
    with pytest.raises(ParameterError, match="live_sqlite_path is sqlite_path"):
        catchup_step(m.settings, m.settings.sqlite_path, str(m.state))
    with pytest.raises(ParameterError, match="lock_timeout"):
        catchup_step(m.settings, str(m.live), str(m.state), lock_timeout="5; DROP")


@pytest.mark.slow
def test_the_catchup_notebook_reports_the_pass(
    migrated: Migrated, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``07_catchup`` run alone by papermill: counts, sha256s, hashed ids and the verdict."""
    import papermill

    m = migrated
    monkeypatch.setenv("SESSIONMIG_ID_SALT", "notebook-test-salt")
    ended = m.ids[14]

    async def on_old() -> str:
        old = legacy(m.live, m.clock)
        assert await old.delete_session(ended)
        created, _ = await old.create_session("user-nb", None)
        await old.close()
        return created

    created = asyncio.run(on_old())
    out = tmp_path / "07_catchup.ipynb"
    papermill.execute_notebook(
        str(ROOT / "notebooks" / "07_catchup.ipynb"),
        str(out),
        parameters={
            **TEST_ENV,
            "sqlite_path": str(m.snap0),
            "live_sqlite_path": str(m.live),
            "state_dir": str(m.state),
        },
        kernel_name="python3",
        progress_bar=False,
        cwd=str(ROOT),
    )
    text = out.read_text()
    (_, live_sha, _), = catchup_runs(m.dsn)  # fmt: skip
    assert "PASS" in text and live_sha in text and sha256_file(m.snap0) in text
    assert mask_id(ended, "notebook-test-salt") in text
    assert mask_id(created, "notebook-test-salt") in text
    assert not any(sid in text for sid in (*m.ids, created))  # tokens only hashed
    assert created in m.pg() and ended not in m.pg()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_the_sqlite_side_runs_at_background_priority_the_transaction_does_not(
    migrated: Migrated, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The snapshot, its hash, the diff and the migrated backup's re-hash (several threads of
    CPU) take only the CPU the app and PostgreSQL leave idle on a shared host; the transaction,
    which holds the app's rows, runs at the caller's priority, and the caller's priority is left
    as it was."""
    m = migrated

    m.validate_on_old(m.ids[3])
    seen: dict[str, tuple[int, int]] = {}

    def priority() -> tuple[int, int]:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id()), os.sched_getscheduler(0)

    def noted(name: str, inner):
        def wrapper(*args, **kwargs):
            seen[name] = priority()
            return inner(*args, **kwargs)

        return wrapper

    # Each where the pass looks it up.
    where = {
        "take": pass_files,
        "sha256_file": pass_files,
        "diff": pass_files,
        "_ended_in_live": pass_delta,
        "_transaction": the_pass,
        "hash_files": source,
    }
    for name, module in where.items():
        monkeypatch.setattr(module, name, noted(name, getattr(module, name)))
    mine = priority()
    result = m.run()
    assert result.verdict == "PASS" and result.changed == 1
    nicer = min(19, mine[0] + catchup.BACKGROUND_NICE)
    idle = (nicer, os.SCHED_IDLE)
    assert seen == {
        # The snapshot holds the live file's read lock by steps: nicer, never idle.
        "take": (nicer, mine[1]),
        # Hashing and comparing hold no lock anyone waits for: only idle CPU.
        "sha256_file": idle,  # on a thread the idle one started
        "diff": idle,
        "_ended_in_live": idle,
        # The migrated backup's re-hash (the last hash_files), once the diff has read it.
        "hash_files": idle,
        # The transaction, which holds rows the app may want: as the caller.
        "_transaction": mine,
    }
    assert priority() == mine


def test_a_pass_failing_on_its_sqlite_side_leaves_nothing_and_the_rerun_applies_once(
    migrated: Migrated, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = migrated
    a = m.ids[9]
    m.validate_on_old(a, a)
    before = m.pg()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while comparing the snapshots")

    diff = pass_files.diff
    monkeypatch.setattr(pass_files, "diff", killed)
    with pytest.raises(KeyboardInterrupt):
        m.run()
    assert m.pg() == before and catchup_runs(m.dsn) == []
    assert list(m.state.iterdir()) == []  # the snapshot taken is no base: removed
    monkeypatch.setattr(pass_files, "diff", diff)
    result = m.run()
    assert (result.changed, result.pass_number) == (1, 1)
    assert m.pg()[a][6] == before[a][6] + 2


def test_a_migrated_backup_changed_while_the_pass_read_it_stops_the_pass_before_any_lock(
    migrated: Migrated, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The migrated snapshot is evidence: the first pass hashes it before and after reading it;
    one changed in between (by anyone) stops the pass before PostgreSQL is touched."""
    m = migrated

    m.validate_on_old(m.ids[2])
    before, evidence = m.pg(), sha256_file(m.snap0)
    transactions: list[object] = []
    diff, transaction = pass_files.diff, the_pass._transaction

    def diff_then_tamper(*args, **kwargs):
        delta = diff(*args, **kwargs)
        with sqlite3.connect(m.snap0) as conn:  # the evidence, written after it was read
            conn.execute("UPDATE sessions SET request_count = request_count + 7")
        return delta

    def noted(*args, **kwargs):
        transactions.append(args)
        return transaction(*args, **kwargs)

    monkeypatch.setattr(pass_files, "diff", diff_then_tamper)
    monkeypatch.setattr(the_pass, "_transaction", noted)
    with pytest.raises(SourceError, match="the backup changed while it was being read"):
        m.run()
    assert sha256_file(m.snap0) != evidence  # it did change …
    assert transactions == [] and m.pg() == before  # … and nothing was locked or written
    assert catchup_runs(m.dsn) == [] and list(m.state.iterdir()) == []


def test_a_live_file_older_than_the_base_is_refused_and_nothing_changes(
    migrated: Migrated,
) -> None:
    """A hurried operator points a pass at a restored copy (or another environment's file)
    instead of the store the old colour writes to: carried, its "changes" would count requests
    back down and end every session created since. Refused before PostgreSQL is touched."""
    m = migrated
    restored = m.live.parent / "restored.db"
    restored.write_bytes(m.live.read_bytes())  # the store as it is now, kept aside

    async def on_old() -> str:
        old = legacy(m.live, m.clock)
        for _ in range(2):
            assert await old.validate_session(m.ids[4])
        created, _ = await old.create_session("user-after", None)
        await old.close()
        return created

    created = asyncio.run(on_old())
    first = m.run()
    assert (first.changed, first.inserted) == (1, 1)
    after_first, kept = m.pg(), sorted(m.state.iterdir())
    with pytest.raises(SourceError, match="not a later state") as refused:
        catchup_step(m.settings, str(restored), str(m.state))
    message = str(refused.value)
    assert "request_count went back in 1 session" in message
    assert mask_id(m.ids[4]) in message and m.ids[4] not in message
    assert m.pg() == after_first and created in after_first
    assert len(catchup_runs(m.dsn)) == 1 and sorted(m.state.iterdir()) == kept
    # The right file still carries on from the same base.
    assert m.run().pass_number == 2


def test_another_environments_store_is_refused_and_nothing_changes(
    migrated: Migrated, tmp_path: Path
) -> None:
    """The wrong path: a store with none of the base's sessions (staging's, say). Carried, every
    production session would end and staging's tokens would land. Its sessions were created
    before the base was taken, yet the base lacks them: refused."""
    m = migrated
    staging = tmp_path / "staging" / "sessions.db"
    staging.parent.mkdir()

    async def staging_app() -> None:
        store = legacy(staging, Clock(START - H))  # the staging app, serving since earlier
        await _create(store, 5, prefix="staging-user")
        await store.close()

    asyncio.run(staging_app())
    before = m.pg()
    with pytest.raises(SourceError, match="not a later state") as refused:
        catchup_step(m.settings, str(staging), str(m.state))
    assert "5 sessions created before the base was taken, not in it" in str(refused.value)
    assert m.pg() == before and catchup_runs(m.dsn) == []
    assert list(m.state.iterdir()) == []
