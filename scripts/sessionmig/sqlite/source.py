"""Open the SQLite backup as evidence: hash it, open it read only, stream its raw rows.

The original file (and any ``-wal``/``-journal`` beside it, which may hold committed rows of a
backup copied from a running app) is never written: a lone file is opened read-only and
immutable; one with side files is copied privately first, so that SQLite's own recovery cannot
touch the evidence.
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from sessionmig import defaults as D
from sessionmig.errors import SourceError
from sessionmig.rules.transform import COLUMNS

T = TypeVar("T")

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


def side_files_of(path: Path) -> list[Path]:
    """The ``-wal``/``-journal`` files present beside a backup."""
    return [Path(str(path) + s) for s in SIDE_FILES if Path(str(path) + s).exists()]


def hash_files(path: Path) -> tuple[FileHash, ...]:
    """Hashes of the backup and of each side file present beside it."""
    files = [path, *side_files_of(path)]
    return tuple(FileHash(str(f), sha256_file(f), f.stat().st_size) for f in files)


def in_background(work: Callable[..., T], *args: Any) -> Future[T]:
    """``work(*args)`` on a thread of its own, so that reading goes on meanwhile (hashlib and
    SQLite release the GIL while they work)."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sessionmig")
    try:
        return pool.submit(work, *args)
    finally:
        pool.shutdown(wait=False)


