"""Exactly once, whatever fails: every write of the live cutover that crosses a connection or
two systems, with a fault injected where it hurts (a TCP proxy that cuts or holds the connection
at a chosen statement, a lost lock connection, SIGINT at COMMIT), then the same command again.

Afterwards PostgreSQL and SQLite equal what the ledger of acknowledged operations says, nothing
is stuck, and the message said truthfully whether anything was committed.
"""

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
from pathlib import Path

import psycopg
import pytest
from conftest import ROOT, TEST_ENV, rows_of
from faultproxy import FaultProxy
from test_catchup import Migrated, catchup_runs, legacy
from test_catchup import migrated as migrated  # the fixture
from test_rollback_overlap import overlap as overlap  # the fixture
from test_rollback_overlap import rollback_overlap

from sessionmig.engines.catchup import BaseNotCurrent, CatchupResult
from sessionmig.engines.catchup import apply as part_transaction
from sessionmig.engines.catchup import passes as the_pass
from sessionmig.engines.overlap import MARKER_TABLE
from sessionmig.errors import TransientTargetError
from sessionmig.sqlite.source import sha256_file

pytestmark = pytest.mark.slow

COMMIT = r"^\s*COMMIT"
AUDIT_INSERT = r'INSERT INTO "[^"]+"\."session_migration_runs"'
APPLY_UPDATE = r'UPDATE "[^"]+"\."sessions" AS s SET'
LOCK_ROWS = r"FOR UPDATE OF s"


class Ledger:
    """What the old colour was told: each acknowledged validation counts one request, each
    acknowledged logout ends a session, each creation adds one."""

    def __init__(self, m: Migrated) -> None:
        self.m = m
        self.counts = {sid: row[6] for sid, row in m.pg().items()}
        self.ended: set[str] = set()

    def traffic(self, validate: list[str], logout: list[str] = (), create: int = 0) -> None:
        async def on_old() -> None:
            old = legacy(self.m.live, self.m.clock)
            for sid in validate:
                assert await old.validate_session(sid)
                self.counts[sid] += 1
            for sid in logout:
                assert await old.delete_session(sid)
                self.ended.add(sid)
                self.counts.pop(sid, None)
            for i in range(create):
                sid, _ = await old.create_session(f"new-{i}-{len(self.counts)}", {"n": i})
                self.counts[sid] = 0
            await old.close()

        asyncio.run(on_old())

    def check(self) -> None:
        """PostgreSQL holds exactly the ledger: every count, no ended session, nothing else."""
        got = {sid: row[6] for sid, row in self.m.pg().items()}
        assert got == self.counts


def passes(dsn: str) -> list[int]:
    return [r[2]["catchup_pass"] for r in catchup_runs(dsn)]


def snapshots_in(state: Path) -> list[str]:
    return sorted(p.name for p in state.iterdir()) if state.exists() else []


def chain_files(dsn: str) -> list[str]:
    """What the RUNBOOK says state_dir holds: the last two passes' snapshots, nothing else."""
    return sorted({Path(r[2]["live_sha256"] + ".db").name for r in catchup_runs(dsn)[-2:]})


@pytest.fixture
def proxied(migrated: Migrated, monkeypatch: pytest.MonkeyPatch):
    """The migrated fixture with every connection the tool opens going through a FaultProxy."""
    with FaultProxy.for_dsn(migrated.dsn) as proxy:
        monkeypatch.setenv("SMTEST_DSN", proxy.dsn(migrated.dsn))
        yield migrated, proxy


# --- the catch-up pass: a fault at each point, first and later pass ----------------------------

POINTS = [
    # (pattern, point, committed?)
    (LOCK_ROWS, "before", False),
    (APPLY_UPDATE, "after", False),
    (AUDIT_INSERT, "before", False),
    (AUDIT_INSERT, "after", False),
    (COMMIT, "before", False),
    (COMMIT, "after", True),  # COMMIT reached the server, its answer never came back
]


