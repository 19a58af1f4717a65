"""Every named query gives the same answer on the SQLite backup and on migrated PostgreSQL,
with values asserted on a known sample; every parameter is checked before any query runs.
What each answer *means* is checked against an independent computation in
``test_query_oracle.py``."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest

from sessionmig.engines import queries
from sessionmig.errors import ParameterError
from sessionmig.rules.mask import mask_id
from sessionmig.runbook import steps
from sessionmig.sqlite.sample import generate

AS_OF = datetime(2026, 1, 15, 3, tzinfo=UTC)


@pytest.fixture(scope="module")
def backup(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("q") / "sessions.db"
    generate(path, rows=600, seed=13)
    return path


@pytest.fixture
def both(backup: Path, dsn: str, target) -> queries.Backends:
    s = target(backup, as_of=AS_OF.isoformat())
    steps.migrate(s, progress=False)
    return queries.Backends(dsn=dsn, analysis=queries.AnalysisCopy.build(backup, s.rules))


def values(name: str, **given) -> dict:
    return queries.resolve(queries.get(name), given, AS_OF, "Asia/Seoul")


CASES = [
    ("active_at", {}),
    ("active_over_time", {"start": "2026-01-01T00:00:00+09:00", "unit": "day"}),
    ("active_over_time", {"start": "2026-01-14T00:00:00Z", "unit": "hour", "timezone": "UTC"}),
    ("active_over_time", {"unit": "15min", "timezone": "Asia/Kolkata"}),
    ("active_over_time", {"start": "2025-12-01T00:00:00Z", "unit": "week"}),
    ("active_over_time", {"start": "2025-11-01T00:00:00Z", "unit": "month"}),
    ("sessions_started", {"unit": "hour", "timezone": "America/New_York"}),
    ("percentiles", {}),
    ("sessions_per_user", {"top_n": 5}),
    ("request_count_distribution", {"width": 25}),
    ("lifetime_hours", {}),
    ("ttl_used", {}),
    ("metadata_keys", {}),
    ("metadata_top_values", {"top_n": 2}),
    ("anomalies", {}),
    ("cutover_watch", {"hours": 6}),
    ("user_sessions", {"user_id": "user-000007"}),
    ("user_sessions", {"anonymous": True}),
]


@pytest.mark.parametrize(
    ("name", "given"), CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)]
)
def test_query_agrees_on_both_backends(both, name, given) -> None:
    pg = queries.run(name, "postgres", both, values(name, **given))
    lite = queries.run(name, "sqlite", both, values(name, **given))
    assert len(pg) > 0
    pd.testing.assert_frame_equal(pg.astype(object), lite.astype(object), check_dtype=False)


def test_every_query_is_covered_by_the_agreement_test() -> None:
    assert {n for n, _ in CASES} == set(queries.BY_NAME)


def test_known_values_on_the_sample(both, backup) -> None:
    active = queries.run("active_at", "postgres", both, values("active_at"))
    # 600 rows, 7 cannot land; the legacy generator makes ~10% fresh sessions.
    assert 0 < active.loc[0, "active"] < 120
    anomalies = queries.run("anomalies", "sqlite", both, values("anomalies"))
    # The live-table rules count exactly what inspect found in the backup.
    census = steps.inspect(
        steps.settings(
            sqlite_path=str(backup), source_timezone="Asia/Seoul", as_of=AS_OF.isoformat()
        )
    ).census
    assert anomalies.to_dict("records") == [
        {
            "expires_before_created": census.anomalies["expires_before_created"],
            "last_activity_outside_lifetime": census.anomalies["last_activity_outside_lifetime"],
            "negative_request_count": census.anomalies["negative_request_count"],
            "rows": 593,
        }
    ]
    assert census.anomalies["expires_before_created"] == 1
    keys = queries.run("metadata_keys", "postgres", both, values("metadata_keys"))
    top = dict(zip(keys["key"], keys["sessions"], strict=True))
    assert top["locale"] == top["ip"] == top["client"] == 592  # one row has NULL metadata
    users = queries.run("sessions_per_user", "postgres", both, values("sessions_per_user"))
    assert users.loc[0, "user_id"] == "(anonymous)" and 20 < users.loc[0, "share_pct"] < 30
    watch = queries.run("cutover_watch", "postgres", both, values("cutover_watch", hours=3))
    assert list(watch["hour"]) == [0, 1, 2]
    assert watch.loc[0, "active"] == active.loc[0, "active"]


def test_session_ids_are_hashed_unless_asked(both) -> None:
    rows = queries.run(
        "user_sessions", "postgres", both, values("user_sessions", user_id="user-000007")
    )
    shown = queries.run(
        "user_sessions",
        "postgres",
        both,
        values("user_sessions", user_id="user-000007"),
        show_ids=True,
    )
    assert all(s.startswith("sid:") for s in rows["session_id"])
    assert list(rows["session_id"]) == [mask_id(s) for s in shown["session_id"]]


def test_free_sql_is_read_only(both) -> None:
    got = queries.run_free_sql("SELECT count(*) AS n FROM sessions", "postgres", both)
    assert got.loc[0, "n"] == 593
    with pytest.raises(Exception, match="read-only"):
        queries.run_free_sql("DELETE FROM sessions", "postgres", both)
    with pytest.raises(ParameterError, match="readonly|read-only|query_only"):
        queries.run_free_sql("DELETE FROM sessions", "sqlite", both)


def test_unknown_query_and_parameter_are_named() -> None:
    with pytest.raises(ParameterError, match="no query named 'nope'"):
        queries.get("nope")
    with pytest.raises(ParameterError, match="has no parameter \\['at_time'\\]"):
        values("active_at", at_time="x")
    assert queries.listing()[0].startswith("active_at — ")


def test_query_command_and_analysis_notebook(both, backup, dsn, tmp_path, monkeypatch) -> None:
    import json
    import subprocess
    import sys

    from conftest import ROOT, env_file

    from sessionmig.runbook import orchestrate

    env = env_file(tmp_path, backup, as_of=AS_OF.isoformat())

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "sessionmig.cli", "query", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={**__import__("os").environ},
        )

    listed = cli("--list").stdout.splitlines()
    assert [line.split(" ")[0] for line in listed] == list(queries.BY_NAME)
    out = {
        s: cli("anomalies", "--env", str(env), "--source", s, "--format", "json").stdout
        for s in ("sqlite", "postgres")
    }
    assert out["sqlite"] == out["postgres"] and json.loads(out["sqlite"])["rows"] == 593
    bad = cli("active_at", "--env", str(env), "-p", "when=now")
    assert bad.returncode == 2 and "has no parameter ['when']" in bad.stderr
    outcome = orchestrate.run(
        str(env),
        ["analysis"],
        {
            "source": "both",
            "query_names": ["active_over_time", "metadata_keys"],
            "free_sql": "SELECT session_id FROM sessions ORDER BY session_id LIMIT 2",
        },
        tmp_path / "reports",
    )
    assert outcome.exit_code == 0, outcome.message
    html = (outcome.run_dir / "04_session_analysis.html").read_text()
    assert html.count("<img") == 1  # the active-over-time chart, both sources on it
    assert "sid:" in html and "session-" not in html.replace("session-analysis", "")


def test_distributions_add_up_to_the_rows(both) -> None:
    counts = queries.run(
        "request_count_distribution", "sqlite", both, values("request_count_distribution", width=50)
    )
    assert counts["sessions"].sum() == 593
    assert list(counts["from_count"]) == [-50, 0, 50, 100, 150]  # the -3 oddity, then 0..199
    lifetimes = queries.run("lifetime_hours", "postgres", both, values("lifetime_hours"))
    by_hours = dict(zip(lifetimes["hours"], lifetimes["sessions"], strict=True))
    assert by_hours[24] > 500 and sum(by_hours.values()) == 593
    used = queries.run("ttl_used", "postgres", both, values("ttl_used"))
    assert set(used["tenths_used"]) <= set(range(11)) and used["sessions"].sum() <= 593


BAD = [
    ("request_count_distribution", {"width": 0}, "width=0 must be between 1 and"),
    ("request_count_distribution", {"width": -5}, "width=-5 must be between 1"),
    ("request_count_distribution", {"width": 2.5}, "width=2.5 must be a whole number"),
    ("request_count_distribution", {"width": "ten"}, "width='ten' must be a whole number"),
    ("request_count_distribution", {"width": True}, "width=True must be a whole number"),
    ("sessions_per_user", {"top_n": 0}, "top_n=0 must be between 1"),
    ("metadata_top_values", {"top_n": -1}, "top_n=-1 must be between 1"),
    ("user_sessions", {"user_id": "u", "limit": 0}, "limit=0 must be between 1"),
    ("cutover_watch", {"hours": 0}, "hours=0 must be between 1"),
    ("cutover_watch", {"hours": 10**6}, "hours=1000000 must be between 1 and 8,784"),
    ("cutover_watch", {"cutover": "yesterday"}, "cutover='yesterday' is not an ISO-8601"),
    ("active_over_time", {"unit": "fortnight"}, "unit='fortnight': choose one of 15min"),
    ("active_over_time", {"timezone": "Mars/Olympus"}, "timezone='Mars/Olympus' is not an IANA"),
    ("active_over_time", {"start": "2026-01-15T00:00:00"}, "start=.* has no UTC offset"),
    ("active_over_time", {"start": "2026-01-16T00:00:00Z"}, "start=.* must be before end="),
    ("active_over_time", {"start": "2000-01-01T00:00:00Z", "unit": "15min"}, "more than 100,000"),
    ("sessions_started", {"end": "2026-01-01T00:00:00Z"}, "must be before end="),
    ("user_sessions", {"anonymous": "maybe"}, "anonymous='maybe' must be true or false"),
    ("user_sessions", {"user_id": "a\x00b"}, "without NUL"),
    ("anomalies", {"timeout_s": 0}, "timeout_s=0 must be more than 0"),
    ("anomalies", {"timeout_s": "soon"}, "timeout_s='soon' must be a number of seconds"),
]


@pytest.mark.parametrize(("name", "given", "message"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_item3_every_parameter_is_checked_before_any_query_runs(name, given, message) -> None:
    with pytest.raises(ParameterError, match=message) as caught:
        values(name, **given)
    assert f"query {name}" in str(caught.value)  # which query, which parameter


def test_item3_width_zero_is_refused_by_the_cli_on_both_sources(backup, tmp_path) -> None:
    """Nothing runs: no server is reachable here, no analysis copy is built."""
    import os
    import subprocess
    import sys

    from conftest import ROOT, env_file

    env = env_file(tmp_path, backup, as_of=AS_OF.isoformat())
    cache = tmp_path / "cache"
    for source in ("sqlite", "postgres"):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "sessionmig.cli",
                "query",
                "request_count_distribution",
                "--env",
                str(env),
                "--source",
                source,
                "-p",
                "width=0",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={
                **os.environ,
                "SMTEST_DSN": "postgresql://nobody@127.0.0.1:1/none",
                "XDG_CACHE_HOME": str(cache),
            },
        )
        assert done.returncode == 2, done.stderr
        assert "width=0 must be between 1 and" in done.stderr
        assert "DivisionByZero" not in done.stderr and not done.stdout
    assert not cache.exists()


def test_item5_timeout_is_a_parameter(both, monkeypatch) -> None:
    seen = []
    real = queries.run_sql_postgres

    def spy(statement, bound, dsn, timeout_s, limit):
        seen.append(timeout_s)
        return real(statement, bound, dsn, timeout_s, limit)

    monkeypatch.setattr(queries, "run_sql_postgres", spy)
    queries.run("anomalies", "postgres", both, values("anomalies"))
    queries.run("anomalies", "postgres", both, values("anomalies", timeout_s=120))
    queries.run("anomalies", "postgres", both, values("anomalies", timeout_s="2.5"))
    assert seen == [queries.DEFAULT_TIMEOUT_S, 120.0, 2.5]
    assert "timeout_s" in queries.listing()[0]


def test_item5_default_unit_is_the_analysis_steps_everywhere() -> None:
    from sessionmig.runbook import params

    assert values("active_over_time")["unit"] == params.default("unit")
    assert values("sessions_started")["unit"] == params.default("unit")


def test_exports_carry_zone_unit_and_window(both) -> None:
    given = {"start": "2026-01-14T00:00:00+09:00", "unit": "hour", "timezone": "Asia/Seoul"}
    frame = queries.run("active_over_time", "sqlite", both, values("active_over_time", **given))
    assert frame.loc[0, "bucket"] == "2026-01-14 00:00+09:00"
    header, first = queries.to_text(frame, "csv").splitlines()[:2]
    assert header == "bucket,peak,timezone,unit,start,end"
    assert first.endswith(
        ",Asia/Seoul,hour,2026-01-13T15:00:00.000000Z,2026-01-15T03:00:00.000000Z"
    )
    import json

    row = json.loads(queries.to_text(frame, "json").splitlines()[0])
    assert (row["timezone"], row["unit"], row["end"]) == (
        "Asia/Seoul",
        "hour",
        "2026-01-15T03:00:00.000000Z",
    )
    assert "(timezone=Asia/Seoul, unit=hour" in queries.to_text(frame, "table")
