"""The catch-up diff reads every changed row as the migration's rules do, whatever it holds: the
rows it builds a batch at a time (the bulk path) are exactly what ``normalise`` makes of them,
a row the rules refuse is named and never read as a logout, and the sessions it finds changed
are the ones whose normalised rows differ."""

from __future__ import annotations

import sqlite3
import tempfile
from dataclasses import replace
from pathlib import Path
from zoneinfo import ZoneInfo

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sessionmig.engines.catchup import diff
from sessionmig.engines.catchup.delta import _canonical
from sessionmig.rules.mask import mask_id
from sessionmig.rules.transform import MAX_SESSION_ID_BYTES, Reject, Rules, normalise
from sessionmig.sqlite.source import open_backup

SCHEMA = (
    "CREATE TABLE sessions (session_id TEXT PRIMARY KEY, user_id TEXT, metadata TEXT, "
    "created_at TIMESTAMP NOT NULL, expires_at TIMESTAMP NOT NULL, "
    "last_activity TIMESTAMP NOT NULL, request_count INTEGER DEFAULT 0)"
)
INSERT = "INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?)"
RULES = Rules(ZoneInfo("America/New_York"))  # a zone with gaps and overlaps

# Values as a SQLite file can hold them: the plain ones the bulk path takes, and the odd ones
# that must go to the rules (``sqlite3.Binary`` is a BLOB; a ``bytes`` bound as text is made
# with CAST below, so that invalid UTF-8 can sit in a TEXT column).
PLAIN_TIMES = ["2026-01-15 10:00:00", "2026-01-15 10:00:00.123456", "2025-12-31 23:59:59"]
ODD_TIMES = [
    "2026-01-15T10:00:00",
    " 2026-01-15 10:00:00",
    "2026-02-30 10:00:00",
    "2026-03-08 02:30:00",  # in New York's spring gap
    "2026-11-01 01:30:00",  # in New York's autumn overlap
    "0001-01-01 00:00:00",
    "9999-12-31 23:59:59",
    "yesterday",
    1736900000,
    1.5,
    sqlite3.Binary(b"2026-01-15 10:00:00"),
    ("bad", b"2026-01-15 10:00:0\xff"),
]
PLAIN_META = [None, '{"k": 1}', '{"cart": [1, 2], "theme": "dark"}', "[]", '{"k": 1, "k": 2}']
ODD_META = [
    "not json",
    '{"k": "\\u00e9"}',
    '{"k": "\\ud800"}',
    ' {"k": 1}',
    '{"k": 1} ',
    '{"a": NaN}',
    "1e999",
    3.5,
    7,
    sqlite3.Binary(b'{"k": 1}'),
    "[" * 1200 + "]" * 1200,
    ("bad", b'{"k": "\xff"}'),
    '{"k": "a\x00b"}',
]
PLAIN_USERS = [None, "u1", "user-2", ""]
ODD_USERS = [7, 7.5, sqlite3.Binary(b"u"), "a\x00b", ("bad", b"u\xfe")]
PLAIN_COUNTS = [0, 1, 2147483647, -2147483648, None]
ODD_COUNTS = [2147483648, 7.0, 7.5, "12", " 12", "x", sqlite3.Binary(b"7")]


def values(plain: list, odd: list) -> st.SearchStrategy:
    # Mostly plain, so the batches hold both kinds side by side.
    return st.one_of(st.sampled_from(plain), st.sampled_from(plain), st.sampled_from(odd))


ROW = st.tuples(
    values(PLAIN_USERS, ODD_USERS),
    values(PLAIN_META, ODD_META),
    values(PLAIN_TIMES, ODD_TIMES),
    values(PLAIN_TIMES, ODD_TIMES),
    values(PLAIN_TIMES, ODD_TIMES),
    values(PLAIN_COUNTS, ODD_COUNTS),
)
KEYS = st.one_of(
    st.integers(0, 39).map(lambda i: f"s{i}"),
    st.sampled_from(["é-ключ", "x" * (MAX_SESSION_ID_BYTES + 1), ""]),
)


def write(conn: sqlite3.Connection, sid: str, row: tuple) -> None:
    marks, bound = [], []
    for value in (sid, *row):
        if isinstance(value, tuple):  # invalid UTF-8 in a TEXT value
            marks.append("CAST(? AS TEXT)")
            bound.append(sqlite3.Binary(value[1]))
        else:
            marks.append("?")
            bound.append(value)
    conn.execute(INSERT.replace("?, ?, ?, ?, ?, ?, ?", ", ".join(marks)), bound)


