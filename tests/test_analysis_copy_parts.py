"""Issue 22, speed: a large backup's analysis copy is made by worker processes, a span of rowids
each, and is row for row the copy one process makes (rows kept, rows left out, every value)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from sessionmig import queries, wire
from sessionmig.sample import generate
from sessionmig.transform import Rules

RULES = Rules(zone=ZoneInfo("Asia/Seoul"))


def rows_of(copy: queries.AnalysisCopy) -> list[tuple]:
    with sqlite3.connect(copy.path) as conn:
        return conn.execute("SELECT * FROM sessions ORDER BY session_id").fetchall()


def indexes_of(copy: queries.AnalysisCopy) -> list[tuple]:
    with sqlite3.connect(copy.path) as conn:
        return conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' ORDER BY name"
        ).fetchall()


def test_a_copy_made_in_parts_is_the_copy_made_whole(tmp_path: Path, monkeypatch) -> None:
    backup = tmp_path / "sessions.db"
    generate(backup, rows=3000, seed=5)  # with the sample's oddities: rows that cannot land
    whole = queries.AnalysisCopy.build(backup, RULES, cache_dir=tmp_path / "whole")

    started = []
    real = wire.in_processes

    def counted(entry, works, ahead=2):
        started.append(len(works))
        return real(entry, works, ahead)

    monkeypatch.setattr(wire, "in_processes", counted)
    monkeypatch.setattr(queries, "FILL_PARTS_FROM", 100)
    parts = queries.AnalysisCopy.build(backup, RULES, cache_dir=tmp_path / "parts")
    assert started == [queries.FILL_PARTS]  # the workers made it
    assert (parts.rows, parts.left_out) == (whole.rows, whole.left_out)
    assert whole.left_out == 7  # the sample's rows that cannot land, left out alike
    assert rows_of(parts) == rows_of(whole) and len(rows_of(whole)) == whole.rows
    assert indexes_of(parts) == indexes_of(whole)
    assert sorted(p.name for p in parts.path.parent.iterdir()) == ["analysis.db", "meta.json"]


def test_a_worker_that_dies_leaves_the_copy_to_the_caller(tmp_path: Path, monkeypatch) -> None:
    backup = tmp_path / "sessions.db"
    generate(backup, rows=1000, seed=6)
    whole = queries.AnalysisCopy.build(backup, RULES, cache_dir=tmp_path / "whole")

    def dies(entry, works, ahead=2):
        raise wire.WorkerDied("a worker process died (exit -9)")
        yield  # pragma: no cover

    monkeypatch.setattr(wire, "in_processes", dies)
    monkeypatch.setattr(queries, "FILL_PARTS_FROM", 100)
    again = queries.AnalysisCopy.build(backup, RULES, cache_dir=tmp_path / "again")
    assert rows_of(again) == rows_of(whole) and again.rows == whole.rows


@pytest.mark.parametrize("rows", [0, 1])
def test_a_small_backup_is_made_by_this_process(tmp_path: Path, monkeypatch, rows: int) -> None:
    backup = tmp_path / "sessions.db"
    generate(backup, rows=max(rows, 1), seed=7)
    if rows == 0:
        with sqlite3.connect(backup) as conn:
            conn.execute("DELETE FROM sessions")
    monkeypatch.setattr(wire, "in_processes", lambda *a, **k: pytest.fail("no worker needed"))
    copy = queries.AnalysisCopy.build(backup, RULES, cache_dir=tmp_path / "c")
    assert copy.rows + copy.left_out == rows
