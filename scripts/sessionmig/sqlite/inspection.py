"""Profile a backup before migrating it: integrity, schema, counts, spellings, anomalies.

:class:`Census` is a pure accumulator over raw rows (one pass, bounded memory: counters keyed by
day, spelling or reason, and a few examples each); :func:`inspect_backup` runs it over a backup
and turns what it saw into a findings table with severities.
"""

from __future__ import annotations

import gc
import json
import re
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, wait
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from sessionmig import defaults as D
from sessionmig.errors import SourceError
from sessionmig.rules.mask import mask_id, run_salt
from sessionmig.rules.transform import (
    COLUMNS,
    STORAGE,
    TIMESTAMP_COLUMNS,
    VALUE,
    Reject,
    Rules,
    normalise,
    spelling,
    wall_clock_kind,
)
from sessionmig.sqlite.keys import duplicate_rejects
from sessionmig.sqlite.source import EXPECTED_SCHEMA, Backup, FileHash, in_background, open_backup
from sessionmig.sqlite.wire import (
    RulesPath,
    Sure,
    WorkerDied,
    describe,
    in_processes,
    opened_again,
    pg_micros,
    raw_rows,
    spans,
)

EXAMPLES = 3
TIMESTAMP_INDEX = {c: VALUE[c] for c in TIMESTAMP_COLUMNS}


@dataclass(frozen=True)
class Finding:
    """One line of the findings table: ``error`` blocks migration, ``warning`` needs a look."""

    severity: str
    code: str
    count: int
    message: str
    examples: tuple[str, ...] = ()