@pytest.mark.parametrize("later_pass", [False, True], ids=["first-pass", "later-pass"])
@pytest.mark.parametrize(("pattern", "point", "committed"), POINTS)
def test_a_pass_cut_at_any_point_reruns_to_the_ledger(
    proxied, pattern: str, point: str, committed: bool, later_pass: bool
) -> None:
    m, proxy = proxied
    ledger = Ledger(m)
    if later_pass:
        ledger.traffic(validate=[m.ids[1]])
        assert m.run().committed
    ledger.traffic(validate=[m.ids[2], m.ids[2], m.ids[3]], logout=[m.ids[4]], create=2)
    kept_before = snapshots_in(m.state)
    fault = proxy.arm(pattern, point, application_name="sessionmig-catchup")
    number = len(passes(m.dsn)) + 1
    if committed:
        result = m.run()
        assert fault.fired.is_set()
        # The pass asked the target instead of guessing: it did commit, and says so.
        assert result.committed and result.pass_number == number
        assert "COMMIT's answer was lost" in result.reason
        assert Path(result.live_snapshot).is_file()  # the next pass's base is kept
    else:
        with pytest.raises(TransientTargetError, match="nothing was committed") as raised:
            m.run()
        assert fault.fired.is_set()
        assert "unless" not in str(raised.value)
        assert passes(m.dsn) == list(range(1, number))
        assert snapshots_in(m.state) == kept_before  # no base of a pass that never was
    again = m.run()  # the same command again
    assert again.committed
    assert passes(m.dsn) == list(range(1, number + 1 + committed))
    ledger.check()
    # state_dir holds the chain's last two snapshots and nothing a dead pass left.
    assert snapshots_in(m.state) == chain_files(m.dsn)


