"""The analysis step's verdict reflects what its queries found.

Two sources that answer differently are named query by query with their numbers; a source with
no session is said; a query (or the free SQL) that fails makes the verdict ERROR, never PASS.
"""

from __future__ import annotations

from datetime import datetime

import pytest
from conftest import env_file, rows_of

from sessionmig.runbook import orchestrate, steps

BOTH = ("sqlite", "postgres")


def active(dsn: str, as_of: datetime) -> tuple[int, int]:
    """(active, anonymous among them) at ``as_of``, counted in PostgreSQL directly."""
    ((n, anonymous),) = rows_of(
        dsn,
        "SELECT count(*), count(*) FILTER (WHERE user_id IS NULL) FROM sessions "
        "WHERE created_at <= %s AND expires_at > %s",
        (as_of, as_of),
    )
    return n, anonymous


def end_active_sessions(dsn: str, as_of: datetime) -> None:
    """What a target that does not match the backup looks like: its active sessions gone."""
    rows_of(dsn, "DELETE FROM sessions WHERE expires_at > %s RETURNING 1", (as_of,))


def expected_active_difference(n: int, anonymous: int) -> str:
    line = f"active_at: active {n} on sqlite vs 0 on postgres"
    return line + (f", anonymous {anonymous} on sqlite vs 0 on postgres" if anonymous else "")


def test_sources_that_agree_pass_and_that_differ_are_named(small_backup, target, dsn) -> None:
    s = target(small_backup)
    steps.migrate(s, progress=False)
    same = steps.analysis(s, BOTH, [], {})
    assert len(same.results) == 12  # every query but user_sessions (no user given)
    assert (same.verdict, same.reason) == (
        "PASS",
        "12 queries on sqlite, postgres; each query computes the meaning `sessionmig query "
        "--list` states, checked against an independent computation, and the sources agree",
    )
    n, anonymous = active(dsn, s.as_of)
    assert n > 0
    end_active_sessions(dsn, s.as_of)
    differ = steps.analysis(s, BOTH, ["active_at", "metadata_keys"], {})
    assert differ.verdict == "PASS_WITH_WARNINGS" and differ.exit_code == 0
    assert differ.differences[0] == expected_active_difference(n, anonymous)
    assert differ.reason.startswith(
        f"the sources differ on 2 of 2 queries: {expected_active_difference(n, anonymous)}; "
        "metadata_keys: "
    )


def test_a_failing_query_is_an_error_not_a_pass(small_backup, target, dsn) -> None:
    s = target(small_backup)  # nothing migrated: the target has no sessions table
    result = steps.analysis(s, ("postgres",), ["active_at"], {})
    assert (result.verdict, result.exit_code) == ("ERROR", 2)
    assert result.reason.startswith("1 failed (active_at: UndefinedTable: ")
    assert 'relation "public.sessions" does not exist' in result.reason
    free = steps.analysis(s, ("sqlite",), ["active_at"], {}, "SELECT nope FROM sessions")
    assert free.verdict == "ERROR" and list(free.errors) == ["free SQL on sqlite"]
    assert "no such column: nope" in free.reason
    assert len(free.results) == 1  # the named query still ran and is shown


def test_an_empty_target_is_said(small_backup, target, dsn) -> None:
    s = target(small_backup)
    steps.migrate(s, progress=False)
    rows_of(dsn, "DELETE FROM sessions RETURNING 1")
    result = steps.analysis(s, ("postgres",), ["anomalies"], {})
    assert (result.verdict, result.reason) == ("PASS_WITH_WARNINGS", "postgres holds no sessions")


@pytest.mark.slow
def test_analysis_step_on_a_backup_that_does_not_match(tmp_path, small_backup, target, dsn) -> None:
    s = target(small_backup)
    steps.migrate(s, progress=False)
    n, anonymous = active(dsn, s.as_of)
    end_active_sessions(dsn, s.as_of)
    outcome = orchestrate.run(
        str(env_file(tmp_path, small_backup)),
        ["analysis"],
        {"source": "both", "query_names": ["active_at"]},
        tmp_path / "reports",
    )
    assert outcome.exit_code == 0, outcome.message
    import json

    manifest = json.loads((outcome.run_dir / "manifest.json").read_text())
    (step,) = manifest["steps"]
    assert step["verdict"] == "PASS_WITH_WARNINGS"
    assert step["reason"] == (
        f"the sources differ on 1 of 1 queries: {expected_active_difference(n, anonymous)}"
    )
    assert manifest["verdict"] == "PASS_WITH_WARNINGS"
