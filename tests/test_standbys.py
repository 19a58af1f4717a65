"""The runbook against a primary with a standby: preflight lists the standbys and their
replication state and refuses a DSN that leads to the standby itself; migrate's report records
the WAL it wrote and how each standby replayed its commit (or how far behind it still was)."""

from __future__ import annotations

import re
from pathlib import Path

import psycopg
import pytest
from pgcluster import needs_pg_bin, primary_and_standby

from sessionmig.postgres import replication
from sessionmig.reports import report
from sessionmig.runbook import steps


def standbys_check(settings: steps.Settings) -> steps.Check:
    found = [c for c in steps.preflight(settings).checks if c.name == "standbys"]
    assert len(found) == 1, steps.preflight(settings).checks
    return found[0]


def test_preflight_says_there_is_no_standby(clean_backup: Path, target) -> None:
    seen = standbys_check(target(clean_backup))
    assert seen.ok and seen.detail.startswith("none: no streaming standby"), seen


@needs_pg_bin
def test_preflight_lists_the_standbys_and_refuses_a_standby_target(
    tmp_path: Path, clean_backup: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conftest import TEST_ENV

    settings = steps.settings(**{**TEST_ENV, "sqlite_path": str(clean_backup)})
    with primary_and_standby(tmp_path) as (primary, standby):
        monkeypatch.setenv("SMTEST_DSN", primary.url())
        seen = standbys_check(settings)
        assert seen.ok, seen
        assert re.fullmatch(
            r"standby \(streaming, sync, replay lag [\d,]+ bytes( / [\d.]+ s)?\)", seen.detail
        ), seen.detail

        monkeypatch.setenv("SMTEST_DSN", standby.url())
        result = steps.preflight(settings)
        seen = standbys_check(settings)
        assert not seen.ok and "the target is a standby" in seen.detail, seen
        assert not result.go


def test_migrate_says_what_it_wrote_to_the_wal_and_that_there_is_no_standby(
    clean_backup: Path, target
) -> None:
    result = steps.migrate(target(clean_backup), progress=False)
    seen = result.outcome.replication
    assert result.verdict == "PASS" and seen is not None
    # 300 sessions of ~200 bytes of JSON, their index and the audit row: more than 60 kB of WAL
    assert seen.wal_bytes is not None and seen.wal_bytes > 60_000, seen
    assert seen.standbys == () and seen.describe().endswith("no streaming standby")
    shown = {f.label: f for f in report.migrate_figures(result)}
    figure = shown["WAL written, standbys after the commit"]
    assert figure.value.endswith(" MB") and not figure.bad


@needs_pg_bin
def test_migrate_reports_each_standby_replaying_its_commit_or_lagging_behind(
    tmp_path: Path, clean_backup: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conftest import TEST_ENV

    settings = steps.settings(**{**TEST_ENV, "sqlite_path": str(clean_backup)})
    with primary_and_standby(tmp_path) as (primary, standby):
        monkeypatch.setenv("SMTEST_DSN", primary.url())
        result = steps.migrate(settings, progress=False)
        seen = result.outcome.replication
        assert result.verdict == "PASS" and seen is not None and seen.wal_bytes
        assert len(seen.standbys) == 1
        replayed = r"standby \(sync\): replayed the commit after [\d.]+ s"
        assert re.fullmatch(replayed, seen.standbys[0]), seen.standbys
        with psycopg.connect(standby.url(), autocommit=True) as conn:
            migrated = conn.execute("SELECT count(*) FROM public.sessions").fetchone()
        assert migrated is not None and migrated[0] == result.outcome.inserted

        # The standby stops replaying (it still receives and flushes, so the synchronous commit
        # goes through): the report says how far behind it is, and marks it.
        with psycopg.connect(standby.url(), autocommit=True) as conn:
            conn.execute("SELECT pg_wal_replay_pause()")
        monkeypatch.setattr(replication, "REPLAY_WAIT_S", 0.5)
        with psycopg.connect(primary.url(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE again")
        monkeypatch.setenv("SMTEST_DSN", primary.url("again"))
        again = steps.migrate(settings, progress=False)
        assert again.verdict == "PASS"
        behind = again.outcome.replication
        assert behind is not None and len(behind.standbys) == 1, behind
        assert re.fullmatch(
            r"standby \(streaming, sync\): [\d,]+ bytes of WAL behind the commit after [\d.]+ s"
            r" — do not cut over before it has replayed",
            behind.standbys[0],
        ), behind.standbys
        shown = {f.label: f for f in report.migrate_figures(again)}
        assert shown["WAL written, standbys after the commit"].bad
