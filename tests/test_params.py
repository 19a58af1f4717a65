"""Parameter loading, -p typing, validation messages that name the fix, redaction."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import TEST_PASSWORD, dsn_with_password

from sessionmig import params as P
from sessionmig.errors import ParameterError

ROOT = Path(__file__).resolve().parent.parent


def test_overrides_are_typed_like_yaml_but_instants_stay_text() -> None:
    got = P.parse_overrides(
        [
            "batch_rows=500",
            "dry_run=true",
            "database_url_env=null",
            "as_of=2026-01-15T12:00:00+09:00",
            "sqlite_path=a=b.db",
        ]
    )
    assert got == {
        "batch_rows": 500,
        "dry_run": True,
        "database_url_env": None,
        "as_of": "2026-01-15T12:00:00+09:00",
        "sqlite_path": "a=b.db",
    }


def test_override_without_equals_is_refused() -> None:
    with pytest.raises(ParameterError, match="expected name=value"):
        P.parse_overrides(["batch_rows"])


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"source_timezone": "Mars/Olympus"}, "source_timezone='Mars/Olympus' is not an IANA"),
        ({"source_timezone": ""}, "source_timezone is empty"),
        ({"as_of": "tomorrow"}, "as_of='tomorrow' is not an ISO-8601"),
        ({"as_of": "2026-01-15T12:00:00"}, "has no UTC offset"),
        ({"sqlite_path": "/nonexistent/sessions.db"}, "no such file"),
        ({"batch_rows": 0}, "batch_rows=0 must be a whole number"),
        ({"database_url_env": dsn_with_password("u", TEST_PASSWORD, "h/db")}, "must be the NAME"),
        ({"on_conflict": "merge"}, "choose one of fail, skip, keep_newer"),
        ({"target_schema": "bad name"}, "plain identifier"),
        ({"expected_sha256": "abc"}, "not a sha256"),
    ],
)
def test_bad_values_are_named_with_the_fix(params: dict, message: str) -> None:
    with pytest.raises(ParameterError, match=message):
        P.validate(params)


def test_as_of_is_an_aware_utc_instant() -> None:
    assert P.resolve_as_of("2026-01-15T12:00:00+09:00") == datetime(2026, 1, 15, 3, tzinfo=UTC)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    assert P.resolve_as_of("", start) == start


def test_environments_follow_the_contract() -> None:
    local = P.load_environment("local", ROOT)
    assert local["database_url_env"] is None
    assert local["source_timezone"] == "Asia/Seoul"
    for env in ("staging", "prod"):
        data = P.load_environment(env, ROOT)
        assert data["source_timezone"] == "Asia/Seoul"
        assert isinstance(data["database_url_env"], str) and data["database_url_env"].isupper()
        assert "://" not in str(data)


def test_unknown_environment_lists_the_known_ones() -> None:
    with pytest.raises(ParameterError, match="known environments: local, prod, staging"):
        P.environment_file("qa", ROOT)


def test_database_url_comes_from_the_named_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    dsn = dsn_with_password("u", TEST_PASSWORD, "h/db")
    monkeypatch.setenv("MY_DSN", dsn)
    assert P.database_url("MY_DSN") == dsn
    monkeypatch.delenv("MY_DSN")
    with pytest.raises(ParameterError, match="export MY_DSN="):
        P.database_url("MY_DSN")


def test_redaction_hides_passwords_everywhere() -> None:
    secret = TEST_PASSWORD
    text = (
        f"failed: {dsn_with_password('app', secret, 'db:5432/x')} and "
        f"{dsn_with_password('a', 'b', 'c/d', scheme='postgres+psycopg')} "
        f"host=db password={secret} user=app"
    )
    out = P.redact(text)
    assert secret not in out and ":b@" not in out
    assert dsn_with_password("app", "***", "db:5432/x") in out
    assert P.redact_url(dsn_with_password("app", secret, "h/db")) == dsn_with_password(
        "app", "***", "h/db"
    )
    assert P.sqlalchemy_url("postgresql://h/db") == "postgresql+psycopg://h/db"


@pytest.mark.parametrize(
    ("pair", "expected"),
    [
        ("sqlite_path=x #c.db", "x #c.db"),  # YAML would cut at the comment
        ("sqlite_path=on", "on"),  # YAML 1.1 would make it True
        ("sqlite_path=~", "~"),
        ("sqlite_path=[a].db", "[a].db"),
        ("sqlite_path= spaced.db ", " spaced.db "),
        ("restore_path=null", "null"),
        ("migrate_manifest=reports/prod/1", "reports/prod/1"),
        ("run_id=0123", "0123"),
        ("expected_sha256=" + "1" * 64, "1" * 64),
        ("expected_sha256=1e5", "1e5"),
        ("target_schema=yes", "yes"),
        ("source_timezone=Etc/GMT+9", "Etc/GMT+9"),
        ("operator=no", "no"),
        ("user_id=007", "007"),
    ],
)
def test_case22_string_parameters_keep_the_text_as_typed(pair: str, expected: str) -> None:
    name = pair.partition("=")[0]
    assert P.parse_overrides([pair]) == {name: expected}


def test_case22_typed_parameters_are_still_typed() -> None:
    got = P.parse_overrides(
        [
            "dry_run=false",
            "confirm=True",
            "show_ids=yes",
            "batch_rows=10_000",
            "max_retries=0",
            "top_n=5",
            "soak_hours=1.5",
            "query_names=active_at, ttl_used",
            "database_url_env=~",
            "batch_rows_typo=12",
        ]
    )
    assert got == {
        "dry_run": False,
        "confirm": True,
        "show_ids": True,
        "batch_rows": 10_000,
        "max_retries": 0,
        "top_n": 5,
        "soak_hours": 1.5,
        "query_names": ["active_at", "ttl_used"],
        "database_url_env": None,
        "batch_rows_typo": "12",
    }
    assert P.parse_overrides(["query_names=[active_at]"]) == {"query_names": ["active_at"]}
    # Text that is not of the parameter's type is kept, so its check names it with the fix.
    bad = P.parse_overrides(["dry_run=on", "batch_rows=many"])
    assert bad == {"dry_run": "on", "batch_rows": "many"}
    with pytest.raises(ParameterError, match="dry_run='on' must be true or false"):
        P.validate({"dry_run": bad["dry_run"]})
    with pytest.raises(ParameterError, match="batch_rows='many' must be a whole number"):
        P.validate({"batch_rows": bad["batch_rows"]})