def normalised(path: Path) -> tuple[dict[str, tuple], list[str]]:
    """Every row by ``normalise``, keyed by session id; and the refused rows' ids."""
    landed, refused = {}, []
    with open_backup(path) as backup:
        for batch in backup.rows(7):
            for raw in batch:
                row = normalise(raw, RULES)
                if isinstance(row, Reject):
                    refused.append(row.session_id)
                else:
                    landed[row[0]] = _canonical(row)
    return landed, refused


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    base_rows=st.dictionaries(KEYS, ROW, min_size=1, max_size=30),
    changes=st.lists(st.tuples(KEYS, st.one_of(st.none(), ROW)), max_size=30),
)
def test_the_diff_reads_every_changed_row_as_the_rules_do(
    tmp_path: Path, base_rows, changes
) -> None:
    folder = Path(tempfile.mkdtemp(dir=tmp_path))  # one tmp_path for all of hypothesis' cases
    base, live = folder / "base.db", folder / "live.db"
    with sqlite3.connect(base) as conn:
        conn.execute(SCHEMA)
        for sid, row in base_rows.items():
            write(conn, sid, row)
    conn.close()
    live.write_bytes(base.read_bytes())
    with sqlite3.connect(live) as conn:
        for sid, row in changes:
            if row is None:
                conn.execute("DELETE FROM sessions WHERE session_id = ?", (sid,))
            else:
                write(conn, sid, row)
    conn.close()

    before, _ = normalised(base)
    after, refused = normalised(live)
    with open_backup(base) as backup:
        delta = diff(backup, live, RULES, batch_rows=5)

    refused_ids = {sid for sid in refused if sid is not None}
    expected = sorted(
        sid
        for sid in before.keys() | after.keys()
        if sid not in refused_ids and before.get(sid) != after.get(sid)
    )
    assert delta.ids == expected
    # Each session the pass carries holds what the rules make of its row, on either side.
    for sid in delta.ids:
        assert (sid in delta.live) == (sid in after)
        if sid in after:
            assert _canonical(delta.live[sid]) == after[sid]
        if sid in delta.base:
            assert _canonical(delta.base[sid]) == before[sid]
    # A refused live row the app changed (or created) is named; one it left as it was is not
    # part of the pass at all.
    changed_raw = {sid for sid, raw in raw_rows(live).items() if raw_rows(base).get(sid) != raw}
    assert sorted(delta.rejected) == sorted(mask_id(s) for s in refused if s in changed_raw)


def raw_rows(path: Path) -> dict[str, tuple]:
    """Each row's values and storage classes as SQLite holds them, by session id."""
    conn = sqlite3.connect(path)
    conn.text_factory = bytes
    try:
        rows = conn.execute(
            "SELECT session_id, user_id, metadata, created_at, expires_at, last_activity, "
            "request_count, typeof(user_id), typeof(metadata), typeof(created_at), "
            "typeof(expires_at), typeof(last_activity), typeof(request_count) FROM sessions"
        ).fetchall()
    finally:
        conn.close()
    return {r[0].decode("utf-8", "surrogateescape"): r[1:] for r in rows}


def test_with_extra_columns_every_changed_row_takes_the_rules(tmp_path: Path) -> None:
    """A store with a column the legacy schema lacks, carried into metadata: no row is built
    in bulk (the extra value changes what metadata holds), each is what ``normalise`` makes."""
    rules = replace(RULES, extra_columns=("theme",))
    base, live = tmp_path / "base.db", tmp_path / "live.db"
    with sqlite3.connect(base) as conn:
        conn.execute(
            SCHEMA.replace("request_count INTEGER DEFAULT 0", "request_count INTEGER, theme")
        )
        for i in range(6):
            conn.execute(
                "INSERT INTO sessions VALUES (?, 'u', '{\"k\": 1}', '2026-01-15 10:00:00', "
                "'2026-01-16 10:00:00', '2026-01-15 11:00:00', 0, ?)",
                (f"s{i}", "dark" if i % 2 else None),
            )
    conn.close()
    live.write_bytes(base.read_bytes())
    with sqlite3.connect(live) as conn:
        conn.execute("UPDATE sessions SET theme = 'light' WHERE session_id = 's1'")  # extra only
        conn.execute("UPDATE sessions SET request_count = 3 WHERE session_id = 's2'")
        conn.execute("DELETE FROM sessions WHERE session_id = 's4'")
    conn.close()
    with open_backup(base) as backup:
        delta = diff(backup, live, rules, batch_rows=2)
    assert delta.ids == ["s1", "s2", "s4"]
    with open_backup(live) as backup:
        expected = {
            row[0]: _canonical(row)
            for batch in backup.rows(7, extra=("theme",))
            for row in (normalise(raw, rules) for raw in batch)
        }
    assert _canonical(delta.live["s1"]) == expected["s1"]
    assert '"light"' in delta.live["s1"][2]  # the extra value, carried into metadata
    assert _canonical(delta.live["s2"]) == expected["s2"] and "s4" not in delta.live
