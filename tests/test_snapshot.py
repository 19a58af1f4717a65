"""A consistent copy of the live SQLite store while the app writes to it: the app's writers never
fail, the copy is a sound database at some committed state, private, hashed, and the live file
is never written."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
import uuid
from pathlib import Path

import pytest

from sessionmig.sqlite.snapshot import SnapshotError, snapshot
from sessionmig.sqlite.source import sha256_file
from sessionmig.store import LegacySQLiteSessionManager

ROW = "INSERT INTO sessions VALUES (?, 'u', '{\"k\": 1}', '2026-01-15 12:00:00', " \
    "'2099-01-16 12:00:00', '2026-01-15 12:00:00', 0)"  # fmt: skip


def live_store(path: Path, mode: str, rows: int = 3000) -> list[str]:
    """The legacy app's store in ``mode`` (wal or delete), with ``rows`` sessions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    asyncio.run(LegacySQLiteSessionManager(path).close())  # the app creates its schema
    ids = [f"session-{uuid.uuid4()}" for _ in range(rows)]
    with sqlite3.connect(path, isolation_level=None) as conn:
        assert conn.execute(f"PRAGMA journal_mode={mode}").fetchone()[0] == mode
        conn.execute("BEGIN")
        conn.executemany(ROW, [(sid,) for sid in ids])
        conn.execute("COMMIT")
    return ids


class Writer(threading.Thread):
    """An app writer that commits as fast as it can, noting every committed row count."""

    def __init__(self, path: Path, pause: float = 0.0005) -> None:
        super().__init__(daemon=True)
        self.path, self.pause = path, pause
        self.errors: list[str] = []
        self.states: set[int] = set()
        self.commits = 0
        self.stop = threading.Event()

    def run(self) -> None:
        # As the legacy app: a 30 s busy timeout and the write lock taken before anything.
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        with conn:
            self.states.add(conn.execute("SELECT count(*) FROM sessions").fetchone()[0])
        while not self.stop.is_set():
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(ROW, (f"session-{uuid.uuid4()}",))
                # Read under the write lock: exactly the state this commit makes.
                count = conn.execute("SELECT count(*) FROM sessions").fetchone()[0]
                conn.execute("COMMIT")
                self.states.add(count)
                self.commits += 1
            except Exception as exc:  # what the app would see: the test fails on any
                self.errors.append(repr(exc))
            time.sleep(self.pause)
        conn.close()


class Validator(threading.Thread):
    """The legacy manager itself validating sessions meanwhile (writes that keep the count)."""

    def __init__(self, path: Path, ids: list[str]) -> None:
        super().__init__(daemon=True)
        self.path, self.ids = path, ids
        self.errors: list[str] = []
        self.validated = 0
        self.stop = threading.Event()

    def run(self) -> None:
        async def work() -> None:
            manager = LegacySQLiteSessionManager(self.path)
            i = 0
            while not self.stop.is_set():
                try:
                    assert await manager.validate_session(self.ids[i % len(self.ids)])
                    self.validated += 1
                except Exception as exc:
                    self.errors.append(repr(exc))
                i += 1
            await manager.close()

        asyncio.run(work())


