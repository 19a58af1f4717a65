"""A catch-up pass applied in parts: each part its own transaction, proven and recorded with its
writes, so no row of the app's stays locked for long whatever the pass carries — and exactly
once whatever fails between, at or after any part's commit.

The parts are made three sessions long here (``small_parts``), so a pass of a dozen sessions
crosses several commits; the ledger of what the old colour was told is the verdict.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from conftest import ROOT, TEST_ENV, rows_of
from test_catchup import Migrated, catchup_runs
from test_catchup import migrated as migrated  # the fixture
from test_exactly_once import (
    AUDIT_INSERT,
    COMMIT,
    LOCK_ROWS,
    Ledger,
    chain_files,
    passes,
    snapshots_in,
)
from test_exactly_once import proxied as proxied  # the fixture
from test_rollback_overlap import overlap as overlap  # the fixture
from test_rollback_overlap import rollback_overlap

from sessionmig.engines.catchup import BaseNotCurrent
from sessionmig.engines.catchup import apply as part_transaction
from sessionmig.engines.catchup import passes as the_pass
from sessionmig.engines.catchup.passes import _next_part_rows
from sessionmig.errors import ParameterError, SourceError, TransientTargetError

pytestmark = pytest.mark.slow

PART = 3
UPDATES = r'UPDATE "[^"]+"\."sessions" AS s SET'  # two statements a part: changes, re-creations


@pytest.fixture(autouse=True)
def small_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(the_pass, "FIRST_PART_ROWS", PART)
    monkeypatch.setattr(the_pass, "MIN_PART_ROWS", PART)
    monkeypatch.setattr(the_pass, "MAX_PART_ROWS", PART)


def part_rows(dsn: str) -> list[dict]:
    return [
        r[0]
        for r in rows_of(
            dsn,
            "SELECT parameters FROM session_migration_runs WHERE step = 'catchup_part' "
            "ORDER BY (parameters->>'catchup_pass')::int, (parameters->>'through')::int",
        )
    ]


def busy(m: Migrated, ledger: Ledger) -> int:
    """The old colour's traffic of a busy stretch: 12 sessions touched (three of them twice),
    two logouts, three creations — 17 sessions for the pass, six parts of three."""
    ledger.traffic(
        validate=[*m.ids[:12], *m.ids[:3]], logout=[m.ids[20], m.ids[21]], create=3
    )  # fmt: skip
    return 17


def test_a_pass_in_parts_lands_exactly_the_ledger_and_records_each_part(
    migrated: Migrated,
) -> None:
    m = migrated
    ledger = Ledger(m)
    touched = busy(m, ledger)
    result = m.run()
    assert result.committed and result.verdict == "PASS"
    assert result.parts == math.ceil(touched / PART) == 6
    assert (result.changed, result.ended, result.inserted) == (12, 2, 3)
    ledger.check()
    parts = part_rows(m.dsn)
    # Every part but the last is a row of its own; the last is the pass's row.
    assert [p["through"] for p in parts] == [3, 6, 9, 12, 15]
    assert {p["of"] for p in parts} == {touched}
    assert {p["live_sha256"] for p in parts} == {result.live_sha256}
    summed = {k: sum(p["kinds"].get(k, 0) for p in parts) for k in ("changed", "inserted")}
    assert summed["changed"] + summed["inserted"] <= 15
    pass_row = catchup_runs(m.dsn)[-1][2]
    assert pass_row["counts"] == result.counts
    assert "applied in 6 parts" in result.reason
    # The next pass starts from this one's snapshot: nothing is carried twice.
    ledger.traffic(validate=[m.ids[30]])
    assert m.run().committed
    ledger.check()
    assert passes(m.dsn) == [1, 2]


POINTS = [
    # (pattern, matches in each earlier part, point, the part committed?)
    (LOCK_ROWS, 1, "before", False),
    (UPDATES, 2, "after", False),
    (AUDIT_INSERT, 1, "before", False),
    (AUDIT_INSERT, 1, "after", False),
    (COMMIT, 1, "before", False),
    (COMMIT, 1, "after", True),  # the part's COMMIT reached the server, its answer never came
]


@pytest.mark.parametrize(("pattern", "per_part", "point", "committed"), POINTS)
def test_a_pass_cut_in_a_later_part_is_finished_once_by_the_same_command(
    proxied, pattern: str, per_part: int, point: str, committed: bool
) -> None:
    m, proxy = proxied
    ledger = Ledger(m)
    busy(m, ledger)
    fault = proxy.arm(
        pattern, point, application_name="sessionmig-catchup", skip=2 * per_part
    )  # the third part
    if committed:
        result = m.run()  # asked the target, which says the part committed: the pass goes on
        assert fault.fired.is_set() and result.committed and result.parts == 6
    else:
        with pytest.raises(TransientTargetError) as raised:
            m.run()
        assert fault.fired.is_set()
        said = str(raised.value)
        assert "stopped part-way: 2 of its parts are committed" in said
        assert "6 of 17 sessions carried" in said and "run the same command again" in said.lower()
        assert "nothing was committed" not in said  # two parts were: never said otherwise
        assert passes(m.dsn) == [] and [p["through"] for p in part_rows(m.dsn)] == [3, 6]
        kept = snapshots_in(m.state)
        assert len(kept) == 1  # the snapshot the pass is finished from
        result = m.run()  # the same command again
        assert result.committed and result.resumed == 6 and result.parts == 6
        assert "finished it from the same snapshot" in result.reason
        assert Path(result.live_snapshot).name == kept[0]
    ledger.check()
    assert passes(m.dsn) == [1]
    assert snapshots_in(m.state) == chain_files(m.dsn)


def test_a_pass_killed_between_two_parts_is_finished_by_the_same_command(
    migrated: Migrated,
) -> None:
    """SIGKILL in the third part's transaction, after two parts committed: the server rolls the
    third back; the next run carries the rest, none of the first six sessions again."""
    m = migrated
    ledger = Ledger(m)
    busy(m, ledger)
    driver = (
        "import json, os, signal, sys\n"
        "from sessionmig.engines.catchup import passes as the_pass\n"
        "from sessionmig.runbook import steps\n"
        f"the_pass.FIRST_PART_ROWS = the_pass.MIN_PART_ROWS = the_pass.MAX_PART_ROWS = {PART}\n"
        "real, seen = the_pass._record_part, []\n"
        "def record(*args, **kwargs):\n"
        "    seen.append(1)\n"
        "    if len(seen) == 3:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(*args, **kwargs)\n"
        "the_pass._record_part = record\n"
        "s = steps.settings(**json.loads(sys.argv[1]))\n"
        "steps.catchup_step(s, sys.argv[2], sys.argv[3])\n"
    )
    params = {**TEST_ENV, "sqlite_path": m.settings.sqlite_path}
    proc = subprocess.run(
        [sys.executable, "-c", driver, json.dumps(params), str(m.live), str(m.state)],
        cwd=ROOT,
        env={**os.environ},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert [p["through"] for p in part_rows(m.dsn)] == [3, 6]
    result = m.run()
    assert result.committed and result.resumed == 6
    ledger.check()


def test_no_overlap_rollback_while_a_pass_is_carried_in_part(
    overlap, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio
    from datetime import timedelta

    from test_rollback_overlap import START, legacy

    from sessionmig.runbook.steps import catchup_step

    live, snap0, settings, state, dsn, ids = overlap

    async def old_colour() -> None:
        store = legacy(live, START + timedelta(minutes=10))
        for sid in ids[:9]:
            assert await store.validate_session(sid)
        await store.close()

    asyncio.run(old_colour())
    _stop_in_part(
        2, lambda: catchup_step(settings, str(live), str(state)), monkeypatch, "1 of its parts"
    )
    before = Path(live).read_bytes()
    with pytest.raises(BaseNotCurrent, match="carried in part"):
        rollback_overlap(settings, live, state, snap0)
    assert Path(live).read_bytes() == before  # the live file was not touched
    assert rows_of(dsn, "SELECT 1 FROM session_migration_runs WHERE step = 'rollback'") == []
    assert catchup_step(settings, str(live), str(state)).resumed == PART
    assert rollback_overlap(settings, live, state, snap0) is not None  # now it may


def _stop_in_part(
    number: int, run: Callable[[], object], monkeypatch: pytest.MonkeyPatch, said: str = ""
) -> None:
    """Run a pass whose connection is lost while part ``number`` records itself (the parts
    before it committed); afterwards the parts record themselves again."""
    real, seen = the_pass._record_part, []

    def lost_in_that_part(*args, **kwargs):
        seen.append(1)
        if len(seen) == number:
            raise psycopg.OperationalError("the connection was lost")
        return real(*args, **kwargs)

    monkeypatch.setattr(the_pass, "_record_part", lost_in_that_part)
    with pytest.raises(TransientTargetError, match=f"stopped part-way: {said}"):
        run()
    monkeypatch.setattr(the_pass, "_record_part", real)


def _stop_after_two_parts(m: Migrated, monkeypatch: pytest.MonkeyPatch) -> None:
    _stop_in_part(3, m.run, monkeypatch, "2 of its parts")


def test_a_pass_carried_in_part_is_finished_from_its_own_snapshot_only(
    migrated: Migrated, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its snapshot gone, or changed in state_dir: refused before anything is written; the
    old colour's later writes wait for the next pass, they never join this one."""
    m = migrated
    ledger = Ledger(m)
    busy(m, ledger)
    _stop_after_two_parts(m, monkeypatch)
    (kept,) = [m.state / name for name in snapshots_in(m.state)]
    after_two = m.pg()
    moved = kept.with_name("elsewhere.db")
    kept.rename(moved)
    with pytest.raises(ParameterError, match="finished from the snapshot it began with"):
        m.run()
    assert m.pg() == after_two
    with kept.open("wb") as out:  # the same name, other bytes
        out.write(moved.read_bytes()[:-1] + b"\x01")
    with pytest.raises(SourceError, match="was changed in state_dir"):
        m.run()
    assert m.pg() == after_two
    moved.replace(kept)
    late = Ledger(m)  # the old colour goes on meanwhile: the next pass carries it
    late.counts = dict(ledger.counts)
    late.traffic(validate=[m.ids[35]])
    result = m.run()
    assert result.committed and result.resumed == 6
    ledger.check()  # exactly the stretch the snapshot holds
    assert m.run().committed  # the next pass: the late validation
    late.check()