def test_a_lost_commit_answer_with_the_target_unreachable_keeps_the_snapshot_and_reruns(
    proxied, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The COMMIT reached the server, its answer was lost, and the target cannot be
    asked at once: the pass says the outcome is unknown, deletes nothing, and the same command
    run again settles it from the audit row."""
    m, proxy = proxied
    ledger = Ledger(m)
    ledger.traffic(validate=[m.ids[5], m.ids[5]], logout=[m.ids[6]])
    real = the_pass._read_snapshots

    def then_unreachable(*args, **kwargs):
        result = real(*args, **kwargs)
        proxy.refuse(True)  # the pass's own connections are open; no new one gets through
        return result

    monkeypatch.setattr(the_pass, "_read_snapshots", then_unreachable)
    proxy.arm(COMMIT, "after", application_name="sessionmig-catchup")
    with pytest.raises(TransientTargetError, match="whether catch-up pass 1 committed is unknown"):
        m.run()
    assert passes(m.dsn) == [1]  # it did commit
    kept = snapshots_in(m.state)
    assert len(kept) == 1  # the snapshot PostgreSQL recorded as the next base is still there
    monkeypatch.setattr(the_pass, "_read_snapshots", real)
    proxy.refuse(False)
    again = m.run()
    assert (again.pass_number, again.changed, again.ended) == (2, 0, 0)
    ledger.check()
    ledger.traffic(validate=[m.ids[5]])
    assert m.run().pass_number == 3
    ledger.check()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_while_the_commit_answer_is_in_flight_is_settled_by_the_target(
    migrated: Migrated, sig: signal.Signals
) -> None:
    """A lost COMMIT answer as an operator meets it: the COMMIT's answer is held, Ctrl-C (or
    SIGTERM, which ends the process at once) arrives; the run stops saying what the target's
    audit row says (or says nothing, killed), keeps the base, and the rerun goes on."""
    m = migrated
    ledger = Ledger(m)
    ledger.traffic(validate=[m.ids[7], m.ids[7], m.ids[7]], create=1)
    driver = (
        "import json, sys\n"
        "from sessionmig.engines.catchup import passes as the_pass\n"
        "from sessionmig.runbook import steps\n"
        "s = steps.settings(**json.loads(sys.argv[1]))\n"
        "try:\n"
        "    r = steps.catchup_step(s, sys.argv[2], sys.argv[3])\n"
        "    print('RESULT', r.committed, r.pass_number, flush=True)\n"
        "except KeyboardInterrupt as exc:\n"
        "    print('INTERRUPTED', exc, flush=True)\n"
        "    sys.exit(130)\n"
    )
    params = {**TEST_ENV, "sqlite_path": m.settings.sqlite_path}
    with FaultProxy.for_dsn(m.dsn) as proxy:
        fault = proxy.arm(COMMIT, "hold", application_name="sessionmig-catchup")
        proc = subprocess.Popen(
            [sys.executable, "-c", driver, json.dumps(params), str(m.live), str(m.state)],
            cwd=ROOT,
            env={**os.environ, "SMTEST_DSN": proxy.dsn(m.dsn)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        assert fault.wait(120), proc.communicate(timeout=30)
        assert fault.answered.wait(30)  # the server committed; the client has not heard
        proc.send_signal(sig)
        time.sleep(0.5)
        fault.release(cut=True)
        out, err = proc.communicate(timeout=120)
    assert passes(m.dsn) == [1], err[-2000:]
    # Whatever way the run ended, it did not say "nothing committed", and kept the base.
    assert "not committed" not in out + err
    if sig == signal.SIGINT:
        assert "RESULT True 1" in out or "catch-up pass 1 committed" in out, (out, err[-2000:])
    else:
        assert proc.returncode == -signal.SIGTERM
    assert len(snapshots_in(m.state)) == 1
    again = m.run()
    assert (again.pass_number, again.changed) == (2, 0)
    ledger.check()


# --- the lock connection lost mid-pass -------------------------------------------------


def test_a_lost_lock_connection_never_applies_a_delta_twice(
    migrated: Migrated, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pass A loses its migration-lock connection mid-pass; pass B starts (the lock is
    free) while A is inside its transaction. Exactly one of them commits pass 1."""
    m = migrated
    ledger = Ledger(m)
    ledger.traffic(validate=[m.ids[3], m.ids[3]], logout=[m.ids[8]], create=1)
    paused, go = threading.Event(), threading.Event()
    real = part_transaction._create_temp_tables

    def pausing(conn):
        if threading.current_thread().name == "pass-A":
            paused.set()
            assert go.wait(120)
        return real(conn)

    monkeypatch.setattr(part_transaction, "_create_temp_tables", pausing)
    results: dict[str, object] = {}

    def run(name: str) -> None:
        try:  # two invocations of the same command: two run ids
            results[name] = m.run(run_id=f"{m.settings.run_id}-{name}")
        except BaseException as exc:  # the test reads it below
            results[name] = exc

    a = threading.Thread(target=run, args=("a",), name="pass-A")
    a.start()
    assert paused.wait(120)
    with psycopg.connect(m.dsn, autocommit=True) as admin:
        killed = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'sessionmig-lock' AND datname = current_database()"
        ).fetchall()
        assert killed == [(True,)]
        b = threading.Thread(target=run, args=("b",), name="pass-B")
        b.start()
        deadline = time.monotonic() + 60
        while b.is_alive() and time.monotonic() < deadline:  # B waits on A's commit lock
            waiting = admin.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            ).fetchone()
            if waiting and waiting[0]:
                break
            time.sleep(0.02)
    go.set()
    a.join(180)
    b.join(180)
    assert not a.is_alive() and not b.is_alive()
    done = [r for r in results.values() if isinstance(r, CatchupResult) and r.committed]
    refused = [r for r in results.values() if isinstance(r, BaseNotCurrent)]
    assert len(done) == 1 and len(refused) == 1, results
    assert passes(m.dsn) == [1]
    ledger.check()  # the delta counted once
    assert m.run().pass_number == 2
    ledger.check()


