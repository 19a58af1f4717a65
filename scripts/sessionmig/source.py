"""Open the SQLite backup as evidence: hash it, read a private copy, stream its raw rows.

The original file (and any ``-wal``/``-journal`` beside it, which may hold committed rows of a
backup copied from a running app) is only ever read to hash and copy. All queries run against a
private copy in a temporary directory, so SQLite's own recovery cannot touch the evidence.
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import SourceError
from .transform import COLUMNS

_STORAGE = {
    b"null": "null",
    b"integer": "integer",
    b"real": "real",
    b"text": "text",
    b"blob": "blob",
}
SQLITE_HEADER = b"SQLite format 3\x00"
SIDE_FILES = ("-wal", "-journal")
EXPECTED_SCHEMA = {
    "session_id": "TEXT",
    "user_id": "TEXT",
    "metadata": "TEXT",
    "created_at": "TIMESTAMP",
    "expires_at": "TIMESTAMP",
    "last_activity": "TIMESTAMP",
    "request_count": "INTEGER",
}


@dataclass(frozen=True)
class FileHash:
    """One source file and its sha256."""

    path: str
    sha256: str
    size: int


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def hash_files(path: Path) -> tuple[FileHash, ...]:
    """Hashes of the backup and of each side file present beside it."""
    files = [path] + [Path(str(path) + s) for s in SIDE_FILES if Path(str(path) + s).exists()]
    return tuple(FileHash(str(f), sha256_file(f), f.stat().st_size) for f in files)


@dataclass
class Backup:
    """An open private copy of a backup; use :func:`open_backup`."""

    original: Path
    copy: Path
    hashes_before: tuple[FileHash, ...]
    connection: sqlite3.Connection
    columns: dict[str, str] = field(default_factory=dict)
    hashes_after: tuple[FileHash, ...] = ()

    @property
    def sha256(self) -> str:
        return self.hashes_before[0].sha256

    @property
    def side_files(self) -> list[str]:
        return [Path(h.path).name for h in self.hashes_before[1:]]

    @property
    def missing_columns(self) -> list[str]:
        return [c for c in COLUMNS if c not in self.columns]

    @property
    def extra_columns(self) -> list[str]:
        return [c for c in self.columns if c not in EXPECTED_SCHEMA]

    def integrity_check(self) -> list[str]:
        """``PRAGMA integrity_check`` messages; ``['ok']`` for a sound file."""
        try:
            rows = self.connection.execute("PRAGMA integrity_check").fetchall()
            return [r[0].decode("utf-8", "replace") for r in rows]
        except sqlite3.DatabaseError as exc:
            return [f"integrity_check could not run: {exc}"]

    def count(self) -> int:
        return self._query("SELECT count(*) FROM sessions").fetchone()[0]

    def query(self, statement: str, params: tuple = ()) -> sqlite3.Cursor:
        """Run a read query on the private copy, turning SQLite errors into SourceError."""
        return self._query(statement, params)

    def _query(self, statement: str, params: tuple = ()) -> sqlite3.Cursor:
        try:
            return self.connection.execute(statement, params)
        except sqlite3.ProgrammingError:
            raise  # our bug, not a damaged file
        except sqlite3.DatabaseError as exc:
            raise SourceError(
                f"{self.original}: reading failed ({exc}); the file is damaged — take a fresh "
                "backup or restore it from a verified copy"
            ) from None

    def rows(
        self, batch: int = 10_000, order: str = "rowid", extra: tuple[str, ...] = ()
    ) -> Iterator[list[tuple]]:
        """Raw rows in batches: ``(rowid, 7 values, 7 storage classes)``, then the ``extra``
        columns' values and storage classes; text as bytes."""
        if order not in ("rowid", "session_id"):
            raise ValueError(order)
        unknown = [c for c in extra if c not in self.columns]
        if unknown:
            raise ValueError(f"no such columns: {unknown}")
        names = (*COLUMNS, *extra)
        # Column names come from the file's own schema, quoted as SQLite identifiers.
        values = ", ".join('"' + c.replace('"', '""') + '"' for c in names)
        types = ", ".join('typeof("' + c.replace('"', '""') + '")' for c in names)
        cursor = self._query(f"SELECT rowid, {values}, {types} FROM sessions ORDER BY {order}")
        while True:
            try:
                chunk = cursor.fetchmany(batch)
            except sqlite3.DatabaseError as exc:
                raise SourceError(
                    f"{self.original}: reading rows failed ({exc}); the file is damaged — take "
                    "a fresh backup"
                ) from None
            if not chunk:
                return
            # text_factory=bytes also makes typeof() bytes; the rules speak str.
            yield [
                row[:8] + tuple(map(_STORAGE.__getitem__, row[8:]))
                if not extra
                else _with_extras(row, len(extra))
                for row in chunk
            ]

    def verify_unchanged(self) -> tuple[FileHash, ...]:
        """Re-hash the original files; raise if anything differs from before."""
        self.hashes_after = hash_files(self.original)
        if self.hashes_after != self.hashes_before:
            raise SourceError(
                f"{self.original}: the backup changed while it was being read "
                f"(before {self.hashes_before}, after {self.hashes_after}); is the app still "
                "writing to it? Stop it, take a new backup and start again"
            )
        return self.hashes_after

    def close(self) -> None:
        self.connection.close()
        shutil.rmtree(self.copy.parent, ignore_errors=True)


def _with_extras(row: tuple, k: int) -> tuple:
    """Reorder ``(rowid, 7+k values, 7+k types)`` to ``(rowid, 7 values, 7 types, k, k)``."""
    n = len(COLUMNS)
    values, types = row[1 : 1 + n + k], [_STORAGE[t] for t in row[1 + n + k :]]
    return (row[0], *values[:n], *types[:n], *values[n:], *types[n:])


def _check_header(path: Path) -> None:
    with open(path, "rb") as handle:
        header = handle.read(len(SQLITE_HEADER))
    if header != SQLITE_HEADER:
        raise SourceError(
            f"{path}: not a SQLite database (first bytes {header[:16]!r}); check sqlite_path "
            "points at the sessions.db backup, not another file"
        )


def open_backup(path: str | Path, workdir: str | Path | None = None) -> Backup:
    """Hash the backup, copy it (with side files) privately, open the copy and read its schema."""
    original = Path(path)
    if not original.is_file():
        raise SourceError(f"{original}: no such file; check sqlite_path")
    _check_header(original)
    before = hash_files(original)
    private = Path(tempfile.mkdtemp(prefix="sessionmig-src-", dir=workdir))
    copy = private / "sessions.db"
    for item in before:
        shutil.copyfile(item.path, str(copy) + item.path[len(str(original)) :])
    if hash_files(original) != before:
        raise SourceError(f"{original}: changed while being copied; stop the writer and retry")
    # The copy is private and used by one caller at a time, possibly from a worker thread.
    connection = sqlite3.connect(copy, check_same_thread=False)
    connection.text_factory = bytes
    backup = Backup(original, copy, before, connection)
    try:
        info = connection.execute("PRAGMA table_info(sessions)").fetchall()
    except sqlite3.DatabaseError as exc:
        backup.close()
        raise SourceError(
            f"{original}: cannot read the schema ({exc}); the file is damaged or truncated"
        ) from None
    if not info:
        backup.close()
        raise SourceError(
            f"{original}: has no table 'sessions'; is this the SessionManager's sessions.db?"
        )
    backup.columns = {r[1].decode(): r[2].decode().upper() for r in info}
    return backup