@dataclass
class Census:
    """One pass over raw rows; every counter is bounded by days, spellings or reasons."""

    rules: Rules
    as_of: datetime
    rows: int = 0
    active: int = 0
    expired: int = 0
    spellings: dict[str, Counter] = field(
        default_factory=lambda: {c: Counter() for c in TIMESTAMP_COLUMNS}
    )
    dst: Counter = field(default_factory=Counter)
    dst_examples: dict[str, list[str]] = field(default_factory=dict)
    nulls: Counter = field(default_factory=Counter)
    empties: Counter = field(default_factory=Counter)
    metadata: Counter = field(default_factory=Counter)
    rejects: Counter = field(default_factory=Counter)
    reject_examples: dict[str, list[str]] = field(default_factory=dict)
    anomalies: Counter = field(default_factory=Counter)
    anomaly_examples: dict[str, list[str]] = field(default_factory=dict)
    created_per_day: Counter = field(default_factory=Counter)
    remaining_ttl_hours: Counter = field(default_factory=Counter)

    def _example(self, book: dict[str, list[str]], key: str, text: str) -> None:
        kept = book.setdefault(key, [])
        if len(kept) < EXAMPLES:
            kept.append(text)

    def add(self, raw: tuple) -> None:
        """Account for one raw row (``source`` layout)."""
        self.rows += 1
        n = len(COLUMNS)
        for i, column in enumerate(COLUMNS):
            storage = raw[1 + n + i]
            if storage == "null":
                self.nulls[column] += 1
            elif storage == "text" and raw[1 + i] == b"":
                self.empties[column] += 1
        for column, index in TIMESTAMP_INDEX.items():
            self._timestamp(column, raw[index], raw[index + n])
        self.metadata[raw[STORAGE["metadata"]]] += 1
        result = normalise(raw, self.rules)
        if isinstance(result, Reject):
            self.rejects[result.reason] += 1
            self._example(
                self.reject_examples,
                result.reason,
                f"rowid {result.rowid} ({mask_id(result.session_id)}): {result.message}",
            )
            return
        session_id, _, metadata, created, expires, last, count = result
        label = f"rowid {raw[0]} ({mask_id(session_id)})"
        if metadata is not None and repeats_a_key(metadata):
            self.anomalies["json_repeated_key"] += 1
            self._example(self.anomaly_examples, "json_repeated_key", label)
        if expires > self.as_of:
            self.active += 1
            hours = int((expires - self.as_of) / timedelta(hours=1))
            self.remaining_ttl_hours[min(hours, 48)] += 1
        else:
            self.expired += 1
        self.created_per_day[created.astimezone(self.rules.zone).date().isoformat()] += 1
        if expires < created:
            self.anomalies["expires_before_created"] += 1
            self._example(self.anomaly_examples, "expires_before_created", label)
        if not created <= last <= expires:
            self.anomalies["last_activity_outside_lifetime"] += 1
            self._example(self.anomaly_examples, "last_activity_outside_lifetime", label)
        if count < 0:
            self.anomalies["negative_request_count"] += 1
            self._example(self.anomaly_examples, "negative_request_count", label)
        if created > self.as_of:
            self.anomalies["created_after_as_of"] += 1
            self._example(self.anomaly_examples, "created_after_as_of", label)

    def add_batch(self, batch: Sure, raw_rows: Callable[[list[int]], Iterable[tuple]]) -> None:
        """Account for a batch of rows (:class:`wire.RulesPath`) exactly as :meth:`add` would
        one row after another: counters, examples, and even the order counters first meet
        each key (``most_common`` breaks ties by it).

        Rows the rules surely land and that hold nothing to report (no anomaly, no DST doubt,
        no repeated key: so no example either) are counted in bulk; every other row is read
        with ``raw_rows(rowids)`` (ascending, in that order) and goes through :meth:`add`."""
        as_of = pg_micros(self.as_of)
        c, e, la, counts = batch.created, batch.expires, batch.last, batch.counts
        quiet = batch.sure & ~batch.repeats
        if len(quiet):
            # The anomalies of :meth:`add`, in integers: such rows go to it for their examples.
            quiet &= (e >= c) & (c <= la) & (la <= e) & (counts >= 0) & (c <= as_of)
        rest = np.flatnonzero(~quiet)
        exact = batch.exact
        if len(rest):
            exact = sorted(exact + [batch.rowids[i] for i in rest.tolist()])
        k = int(np.count_nonzero(quiet))
        if not k:
            for raw in raw_rows(exact):
                self.add(raw)
            return
        pick = np.flatnonzero(quiet)
        every = k == len(quiet)
        rowids = np.array(batch.rowids, dtype=np.int64)[pick]

        def kept(values: list) -> list:
            return values if every else [values[i] for i in pick.tolist()]

        # (counter, key, rows counted, first of the quiet rows with it, order within a row)
        tally: list[tuple[Counter, Any, int, int, int]] = []

        def count(counter: Counter, key: Any, where: np.ndarray, within: int = 0) -> None:
            n = int(np.count_nonzero(where))
            if n:
                tally.append((counter, key, n, int(np.argmax(where)), within))

        def count_values(counter: Counter, values: np.ndarray) -> None:
            keys, first, many = np.unique(values, return_index=True, return_counts=True)
            for key, at, n in zip(keys.tolist(), first.tolist(), many.tolist(), strict=True):
                tally.append((counter, key.decode() if isinstance(key, bytes) else key, n, at, 0))

        sids, uids, metas = kept(batch.session_ids), kept(batch.user_ids), kept(batch.metadata)
        no_user = np.fromiter((u is None for u in uids), bool, k)
        no_meta = np.fromiter((m is None for m in metas), bool, k)
        index = {column: i for i, column in enumerate(COLUMNS)}
        count(self.empties, "session_id", np.fromiter(map(len, sids), np.int64, k) == 0)
        count(self.nulls, "user_id", no_user, index["user_id"])
        count(self.empties, "user_id", np.fromiter((u == b"" for u in uids), bool, k))
        count(self.nulls, "metadata", no_meta, index["metadata"])
        count(self.nulls, "request_count", batch.count_null[quiet], index["request_count"])
        for column, texts in zip(TIMESTAMP_COLUMNS, batch.texts, strict=True):
            long = np.fromiter(map(len, kept(texts)), np.int64, k) == 26
            count(self.spellings[column], _SPELLED[19], ~long)
            count(self.spellings[column], _SPELLED[26], long)
        count(self.metadata, "null", no_meta)
        count(self.metadata, "text", ~no_meta)
        left = e[quiet] - as_of
        active = left > 0
        # Expired rows count as -1 here, and are left out below.
        hours = np.where(active, np.minimum(left // _US_PER_HOUR, 48), -1)
        count_values(self.remaining_ttl_hours, hours)
        # A plain wall-clock time the clock was sure of is in its local day as written.
        count_values(self.created_per_day, np.array(kept(batch.texts[0]), dtype="S10"))
        firsts = sorted(
            (int(rowids[at]), within, i)
            for i, (counter, key, _, at, within) in enumerate(tally)
            if key not in counter and key != -1
        )

        def meet(before: int | None) -> None:
            """Let each counter meet its new keys of quiet rows before ``before``, in order."""
            while firsts and (before is None or firsts[0][0] < before):
                counter, key = tally[firsts.pop(0)[2]][:2]
                counter.setdefault(key, 0)

        for raw in raw_rows(exact):
            meet(raw[0])
            self.add(raw)
        meet(None)
        self.rows += k
        n_active = int(np.count_nonzero(active))
        self.active += n_active
        self.expired += k - n_active
        for counter, key, n, _, _ in tally:
            if key != -1:
                counter[key] += n

    def merge(self, later: Census) -> None:
        """Add the census of the rows after these: as if :meth:`add` had gone on with them
        (counts added, keys met in the order they were, examples the first ones)."""
        self.rows += later.rows
        self.active += later.active
        self.expired += later.expired
        counters = [(getattr(self, name), getattr(later, name)) for name in _COUNTERS]
        counters += [(self.spellings[c], later.spellings[c]) for c in TIMESTAMP_COLUMNS]
        for mine, theirs in counters:
            for key, n in theirs.items():
                mine[key] += n
        for name in ("dst_examples", "reject_examples", "anomaly_examples"):
            book = getattr(self, name)
            for key, texts in getattr(later, name).items():
                kept = book.setdefault(key, [])
                kept.extend(texts[: max(EXAMPLES - len(kept), 0)])

    def _timestamp(self, column: str, value: Any, storage: str) -> None:
        if storage != "text":
            self.spellings[column][f"<{storage}>"] += 1
            return
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            self.spellings[column]["<not utf-8>"] += 1
            return
        self.spellings[column][spelling(text)[:40]] += 1
        try:
            naive = datetime.fromisoformat(text.strip())
        except ValueError:
            return
        if naive.tzinfo is None:
            kind = wall_clock_kind(naive, self.rules.zone)
            if kind != "ok":
                self.dst[kind] += 1
                self._example(self.dst_examples, kind, f"{column}={text}")


_COUNTERS = (
    "dst",
    "nulls",
    "empties",
    "metadata",
    "rejects",
    "anomalies",
    "created_per_day",
    "remaining_ttl_hours",
)
_SPELLED = {19: spelling("2000-01-01 00:00:00"), 26: spelling("2000-01-01 00:00:00.000000")}
_US_PER_HOUR = 3_600_000_000


def _bump(counter: Counter, key: Any, n: int) -> None:
    """``counter[key] += n``, leaving no key behind for nothing (a spelling seen 0 times is
    not a spelling)."""
    if n:
        counter[key] += n


_KEY = re.compile(r'"((?:[^"\\]|\\.)*)"\s*:')


def repeats_a_key(text: str) -> bool:
    """Whether a JSON object in ``text`` names one key twice (``{"a": 1, "a": 2}``): ``jsonb``
    keeps only the last value, so the earlier ones would be silently dropped. A key spelled
    twice is the only way to repeat one, unless escapes spell it differently, so the parse runs
    only then (most rows cost one regex scan)."""
    keys = _KEY.findall(text)
    if len(keys) == len(set(keys)) and "\\u" not in text:
        return False
    repeated = False

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal repeated
        repeated = repeated or len({k for k, _ in items}) != len(items)
        return dict(items)

    try:
        json.loads(text, object_pairs_hook=pairs)
    except (ValueError, RecursionError):
        return False  # not JSON the rules accept: a reject, counted as such
    return repeated


@dataclass(frozen=True)
class InspectResult:
    """Everything the inspect report shows; ``ok`` is False when migrating would be unsafe."""

    path: str
    files: tuple[FileHash, ...]
    integrity: tuple[str, ...]
    columns: dict[str, str]
    census: Census | None
    findings: tuple[Finding, ...]

    @property
    def ok(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)


ANOMALY_WORDS = {
    "json_repeated_key": "metadata JSON names a key twice in one object; jsonb (PostgreSQL, and "
    "what the app reads back) keeps only the last value of each, the earlier ones are dropped",
}


def _integrity_check(uri: str) -> list[str]:
    """``PRAGMA integrity_check`` as :meth:`Backup.integrity_check` runs it, on a connection
    of its own (for a thread of its own)."""
    connection = sqlite3.connect(uri, uri=True, check_same_thread=False)
    connection.text_factory = bytes
    try:
        rows = connection.execute("PRAGMA integrity_check").fetchall()
        return [r[0].decode("utf-8", "replace") for r in rows]
    except sqlite3.DatabaseError as exc:
        return [f"integrity_check could not run: {exc}"]
    finally:
        connection.close()


def _integrity_finding(findings: list[Finding], slot: int, integrity: tuple[str, ...]) -> None:
    if integrity != ("ok",):
        findings.insert(
            slot,
            Finding(
                "error",
                "integrity",
                len(integrity),
                "PRAGMA integrity_check failed: "
                + "; ".join(integrity[:3])
                + " — take a fresh backup; do not migrate this file",
            ),
        )


def take_census(
    census: Census,
    backup: Backup,
    batch_rows: int,
    progress: Callable[[int], None] | None = None,
    fast: bool = True,
) -> None:
    """Every row of ``backup`` into ``census``: plain rows the rules surely land in bulk
    (:meth:`Census.add_batch`; a large backup in :data:`CENSUS_PARTS` processes, merged in
    order with :meth:`Census.merge`), every other row by :meth:`Census.add`, in rowid order, so that
    counts and examples are what :meth:`Census.add` alone makes of every row (``fast=False``)."""
    extra = census.rules.extra_columns
    if not fast or extra:  # extra columns change what metadata holds: the rules decide
        for batch in backup.rows(batch_rows, extra=extra):
            for raw in batch:
                census.add(raw)
            if progress is not None:
                progress(len(batch))
        return
    cut = spans(backup, CENSUS_PARTS)
    if census.rows == 0 and cut and cut[-1][1] - cut[0][0] >= CENSUS_PARTS_FROM:
        # A large backup: each span of rowids in a process of its own, merged in order.
        run_salt()  # the workers mask ids with this run's salt (they inherit it)
        opened = describe(backup)
        works = [
            (opened, census.rules, census.as_of, batch_rows, first, last) for first, last in cut
        ]
        done: dict[int, Census] = {}
        try:
            for index, item in in_processes(_CENSUS_WORKER, works):
                if isinstance(item, Census):
                    done[index] = item
                elif progress is not None:
                    progress(item)
        except WorkerDied:  # killed, out of memory …: this process takes the census itself
            done = {}
        if done:
            for index in sorted(done):
                census.merge(done[index])
            return
    for rows in _census_of(census, backup, batch_rows):
        if progress is not None:
            progress(rows)


CENSUS_PARTS = 2
"""Processes that take the census of a large backup, each a span of its rowids."""
CENSUS_PARTS_FROM = 200_000
"""Rowids from which the census is taken by :data:`CENSUS_PARTS` processes (each costs
about a second to start)."""
_CENSUS_WORKER = (
    "from sessionmig.sqlite.inspection import census_part; "
    "from sessionmig.sqlite.wire import serve; serve(census_part)"
)


def census_part(
    opened: dict[str, Any],
    rules: Rules,
    as_of: datetime,
    batch_rows: int,
    first: int,
    last: int,
) -> Iterator[int | Census]:
    """A worker's census of the rowids ``first..last``: the rows of each batch as it is done
    (for progress), then the census."""
    backup = opened_again(opened)
    census = Census(rules, as_of)
    try:
        yield from _census_of(census, backup, batch_rows, first, last)
        yield census
    finally:
        backup.connection.close()


def _census_of(
    census: Census,
    backup: Backup,
    batch_rows: int,
    first: int | None = None,
    last: int | None = None,
) -> Iterator[int]:
    """The bulk census of the rows (``first..last``), in this process; yields each batch's
    number of rows as it is done."""
    path = RulesPath(census.rules)
    collecting = gc.isenabled()
    gc.disable()  # millions of short-lived tuples, none in a cycle
    try:
        for checked in path.batches(backup, batch_rows, first, last):
            census.add_batch(checked, lambda rowids: raw_rows(backup, rowids))
            yield len(checked.rowids) + len(checked.exact)
    finally:
        if collecting:
            gc.enable()


def findings_from(census: Census, zone_name: str) -> list[Finding]:
    """Turn a census into findings, worst first."""
    out: list[Finding] = []
    for reason, count in sorted(census.rejects.items()):
        out.append(
            Finding(
                "warning",
                f"reject:{reason}",
                count,
                f"{count} rows cannot land ({reason}); migrate keeps them in "
                "session_migration_rejects",
                tuple(census.reject_examples[reason]),
            )
        )
    for name, count in sorted(census.anomalies.items()):
        said = ANOMALY_WORDS.get(name, f"{name.replace('_', ' ')} (migrated as they are)")
        out.append(
            Finding(
                "warning",
                f"anomaly:{name}",
                count,
                f"{count} rows: {said}",
                tuple(census.anomaly_examples[name]),
            )
        )
    for kind, count in sorted(census.dst.items()):
        rule = "first occurrence" if kind == "ambiguous" else "offset before the gap"
        out.append(
            Finding(
                "warning",
                f"dst:{kind}",
                count,
                f"{count} naive timestamps are {kind} in {zone_name}; read by the rule: {rule}",
                tuple(census.dst_examples[kind]),
            )
        )
    for column, spellings in census.spellings.items():
        if len(spellings) > 1:
            top = ", ".join(f"{s!r}×{c}" for s, c in spellings.most_common(4))
            out.append(
                Finding(
                    "info",
                    f"spellings:{column}",
                    len(spellings),
                    f"{column} is written {len(spellings)} ways: {top}",
                )
            )
    if census.nulls.get("request_count"):
        out.append(
            Finding(
                "info",
                "null:request_count",
                census.nulls["request_count"],
                "request_count NULL becomes 0 (the legacy column default)",
            )
        )
    return out


def _duplicates(backup: Backup, rules: Rules) -> list[Finding]:
    """Rows whose session_id an earlier row already has: migrate lands the first the rules
    accept and rejects the others as ``duplicate_session_id``."""
    try:
        repeated = duplicate_rejects(backup, rules)
    except SourceError as exc:
        return [Finding("error", "unreadable_rows", 1, str(exc))]
    if not repeated:
        return []
    examples = tuple(
        f"rowid {r.rowid} ({mask_id(r.session_id)}): {r.message}"
        for r in list(repeated.values())[:3]
    )
    return [
        Finding(
            "warning",
            "reject:duplicate_session_id",
            len(repeated),
            f"{len(repeated)} rows repeat a session_id of an earlier row (the table does not "
            "keep it unique); migrate lands the first copy the rules accept and keeps the "
            "others in session_migration_rejects",
            examples,
        )
    ]


def inspect_backup(
    path: str | Path,
    rules: Rules,
    as_of: datetime,
    zone_name: str,
    batch_rows: int = D.BATCH_ROWS,
    on_extra_columns: str = "fail",
    progress: Callable[[int], None] | None = None,
    phase: Callable[[str, int | None], None] | None = None,
    fast: bool = True,
) -> InspectResult:
    """Inspect the backup at ``path`` without changing it; never raises for a bad file.

    ``phase(text, rows)`` is told each stage (``rows``: how many that stage reads, when known)
    and ``progress(n)`` each batch of ``n`` rows read, so a long inspect is never silent.
    ``fast=False`` takes the census row by row (:meth:`Census.add`), the reference the bulk
    census is tested against."""
    say = phase or (lambda text, rows: None)
    try:
        backup = open_backup(path)
    except SourceError as exc:
        return InspectResult(
            str(path), (), (), {}, None, (Finding("error", "unreadable", 1, str(exc)),)
        )
    findings: list[Finding] = []
    checking: Future[list[str]] | None = None
    integrity: tuple[str, ...] = ()
    try:
        if backup.side_files:
            findings.append(
                Finding(
                    "info",
                    "side_files",
                    len(backup.side_files),
                    f"{', '.join(backup.side_files)} beside the backup: their "
                    "committed rows are included (read from a private copy)",
                )
            )
        say("integrity check", None)
        # The full check runs on a connection and thread of its own beside the census (SQLite
        # releases the GIL while it works); its finding takes its place in the table after.
        slot = len(findings)
        if fast:
            checking = in_background(_integrity_check, backup.uri)
        else:
            integrity = tuple(backup.integrity_check())
            _integrity_finding(findings, slot, integrity)
        for column in backup.missing_columns:
            findings.append(
                Finding(
                    "error",
                    "missing_column",
                    1,
                    f"column {column} is missing from sessions; this is not the "
                    "schema the runbook migrates",
                )
            )
        carry = on_extra_columns == "into_metadata"
        for column in backup.extra_columns:
            findings.append(
                Finding(
                    "warning" if carry else "error",
                    "extra_column",
                    1,
                    f"column {column} is not in the legacy schema; its values are carried into "
                    "metadata._legacy_columns"
                    if carry
                    else f"column {column} is not in the legacy schema and the target has no "
                    "place for it; decide what it holds, then rerun with "
                    "-p on_extra_columns=into_metadata to keep it in metadata",
                )
            )
        if carry and backup.extra_columns:
            rules = replace(rules, extra_columns=tuple(backup.extra_columns))
        for column, declared in EXPECTED_SCHEMA.items():
            found = backup.columns.get(column)
            if found and found != declared:
                findings.append(
                    Finding(
                        "warning",
                        "column_type",
                        1,
                        f"{column} is declared {found}, expected {declared}",
                    )
                )
        census = None
        if not backup.missing_columns:
            census = Census(rules, as_of.astimezone(UTC))
            say("reading rows", backup.estimated_rows())
            try:
                take_census(census, backup, batch_rows, progress, fast=fast)
            except SourceError as exc:
                findings.append(Finding("error", "unreadable_rows", 1, str(exc)))
            if checking is not None:
                integrity = tuple(checking.result())
                _integrity_finding(findings, slot, integrity)
                checking = None
            findings[:0] = findings_from(census, zone_name)
            say("looking for repeated session ids", None)
            findings.extend(_duplicates(backup, rules))
        if checking is not None:
            integrity = tuple(checking.result())
            _integrity_finding(findings, slot, integrity)
            checking = None
        if backup.rowids_by_key:
            findings.append(
                Finding(
                    "info",
                    "without_rowid",
                    1,
                    "sessions is a WITHOUT ROWID table: it is read from a private copy, and a "
                    "reject's source rowid is the row's position in primary-key order",
                )
            )
        say("checking the backup is unchanged", None)
        backup.verify_unchanged()
        files = backup.hashes_before
    finally:
        if checking is not None:
            wait([checking])  # the copy it may read goes with the backup
        backup.close()
    order = {"error": 0, "warning": 1, "info": 2}
    findings.sort(key=lambda f: order[f.severity])
    return InspectResult(str(path), files, integrity, dict(backup.columns), census, tuple(findings))
