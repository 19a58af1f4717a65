"""Take a consistent copy of the live SQLite session store while the app keeps writing to it.

The copy is made with SQLite's online backup API (``sqlite3.Connection.backup``), a few pages
per step with a short pause between steps, from a connection opened **read only**
(``mode=ro``): it takes only the locks any reader takes, never a write lock, never rolls back a
hot journal, never checkpoints the WAL on close. So the live file is never modified beyond what
a reader does (in WAL mode a reader may create the ``-wal``/``-shm`` files SQLite needs).

Why the app's writers never see SQLITE_BUSY because of us:

* **WAL mode**: readers never block writers. The copy holds one read transaction for its whole
  duration, so every step reads the same committed state (consistent, no restarts) while the
  app commits beside it; the WAL merely grows until the copy ends.
* **Rollback-journal mode**: a reader's SHARED lock makes a committing writer wait (in its busy
  handler; the legacy manager waits up to 30 s) until the step ends. Each step therefore holds
  the lock for a few pages only. A commit between steps makes SQLite restart the copy, so a
  busy store could restart forever: after repeated restarts the step grows (×8) until the copy
  fits in one step — never beyond ``max_hold_s`` of estimated lock time, which stays far below
  the app's busy timeout. The copy only ever waits; it never makes the writer wait for a lock
  the writer already needs (we never ask for RESERVED), so SQLite never answers the writer
  BUSY at once to break a deadlock.

The copy is written to a private temporary file (0600; its directory created 0700 when this
creates it), converted to a self-contained rollback-journal file, checked, fsynced and then
linked into place (never over an existing file unless asked), and its sha256 returned.

Why the copy is flushed to disk as it goes (every ``flush_bytes``, between steps): the new
colour's PostgreSQL may share the disk. Left to itself the kernel keeps the whole copy in the
page cache and writes it all at once when the copy's commit asks for fsync — half a gigabyte
for a million sessions, a few hundred milliseconds in which every commit of PostgreSQL waits for
its WAL flush behind it (measured: the app's p99 went from ~10 ms to ~250 ms, see
``benchmarks/CATCHUP.md``). Flushed a few MiB at a time, the disk never has more than that
queued ahead of a WAL flush; the copy is as durable in the end as before (fsynced before it is
linked into place).
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from sessionmig.errors import SourceError
from sessionmig.sqlite.source import SIDE_FILES, SQLITE_HEADER, sha256_file

PAGES_PER_STEP = 1024  # 4 MiB at the default 4 KiB page: one step reads it in ms
PAUSE_S = 0.001  # between steps in rollback-journal mode: a waiting writer goes first
BUSY_TIMEOUT_S = 60.0
MAX_HOLD_S = 5.0  # longest read lock one step may hold (the legacy app waits up to 30 s)
RESTARTS_BEFORE_GROWING = 2
GROWTH = 8
BUSY_POLL_MS = 50
FLUSH_BYTES = 4 << 20  # written back between steps once this much of the copy is unflushed


class SnapshotError(SourceError):
    """The live store could not be copied consistently; the live file was not touched."""


@dataclass(frozen=True)
class SnapshotResult:
    """One consistent copy of the live store."""

    live_path: str
    path: str
    sha256: str
    size: int
    pages: int
    page_size: int
    journal_mode: str  # of the live file: "wal" or a rollback-journal mode
    sessions: int | None  # rows of the sessions table in the copy (None: no such table)
    seconds: float
    waited_s: float  # time spent waiting for the live file's locks
    attempts: int  # copies started (restarted ones included)
    restarts: int  # times SQLite restarted a copy because the app committed meanwhile
    step_pages: int  # pages per step of the copy that completed (-1: all in one step)
    check: str  # "ok" from quick_check, or "skipped"


class _Restart(Exception):
    """Raised from the progress callback to abandon a copy that keeps restarting."""


class _Waited(Exception):
    """Raised from the progress callback when the live file stayed locked too long."""


def private_dir(directory: Path) -> None:
    """Create ``directory`` and each missing parent 0700; leave existing ones as they are."""
    missing = [d for d in (directory, *directory.parents) if not d.exists()]
    for folder in reversed(missing):
        folder.mkdir(mode=0o700, exist_ok=True)
        os.chmod(folder, 0o700)  # mkdir's mode is filtered by the umask


def _fsync(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_live(live: Path) -> None:
    if not live.is_file():
        raise SnapshotError(f"{live}: no such file; give the path the app's sessions.db is at")
    with open(live, "rb") as handle:
        header = handle.read(len(SQLITE_HEADER))
    if header != SQLITE_HEADER:
        raise SnapshotError(f"{live}: not a SQLite database (first bytes {header[:16]!r})")


def _page_size(live: Path) -> int:
    """The page size the file's header gives (read without a lock: it changes only when the
    whole file is rewritten, and it only paces the write-back)."""
    with open(live, "rb") as handle:
        header = handle.read(18)
    size = int.from_bytes(header[16:18], "big")
    return 65536 if size == 1 else max(size, 512)


def _open_live(live: Path, busy_timeout_s: float) -> sqlite3.Connection:
    # mode=ro: no write lock, no hot-journal rollback, no checkpoint on close. isolation_level
    # None: we open and end the read transaction ourselves.
    uri = live.resolve().as_uri() + "?mode=ro"
    try:
        return sqlite3.connect(uri, uri=True, timeout=busy_timeout_s, isolation_level=None)
    except sqlite3.Error as exc:
        raise SnapshotError(f"{live}: cannot open it for reading ({exc})") from None


def snapshot(
    live_db: str | Path,
    out_db: str | Path,
    *,
    pages: int = PAGES_PER_STEP,
    pause_s: float = PAUSE_S,
    busy_timeout_s: float = BUSY_TIMEOUT_S,
    max_hold_s: float = MAX_HOLD_S,
    check: bool = True,
    replace: bool = False,
    flush_bytes: int = FLUSH_BYTES,
) -> SnapshotResult:
    """Copy ``live_db`` consistently to ``out_db`` (0600) while the app writes to it; its
    sha256 is computed and returned.

    ``pages`` per step, ``pause_s`` between steps; the live file's locks are waited for up to
    ``busy_timeout_s`` in all; in rollback-journal mode no step is grown beyond an estimated
    ``max_hold_s`` of read lock. The copy is written back to disk between steps whenever
    ``flush_bytes`` of it are unflushed (0: only at its end, all at once). ``check`` runs
    ``PRAGMA quick_check`` on the copy. Raises
    :class:`SnapshotError` (nothing written at ``out_db``) when no consistent copy could be
    made; the app's writes are never failed.
    """
    started = time.perf_counter()
    taken = take(
        live_db,
        out_db,
        pages=pages,
        pause_s=pause_s,
        busy_timeout_s=busy_timeout_s,
        max_hold_s=max_hold_s,
        check=check,
        replace=replace,
        flush_bytes=flush_bytes,
    )
    digest = sha256_file(Path(taken.path))
    return dataclasses.replace(taken, sha256=digest, seconds=time.perf_counter() - started)


def take(
    live_db: str | Path,
    out_db: str | Path,
    *,
    pages: int = PAGES_PER_STEP,
    pause_s: float = PAUSE_S,
    busy_timeout_s: float = BUSY_TIMEOUT_S,
    max_hold_s: float = MAX_HOLD_S,
    check: bool = True,
    replace: bool = False,
    flush_bytes: int = FLUSH_BYTES,
) -> SnapshotResult:
    """:func:`snapshot` without the sha256 (``sha256`` is empty): for a caller that hashes the
    copy on a thread beside other work (catch-up hashes it while SQLite compares)."""
    started = time.perf_counter()
    live = Path(live_db).resolve()
    out = Path(out_db).resolve()
    _check_live(live)
    if out == live or any(str(out) == str(live) + side for side in (*SIDE_FILES, "-shm")):
        raise SnapshotError(f"{out}: that is the live store itself; give a new path")
    if out.exists() and not replace:
        raise SnapshotError(f"{out} exists; a snapshot is never written over another file")
    private_dir(out.parent)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
    # Created 0600 before SQLite opens it; SQLite gives its journal the same permissions.
    os.close(os.open(partial, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    source = _open_live(live, busy_timeout_s)
    try:
        copied = _copy(
            source, partial, live, started, pages, pause_s, busy_timeout_s, max_hold_s, flush_bytes
        )
        result = _finish(partial, out, live, started, copied, check, replace)
    except BaseException:
        for leftover in (partial, Path(str(partial) + "-journal")):
            leftover.unlink(missing_ok=True)
        raise
    finally:
        source.close()
    return result


@dataclass
class _Copy:
    journal_mode: str
    waited_s: float = 0.0
    attempts: int = 0
    restarts: int = 0
    step_pages: int = PAGES_PER_STEP
    flushes: int = 0  # write-backs of the copy between steps


def _copy(
    source: sqlite3.Connection,
    partial: Path,
    live: Path,
    started: float,
    pages: int,
    pause_s: float,
    busy_timeout_s: float,
    max_hold_s: float,
    flush_bytes: int = FLUSH_BYTES,
) -> _Copy:
    """Run backup attempts until one completes without a restart."""
    asked = time.perf_counter()
    try:
        # The first read waits (in SQLite's busy handler) while a writer holds the file.
        mode = str(source.execute("PRAGMA journal_mode").fetchone()[0]).lower()
    except sqlite3.OperationalError as exc:  # locked for longer than busy_timeout_s
        raise SnapshotError(
            f"{live}: could not read it within {busy_timeout_s:.0f} s ({exc})"
        ) from None
    first_read_s = time.perf_counter() - asked
    # From here a locked file answers BUSY to us quickly, so that every wait is counted (and
    # bounded by busy_timeout_s in all) between steps instead of hidden inside one.
    source.execute(f"PRAGMA busy_timeout = {BUSY_POLL_MS}")
    state = _Copy(mode, step_pages=pages, waited_s=first_read_s if first_read_s > 0.01 else 0.0)
    wal = mode == "wal"
    pages_per_s: float | None = None
    while True:
        state.attempts += 1
        target = sqlite3.connect(partial)
        # In WAL mode readers never hold up a writer: no pause needed between steps.
        progress = _Progress(state, 0.0 if wal else pause_s, busy_timeout_s, started)
        if flush_bytes > 0:
            progress.flusher = _Flusher(partial, max(1, flush_bytes // _page_size(live)))
        try:
            if wal:
                # One read transaction for the whole copy: every step sees the same commit.
                source.execute("BEGIN")
                source.execute("SELECT count(*) FROM sqlite_master").fetchone()
            source.backup(target, pages=state.step_pages, progress=progress, sleep=pause_s)
            state.restarts += progress.restarts
            return state
        except _Restart:
            state.restarts += progress.restarts
        except _Waited:
            raise SnapshotError(
                f"{live}: stayed locked by a writer for more than {busy_timeout_s:.0f} s in all; "
                "nothing was copied. Is a long write transaction running? Try again later"
            ) from None
        except sqlite3.Error as exc:
            raise SnapshotError(f"{live}: the copy failed ({exc}); nothing was written") from None
        finally:
            target.close()
            if progress.flusher is not None:
                progress.flusher.close()
                state.flushes += progress.flusher.flushes
            if wal and source.in_transaction:
                source.execute("COMMIT")
        pages_per_s = progress.pages_per_s or pages_per_s
        total = progress.total
        # The app commits faster than a copy in steps this small completes: grow the step.
        grown = state.step_pages * GROWTH
        if grown >= total:
            estimate = total / pages_per_s if pages_per_s else 0.0
            if estimate > max_hold_s:
                raise SnapshotError(
                    f"{live}: the app commits too often for a consistent copy in steps, and one "
                    f"step of all {total} pages would hold the read lock ~{estimate:.1f} s "
                    f"(max_hold_s {max_hold_s}); switch the store to WAL "
                    "(PRAGMA journal_mode=WAL, readers then never block writers) or raise "
                    "max_hold_s below the app's busy timeout"
                )
            grown = -1
        state.step_pages = grown
        # A fresh destination for the next attempt (the abandoned one holds a partial copy).
        partial.unlink()
        os.close(os.open(partial, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))


class _Flusher:
    """Writes the copy back to disk once ``every`` pages were copied since the last time, so
    that the kernel never holds more than that of it to write at once (see the module
    docstring). Its own descriptor: ``fdatasync`` writes back every page of the file, whoever
    wrote it."""

    def __init__(self, path: Path, every: int) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        self.every = every
        self.pending = 0
        self.flushes = 0

    def copied(self, pages: int) -> None:
        self.pending += pages
        if self.pending >= self.every:
            os.fdatasync(self.fd)
            self.pending = 0
            self.flushes += 1

    def close(self) -> None:
        os.close(self.fd)


class _Progress:
    """The backup's progress callback: pauses between steps, detects restarts and waits."""

    def __init__(self, state: _Copy, pause_s: float, busy_timeout_s: float, started: float):
        self.state = state
        self.pause_s = pause_s
        self.busy_timeout_s = busy_timeout_s
        self.started = started
        self.last_remaining: int | None = None
        self.restarts = 0
        self.total = 0
        self.copied_pages = 0
        self.copy_s = 0.0
        self.step_start = time.perf_counter()
        self.flusher: _Flusher | None = None

    @property
    def pages_per_s(self) -> float | None:
        return self.copied_pages / self.copy_s if self.copy_s > 0 and self.copied_pages else None

    def __call__(self, status: int, remaining: int, total: int) -> None:
        now = time.perf_counter()
        self.total = total
        if status in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            # The live file is write-locked: count the wait; give up only after the limit.
            self.state.waited_s += now - self.step_start
            if self.state.waited_s > self.busy_timeout_s:
                raise _Waited
            self.step_start = time.perf_counter()
            return
        if self.last_remaining is not None and remaining >= self.last_remaining:
            # No progress although the step succeeded: SQLite restarted the copy because the
            # live file changed between steps.
            self.restarts += 1
            if self.state.step_pages != -1 and self.restarts >= RESTARTS_BEFORE_GROWING:
                raise _Restart
            done = total - remaining  # the restarted copy's first step wrote these again
        else:
            done = (self.last_remaining if self.last_remaining is not None else total) - remaining
            self.copied_pages += done
            self.copy_s += now - self.step_start
        self.last_remaining = remaining
        if remaining and self.flusher is not None:
            # Between steps, so the live file's read lock (rollback-journal mode) is free.
            self.flusher.copied(done)
        if remaining and self.pause_s:
            time.sleep(self.pause_s)  # the lock is free now: a waiting writer goes first
        self.step_start = time.perf_counter()