def test_a_pass_carried_in_part_is_finished_only_by_the_rules_it_began_with(
    migrated: Migrated, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = migrated
    ledger = Ledger(m)
    busy(m, ledger)
    _stop_after_two_parts(m, monkeypatch)
    after_two = m.pg()
    with pytest.raises(ParameterError, match="begun under other rules"):
        m.run(source_timezone="America/New_York")
    assert m.pg() == after_two
    assert m.run().resumed == 6
    ledger.check()


def test_a_part_another_run_carried_meanwhile_stops_this_one(
    migrated: Migrated, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run whose migration lock was lost, and another run of the same pass beside it: each
    part re-reads the parts under the commit lock, and a part it did not expect stops it."""
    m = migrated
    ledger = Ledger(m)
    busy(m, ledger)
    real, seen, after_one = part_transaction.commit_lock, [], {}

    def another_run_carries_one(conn, schema):
        seen.append(1)
        if len(seen) == 2:  # part 1 committed; as if another run's part had committed since
            after_one.update(m.pg())
            with psycopg.connect(m.dsn, autocommit=True) as other:
                other.execute(
                    "INSERT INTO session_migration_runs (run_id, step, started_at, dry_run, "
                    "source_path, source_sha256, source_timezone, rows_read, inserted, "
                    "unchanged, conflicting, updated, rejected, parameters, finished_at) "
                    "SELECT run_id || '-other', step, started_at, dry_run, source_path, "
                    "source_sha256, source_timezone, 0, 0, 0, 0, 0, 0, "
                    "jsonb_set(parameters, '{through}', '4'), clock_timestamp() "
                    "FROM session_migration_runs WHERE step = 'catchup_part'"
                )
        return real(conn, schema)

    monkeypatch.setattr(part_transaction, "commit_lock", another_run_carries_one)
    with pytest.raises(BaseNotCurrent, match="stopped part-way: 1 of its parts"):
        m.run()
    assert passes(m.dsn) == [] and m.pg() == after_one  # part 2 wrote nothing


def test_a_dry_run_in_parts_commits_nothing(migrated: Migrated) -> None:
    m = migrated
    ledger = Ledger(m)
    busy(m, ledger)
    before = m.pg()
    result = m.run(dry_run=True)
    assert not result.committed and result.dry_run and result.verdict == "PASS"
    assert m.pg() == before and part_rows(m.dsn) == [] and passes(m.dsn) == []
    assert m.run().committed
    ledger.check()


@pytest.mark.parametrize(
    ("rows", "locked_s", "expected"),
    [
        (4_000, 2.0, 1_000),  # too slow: a quarter
        (4_000, 0.1, 8_000),  # fast: at most twice the last
        (4_000, 0.0, 8_000),
        (100, 10.0, PART),  # never below the floor
        (90_000, 0.01, PART),  # nor above the ceiling (here both are PART)
    ],
)
def test_each_part_is_sized_to_hold_its_locks_half_a_second(
    monkeypatch: pytest.MonkeyPatch, rows: int, locked_s: float, expected: int
) -> None:
    if expected != PART:
        monkeypatch.setattr(the_pass, "MIN_PART_ROWS", 500)
        monkeypatch.setattr(the_pass, "MAX_PART_ROWS", 100_000)
    assert _next_part_rows(rows, locked_s) == expected