def test_the_target_refuses_a_second_pass_with_the_same_number(migrated: Migrated) -> None:
    """The last guard against a lost lock connection is the target's own: whatever the locks
    did, a second audit row for pass N of the same migrate run cannot commit."""
    m = migrated
    Ledger(m).traffic(validate=[m.ids[1]])
    assert m.run().pass_number == 1
    with psycopg.connect(m.dsn) as conn, pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute(
            "INSERT INTO session_migration_runs SELECT run_id || '-twin', step, started_at, "
            "finished_at, dry_run, source_path, source_sha256, source_timezone, rows_read, "
            "inserted, unchanged, conflicting, updated, rejected, parameters, operator, host "
            "FROM session_migration_runs WHERE step = 'catchup'"
        )


# --- what killed passes leave behind ---------------------------------------------------


def test_state_dir_keeps_only_the_chain_whatever_killed_passes_left(migrated: Migrated) -> None:
    m = migrated
    ledger = Ledger(m)
    ledger.traffic(validate=[m.ids[2]])
    assert m.run().committed
    dead = 2**22 + 12345  # above pid_max's default: no such process
    leftovers = [
        f".incoming-r1-catchup-{dead}.db",
        f"..incoming-r1-catchup-{dead}.db.partial-{dead}-0badc0de",
        f"..incoming-r1-catchup-{dead}.db.partial-{dead}-0badc0de-journal",
        "..incoming-r0.db.partial-999999-deadbeef",  # a pass from before names carried pids
        "f" * 64 + ".db",  # a snapshot no pass recorded
    ]
    for name in leftovers:
        (m.state / name).write_bytes(b"session tokens inside")
    ledger.traffic(validate=[m.ids[2]])
    assert m.run().pass_number == 2
    assert snapshots_in(m.state) == chain_files(m.dsn)
    ledger.check()


# --- the rollback during the overlap, two systems, one decision -----------------------


def _rollback_rows(dsn: str) -> list[tuple]:
    return rows_of(
        dsn,
        "SELECT parameters->>'state' FROM session_migration_runs WHERE step = 'rollback' "
        "ORDER BY parameters->>'state' DESC",
    )


@pytest.fixture
def overlapped(overlap, monkeypatch: pytest.MonkeyPatch):
    live, snap0, settings, state, dsn, ids = overlap
    with FaultProxy.for_dsn(dsn) as proxy:
        monkeypatch.setenv("SMTEST_DSN", proxy.dsn(dsn))
        yield live, snap0, settings, state, dsn, ids, proxy


@pytest.mark.parametrize(
    ("where", "point"),
    [("intent", "before"), ("intent", "after"), ("done", "before"), ("done", "after")],
)
def test_an_overlap_rollback_cut_at_either_write_is_completed_by_a_rerun(
    overlapped, monkeypatch: pytest.MonkeyPatch, where: str, point: str
) -> None:
    from sessionmig.engines import overlap as O
    from sessionmig.runbook.steps import catchup_step

    live, snap0, settings, state, dsn, ids, proxy = overlapped
    with psycopg.connect(dsn, autocommit=True) as conn:  # the new colour validated ids[1] twice
        conn.execute(
            "UPDATE sessions SET request_count = request_count + 2 WHERE session_id = %s",
            (ids[1],),
        )
    count_before = _sqlite_count(live, ids[1])
    untouched = sha256_file(live)
    if where == "intent":
        proxy.arm(AUDIT_INSERT, point, application_name="sessionmig-rollback")
    else:  # arm once the intent is committed: the next audit INSERT is the record
        real = O._merge_into_sqlite

        def then_arm(*args, **kwargs):
            merged = real(*args, **kwargs)
            proxy.arm(AUDIT_INSERT, point, application_name="sessionmig-rollback")
            return merged

        monkeypatch.setattr(O, "_merge_into_sqlite", then_arm)
    with pytest.raises(TransientTargetError) as raised:
        rollback_overlap(settings, live, state, snap0)
    said = str(raised.value)
    if where == "intent":
        assert "the live SQLite file was not touched" in said
        assert sha256_file(live) == untouched
    else:
        assert f"{live} WAS changed" in said and "run the same command again" in said.lower()
        assert _sqlite_count(live, ids[1]) == count_before + 2
        assert _rollback_rows(dsn) == [("intent",)]
        # No catch-up pass may run now: it would carry the new colour's changes back again.
        with pytest.raises(BaseNotCurrent):
            catchup_step(settings, str(live), str(state))
        changed = sha256_file(live)
    monkeypatch.setattr(O, "_merge_into_sqlite", O._merge_into_sqlite)
    result = rollback_overlap(settings, live, state, snap0)  # the same command again
    assert _sqlite_count(live, ids[1]) == count_before + 2  # carried exactly once
    assert _rollback_rows(dsn) == [("intent",), ("done",)]
    if where == "done":
        assert result.completed_earlier and sha256_file(live) == changed
    with pytest.raises(BaseNotCurrent):
        catchup_step(settings, str(live), str(state))


