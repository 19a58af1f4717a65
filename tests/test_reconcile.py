"""Reconcile a real migrated database, damaged one way per test: each damage is named."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
from conftest import rows_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.types.json import Jsonb

from sessionmig.engines.appcheck import combined_verdict
from sessionmig.engines.reconcile import FAIL, WARN, canonical_json, json_diff
from sessionmig.rules.jsonb import jsonb_text, metadata_text
from sessionmig.rules.mask import mask_id
from sessionmig.runbook import steps


@pytest.fixture
def migrated(small_backup: Path, target) -> steps.Settings:
    s = target(small_backup, batch_rows=50)
    steps.migrate(s, progress=False)
    return s


def damage(dsn: str, statement: str) -> str:
    """Apply ``statement`` to the first session (``%s`` is its id) and return the id."""
    with psycopg.connect(dsn) as conn:
        (sid,) = conn.execute(
            "SELECT min(session_id) FROM sessions WHERE user_id IS NOT NULL AND "
            "jsonb_typeof(metadata) = 'object'"
        ).fetchone()
        conn.execute(statement, (sid,))
    return sid


def named(result, kind: str) -> list:
    return [d for d in result.differences if d.kind == kind]


def test_untouched_database_passes_with_the_rejects_accounted(migrated) -> None:
    result = steps.reconcile_step(migrated)
    assert result.verdict == WARN
    assert (result.source_rows, result.migrated, result.rejected) == (400, 393, 7)
    assert result.partition_holds and result.matched == 393
    assert result.differences == []
    assert result.counts["changed"] == result.counts["missing"] == result.counts["extra"] == 0
    assert result.parity["distributions_agree"]
    assert (
        result.parity["active_postgres"]
        == result.parity["active_legacy_rule_sqlite_excluding_rejects"]
    )


def test_deleted_row_is_missing(migrated, dsn) -> None:
    sid = damage(dsn, "DELETE FROM sessions WHERE session_id = %s")
    result = steps.reconcile_step(migrated)
    assert result.verdict == FAIL
    assert result.matched == 392 and result.counts["missing"] == 1
    assert [d.session for d in named(result, "missing")] == [mask_id(sid)]
    assert not result.partition_holds


def test_inserted_row_is_extra(migrated, dsn) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO sessions SELECT 'session-zzz', user_id, metadata, created_at, "
            "expires_at, last_activity, request_count FROM sessions LIMIT 1"
        )
    result = steps.reconcile_step(migrated)
    assert result.verdict == FAIL
    assert [d.session for d in named(result, "extra")] == [mask_id("session-zzz")]


def test_one_microsecond_is_a_change(migrated, dsn) -> None:
    sid = damage(
        dsn,
        "UPDATE sessions SET created_at = created_at + interval '1 microsecond' "
        "WHERE session_id = %s",
    )
    (diff,) = named(steps.reconcile_step(migrated), "changed")
    assert diff.session == mask_id(sid)
    assert "created_at" in diff.detail and "0:00:00.000001" in diff.detail


def test_wrong_zone_is_a_change_of_exactly_the_offset(migrated, dsn) -> None:
    damage(
        dsn,
        "UPDATE sessions SET expires_at = expires_at + interval '9 hours' WHERE session_id = %s",
    )
    (diff,) = named(steps.reconcile_step(migrated), "changed")
    assert "expires_at" in diff.detail and "9:00:00" in diff.detail


def test_nested_metadata_key_is_named(migrated, dsn) -> None:
    damage(
        dsn,
        "UPDATE sessions SET metadata = jsonb_set(metadata, '{client,version}', "
        "'\"9.9.9\"') WHERE session_id = %s",
    )
    (diff,) = named(steps.reconcile_step(migrated), "changed")
    assert "$.client.version differs" in diff.detail


def test_request_count_off_by_one(migrated, dsn) -> None:
    damage(dsn, "UPDATE sessions SET request_count = request_count + 1 WHERE session_id = %s")
    result = steps.reconcile_step(migrated)
    (diff,) = named(result, "changed")
    assert "request_count" in diff.detail
    assert result.verdict == FAIL


def test_null_user_is_not_empty_user(migrated, dsn) -> None:
    with psycopg.connect(dsn) as conn:
        (sid,) = conn.execute(
            "SELECT min(session_id) FROM sessions WHERE user_id IS NULL"
        ).fetchone()
        conn.execute("UPDATE sessions SET user_id = '' WHERE session_id = %s", (sid,))
    (diff,) = named(steps.reconcile_step(migrated), "changed")
    assert "user_id: source NULL vs target ''" in diff.detail


def test_a_row_both_migrated_and_rejected(migrated, dsn) -> None:
    with psycopg.connect(dsn) as conn:
        (sid,) = conn.execute("SELECT min(session_id) FROM sessions").fetchone()
        conn.execute(
            "INSERT INTO session_migration_rejects (run_id, source_rowid, session_id, "
            "reason, message, raw) SELECT run_id, %s, %s, 'x', 'x', '{}' FROM "
            "session_migration_runs LIMIT 1",
            (_rowid_of(migrated, sid), sid),
        )
    result = steps.reconcile_step(migrated)
    assert [d.session for d in named(result, "both")] == [mask_id(sid)]
    assert named(result, "reject_mismatch")  # its raw '{}' is not the source row either
    assert result.verdict == FAIL


def test_a_reject_whose_raw_values_differ(migrated, dsn) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "UPDATE session_migration_rejects SET raw = jsonb_set(raw, "
            "'{request_count}', %s) WHERE id = (SELECT min(id) FROM "
            "session_migration_rejects)",
            (Jsonb({"type": "integer", "value": 1}),),
        )
    result = steps.reconcile_step(migrated)
    assert len(named(result, "reject_mismatch")) == 1
    assert result.verdict == FAIL


def test_a_lost_reject_is_unaccounted(migrated, dsn) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute("DELETE FROM session_migration_rejects WHERE reason = 'invalid_json'")
    result = steps.reconcile_step(migrated)
    assert len(named(result, "unaccounted")) == 1
    assert "invalid_json" in named(result, "unaccounted")[0].detail


def _rowid_of(settings: steps.Settings, sid: str) -> int:
    import sqlite3

    conn = sqlite3.connect(settings.sqlite_path)
    return conn.execute("SELECT rowid FROM sessions WHERE session_id = ?", (sid,)).fetchone()[0]


def test_json_canonical_form_tells_true_from_one() -> None:
    assert canonical_json(True) != canonical_json(1)
    assert canonical_json({"a": [1.0]}) == canonical_json({"a": [1.00]})
    assert json_diff(
        canonical_json({"a": {"b": 1}, "c": 2}), canonical_json({"a": {"b": 2}, "d": 2})
    ) == ["$.a.b differs", "$.c missing in PostgreSQL", "$.d only in PostgreSQL"]


json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(10**30), max_value=10**30),
        st.decimals(allow_nan=False, allow_infinity=False).map(lambda d: ("number", str(d))),
        st.text(
            alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
            max_size=8,
        ),
    ),
    lambda c: st.one_of(
        st.lists(c, max_size=4),
        st.dictionaries(
            st.text(
                alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                max_size=6,
            ),
            c,
            max_size=4,
        ),
    ),
    max_leaves=12,
)


def _as_json(value) -> str:
    """JSON text where ("number", text) becomes a bare number (1.50, 1E+3 …)."""
    if isinstance(value, tuple):
        return value[1]
    if isinstance(value, list):
        return "[" + ",".join(_as_json(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{_as_json(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(value=json_values)
def test_python_prints_jsonb_exactly_as_postgresql_does(server_url, value) -> None:
    text = _as_json(value)
    with psycopg.connect(server_url) as conn:
        expected = conn.execute("SELECT %s::jsonb::text", (text,)).fetchone()[0]
    assert jsonb_text(json.loads(text, parse_float=Decimal)) == expected
    assert metadata_text(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "-0.0",
        "-0",
        "1E+3",
        "1.5e-7",
        "0.000",
        "1e-10",
        "[1e400]",
        '{"b":1,"aa":2,"a":3,"a":4}',
        '"\\u00e9\\t\\u001f/"',
        '{"서울": {"": []}, "z": "\\"q\\""}',
    ],
)
def test_jsonb_edge_cases_print_alike(server_url, text) -> None:
    with psycopg.connect(server_url) as conn:
        expected = conn.execute("SELECT %s::jsonb::text", (text,)).fetchone()[0]
    assert jsonb_text(json.loads(text, parse_float=Decimal)) == expected
    assert metadata_text(text) == expected


def test_app_check_accepts_exactly_the_active_sessions_without_touching_them(migrated, dsn) -> None:
    before = rows_of(
        dsn, "SELECT session_id, last_activity, request_count FROM sessions ORDER BY 1"
    )
    app = steps.reconcile_step(migrated).app
    assert app is not None
    assert app.ok and app.checked == 393
    assert app.accepted_active == app.expected_active > 0
    assert (
        rows_of(dsn, "SELECT session_id, last_activity, request_count FROM sessions ORDER BY 1")
        == before
    )


def test_app_check_names_a_session_the_app_would_refuse(migrated, dsn) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "UPDATE sessions SET expires_at = %s WHERE session_id = (SELECT min(session_id) "
            "FROM sessions WHERE expires_at > %s)",
            (migrated.as_of, migrated.as_of),
        )
    result = steps.reconcile_step(migrated)
    app = result.app
    assert app is not None
    assert app.wrongly_rejected == 1 and app.wrongly_accepted == 0
    assert "source says active, the app says not active" in app.examples[0]
    assert combined_verdict(result.verdict, result.reason, app)[0] == FAIL


def test_a_clean_untouched_migration_passes_outright(clean_backup, target) -> None:
    s = target(clean_backup)
    steps.migrate(s, progress=False)
    result = steps.reconcile_step(s)
    assert (result.verdict, result.warnings) == ("PASS", [])
    assert result.matched == result.source_rows == 300 and result.rejected == 0


def test_the_app_check_can_only_make_a_verdict_worse() -> None:
    from sessionmig.engines.appcheck import AppCheck

    agrees = AppCheck(10, 4, 4, 0, 0)
    refuses_one = AppCheck(10, 4, 3, 1, 0)
    assert combined_verdict(WARN, "rejects", agrees) == (WARN, "rejects")
    assert combined_verdict(WARN, "rejects", refuses_one)[0] == FAIL
    assert "disagrees with the source on 1 sessions" in combined_verdict("PASS", "", refuses_one)[1]
    assert combined_verdict(FAIL, "missing", refuses_one) == (FAIL, "missing")
