"""One session_id, one row: which copy of a repeated session_id lands.

A SessionManager file keeps session_id unique (its primary key), but a hand-rebuilt table may
not, and ``123`` and ``'123'`` are two SQLite values yet one PostgreSQL key. The rule, applied
before any row is copied so that it cannot depend on the order rows reach the server: among the
rows that share a session_id (as the rules read it), the first by rowid that the rules accept
lands; every later one that the rules accept is rejected as ``duplicate_session_id`` with its
raw values, naming the rowid that landed. Rows the rules reject keep their own reason.
"""

from __future__ import annotations

from sessionmig.rules.transform import Reject, Rules, normalise, raw_record
from sessionmig.sqlite.source import Backup


def duplicate_rejects(backup: Backup, rules: Rules) -> dict[int, Reject]:
    """The ``duplicate_session_id`` rejects of ``backup``, by rowid (usually none)."""
    landed: dict[str, int] = {}
    rejects: dict[int, Reject] = {}
    for rowid in backup.colliding_rowids():
        raw = backup.raw_row(rowid, rules.extra_columns)
        result = normalise(raw, rules)
        if isinstance(result, Reject):
            continue
        key = result.session_id
        if key not in landed:
            landed[key] = rowid
            continue
        rejects[rowid] = Reject(
            rowid,
            key,
            "duplicate_session_id",
            f"session_id already taken by source row {landed[key]}, which landed",
            raw_record(raw, rules.extra_columns),
        )
    return rejects