def _finish(
    partial: Path,
    out: Path,
    live: Path,
    started: float,
    copied: _Copy,
    check: bool,
    replace: bool,
) -> SnapshotResult:
    """Make the copy self-contained, check it, and put it in place with its sha256."""
    conn = sqlite3.connect(partial, isolation_level=None)
    try:
        # A copy of a WAL store is a WAL file: make it one self-contained file, so opening it
        # later (read only, immutable) needs no -wal/-shm beside it.
        conn.execute("PRAGMA journal_mode=DELETE")
        verdict = "skipped"
        if check:
            messages = [r[0] for r in conn.execute("PRAGMA quick_check")]
            if messages != ["ok"]:
                raise SnapshotError(f"{live}: the copy fails quick_check: {messages[:3]}")
            verdict = "ok"
        page_count = conn.execute("PRAGMA page_count").fetchone()[0]
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        has_sessions = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'sessions'"
        ).fetchone()
        sessions = (
            conn.execute("SELECT count(*) FROM sessions").fetchone()[0] if has_sessions else None
        )
    finally:
        conn.close()
    os.chmod(partial, 0o600)
    _fsync(partial)
    if replace:
        os.replace(partial, out)
    else:
        try:
            os.link(partial, out)  # atomic and never over an existing file
        except FileExistsError:
            raise SnapshotError(f"{out} appeared meanwhile; nothing was replaced") from None
        partial.unlink()
    _fsync(out.parent)
    return SnapshotResult(
        live_path=str(live),
        path=str(out),
        sha256="",  # hashed by snapshot() or by the caller
        size=out.stat().st_size,
        pages=page_count,
        page_size=page_size,
        journal_mode=copied.journal_mode,
        sessions=sessions,
        seconds=time.perf_counter() - started,
        waited_s=copied.waited_s,
        attempts=copied.attempts,
        restarts=copied.restarts,
        step_pages=copied.step_pages,
        check=verdict,
    )
