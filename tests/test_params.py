"""Parameter loading, -p typing, validation messages that name the fix, redaction; and the one
declaration (params.PARAMETERS) against everything made from it."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from pathlib import Path

import papermill
import pytest
import yaml
from conftest import TEST_PASSWORD, dsn_with_password

from sessionmig.errors import ParameterError
from sessionmig.runbook import params as P
from sessionmig.runbook import settings as S
from sessionmig.runbook.orchestrate import STEPS as NOTEBOOKS

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
def test_string_parameters_keep_the_text_as_typed(pair: str, expected: str) -> None:
    name = pair.partition("=")[0]
    assert P.parse_overrides([pair]) == {name: expected}


def test_typed_parameters_are_still_typed() -> None:
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


# --- the one declaration -----------------------------------------------------------------------


def _declared(step: str) -> dict:
    return papermill.inspect_notebook(str(ROOT / "notebooks" / NOTEBOOKS[step]))


@pytest.mark.parametrize("step", P.STEPS)
def test_each_notebook_declares_exactly_its_parameters_with_their_defaults_and_help(
    step: str,
) -> None:
    declared = _declared(step)
    expected = P.of_steps([step])
    assert list(declared) == [p.name for p in expected]
    for p in expected:
        assert declared[p.name]["default"] == p.literal, p.name
        assert declared[p.name]["help"] == p.help_for(step), p.name


def test_environment_files_carry_only_what_every_notebook_declares() -> None:
    """papermill -f ENV.yaml on any notebook never warns "Passed unknown parameter"."""
    everywhere = set.intersection(*(set(_declared(step)) for step in P.STEPS))
    assert everywhere == set(P.ENVIRONMENT)
    for path in sorted((ROOT / "runbook" / "environments").glob("*.yaml")):
        keys = set(yaml.safe_load(path.read_text()))
        assert keys <= everywhere, f"{path.name} sets {sorted(keys - everywhere)}"
        assert {"sqlite_path", "source_timezone", "database_url_env"} <= keys, path.name


def test_settings_fields_and_defaults_are_the_declarations() -> None:
    from sessionmig.runbook import steps

    # The notebooks and older callers reach them through steps.
    assert (steps.Settings, steps.settings, steps.settings_from) == (
        S.Settings,
        S.settings,
        S.settings_from,
    )
    fields = [f for f in S.Settings.__dataclass_fields__ if f != "declared"]
    assert sorted(fields) == sorted(P.SETTINGS)
    # No default is written on Settings: settings() fills every one from the declaration.
    assert all(S.Settings.__dataclass_fields__[f].default is dataclasses.MISSING for f in fields)


def test_settings_fill_the_declared_defaults(tmp_path: Path) -> None:
    backup = tmp_path / "b.db"
    backup.write_bytes(b"")
    s = S.settings(sqlite_path=str(backup), source_timezone="UTC", run_id="r1")
    for name in P.SETTINGS:
        if name not in ("sqlite_path", "source_timezone", "as_of", "run_id", "operator"):
            assert getattr(s, name) == P.default(name), name
    assert s.reconcile_mode == "strict" and s.run_id == "r1" and s.operator
    assert s.declared == ("sqlite_path", "source_timezone", "run_id")
    with pytest.raises(ParameterError, match="reconcile_mode='loose': choose one of strict"):
        S.settings(sqlite_path=str(backup), source_timezone="UTC", reconcile_mode="loose")
    assert (
        S.settings(
            sqlite_path=str(backup), source_timezone="UTC", reconcile_mode="after_cutover"
        ).reconcile_mode
        == "after_cutover"
    )


def test_a_query_on_postgres_needs_no_backup_file() -> None:
    with pytest.raises(ParameterError, match="no such file"):
        S.settings(sqlite_path="/nonexistent/sessions.db", source_timezone="UTC")
    s = S.settings(
        require_source=False, sqlite_path="/nonexistent/sessions.db", source_timezone="UTC"
    )
    assert s.sqlite_path == "/nonexistent/sessions.db"


def test_every_default_passes_its_own_check_unless_the_parameter_is_required() -> None:
    required = set()
    for p in P.PARAMETERS:
        if p.check is None:
            continue
        try:
            p.check(P.default(p.name))
        except ParameterError:
            required.add(p.name)
    assert required == {"sqlite_path", "source_timezone"}
    with pytest.raises(ParameterError, match="source_timezone is empty"):
        P.validate({"sqlite_path": __file__}, steps=["inspect"])


def test_overrides_are_typed_by_the_declaration() -> None:
    kinds = {p.name: p.type for p in P.PARAMETERS}
    assert kinds["soak_hours"] is float and kinds["query_names"] is list
    assert P.parse_overrides(["reconcile_mode=after_cutover"]) == {
        "reconcile_mode": "after_cutover"
    }
    # A name outside the declaration (a query's own) is typed by what its owner says.
    assert P.parse_overrides(["hours=12"]) == {"hours": "12"}
    assert P.parse_overrides(["hours=12"], {"hours": int}) == {"hours": 12}


def test_one_merge_rule_for_every_verb(tmp_path: Path) -> None:
    env = tmp_path / "mine.yaml"
    env.write_text("source_timezone: UTC\nbatch_rows: 5\n")
    merged = P.resolve(str(env), {"batch_rows": 7}, ["migrate"])
    assert merged == {"source_timezone": "UTC", "batch_rows": 7}
    with pytest.raises(ParameterError, match="-p on_conflict: not a parameter of the selected"):
        P.resolve(str(env), {"on_conflict": "skip"}, ["reconcile"])
    assert P.resolve(str(env), {"hours": 3}, [], extra=("hours",))["hours"] == 3
    env.write_text("batchrows: 5\n")
    with pytest.raises(ParameterError, match=r"sets \['batchrows'\], which is no parameter"):
        P.resolve(str(env), {}, ["migrate"])


def test_help_lists_each_parameter_of_the_steps_with_its_help() -> None:
    text = " ".join(P.help_text(["reconcile"]).split())
    for p in P.of_steps(["reconcile"]):
        assert f" {p.name} = {p.literal} {p.help}" in text
    assert "soak_hours" not in text


def test_runbook_table_is_the_declaration() -> None:
    runbook = (ROOT / "runbook" / "RUNBOOK.md").read_text()
    assert P.with_runbook_table(runbook) == runbook, (
        "the RUNBOOK's parameter table is stale: "
        "python -m sessionmig.runbook.params runbook/RUNBOOK.md"
    )
    table = runbook.split(P.RUNBOOK_BEGIN)[1].split(P.RUNBOOK_END)[0]
    names = [line.split("`")[1] for line in table.strip().splitlines()[2:]]
    assert names == [p.name for p in P.PARAMETERS]


def test_run_fills_run_id_as_of_and_operator_in_one_place() -> None:
    from datetime import UTC, datetime

    started = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    done = S.complete({"as_of": "", "run_id": "", "operator": ""}, started)
    assert done["as_of"] == started.isoformat()
    assert done["run_id"].startswith("20260102T030405Z-") and done["operator"]
    import inspect

    from sessionmig.runbook import orchestrate

    source = inspect.getsource(orchestrate)
    assert "current_operator" not in source and "resolve_as_of" not in source


def test_query_on_postgres_does_not_need_the_backup(monkeypatch, capsys) -> None:
    """prod's sqlite_path does not exist here: a query on PostgreSQL gets as far as the DSN."""
    from sessionmig.cli import main

    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert main(["query", "active_at", "--env", "prod", "--source", "postgres"]) == 2
    err = capsys.readouterr().err
    assert "database_url_env='DATABASE_URL', but that environment variable is not set" in err
    assert main(["query", "active_at", "--env", "prod", "--source", "sqlite"]) == 2
    assert "sqlite_path='/srv/backups/sessions_backup_YYYYMMDD/sessions.db': no such file" in (
        capsys.readouterr().err
    )
    assert main(["query", "active_at", "--env", "prod", "-p", "top_n=3"]) == 2
    assert "query active_at has no parameter ['top_n']" in capsys.readouterr().err


def test_every_step_has_one_notebook_in_the_declared_order() -> None:
    from sessionmig.runbook import orchestrate

    assert tuple(orchestrate.STEPS) == P.STEPS
    assert set(P.DEFAULT_STEPS) <= set(P.STEPS)
    assert orchestrate.DEFAULT_STEPS == P.DEFAULT_STEPS
