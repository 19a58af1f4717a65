"""Profile a backup before migrating it: integrity, schema, counts, spellings, anomalies.

:class:`Census` is a pure accumulator over raw rows (one pass, bounded memory: counters keyed by
day, spelling or reason, and a few examples each); :func:`inspect_backup` runs it over a backup
and turns what it saw into a findings table with severities.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from . import params as P
from .errors import SourceError
from .keys import duplicate_rejects
from .mask import mask_id
from .source import EXPECTED_SCHEMA, Backup, FileHash, open_backup
from .transform import (
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
    batch_rows: int = P.default("batch_rows"),
    on_extra_columns: str = "fail",
    progress: Callable[[int], None] | None = None,
    phase: Callable[[str, int | None], None] | None = None,
) -> InspectResult:
    """Inspect the backup at ``path`` without changing it; never raises for a bad file.

    ``phase(text, rows)`` is told each stage (``rows``: how many that stage reads, when known)
    and ``progress(n)`` each batch of ``n`` rows read, so a long inspect is never silent."""
    say = phase or (lambda text, rows: None)
    try:
        backup = open_backup(path)
    except SourceError as exc:
        return InspectResult(
            str(path), (), (), {}, None, (Finding("error", "unreadable", 1, str(exc)),)
        )
    findings: list[Finding] = []
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
        integrity = tuple(backup.integrity_check())
        if integrity != ("ok",):
            findings.append(
                Finding(
                    "error",
                    "integrity",
                    len(integrity),
                    "PRAGMA integrity_check failed: "
                    + "; ".join(integrity[:3])
                    + " — take a fresh backup; do not migrate this file",
                )
            )
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
                for batch in backup.rows(batch_rows, extra=rules.extra_columns):
                    for raw in batch:
                        census.add(raw)
                    if progress is not None:
                        progress(len(batch))
            except SourceError as exc:
                findings.append(Finding("error", "unreadable_rows", 1, str(exc)))
            findings[:0] = findings_from(census, zone_name)
            say("looking for repeated session ids", None)
            findings.extend(_duplicates(backup, rules))
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
        backup.close()
    order = {"error": 0, "warning": 1, "info": 2}
    findings.sort(key=lambda f: order[f.severity])
    return InspectResult(str(path), files, integrity, dict(backup.columns), census, tuple(findings))
