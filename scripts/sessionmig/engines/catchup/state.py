"""The pass's files: the private state directory, the snapshot of the live store kept
there between passes (named by its sha256), the base it is compared with, and the
refusals of a wrong live file, a stale base or a pass that would move sessions back."""

from __future__ import annotations

import dataclasses
import os
import re
import sqlite3
import stat
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from sessionmig.errors import ParameterError, SourceError
from sessionmig.rules import merge as M
from sessionmig.rules.transform import Rules
from sessionmig.sqlite.snapshot import SnapshotResult, private_dir, take
from sessionmig.sqlite.source import Backup, in_background, open_backup, sha256_file

if TYPE_CHECKING:  # pandas is heavy; only the notebook's functions need it
    pass

from sessionmig.engines.catchup.chain import BaseNotCurrent, Chain, Progress
from sessionmig.engines.catchup.delta import Delta, diff
from sessionmig.engines.catchup.priority import _idle_priority

SNAPSHOT_NAME = "{sha256}.db"


def _base_file(chain: Chain, sqlite_path: Path, state_dir: Path, given: Path | None) -> Path:
    if given is not None:
        return given
    if chain.last_pass == 0:
        return sqlite_path
    return state_dir / SNAPSHOT_NAME.format(sha256=chain.base_sha256)


def _refuse_stale_base(base: Path, sha: str, chain: Chain) -> None:
    if sha == chain.base_sha256:
        return
    if chain.last_pass == 0:
        raise BaseNotCurrent(
            f"{base}: sha256 {sha} is not the backup the latest migrate run "
            f"({chain.migrate_run_id}) loaded ({chain.migrate_sha256}); sqlite_path must name "
            "the migrated snapshot"
        )
    raise BaseNotCurrent(
        f"{base}: sha256 {sha} is not the base of the next pass: pass {chain.last_pass} "
        f"already carried the snapshot {chain.base_sha256} into PostgreSQL, so this base's "
        "changes would be applied twice; refused. Run the same command again without naming a "
        "base: it takes the last snapshot from state_dir"
    )


def _private_state_dir(state_dir: Path) -> None:
    """``state_dir`` holds live tokens: created 0700, refused when others may read it or when
    it lies inside a report folder (reports are shared; tokens must never be)."""
    for folder in (state_dir, *state_dir.parents):
        if (folder / "manifest.json").is_file():
            raise ParameterError(
                f"state_dir {state_dir} is inside the report folder {folder}: snapshots hold "
                "session tokens and must never be published with a report; choose a private "
                "directory, e.g. /var/lib/sessionmig/catchup"
            )
    private_dir(state_dir)
    if not state_dir.is_dir():
        raise ParameterError(f"state_dir {state_dir} is not a directory")
    mode = stat.S_IMODE(state_dir.stat().st_mode)
    if mode & 0o077:
        raise ParameterError(
            f"state_dir {state_dir} is open to others (mode {mode:o}); it will hold session "
            f"tokens: run chmod 700 {state_dir}, or give a new path"
        )


def _keep_snapshot(taken: SnapshotResult, state_dir: Path) -> tuple[Path, bool]:
    """Name the new snapshot by its sha256; whether this pass created that file (an identical
    one already there — the last pass's, when nothing changed — is the same file, and is never
    this pass's to remove)."""
    final = state_dir / SNAPSHOT_NAME.format(sha256=taken.sha256)
    incoming = Path(taken.path)
    if final.exists():
        incoming.unlink()
        return final, False
    os.rename(incoming, final)
    return final, True


_INCOMING = re.compile(r"^\.incoming-.*-(?P<pid>[0-9]+)\.db$")
_PARTIAL = re.compile(r"^\.\.?incoming-.*\.partial-(?P<pid>[0-9]+)-[0-9a-f]+(-journal)?$")


def _incoming_name(run_id: str) -> str:
    """Where a pass writes its snapshot before it is named by its sha256; the pid lets a later
    pass tell a killed pass's leftovers from a running one's."""
    return f".incoming-{run_id}-{os.getpid()}.db"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ours(name: str) -> bool:
    return (name.endswith(".db") and len(name) == 67) or name.startswith(
        (".incoming-", "..incoming-")
    )


def _prune(state_dir: Path, keep: set[Path]) -> None:
    """After a commit: remove the snapshots no pass can need any more (they hold tokens) — all
    but the new head and its base — and whatever a killed or refused pass left (incoming
    copies, partial snapshots and their journals). Safe while another pass runs: a pass that
    has not committed yet will be refused by the chain this commit moved."""
    for item in state_dir.iterdir():
        if _ours(item.name) and item.resolve() not in keep:
            item.unlink(missing_ok=True)


def _prune_dead(state_dir: Path) -> None:
    """Before a pass: remove the incoming copies and partial snapshots of passes whose process
    is gone (killed mid-way: each is a full copy of the store, tokens inside). A running pass's
    files are left alone."""
    for item in state_dir.iterdir():
        found = _INCOMING.match(item.name) or _PARTIAL.match(item.name)
        if found and not _alive(int(found["pid"])):
            item.unlink(missing_ok=True)


@dataclass(frozen=True)
class _Snapshots:
    """The SQLite side of a pass: the base (open), the live store's new snapshot (at the path
    ``take`` wrote, hashed), and their delta."""

    base: Backup
    taken: SnapshotResult
    delta: Delta