def test_catch_up_reads_the_live_files_marker_whatever_the_target_says(overlap) -> None:
    """A live file a rollback wrote into is refused by catch-up even where the target lost the
    rollback's rows (restored from before, or the rows were removed)."""
    from sessionmig.runbook.steps import catchup_step

    live, snap0, settings, state, dsn, ids = overlap
    rollback_overlap(settings, live, state, snap0)
    with psycopg.connect(dsn) as conn:
        conn.execute("DELETE FROM session_migration_runs WHERE step = 'rollback'")
    before = sha256_file(live)
    counts = rows_of(dsn, "SELECT session_id, request_count FROM sessions ORDER BY 1")
    with pytest.raises(BaseNotCurrent, match=MARKER_TABLE):
        catchup_step(settings, str(live), str(state))
    assert sha256_file(live) == before
    assert rows_of(dsn, "SELECT session_id, request_count FROM sessions ORDER BY 1") == counts


def _sqlite_count(live: Path, sid: str) -> int:
    with sqlite3.connect(live) as conn:
        return conn.execute(
            "SELECT request_count FROM sessions WHERE session_id = ?", (sid,)
        ).fetchone()[0]


# --- one session must not stall a cutover -----------------------------------------------


def test_a_session_recreated_under_its_id_is_carried_named_and_counted(migrated: Migrated) -> None:
    from datetime import timedelta

    m = migrated
    sid = m.ids[12]
    with psycopg.connect(m.dsn) as conn:  # the new colour used the old session meanwhile
        conn.execute(
            "UPDATE sessions SET request_count = request_count + 2 WHERE session_id = %s", (sid,)
        )
    m.clock.now += timedelta(hours=1)

    async def recreate_on_old() -> None:
        old = legacy(m.live, m.clock)
        assert await old.delete_session(sid)
        fresh, _ = await old.create_session("someone-else", {"again": True})
        await old.close()
        with sqlite3.connect(m.live) as conn:  # the app gave the new session the same id
            conn.execute("UPDATE sessions SET session_id = ? WHERE session_id = ?", (sid, fresh))
        conn.close()
        old = legacy(m.live, m.clock)
        assert await old.validate_session(sid)
        await old.close()

    asyncio.run(recreate_on_old())
    result = m.run()
    assert result.committed and result.recreated == 1
    assert result.verdict == "PASS_WITH_WARNINGS" and "created again under the same id" in (
        result.reason
    )
    row = m.pg()[sid]
    assert (row[1], row[2], row[6]) == ("someone-else", '{"again": true}', 1)
    # The refusals keep holding for what they exist for: a file older than the base.
    Ledger(m).traffic(validate=[m.ids[13]])
    assert m.run().pass_number == 2


