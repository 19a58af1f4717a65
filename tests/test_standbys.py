"""Preflight against a primary with a standby: it lists the standbys and their replication state,
and refuses a DSN that leads to the standby itself."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pgcluster import needs_pg_bin, primary_and_standby

from sessionmig import steps


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