@dataclass
class Backup:
    """An open backup, read only: ``with open_backup(path) as backup:``."""

    original: Path
    copy: Path | None  # the private copy, when side files made one necessary
    before: tuple[FileHash, ...] | Future[tuple[FileHash, ...]]
    connection: sqlite3.Connection
    uri: str = ""  # what the connection opened, for checks on connections of their own
    columns: dict[str, str] = field(default_factory=dict)
    hashes_after: tuple[FileHash, ...] = ()
    # A WITHOUT ROWID table is read from a copy whose rowids are primary-key positions.
    rowids_by_key: bool = False
    # A column named "rowid" hides SQLite's rowid, which everything here addresses rows by: it is
    # read from a copy where that column has another name (its values and name kept).
    renamed: dict[str, str] = field(default_factory=dict)

    @property
    def hashes_before(self) -> tuple[FileHash, ...]:
        """The files' hashes when opened (computed on a worker thread; waits for it)."""
        if isinstance(self.before, Future):
            self.before = self.before.result()
        return self.before

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

    def quick_check_later(self) -> Future[list[str]]:
        """``PRAGMA quick_check`` (every page and b-tree sound, NOT NULLs held: what a full
        scan of the table relies on, at a tenth of :meth:`integrity_check`'s cost) on a
        connection and thread of its own, beside the reading. ``['ok']`` for a sound file."""
        return in_background(self._quick_check)

    def _quick_check(self) -> list[str]:
        connection = sqlite3.connect(self.uri, uri=True)
        try:
            return [r[0] for r in connection.execute("PRAGMA quick_check").fetchall()]
        except sqlite3.DatabaseError as exc:
            return [f"quick_check could not run: {exc}"]
        finally:
            connection.close()

    @property
    def session_id_unique(self) -> bool:
        """Whether the file itself keeps session_ids unique (a primary key or unique index on
        exactly that column, whatever its collation: none is finer than byte equality)."""
        for _, name, unique, _, partial in self._query("PRAGMA index_list(sessions)"):
            if unique and not partial:
                quoted = '"' + name.decode().replace('"', '""') + '"'
                columns = [r[2] for r in self._query(f"PRAGMA index_info({quoted})")]
                if columns == [b"session_id"]:
                    return True
        return False

    def colliding_rowids(self) -> list[int]:
        """Rowids of the rows that may share a session_id with another row once it is read as
        text: numbers (``123`` and ``'123'`` are one key) and, unless the file keeps the column
        unique, every row of a repeated value. Empty for a sound SessionManager file, where the
        primary key's index answers this at no cost."""
        numbers = self._query(
            "SELECT rowid, session_id FROM sessions WHERE session_id < ''"
        ).fetchall()
        found = {rowid for rowid, _ in numbers}
        spelled = sorted({repr(v) if isinstance(v, float) else str(v) for _, v in numbers})
        for start in range(0, len(spelled), 500):
            chunk = spelled[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            found.update(
                r[0]
                for r in self._query(
                    f"SELECT rowid FROM sessions WHERE session_id IN ({marks})", tuple(chunk)
                )
            )
        if not self.session_id_unique:
            found.update(
                r[0]
                for r in self._query(
                    "SELECT rowid FROM sessions WHERE session_id IN (SELECT session_id "
                    "FROM sessions GROUP BY session_id HAVING count(*) > 1)"
                )
            )
        return sorted(found)

    def estimated_rows(self) -> int:
        """The largest rowid: the row count, or a little above it after deletions, at no cost
        (the count itself scans an index). For progress bars."""
        return self._query("SELECT coalesce(max(rowid), 0) FROM sessions").fetchone()[0]

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
        self,
        batch: int = D.BATCH_ROWS,
        order: str = "rowid",
        extra: tuple[str, ...] = (),
    ) -> Iterator[list[tuple]]:
        """Raw rows in batches: ``(rowid, 7 values, 7 storage classes)``, then the ``extra``
        columns' values and storage classes; text as bytes."""
        if order not in ("rowid", "session_id"):
            raise ValueError(order)
        unknown = [c for c in extra if c not in self.columns]
        if unknown:
            raise ValueError(f"no such columns: {unknown}")
        yield from self._raw_batches(extra, f"ORDER BY {order}", (), batch)

    def raw_row(self, rowid: int, extra: tuple[str, ...] = ()) -> tuple:
        """One row in the form of :meth:`rows`."""
        row = self._raw_cursor(extra, "WHERE rowid = ?", (rowid,)).fetchone()
        if row is None:
            raise SourceError(f"{self.original}: row {rowid} vanished while it was being read")
        return shaped(row, len(extra))

    def raw_rows_between(
        self,
        first: int,
        last: int,
        extra: tuple[str, ...] = (),
        batch: int = D.BATCH_ROWS,
    ) -> Iterator[list[tuple]]:
        """The rows with ``first <= rowid <= last``, in batches, in the form of :meth:`rows`."""
        where = "WHERE rowid BETWEEN ? AND ? ORDER BY rowid"
        yield from self._raw_batches(extra, where, (first, last), batch)

    def _raw_batches(
        self, extra: tuple[str, ...], where: str, params: tuple, batch: int
    ) -> Iterator[list[tuple]]:
        k = len(extra)
        for chunk in self.batches(self._raw_cursor(extra, where, params), batch):
            yield [shaped(row, k) for row in chunk]

    def _raw_cursor(self, extra: tuple[str, ...], where: str, params: tuple) -> sqlite3.Cursor:
        names = [self.renamed.get(c, c) for c in (*COLUMNS, *extra)]
        # Column names come from the file's own schema, quoted as SQLite identifiers.
        values = ", ".join('"' + c.replace('"', '""') + '"' for c in names)
        types = ", ".join('typeof("' + c.replace('"', '""') + '")' for c in names)
        return self._query(f"SELECT rowid, {values}, {types} FROM sessions {where}", params)

    def batches(self, cursor: sqlite3.Cursor, batch: int) -> Iterator[list[tuple]]:
        """A cursor's rows in lists of ``batch``; a read error is a :class:`SourceError`."""
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
            yield chunk

    def verify_unchanged_later(self) -> Future[tuple[FileHash, ...]]:
        """:meth:`verify_unchanged` beside other work, once every read is done."""
        return in_background(self.verify_unchanged)

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

    def __enter__(self) -> Backup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the file and remove the private copy, if one was made."""
        self.connection.close()
        if self.copy is not None:
            shutil.rmtree(self.copy.parent, ignore_errors=True)


def shaped(row: tuple, k: int) -> tuple:
    """A fetched raw row in the form of :meth:`Backup.rows`, with ``k`` extra columns.
    (``text_factory=bytes`` makes ``typeof()`` bytes too; the rules speak str.)"""
    if not k:
        return row[:8] + tuple(map(_STORAGE.__getitem__, row[8:]))
    return _with_extras(row, k)


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
    """Hash the backup, open it for reading only, and read its schema.

    A lone file is opened in place with ``mode=ro&immutable=1``: the OS refuses SQLite any
    write and SQLite takes no lock, so reading cannot touch it (the hash after the run proves
    nothing else did). With a ``-wal`` or ``-journal`` beside it, SQLite would replay those
    into the file on opening, so the file and its side files are copied to a private directory
    and the copy is opened instead.
    """
    original = Path(path)
    if not original.is_file():
        raise SourceError(f"{original}: no such file; check sqlite_path")
    _check_header(original)
    copy: Path | None = None
    before: tuple[FileHash, ...] | Future[tuple[FileHash, ...]]
    if side_files_of(original):
        before = hash_files(original)
        copy = Path(tempfile.mkdtemp(prefix="sessionmig-src-", dir=workdir)) / "sessions.db"
        for item in before:
            shutil.copyfile(item.path, str(copy) + item.path[len(str(original)) :])
        if hash_files(original) != before:
            shutil.rmtree(copy.parent, ignore_errors=True)
            raise SourceError(f"{original}: changed while being copied; stop the writer and retry")
        uri = copy.resolve().as_uri()
    else:
        # Hashed while the caller checks the file; any change is caught by the hash after.
        before = in_background(hash_files, original)
        uri = original.resolve().as_uri() + "?mode=ro&immutable=1"
    # Used by one caller at a time, possibly from a worker thread.
    connection = sqlite3.connect(uri, uri=True, check_same_thread=False)
    connection.text_factory = bytes
    backup = Backup(original, copy, before, connection, uri)
    try:
        info = _columns_of(connection)
        hiding = [r[1] for r in info if r[1].decode("utf-8", "replace").lower() == "rowid"]
        names = [r[1].decode("utf-8", "replace") for r in info]
        if info and (hiding or not _has_rowid(connection, names)):
            by_key = not _has_rowid(connection, names)
            renamed = {name.decode(): _HIDDEN_ROWID_COLUMN for name in hiding}
            backup.close()
            copy = _rowid_copy(uri, info, workdir, renamed, keep_rowids=not by_key)
            uri = copy.resolve().as_uri() + "?mode=ro"
            connection = sqlite3.connect(uri, uri=True, check_same_thread=False)
            connection.text_factory = bytes
            backup = Backup(
                original, copy, before, connection, uri, rowids_by_key=by_key, renamed=renamed
            )
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


def extra_columns_of(path: str | Path) -> tuple[str, ...]:
    """The columns of a backup's sessions table beyond the legacy schema, read from its schema
    alone (read only and immutable, no hash): what ``on_extra_columns`` decides about."""
    uri = Path(path).resolve().as_uri() + "?mode=ro&immutable=1"
    try:
        with closing(sqlite3.connect(uri, uri=True)) as connection:
            info = _columns_of(connection)
    except sqlite3.DatabaseError:
        return ()  # open_backup says what is wrong with the file, with the file's name
    return tuple(r[1] for r in info if r[1] not in EXPECTED_SCHEMA)


def _columns_of(connection: sqlite3.Connection) -> list[tuple]:
    """The sessions table's columns as ``PRAGMA table_info`` rows, generated columns included
    (``table_info`` leaves them out; ``table_xinfo`` marks them hidden 2 or 3, and a SELECT
    reads their values like any other's)."""
    rows = connection.execute("PRAGMA table_xinfo(sessions)").fetchall()
    return [r[:6] for r in rows if r[6] != 1]  # 1: a virtual table's hidden column


def _has_rowid(connection: sqlite3.Connection, names: Iterable[str] = ()) -> bool:
    """Whether sessions is a rowid table, asked under a name of the rowid that no column
    hides (``WITHOUT ROWID`` tables have none)."""
    taken = {n.lower() for n in names}
    alias = next((a for a in ("rowid", "_rowid_", "oid") if a not in taken), None)
    if alias is None:
        return True  # every name is a column's; the copy orders rows by position then
    try:
        connection.execute(f"SELECT {alias} FROM sessions LIMIT 0")
    except sqlite3.OperationalError as exc:
        if "rowid" in str(exc):
            return False
        raise
    return True


_HIDDEN_ROWID_COLUMN = "sessionmig: the column named rowid"


def _rowid_copy(
    uri: str,
    info: list[tuple],
    workdir: str | Path | None,
    renamed: dict[str, str] | None = None,
    keep_rowids: bool = False,
) -> Path:
    """A private copy of the sessions table as an ordinary rowid table (everything here
    addresses rows by rowid). A ``WITHOUT ROWID`` table's rows get their positions in
    primary-key order as rowids; a table with a column named ``rowid`` keeps its real rowids
    (read under SQLite's other names for it, ``_rowid_`` or ``oid``) and that column is stored
    under another name (``renamed``). Columns keep their declared types, so every value keeps
    its storage class."""
    renamed = renamed or {}
    copy = Path(tempfile.mkdtemp(prefix="sessionmig-src-", dir=workdir)) / "sessions.db"

    def quoted(name: bytes | str) -> str:
        text = name.decode() if isinstance(name, bytes) else name
        return '"' + text.replace('"', '""') + '"'

    names = [r[1].decode() for r in info]
    taken = {n.lower() for n in names}
    real = next((alias for alias in ("_rowid_", "oid") if alias not in taken), None)
    if keep_rowids and real is None:
        keep_rowids = False  # rowid, _rowid_ and oid are all columns: positions it is
    source_columns = ", ".join(quoted(n) for n in names)
    columns = ", ".join(quoted(renamed.get(n, n)) for n in names)
    declared = ", ".join(
        f"{quoted(renamed.get(n, n))} {r[2].decode()}" for n, r in zip(names, info, strict=True)
    )
    key = ", ".join(quoted(r[1]) for r in sorted((r for r in info if r[5]), key=lambda r: r[5]))
    if keep_rowids:
        into, select, order = f"rowid, {columns}", f"{real}, {source_columns}", real
    else:
        into, select, order = columns, source_columns, key or source_columns
    # Opened as a URI, so that ATTACH reads the backup's URI (read-only, immutable) as one.
    connection = sqlite3.connect(copy.resolve().as_uri(), uri=True)
    try:
        connection.execute("ATTACH DATABASE ? AS src", (uri,))
        connection.execute(f"CREATE TABLE sessions ({declared})")
        connection.execute(
            f"INSERT INTO sessions ({into}) SELECT {select} FROM src.sessions ORDER BY {order}"
        )
        connection.commit()
        connection.execute("DETACH DATABASE src")
    except sqlite3.DatabaseError:
        connection.close()
        shutil.rmtree(copy.parent, ignore_errors=True)
        raise
    connection.close()
    return copy