# --- migrate: its one transaction's COMMIT --------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "point", "attempts"),
    [
        (COMMIT, "before", 2),  # nothing committed: the built-in retry loads it once
        (COMMIT, "after", 1),  # committed, answer lost: asked, and done — never loaded twice
        (AUDIT_INSERT, "after", 2),
    ],
)
def test_migrate_cut_at_its_commit_lands_every_row_once(
    small_backup: Path, target, dsn: str, monkeypatch: pytest.MonkeyPatch, pattern, point, attempts
) -> None:
    from sessionmig.runbook import steps

    with FaultProxy.for_dsn(dsn) as proxy:
        monkeypatch.setenv("SMTEST_DSN", proxy.dsn(dsn))
        settings = target(small_backup)
        proxy.arm(pattern, point, application_name="sessionmig-migrate")
        monkeypatch.setattr(steps, "RETRY_BACKOFF_S", 0.05)
        result = steps.migrate(settings, progress=False)
        loads = proxy.connections
    assert result.verdict in ("PASS", "PASS_WITH_WARNINGS") and result.outcome.committed
    assert rows_of(dsn, "SELECT count(*) FROM session_migration_runs") == [(1,)]
    landed = rows_of(dsn, "SELECT count(*) FROM sessions")[0][0]
    rejected = rows_of(dsn, "SELECT count(*) FROM session_migration_rejects")[0][0]
    assert (landed, rejected) == (result.outcome.inserted, result.outcome.rejected)
    assert landed + rejected == 400
    assert loads >= attempts
    # The same command again changes nothing (every row already there, byte for byte).
    monkeypatch.setenv("SMTEST_DSN", dsn)
    again = steps.migrate(target(small_backup, run_id=""), progress=False)
    assert again.outcome.inserted == 0 and again.outcome.updated == 0
    assert rows_of(dsn, "SELECT count(*) FROM sessions")[0][0] == landed


@pytest.mark.parametrize("where", ["before the SQLite commit", "between SQLite and PostgreSQL"])
def test_an_overlap_rollback_killed_between_its_two_systems_is_completed_once(
    overlap, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """The rollback during the overlap, killed rather than cut off: after the intent, stopped
    before SQLite committed (its transaction rolls back) or after it committed and before the
    record. The same command then carries PostgreSQL's changes into the live file exactly
    once."""
    from sessionmig.engines import overlap as O
    from sessionmig.runbook.steps import catchup_step

    live, snap0, settings, state, dsn, ids = overlap
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "UPDATE sessions SET request_count = request_count + 3 WHERE session_id = %s",
            (ids[2],),
        )
    count_before = _sqlite_count(live, ids[2])
    untouched = sha256_file(live)
    originals = {"_write": O._write, "_record_done": O._record_done}
    if where == "before the SQLite commit":
        real = O._write

        def killed(*args, **kwargs):
            real(*args, **kwargs)
            raise KeyboardInterrupt("killed inside the SQLite transaction")

        monkeypatch.setattr(O, "_write", killed)
    else:

        def killed(*args, **kwargs):
            raise KeyboardInterrupt("killed before the record")

        monkeypatch.setattr(O, "_record_done", killed)
    with pytest.raises(KeyboardInterrupt):
        rollback_overlap(settings, live, state, snap0)
    assert _rollback_rows(dsn) == [("intent",)]
    if where == "before the SQLite commit":
        assert sha256_file(live) == untouched  # rolled back with the transaction
    else:
        assert _sqlite_count(live, ids[2]) == count_before + 3
    with pytest.raises(BaseNotCurrent):  # the intent refuses catch-up meanwhile
        catchup_step(settings, str(live), str(state))
    for name, function in originals.items():
        monkeypatch.setattr(O, name, function)
    result = rollback_overlap(settings, live, state, snap0)
    assert _sqlite_count(live, ids[2]) == count_before + 3  # once
    assert _rollback_rows(dsn) == [("intent",), ("done",)]
    assert result.completed_earlier == (where == "between SQLite and PostgreSQL")