def sound(path: Path) -> int:
    """The copy's integrity_check is ok; returns its session count."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        return conn.execute("SELECT count(*) FROM sessions").fetchone()[0]


@pytest.mark.parametrize("mode", ["wal", "delete"])
def test_snapshots_while_the_app_writes_are_consistent_and_never_fail_it(
    tmp_path: Path, mode: str
) -> None:
    live = tmp_path / "app" / "sessions.db"
    ids = live_store(live, mode)
    writers = [Writer(live), Writer(live)]
    validator = Validator(live, ids)
    for thread in (*writers, validator):
        thread.start()
    time.sleep(0.1)
    out_dir = tmp_path / "private" / "snapshots"
    taken = []
    deadline = time.monotonic() + 30
    # Small steps (many chances for a commit to land between two), until the app has done
    # real work meanwhile, however loaded this machine is.
    while len(taken) < 3 or min(w.commits for w in writers) <= 20 or validator.validated <= 20:
        assert time.monotonic() < deadline, "the app made no progress"
        taken.append(snapshot(live, out_dir / f"s{len(taken)}.db", pages=8, pause_s=0.001))
    for thread in (*writers, validator):
        thread.stop.set()
        thread.join(30)
    assert not any(t.is_alive() for t in (*writers, validator))
    assert [w.errors for w in writers] == [[], []] and validator.errors == []
    assert all(w.commits > 20 for w in writers) and validator.validated > 20
    committed = set().union(*(w.states for w in writers))
    for result in taken:
        path = Path(result.path)
        count = sound(path)
        assert count == result.sessions and count in committed  # one committed state
        assert result.journal_mode == mode and result.check == "ok"
        assert result.sha256 == sha256_file(path) and result.size == path.stat().st_size
        assert path.stat().st_mode & 0o777 == 0o600
    if mode == "wal":  # one read transaction for the whole copy: never restarted
        assert all(r.restarts == 0 and r.attempts == 1 for r in taken)
    assert out_dir.stat().st_mode & 0o777 == 0o700
    assert (out_dir.parent.stat().st_mode & 0o777) == 0o700  # created by the snapshot too
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        f"s{k}.db" for k in range(len(taken))
    )


@pytest.mark.parametrize("mode", ["wal", "delete"])
def test_the_live_file_is_never_written(tmp_path: Path, mode: str) -> None:
    live = tmp_path / "sessions.db"
    live_store(live, mode, rows=500)
    app = sqlite3.connect(live, isolation_level=None)  # the app stays connected
    app.execute("PRAGMA wal_autocheckpoint = 0")
    app.execute("BEGIN IMMEDIATE")
    app.executemany(ROW, [(f"session-{uuid.uuid4()}",) for _ in range(50)])
    app.execute("COMMIT")  # in WAL mode: rows that live only in the -wal file so far
    files = [live, Path(f"{live}-wal")] if mode == "wal" else [live]
    before = {f: sha256_file(f) for f in files}
    result = snapshot(live, tmp_path / "copy.db")
    assert {f: sha256_file(f) for f in files} == before  # no checkpoint, no write
    assert result.sessions == 550 and sound(Path(result.path)) == 550
    assert not Path(f"{live}-journal").exists()
    app.close()


@pytest.mark.parametrize("mode", ["wal", "delete"])
def test_a_writer_holding_the_file_delays_the_snapshot_and_never_fails(
    tmp_path: Path, mode: str
) -> None:
    """A long write transaction: in rollback-journal mode the snapshot waits for it (and the
    app's other writers wait too, as they always do, without an error); in WAL mode nothing
    waits and the copy is the state before it."""
    live = tmp_path / "sessions.db"
    ids = live_store(live, mode, rows=1000)
    holding, snapshotting, snapshotted = threading.Event(), threading.Event(), threading.Event()
    held: dict = {}

    def long_transaction() -> None:
        conn = sqlite3.connect(live, timeout=30, isolation_level=None)
        conn.execute("BEGIN EXCLUSIVE")
        conn.execute(ROW, ("held-row",))
        holding.set()
        # Held for 1.5 s from the moment the snapshot starts, however late a loaded machine
        # starts it; in WAL mode held until the snapshot is done (60 s at most), so that "it
        # never waited" does not depend on how fast the copy runs.
        snapshotting.wait(60)
        if mode == "wal":
            snapshotted.wait(60)
        else:
            time.sleep(1.5)
        conn.execute("COMMIT")
        held["committed_at"] = time.perf_counter()
        conn.close()

    holder = threading.Thread(target=long_transaction)
    validator = Validator(live, ids)
    holder.start()
    assert holding.wait(30), "the holder never took the lock"
    validator.start()
    started = time.perf_counter()
    snapshotting.set()
    try:
        result = snapshot(live, tmp_path / "copy.db", busy_timeout_s=30)
        finished = time.perf_counter()
    finally:
        snapshotted.set()
    holder.join(70)
    assert not holder.is_alive()
    # The validator was blocked for as long as the holder held the file (rollback journal);
    # give it time to show it resumes, however loaded this machine is.
    deadline = time.monotonic() + 20
    while validator.validated == 0 and not validator.errors and time.monotonic() < deadline:
        time.sleep(0.05)
    validator.stop.set()
    validator.join(30)
    assert not validator.is_alive()
    assert validator.errors == [] and "committed_at" in held
    with sqlite3.connect(result.path) as copy:
        has_held = copy.execute("SELECT count(*) FROM sessions WHERE session_id = 'held-row'")
        found = has_held.fetchone()[0]
    if mode == "delete":
        # It waited for the commit, counted the wait, and read the state after it.
        held_for = held["committed_at"] - started
        assert finished >= held["committed_at"] and held_for >= 1.5
        assert result.waited_s >= 0.8 * held_for
        assert found == 1 and result.sessions == 1001
    else:
        # Done while the holder still held the file (it lets go only once the copy is done).
        assert result.waited_s < 0.5 and finished < held["committed_at"]
        assert found == 0 and result.sessions == 1000  # readers never wait in WAL mode
    assert validator.validated > 0


def test_a_lock_held_beyond_the_limit_fails_the_snapshot_not_the_app(tmp_path: Path) -> None:
    live = tmp_path / "sessions.db"
    live_store(live, "delete", rows=200)
    holding, gave_up = threading.Event(), threading.Event()
    outcome: dict = {}

    def long_transaction() -> None:
        conn = sqlite3.connect(live, timeout=30, isolation_level=None)
        conn.execute("BEGIN EXCLUSIVE")
        conn.execute(ROW, ("held-row",))
        holding.set()
        # Held until the snapshot has given up (60 s at most), however late a loaded machine
        # starts it: "beyond the limit" never depends on how soon the snapshot began.
        gave_up.wait(60)
        conn.execute("COMMIT")
        outcome["committed"] = conn.execute("SELECT count(*) FROM sessions").fetchone()[0]
        conn.close()

    holder = threading.Thread(target=long_transaction)
    holder.start()
    assert holding.wait(30), "the holder never took the lock"
    out = tmp_path / "out" / "copy.db"
    try:
        with pytest.raises(SnapshotError, match="stayed locked|could not read it"):
            snapshot(live, out, busy_timeout_s=0.3)
    finally:
        gave_up.set()
    holder.join(30)
    assert not holder.is_alive()
    assert outcome["committed"] == 201
    assert list(out.parent.iterdir()) == []  # nothing half-written left behind


def test_constant_commits_grow_the_step_until_a_copy_holds(tmp_path: Path) -> None:
    live = tmp_path / "sessions.db"
    live_store(live, "delete", rows=3000)
    writer = Writer(live, pause=0.0002)
    writer.start()
    deadline = time.monotonic() + 30
    while writer.commits < 10 and not writer.errors:  # the app is committing, however loaded
        assert time.monotonic() < deadline, "the writer made no progress"
        time.sleep(0.01)
    result = snapshot(live, tmp_path / "copy.db", pages=4, pause_s=0.001)
    with pytest.raises(SnapshotError, match="WAL"):
        # A store that cannot be copied in steps, and whose one-step copy would hold the read
        # lock longer than allowed, is refused rather than held.
        snapshot(live, tmp_path / "refused.db", pages=4, pause_s=0.001, max_hold_s=1e-9)
    writer.stop.set()
    writer.join(30)
    assert not writer.is_alive() and writer.errors == []
    assert result.restarts > 0 and result.step_pages != 4 and result.attempts > 1
    assert sound(Path(result.path)) in writer.states
    assert not (tmp_path / "refused.db").exists()


def test_snapshot_refuses_what_it_must_not_do(tmp_path: Path) -> None:
    live = tmp_path / "sessions.db"
    live_store(live, "delete", rows=10)
    out = tmp_path / "copy.db"
    first = snapshot(live, out)
    with pytest.raises(SnapshotError, match="never written over"):
        snapshot(live, out)
    assert sha256_file(out) == first.sha256
    assert snapshot(live, out, replace=True).sha256 == first.sha256  # same state, same bytes
    with pytest.raises(SnapshotError, match="live store itself"):
        snapshot(live, live, replace=True)
    not_sqlite = tmp_path / "notes.txt"
    not_sqlite.write_text("hello")
    with pytest.raises(SnapshotError, match="not a SQLite database"):
        snapshot(not_sqlite, tmp_path / "x.db")
    with pytest.raises(SnapshotError, match="no such file"):
        snapshot(tmp_path / "missing.db", tmp_path / "y.db")


@pytest.mark.parametrize("mode", ["wal", "delete"])
def test_the_copy_reaches_the_disk_as_it_is_made_not_all_at_once(
    tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy left in the page cache is written all at once when its commit asks for fsync,
    and PostgreSQL's commits on the same disk wait behind it (benchmarks/CATCHUP.md). So the
    copy is written back every ``flush_bytes`` while it is made: no write-back may leave more
    than that (plus a step and SQLite's page cache) unwritten, and it ends sound and equal."""
    live = tmp_path / "sessions.db"
    live_store(live, mode, rows=30000)  # ~7 MiB
    out = tmp_path / "copy.db"
    sizes: list[int] = []
    fdatasync = os.fdatasync

    def noted(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(tmp_path / ".copy.db.partial")):
            sizes.append(os.fstat(fd).st_size)
        fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", noted)
    flush, step = 256 << 10, 16
    result = snapshot(live, out, pages=step, flush_bytes=flush)
    copied = result.size
    assert copied > 5 << 20
    # Every write-back between steps, each after about flush_bytes more of the copy.
    assert len(sizes) >= copied // (flush + step * result.page_size) - 1
    gaps = [b - a for a, b in zip([0, *sizes], [*sizes, copied], strict=True)]
    slack = step * result.page_size + (2 << 20)  # a step, and SQLite's default page cache
    assert max(gaps) <= flush + slack, gaps
    assert sound(out) == 30000 and result.sha256 == sha256_file(out)
    # flush_bytes=0: only at the end, as before (the copy is the same file).
    sizes.clear()
    again = snapshot(live, tmp_path / "again.db", pages=step, flush_bytes=0)
    assert sizes == [] and again.sha256 == result.sha256