def _read_snapshots(
    base_file: Path,
    chain: Chain,
    live_path: Path,
    incoming: Path,
    rules: Rules,
    batch_rows: int,
    evidence: bool,
    kept: Path | None = None,
) -> _Snapshots:
    """Open and hash the base, snapshot the live store to ``incoming``, hash the snapshot while
    SQLite compares it with the base. When the base is ``evidence`` (the migrated backup), it
    is hashed again once the diff has read it, and a change raises before anything is locked in
    PostgreSQL. On failure nothing is left open and ``incoming`` is gone. With ``kept`` (the
    snapshot a pass carried in part began with), that file is the live side instead of a new
    snapshot, and it must still have the sha256 that names it."""
    base = open_backup(base_file)  # hashed on a thread meanwhile
    try:
        if kept is None:
            taken, snapshot = take(live_path, incoming, check=False, replace=True), incoming
        else:
            taken, snapshot = _resumed(kept, live_path), kept
        try:
            _idle_priority()  # the live file is no longer read: no lock of the app's to hold
            # The copy is hashed on a thread while SQLite compares it with the base.
            digest = in_background(sha256_file, snapshot)
            _refuse_stale_base(base_file, base.sha256, chain)
            _refuse_rolled_back_file(snapshot, live_path)
            delta = diff(base, snapshot, rules, batch_rows, taken.sessions)
            # Every read of the base is done: its re-hash runs here, idle like the rest of the
            # SQLite side, rather than beside the transaction at the caller's priority.
            if evidence:
                base.verify_unchanged()
            sha = digest.result()
            if kept is not None and kept.name != SNAPSHOT_NAME.format(sha256=sha):
                raise SourceError(
                    f"{kept}: its sha256 is now {sha}, not the one it is named by: the snapshot "
                    "a pass carried in part began with was changed in state_dir; nothing was "
                    "changed in PostgreSQL — restore it, or find out what wrote to it"
                )
            taken = dataclasses.replace(taken, sha256=sha)
        except BaseException:
            if kept is None:
                incoming.unlink(missing_ok=True)
            raise
    except BaseException:
        base.close()
        raise
    return _Snapshots(base, taken, delta)


def _resumed(kept: Path, live_path: Path) -> SnapshotResult:
    """The kept snapshot as the live side of a pass finished from it (no new copy taken)."""
    return SnapshotResult(
        live_path=str(live_path),
        path=str(kept),
        sha256="",
        size=kept.stat().st_size,
        pages=0,
        page_size=0,
        journal_mode="kept (a pass finished from its first snapshot)",
        sessions=None,
        seconds=0.0,
        waited_s=0.0,
        attempts=0,
        restarts=0,
        step_pages=-1,
        check="skipped",
    )


ROLLBACK_MARKER = "sessionmig_rollback_passes"
"""The table a rollback during the overlap writes into the live SQLite file, in the SQLite
transaction of its merge (:mod:`sessionmig.engines.overlap`)."""


def _refuse_rolled_back_file(snapshot_path: Path, live_path: Path) -> None:
    """Refuse a live file a rollback during the overlap already wrote PostgreSQL's changes into
    (its marker, read from the pass's own snapshot of it): carried again they would count twice.
    The target's audit row says the same where it was written; this holds where it was not."""
    conn = sqlite3.connect(snapshot_path.resolve().as_uri() + "?mode=ro&immutable=1", uri=True)
    try:
        marked = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (ROLLBACK_MARKER,)
        ).fetchone()
        rows = (
            conn.execute(f"SELECT count(*) FROM {ROLLBACK_MARKER}").fetchone() if marked else None
        )
    except sqlite3.DatabaseError as exc:
        raise SourceError(f"{live_path}: its snapshot cannot be read ({exc})") from None
    finally:
        conn.close()
    if rows and rows[0]:
        raise BaseNotCurrent(
            f"{live_path}: a rollback during the overlap already carried PostgreSQL's changes "
            f"into this file (its table {ROLLBACK_MARKER} says so): a catch-up pass would carry "
            "them back and count them twice. Nothing was changed; to cut over again, take a new "
            "snapshot and migrate it"
        )


CLOCK_MARGIN = timedelta(minutes=10)
"""How much earlier than the base's latest instant a session created in live may say it was
created (a transaction begun before the base's snapshot and committed after it; clocks)."""


def _refuse_going_back(delta: Delta, live_path: Path, base_file: Path) -> None:
    """Refuse a live snapshot that is not a later state of the base's store: carried, it
    would count requests back down and end every session created since the older file."""
    pairs = [(sid, delta.base.get(sid), delta.live.get(sid)) for sid in delta.ids]
    back = M.going_back(pairs)
    older = M.created_before_base(
        [p for p in pairs if p[0] not in delta.base_rejected], CLOCK_MARGIN, datetime.now(UTC)
    )
    if older:
        back[M.BEFORE_BASE] = older
    if back:
        raise SourceError(
            f"{live_path}: not a later state of the store the base {base_file} was taken from: "
            f"{M.describe_going_back(back)}. The app only counts requests up, never changes "
            "created_at and creates sessions as of now, so this file is older than the base or "
            "another store (a restored backup, another environment's file). Nothing was "
            "changed; point live_sqlite_path at the file the old colour writes to now"
        )


def _kept_file(progress: Progress, state_dir: Path) -> Path:
    """The live snapshot a pass carried in part began with: it is finished from that one."""
    kept = state_dir / SNAPSHOT_NAME.format(sha256=progress.live_sha256)
    if not kept.is_file():
        raise ParameterError(
            f"catch-up pass {progress.number} is carried in part ({progress.through:,} of "
            f"{progress.of:,} sessions, {progress.parts} parts committed) from the live snapshot "
            f"{progress.live_sha256}, and {kept} is not there: a pass carried in part is "
            "finished from the snapshot it began with. Nothing was changed; give the state_dir "
            "the run that began it used"
        )
    return kept
