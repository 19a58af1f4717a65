"""The catch-up diff finds exactly the sessions that differ between two snapshots, by key, however
the live store's rowids moved: reused by another session, a session deleted and created again,
rows inserted with chosen rowids, a VACUUM that renumbers them all."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from zoneinfo import ZoneInfo

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sessionmig.engines.catchup import diff
from sessionmig.rules.transform import Rules
from sessionmig.sqlite.source import open_backup

SCHEMA = (
    "CREATE TABLE sessions (session_id TEXT PRIMARY KEY, user_id TEXT, metadata TEXT, "
    "created_at TIMESTAMP NOT NULL, expires_at TIMESTAMP NOT NULL, "
    "last_activity TIMESTAMP NOT NULL, request_count INTEGER DEFAULT 0)"
)
INSERT = "INSERT INTO sessions VALUES (?, ?, ?, '2026-01-15 10:00:00', ?, ?, ?)"
RULES = Rules(ZoneInfo("Asia/Seoul"))  # the rules every environment file here uses


def row(i: int, count: int = 0, user: str = "u") -> tuple:
    return (f"s{i}", user, '{"k": 1}', "2026-01-16 10:00:00", "2026-01-15 11:00:00", count)


# One operation of the old colour (or of SQLite itself) on the live file.
OPS = st.one_of(
    st.tuples(st.just("validate"), st.integers(0, 29)),
    st.tuples(st.just("user"), st.integers(0, 29)),
    st.tuples(st.just("delete"), st.integers(0, 29)),
    st.tuples(st.just("create"), st.integers(30, 45)),
    st.tuples(st.just("recreate"), st.integers(0, 29)),  # deleted, then created anew
    st.tuples(st.just("create_at_rowid"), st.integers(30, 45), st.integers(1, 40)),
    st.tuples(st.just("vacuum"), st.just(0)),
)


def apply(conn: sqlite3.Connection, op: tuple) -> None:
    kind, i = op[0], op[1]
    sid = f"s{i}"
    if kind == "validate":
        conn.execute("UPDATE sessions SET request_count = request_count + 1 WHERE session_id = ?",
                     (sid,))  # fmt: skip
    elif kind == "user":
        conn.execute("UPDATE sessions SET user_id = 'other' WHERE session_id = ?", (sid,))
    elif kind == "delete":
        conn.execute("DELETE FROM sessions WHERE session_id = ?", (sid,))
    elif kind == "create":
        conn.execute(INSERT.replace("INSERT", "INSERT OR IGNORE"), row(i))
    elif kind == "recreate":
        conn.execute("DELETE FROM sessions WHERE session_id = ?", (sid,))
        conn.execute(INSERT, row(i, count=5))
    elif kind == "create_at_rowid":
        # A rowid freed by a delete taken by another session (or a clash: then nothing).
        conn.execute(
            "INSERT OR IGNORE INTO sessions (rowid, session_id, user_id, metadata, created_at, "
            "expires_at, last_activity, request_count) "
            "VALUES (?, ?, ?, ?, '2026-01-15 10:00:00', ?, ?, ?)",
            (op[2], *row(i)),
        )
    elif kind == "vacuum":
        conn.commit()
        conn.execute("VACUUM")


def by_key(path: Path) -> dict[str, tuple]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT session_id, user_id, metadata, expires_at, last_activity, "
                            "request_count FROM sessions").fetchall()  # fmt: skip
    conn.close()
    return {r[0]: r[1:] for r in rows}


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=st.lists(OPS, max_size=25))
def test_the_diff_is_the_difference_by_key_whatever_the_rowids(tmp_path: Path, ops) -> None:
    folder = tmp_path / f"case-{abs(hash(tuple(ops)))}"
    folder.mkdir()
    base, live = folder / "base.db", folder / "live.db"
    with sqlite3.connect(base) as conn:
        conn.execute(SCHEMA)
        conn.executemany(INSERT, [row(i, count=i % 2) for i in range(30)])  # look-alikes
        conn.execute("DELETE FROM sessions WHERE session_id IN ('s3', 's7')")  # holes
    conn.close()
    live.write_bytes(base.read_bytes())
    conn = sqlite3.connect(live)
    for op in ops:
        apply(conn, op)
    conn.commit()
    conn.close()
    before, after = by_key(base), by_key(live)
    expected = sorted(
        sid for sid in before.keys() | after.keys() if before.get(sid) != after.get(sid)
    )
    with open_backup(base) as backup:
        delta = diff(backup, live, RULES)
    assert delta.ids == expected
    assert sorted(set(before) - set(after)) == sorted(set(delta.base) - set(delta.live))
    assert delta.unchanged == len(after) - len(set(expected) & set(after))
