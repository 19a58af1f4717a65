"""Named, documented analysis queries that give the same answer on the SQLite backup and on
PostgreSQL, so a before/after comparison is one call.

PostgreSQL runs them on the live table in a read-only transaction with a statement timeout. The
SQLite side never queries the backup directly: the backup is normalised once by the migration's
own rules into a private *analysis copy* (instants as UTC microseconds, metadata printed as
jsonb prints it, rows that cannot land left out — exactly what migrate would load), opened
read-only, with small SQL functions for zone-aware bucketing. Session ids are masked in results
unless asked otherwise.

The analysis copy holds every session id in clear, so it lives in a private cache, never in a
shared temporary directory: ``$XDG_CACHE_HOME/sessionmig/analysis`` (else
``~/.cache/sessionmig/analysis``), mode 0700, one folder per backup named by the sha256 of the
backup (and of its ``-wal``/``-journal``), of the rules and of this package's code, holding
``analysis.db`` (0600). It is built once per backup — in a temporary folder inside the cache,
renamed into place when complete, the temporary folder always removed — and reused by every
later query on the same files and rules; a different backup, zone or code never reuses it.
Copies unused for :data:`KEEP_UNUSED` are removed when the next one is built;
:func:`remove_analysis_copies` removes them all, :meth:`AnalysisCopy.remove` one.

Free SQL (:func:`run_free_sql`) is read-only on both stores and masks every session id in its
result whatever the column is called: see :mod:`sessionmig.readonly`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import stat
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pandas as pd
from psycopg import sql

from . import params as P
from . import readonly
from .connect import connect
from .errors import ParameterError, SourceError
from .jsonb import metadata_text
from .keys import duplicate_rejects
from .mask import mask_id
from .source import FileHash, hash_files, open_backup
from .transform import Reject, Rules, normalise

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MICROS = timedelta(microseconds=1)
ISO_PG = """to_char({} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"""


@dataclass(frozen=True)
class Param:
    """One query parameter: its name, kind (instant, zone, int, str, unit), default, meaning."""

    name: str
    kind: str
    default: Any
    help: str


@dataclass(frozen=True)
class Query:
    """A named query with the same meaning in both dialects."""

    name: str
    description: str
    params: tuple[Param, ...]
    postgres: str
    sqlite: str
    post: Callable[[pd.DataFrame], pd.DataFrame] | None = field(default=None, compare=False)


AT = Param("at", "instant", None, "the instant (default: as_of)")
START = Param("start", "instant", None, "window start (default: 7 days before as_of)")
END = Param("end", "instant", None, "window end, exclusive (default: as_of)")
UNIT = Param("unit", "unit", "hour", "bucket size: hour or day")
ZONE = Param("timezone", "zone", None, "IANA zone of the buckets (default: source_timezone)")
TOP = Param("top_n", "int", 10, "how many rows to keep")


def _share(df: pd.DataFrame) -> pd.DataFrame:
    df["share_pct"] = (100 * df["sessions"] / df.pop("total")).round(2)
    return df


QUERIES: tuple[Query, ...] = (
    Query(
        "active_at",
        "sessions active at an instant (created <= at < expires), anonymous among them",
        (AT,),
        "SELECT count(*) AS active, count(*) FILTER (WHERE user_id IS NULL) AS anonymous "
        "FROM {sessions} WHERE created_at <= %(at)s AND expires_at > %(at)s",
        "SELECT count(*) AS active, coalesce(sum(user_id IS NULL), 0) AS anonymous "
        "FROM sessions WHERE created_at <= :at AND expires_at > :at",
    ),
    Query(
        "active_over_time",
        "peak concurrent sessions per local hour or day within a window",
        (START, END, UNIT, ZONE),
        """WITH ev AS (SELECT created_at AS t, 1 AS d FROM {sessions}
                       UNION ALL SELECT expires_at, -1 FROM {sessions}),
                run AS (SELECT t, sum(d) OVER (ORDER BY t, d ROWS UNBOUNDED PRECEDING) AS n
                        FROM ev)
           SELECT to_char(date_trunc(%(unit)s, t AT TIME ZONE %(timezone)s),
                          'YYYY-MM-DD HH24:MI') AS bucket, max(n)::bigint AS peak
           FROM run WHERE t >= %(start)s AND t < %(end)s GROUP BY 1 ORDER BY 1""",
        """WITH ev AS (SELECT created_at AS t, 1 AS d FROM sessions
                       UNION ALL SELECT expires_at, -1 FROM sessions),
                run AS (SELECT t, sum(d) OVER (ORDER BY t, d ROWS UNBOUNDED PRECEDING) AS n
                        FROM ev)
           SELECT tz_bucket(t, :timezone, :unit) AS bucket, max(n) AS peak
           FROM run WHERE t >= :start AND t < :end GROUP BY 1 ORDER BY 1""",
    ),
    Query(
        "sessions_per_user",
        "users with the most sessions (top N), anonymous as one row, with shares",
        (TOP,),
        """SELECT coalesce(user_id, '(anonymous)') AS user_id, count(*) AS sessions,
                  sum(count(*)) OVER ()::bigint AS total
           FROM {sessions} GROUP BY user_id
           ORDER BY sessions DESC, coalesce(user_id, '(anonymous)') COLLATE "C"
           LIMIT %(top_n)s""",
        """SELECT coalesce(user_id, '(anonymous)') AS user_id, count(*) AS sessions,
                  sum(count(*)) OVER () AS total
           FROM sessions GROUP BY user_id ORDER BY sessions DESC, 1 LIMIT :top_n""",
        _share,
    ),
    Query(
        "request_count_distribution",
        "how many sessions made how many requests (buckets of width)",
        (Param("width", "int", 10, "bucket width in requests"),),
        """SELECT (floor(request_count::numeric / %(width)s) * %(width)s)::bigint AS from_count,
                  count(*) AS sessions FROM {sessions} GROUP BY 1 ORDER BY 1""",
        """SELECT floordiv(request_count, :width) * :width AS from_count, count(*) AS sessions
           FROM sessions GROUP BY 1 ORDER BY 1""",
    ),
    Query(
        "lifetime_hours",
        "session lifetime (expires - created) in whole hours",
        (),
        """SELECT floor(extract(epoch FROM expires_at - created_at) / 3600)::bigint AS hours,
                  count(*) AS sessions FROM {sessions} GROUP BY 1 ORDER BY 1""",
        """SELECT floordiv(expires_at - created_at, 3600000000) AS hours, count(*) AS sessions
           FROM sessions GROUP BY 1 ORDER BY 1""",
    ),
    Query(
        "ttl_used",
        "share of the lifetime used before the last activity, in tenths "
        "(sessions with last_activity inside their lifetime)",
        (),
        """SELECT least(10 * (extract(epoch FROM last_activity - created_at) * 1000000)::bigint
                        / (extract(epoch FROM expires_at - created_at) * 1000000)::bigint, 10)
                  AS tenths_used, count(*) AS sessions
           FROM {sessions}
           WHERE expires_at > created_at AND last_activity >= created_at
             AND last_activity <= expires_at
           GROUP BY 1 ORDER BY 1""",
        """SELECT min(10 * (last_activity - created_at) / (expires_at - created_at), 10)
                  AS tenths_used, count(*) AS sessions
           FROM sessions
           WHERE expires_at > created_at AND last_activity >= created_at
             AND last_activity <= expires_at
           GROUP BY 1 ORDER BY 1""",
    ),
    Query(
        "metadata_keys",
        "top-level metadata keys in use and how many sessions carry each",
        (),
        """SELECT k AS key, count(*) AS sessions FROM {sessions},
                  jsonb_object_keys(CASE WHEN jsonb_typeof(metadata) = 'object'
                                         THEN metadata END) AS k
           GROUP BY 1 ORDER BY 2 DESC, k COLLATE "C" """,
        """SELECT j.key AS key, count(*) AS sessions FROM sessions, json_each(sessions.metadata) j
           WHERE json_type(sessions.metadata) = 'object' GROUP BY 1 ORDER BY 2 DESC, 1""",
    ),
    Query(
        "metadata_top_values",
        "most frequent string values of each top-level metadata key",
        (Param("top_n", "int", 3, "values kept per key"),),
        """WITH kv AS (SELECT e.key, e.value #>> '{{}}' AS value FROM {sessions},
                          jsonb_each(CASE WHEN jsonb_typeof(metadata) = 'object'
                                          THEN metadata END) AS e
                       WHERE jsonb_typeof(e.value) = 'string'),
                c AS (SELECT key, value, count(*) AS sessions FROM kv GROUP BY 1, 2),
                r AS (SELECT *, row_number() OVER (PARTITION BY key ORDER BY sessions DESC,
                                                   value COLLATE "C") AS rank FROM c)
           SELECT key, value, sessions FROM r WHERE rank <= %(top_n)s
           ORDER BY key COLLATE "C", sessions DESC, value COLLATE "C" """,
        """WITH kv AS (SELECT j.key, j.value FROM sessions, json_each(sessions.metadata) j
                       WHERE json_type(sessions.metadata) = 'object' AND j.type = 'text'),
                c AS (SELECT key, value, count(*) AS sessions FROM kv GROUP BY 1, 2),
                r AS (SELECT *, row_number() OVER (PARTITION BY key ORDER BY sessions DESC,
                                                   value) AS rank FROM c)
           SELECT key, value, sessions FROM r WHERE rank <= :top_n
           ORDER BY key, sessions DESC, value""",
    ),
    Query(
        "anomalies",
        "the inspect rules on the live table: rows breaking each one",
        (),
        """SELECT count(*) FILTER (WHERE expires_at < created_at) AS expires_before_created,
                  count(*) FILTER (WHERE last_activity < created_at OR last_activity > expires_at)
                      AS last_activity_outside_lifetime,
                  count(*) FILTER (WHERE request_count < 0) AS negative_request_count,
                  count(*) AS rows FROM {sessions}""",
        """SELECT coalesce(sum(expires_at < created_at), 0) AS expires_before_created,
                  coalesce(sum(last_activity < created_at OR last_activity > expires_at), 0)
                      AS last_activity_outside_lifetime,
                  coalesce(sum(request_count < 0), 0) AS negative_request_count,
                  count(*) AS rows FROM sessions""",
    ),
    Query(
        "cutover_watch",
        "active sessions at each hour since a cutover, beside the same hour a "
        "week earlier (the digest's 24 h watch)",
        (
            Param("cutover", "instant", None, "the cutover instant (default: as_of)"),
            Param("hours", "int", 24, "how many hours to watch"),
        ),
        """SELECT h AS hour, (SELECT count(*) FROM {sessions}
                              WHERE created_at <= w.t AND expires_at > w.t) AS active,
                  (SELECT count(*) FROM {sessions}
                   WHERE created_at <= w.t - interval '7 days'
                     AND expires_at > w.t - interval '7 days') AS week_before
           FROM (SELECT h, %(cutover)s::timestamptz + h * interval '1 hour' AS t
                 FROM generate_series(0, %(hours)s - 1) AS h) AS w ORDER BY h""",
        """WITH RECURSIVE w(h) AS (SELECT 0 WHERE :hours > 0
                                  UNION ALL SELECT h + 1 FROM w WHERE h + 1 < :hours)
           SELECT h AS hour,
                  (SELECT count(*) FROM sessions WHERE created_at <= :cutover + h * 3600000000
                     AND expires_at > :cutover + h * 3600000000) AS active,
                  (SELECT count(*) FROM sessions
                   WHERE created_at <= :cutover + h * 3600000000 - 604800000000
                     AND expires_at > :cutover + h * 3600000000 - 604800000000) AS week_before
           FROM w ORDER BY h""",
    ),
    Query(
        "user_sessions",
        "one user's sessions, newest first (ids hashed unless shown)",
        (Param("user_id", "str", "", "the user to list"), Param("limit", "int", 50, "rows")),
        f"""SELECT session_id, {ISO_PG.format("created_at")} AS created_at,
                   {ISO_PG.format("expires_at")} AS expires_at,
                   {ISO_PG.format("last_activity")} AS last_activity, request_count
            FROM {{sessions}} WHERE user_id = %(user_id)s
            ORDER BY created_at DESC, session_id COLLATE "C" LIMIT %(limit)s""",
        """SELECT session_id, iso(created_at) AS created_at, iso(expires_at) AS expires_at,
                  iso(last_activity) AS last_activity, request_count
           FROM sessions WHERE user_id = :user_id
           ORDER BY sessions.created_at DESC, session_id LIMIT :limit""",
    ),
)
BY_NAME = {q.name: q for q in QUERIES}


def get(name: str) -> Query:
    if name not in BY_NAME:
        raise ParameterError(
            f"no query named {name!r}; `sessionmig query --list` shows them: {', '.join(BY_NAME)}"
        )
    return BY_NAME[name]


def listing() -> list[str]:
    """One line per query: its name first, then what it answers and its parameters."""
    lines = []
    for q in QUERIES:
        args = ", ".join(f"{p.name}: {p.kind} = {p.default!r}" for p in q.params)
        lines.append(f"{q.name} — {q.description}" + (f" ({args})" if args else ""))
    return lines


def resolve(query: Query, given: dict[str, Any], as_of: datetime, zone: str) -> dict[str, Any]:
    """Typed parameter values with defaults; unknown names are refused."""
    unknown = sorted(set(given) - {p.name for p in query.params})
    if unknown:
        raise ParameterError(
            f"query {query.name} has no parameter {unknown}; it takes "
            f"{', '.join(p.name for p in query.params) or 'none'}"
        )
    out: dict[str, Any] = {}
    for p in query.params:
        value = given.get(p.name, p.default)
        if p.kind == "instant":
            default = as_of - timedelta(days=7) if p.name == "start" else as_of
            value = P.parse_instant(value, p.name) or default
        elif p.kind == "zone":
            value = str(value or zone)
            P.zone(value)
        elif p.kind == "int":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ParameterError(f"{p.name}={value!r} must be a whole number >= 0")
        elif p.kind == "unit":
            if value not in ("hour", "day"):
                raise ParameterError(f"{p.name}={value!r}: choose hour or day")
        else:
            value = "" if value is None else str(value)
        out[p.name] = value
    return out


def _micros(moment: datetime) -> int:
    return (moment - EPOCH) // MICROS


def _tz_bucket(micros: int | None, zone: str, unit: str) -> str | None:
    if micros is None:
        return None
    local = (EPOCH + micros * MICROS).astimezone(ZoneInfo(zone))
    local = local.replace(minute=0, second=0, microsecond=0)
    if unit == "day":
        local = local.replace(hour=0)
    return local.strftime("%Y-%m-%d %H:%M")


def _iso(micros: int | None) -> str | None:
    if micros is None:
        return None
    return (EPOCH + micros * MICROS).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _floordiv(a: int | None, b: int | None) -> int | None:
    return None if a is None or not b else a // b


COPY_NAME = "analysis.db"
META_NAME = "meta.json"
BUILD_PREFIX = ".build-"
# Long enough for a migration weekend's before/after queries; a copy holds raw tokens, so not
# longer.
KEEP_UNUSED = timedelta(days=3)
# A build folder this old was left by a killed process (a build takes minutes at most).
STALE_BUILD = timedelta(hours=6)


def analysis_cache_dir() -> Path:
    """Where analysis copies live: the user's cache (XDG), never a shared /tmp."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"
    return root / "sessionmig" / "analysis"


def _private_dir(path: Path) -> Path:
    """``path`` created 0700, owned by this user and not a symlink, or an error."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise SourceError(
            f"{path}: not a directory of this user; the analysis copy holds session tokens, so "
            "it is kept only in a private folder. Remove it or set XDG_CACHE_HOME"
        )
    if info.st_mode & 0o077:
        path.chmod(0o700)
    return path


def _code_fingerprint() -> str:
    """The package's code: a copy made by other rules' code is never reused."""
    digest = hashlib.sha256()
    for module in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(module.name.encode() + b"\0" + module.read_bytes())
    return digest.hexdigest()


def _copy_key(hashes: tuple[FileHash, ...], rules: Rules) -> str:
    main = hashes[0]
    digest = hashlib.sha256()
    for side in hashes[1:]:  # a -wal or -journal holds rows too
        digest.update(f"{side.path[len(main.path) :]}={side.sha256}\n".encode())
    digest.update(repr(rules).encode() + b"\n" + _code_fingerprint().encode())
    return f"{main.sha256}-{digest.hexdigest()[:16]}"


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _age(path: Path) -> timedelta:
    return timedelta(seconds=max(0.0, time.time() - path.stat().st_mtime))


def prune_analysis_copies(
    older_than: timedelta = KEEP_UNUSED, cache_dir: str | Path | None = None
) -> int:
    """Remove the copies not used for ``older_than`` (and builds left by killed processes);
    how many folders went."""
    root = Path(cache_dir) if cache_dir else analysis_cache_dir()
    if not root.is_dir():
        return 0
    removed = 0
    for entry in root.iterdir():
        try:
            limit = STALE_BUILD if entry.name.startswith(BUILD_PREFIX) else older_than
            if _age(entry) < limit:
                continue
        except FileNotFoundError:
            continue  # another process removed it meanwhile
        shutil.rmtree(entry, ignore_errors=True)
        removed += 1
    return removed


def remove_analysis_copies(cache_dir: str | Path | None = None) -> int:
    """Remove every analysis copy (the next query on a backup builds it again); how many."""
    return prune_analysis_copies(timedelta(0), cache_dir)


@dataclass
class AnalysisCopy:
    """The backup normalised for analysis (see the module docstring); a private file."""

    path: Path
    rows: int
    left_out: int
    built: bool = False  # whether this call built it (False: reused from the cache)

    @classmethod
    def build(
        cls,
        sqlite_path: str | Path,
        rules: Rules,
        batch_rows: int = P.default("batch_rows"),
        cache_dir: str | Path | None = None,
    ) -> AnalysisCopy:
        """The analysis copy of ``sqlite_path`` under ``rules``: the cached one when this
        backup was already normalised by these rules and this code, else built now."""
        root = _private_dir(Path(cache_dir) if cache_dir else analysis_cache_dir())
        prune_analysis_copies(cache_dir=root)
        original = Path(sqlite_path)
        if not original.is_file():
            raise SourceError(f"{original}: no such file; check sqlite_path")
        hashes = hash_files(original)
        entry = root / _copy_key(hashes, rules)
        found = cls._cached(entry)
        if found is not None:
            return found
        work = Path(tempfile.mkdtemp(prefix=BUILD_PREFIX, dir=root))
        try:
            kept, left_out = _fill(work / COPY_NAME, original, hashes, rules, batch_rows)
            meta = {"rows": kept, "left_out": left_out, "backup": [h.sha256 for h in hashes]}
            _write_private(work / META_NAME, json.dumps(meta).encode())
            try:
                # Atomic: a folder under the final name is always complete.
                os.rename(work, entry)
            except OSError:
                found = cls._cached(entry)  # another process finished the same copy first
                if found is None:
                    raise
                return found
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return cls(entry / COPY_NAME, kept, left_out, built=True)

    @classmethod
    def _cached(cls, entry: Path) -> AnalysisCopy | None:
        try:
            meta = json.loads((entry / META_NAME).read_text())
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (OSError, ValueError):
            shutil.rmtree(entry, ignore_errors=True)  # damaged: built again
            return None
        path = entry / COPY_NAME
        if not path.is_file():
            shutil.rmtree(entry, ignore_errors=True)
            return None
        os.utime(entry)  # its last use, for pruning
        return cls(path, meta["rows"], meta["left_out"])

    def remove(self) -> None:
        """Remove this copy (its folder in the cache)."""
        if (self.path.parent / META_NAME).exists():
            shutil.rmtree(self.path.parent, ignore_errors=True)

    def connect(self, timeout_s: float) -> sqlite3.Connection:
        return self.open(timeout_s)[0]

    def open(self, timeout_s: float) -> tuple[sqlite3.Connection, readonly.SqliteGuard]:
        """A connection that can only read the copy (see :func:`readonly.guard_sqlite`)."""
        # immutable: SQLite never writes, locks or creates a side file for this file.
        uri = self.path.resolve().as_uri() + "?mode=ro&immutable=1"
        conn = sqlite3.connect(uri, uri=True)
        conn.create_function("tz_bucket", 3, _tz_bucket, deterministic=True)
        conn.create_function("iso", 1, _iso, deterministic=True)
        conn.create_function("floordiv", 2, _floordiv, deterministic=True)
        return conn, readonly.guard_sqlite(conn, timeout_s)


def _fill(
    path: Path, original: Path, hashes: tuple[FileHash, ...], rules: Rules, batch_rows: int
) -> tuple[int, int]:
    """Normalise the backup into a new file at ``path``; rows kept and left out."""
    _write_private(path, b"")  # created 0600 before SQLite writes a byte into it
    kept = left_out = 0
    # Any private copy open_backup makes of a backup with side files goes into our folder.
    with (
        open_backup(original, workdir=path.parent) as backup,
        contextlib.closing(sqlite3.connect(path)) as out,
    ):
        if backup.hashes_before != hashes:
            raise SourceError(
                f"{original}: changed while the analysis copy was being made; is the app still "
                "writing to it? Stop it, take a new backup and start again"
            )
        out.execute(
            "CREATE TABLE sessions (session_id TEXT PRIMARY KEY, user_id TEXT, "
            "metadata TEXT, created_at INTEGER, expires_at INTEGER, "
            "last_activity INTEGER, request_count INTEGER)"
        )
        # Exactly what migrate lands: a repeated session_id only once, by the same rule.
        repeated = duplicate_rejects(backup, rules)
        for batch in backup.rows(batch_rows, extra=rules.extra_columns):
            rows = []
            for raw in batch:
                result = normalise(raw, rules)
                if isinstance(result, Reject) or raw[0] in repeated:
                    left_out += 1
                    continue
                sid, user, meta, created, expires, last, count = result
                rows.append(
                    (
                        sid,
                        user,
                        None if meta is None else metadata_text(meta),
                        _micros(created),
                        _micros(expires),
                        _micros(last),
                        count,
                    )
                )
            out.executemany("INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            kept += len(rows)
        out.execute("CREATE INDEX idx_expires_at ON sessions(expires_at)")
        out.commit()
        backup.verify_unchanged()
    return kept, left_out


@dataclass(frozen=True)
class Backends:
    """Where queries run: a PostgreSQL DSN and schema, and/or an analysis copy of the backup."""

    dsn: str | None = None
    schema: str = P.default("target_schema")
    analysis: AnalysisCopy | None = None
    timeout_s: float = 30.0


def _frame(columns: list[str], rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=columns)


def run_sql_postgres(
    statement: Any, values: dict[str, Any], dsn: str, timeout_s: float, limit: int
) -> pd.DataFrame:
    conn = connect(dsn, "query", read_only=True, statement_timeout_ms=int(timeout_s * 1000))
    with conn:
        cur = conn.execute(statement, values)
        rows = cur.fetchmany(limit) if cur.description else []
        columns = [c.name for c in cur.description or []]
    return _frame(columns, rows)


def run_sql_sqlite(
    statement: str, values: dict[str, Any], analysis: AnalysisCopy, timeout_s: float, limit: int
) -> pd.DataFrame:
    conn, guard = analysis.open(timeout_s)
    try:
        cur = conn.execute(statement, values)
        rows = cur.fetchmany(limit) if cur.description else []
        columns = [c[0] for c in cur.description or []]
    except sqlite3.Error as exc:
        raise ParameterError(readonly.sqlite_message(exc, guard, timeout_s)) from None
    finally:
        conn.close()
    return _frame(columns, rows)


def mask_ids(frame: pd.DataFrame, show_ids: bool) -> pd.DataFrame:
    """Session ids are bearer tokens: hashed unless ``show_ids`` was asked for explicitly."""
    if not show_ids and "session_id" in frame.columns:
        frame["session_id"] = frame["session_id"].map(mask_id)
    return frame


def run(
    name: str,
    source: str,
    backends: Backends,
    values: dict[str, Any],
    *,
    show_ids: bool = False,
    limit: int = 1000,
) -> pd.DataFrame:
    """Run a named query on ``source`` (``postgres`` or ``sqlite``) with resolved values."""
    query = get(name)
    if source == "postgres":
        if not backends.dsn:
            raise ParameterError("no PostgreSQL target configured for --source postgres")
        statement = sql.SQL(query.postgres).format(
            sessions=sql.Identifier(backends.schema, "sessions")
        )  # type: ignore[arg-type]
        frame = run_sql_postgres(statement, values, backends.dsn, backends.timeout_s, limit)
    elif source == "sqlite":
        if backends.analysis is None:
            raise ParameterError("no SQLite backup configured for --source sqlite")
        lite = {k: _micros(v) if isinstance(v, datetime) else v for k, v in values.items()}
        frame = run_sql_sqlite(query.sqlite, lite, backends.analysis, backends.timeout_s, limit)
    else:
        raise ParameterError(f"--source {source!r}: choose sqlite or postgres")
    if query.post:
        frame = query.post(frame)
    return mask_ids(frame, show_ids)


def run_free_sql(
    text: str, source: str, backends: Backends, *, show_ids: bool = False, limit: int = 1000
) -> pd.DataFrame:
    """An analyst's own SQL: one read-only statement over the table ``sessions`` (on
    PostgreSQL in ``target_schema``), stopped at the timeout, with every session id in the
    result masked unless ``show_ids`` (see :mod:`sessionmig.readonly`)."""
    if source == "postgres":
        if not backends.dsn:
            raise ParameterError("no PostgreSQL target configured")
        columns, rows = readonly.run_postgres(
            text, backends.dsn, backends.schema, backends.timeout_s, limit, show_ids
        )
        return _frame(columns, rows)
    if source != "sqlite":
        raise ParameterError(f"--source {source!r}: choose sqlite or postgres")
    if backends.analysis is None:
        raise ParameterError("no SQLite backup configured")
    conn, guard = backends.analysis.open(backends.timeout_s)
    lookup = readonly.sqlite_lookup(conn)
    try:
        cur = conn.execute(text)  # sqlite3 refuses a text holding more than one statement
        rows = cur.fetchmany(limit) if cur.description else []
        columns = [c[0] for c in cur.description or []]
        return _frame(columns, readonly.mask_rows(columns, rows, lookup, show_ids))
    except (sqlite3.Error, ValueError) as exc:
        error = exc if isinstance(exc, sqlite3.Error) else sqlite3.ProgrammingError(str(exc))
        message = readonly.sqlite_message(error, guard, backends.timeout_s)
        raise ParameterError(message if show_ids else readonly.mask_text(message, None)) from None
    finally:
        conn.close()


def to_text(frame: pd.DataFrame, fmt: str) -> str:
    """A result as a terminal table, CSV or JSON lines (one object a row; ``[]`` when there
    is none, so a script reading it always gets JSON)."""
    if fmt == "csv":
        return frame.to_csv(index=False)
    if fmt == "json":
        if not len(frame):
            return "[]"
        return "\n".join(
            json.dumps(r, default=str, ensure_ascii=False) for r in frame.to_dict(orient="records")
        )
    return frame.to_string(index=False) if len(frame) else "(no rows)"


def backends_for(settings: Any, sources: tuple[str, ...], timeout_s: float = 30.0) -> Backends:
    """Backends for a step's settings: the target (``postgres``) and/or the analysis copy of
    the backup (``sqlite``)."""
    analysis = (
        AnalysisCopy.build(settings.sqlite_path, settings.rules) if "sqlite" in sources else None
    )
    dsn = settings.dsn() if "postgres" in sources else None
    return Backends(dsn=dsn, schema=settings.target_schema, analysis=analysis, timeout_s=timeout_s)


def run_many(
    names: list[str],
    sources: tuple[str, ...],
    backends: Backends,
    settings: Any,
    common: dict[str, Any],
    show_ids: bool = False,
) -> dict[str, pd.DataFrame]:
    """Run several named queries with the parameters each declares, taken from ``common``
    (empty values mean the query's default); with two sources, the results sit side by side."""
    out: dict[str, pd.DataFrame] = {}
    for name in names:
        query = get(name)
        given = {
            p.name: common[p.name] for p in query.params if common.get(p.name) not in (None, "")
        }
        values = resolve(query, given, settings.as_of, settings.source_timezone)
        frames = [
            run(name, s, backends, values, show_ids=show_ids).assign(source=s) for s in sources
        ]
        out[name] = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    return out
