"""Preflight says GO only to a role that can carry out the selected steps.

Each test creates a real login role with no privileges on the server under test, grants it
something (as the superuser the tests connect as), and runs preflight connected as that role.
Where preflight withholds GO, the step itself is run too, to show it would indeed have failed;
where it says GO after its GRANTs were applied, the steps run as that role and pass.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

from sessionmig.errors import TargetError
from sessionmig.postgres import schema
from sessionmig.runbook import manifest, steps

# How a step reports the server's refusal (raw, or wrapped with what was not written).
REFUSED = (TargetError, psycopg.errors.InsufficientPrivilege)


def as_role(url: str, role: str) -> str:
    """The same DSN, logging in as ``role`` (both test servers trust local connections)."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{role}@{host}"))


def database_of(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def admin(url: str, *statements: str | sql.Composable) -> None:
    """Run statements as the superuser, on the test's database."""
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)  # type: ignore[arg-type]


@pytest.fixture
def role(dsn: str) -> Iterator[str]:
    """A login role holding no privilege of its own (only what PUBLIC has)."""
    name = f"smrole_{uuid.uuid4().hex[:10]}"
    admin(dsn, sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
    yield name
    # Its grants on the database and anything it created go with it; then the role.
    admin(dsn, sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
    admin(dsn, sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


@pytest.fixture
def as_the_role(dsn: str, role: str, target, monkeypatch: pytest.MonkeyPatch):
    """Settings for a backup, aimed at the test's database but connecting as ``role``."""

    monkeypatch.setenv("SMTEST_ROLE_DSN", as_role(dsn, role))

    def make(backup: Path, **overrides) -> steps.Settings:
        return target(backup, database_url_env="SMTEST_ROLE_DSN", **overrides)

    return make


def grant(statement: str, *names: str) -> str:
    return sql.SQL(statement).format(*map(sql.Identifier, names)).as_string()


def digest_grants(url: str, role: str) -> tuple[str, ...]:
    """INSERT on the table each run records its manifest digest in, when the target has it."""
    table = getattr(manifest, "DIGEST_TABLE", None)
    with psycopg.connect(url) as conn:
        present = table and conn.execute("SELECT to_regclass(%s)", (f"public.{table}",)).fetchone()
    if not present or not present[0]:
        return ()
    return (grant("GRANT INSERT ON TABLE {}.{} TO {};", "public", table, role),)  # type: ignore[arg-type]


def test_an_existing_schema_needs_no_database_create(dsn, role, as_the_role, clean_backup) -> None:
    # USAGE and CREATE on the schema, no CREATE on the database: today's preflight said GO and
    # migrate then failed on CREATE SCHEMA IF NOT EXISTS. The step no longer needs it.
    admin(dsn, grant("GRANT CREATE ON SCHEMA public TO {}", role))
    s = as_the_role(clean_backup)
    result = steps.preflight(s)
    assert result.go, [c for c in result.checks if not c.ok]
    assert steps.migrate(s, progress=False).outcome.inserted == 300
    assert steps.reconcile_step(s, progress=False).verdict == "PASS"
    assert result.grants == ()


def test_a_missing_schema_needs_database_create(dsn, role, as_the_role, clean_backup) -> None:
    database = database_of(dsn)
    s = as_the_role(clean_backup, target_schema="sm_new")
    result = steps.preflight(s)
    assert not result.go
    assert result.grants == (grant("GRANT CREATE ON DATABASE {} TO {};", database, role),)
    failed = [(c.name, c.detail) for c in result.checks if not c.ok]
    assert failed == [
        (
            f"CREATE on database {database}",
            "migrate creates schema sm_new, which does not exist yet; ask for: "
            + result.grants[0].removesuffix(";"),
        )
    ]
    # And it is right: migrate cannot run as this role; with the grant it can.
    with pytest.raises(TargetError, match="permission denied for database"):
        steps.migrate(s, progress=False)
    admin(dsn, *result.grants)
    assert steps.preflight(s).go
    assert steps.migrate(s, progress=False).outcome.inserted == 300
    assert steps.reconcile_step(s, progress=False).verdict == "PASS"


def test_no_temp_privilege_withholds_go(dsn, role, as_the_role, clean_backup) -> None:
    database = database_of(dsn)
    admin(
        dsn,
        grant("GRANT CREATE ON DATABASE {} TO {}", database, role),
        grant("GRANT CREATE ON SCHEMA public TO {}", role),
        grant("REVOKE TEMPORARY ON DATABASE {} FROM PUBLIC", database),
    )
    s = as_the_role(clean_backup)
    result = steps.preflight(s)  # the default run: preflight, inspect, migrate, reconcile
    assert not result.go
    assert result.grants == (grant("GRANT TEMPORARY ON DATABASE {} TO {};", database, role),)
    check = next(c for c in result.checks if not c.ok)
    assert check.name == f"TEMPORARY on database {database}"
    assert check.detail.startswith("migrate, reconcile stage rows in temporary tables")
    # Steps that do not touch the target need nothing of it.
    assert steps.preflight(s, "preflight,inspect").go
    with pytest.raises(REFUSED, match="permission denied to create temporary tables"):
        steps.migrate(s, progress=False)


def test_server_before_14_withholds_go_for_reconcile(dsn, clean_backup) -> None:
    with psycopg.connect(dsn) as conn:
        facts = steps.target_facts(conn, "public")
    assert facts.version_num >= 140000  # the test servers: 15 and 18
    checks, grants = steps.target_checks(facts, ("migrate", "reconcile"))
    assert all(c.ok for c in checks) and grants == []  # the superuser may do everything
    old = replace(facts, version_num=130016, version="13.16")
    checks, grants = steps.target_checks(old, ("migrate", "reconcile"))
    failed = [c for c in checks if not c.ok]
    assert [(c.name, c.detail) for c in failed] == [
        (
            "server version",
            "PostgreSQL 13.16: reconcile fingerprint rows with hash_record_extended, which needs "
            "PostgreSQL 14 or newer; run them against a PostgreSQL 14+ server",
        )
    ]
    assert grants == []  # no GRANT gives a server a function it does not have
    # Migrate alone does not need it.
    assert all(c.ok for c in steps.target_checks(old, ("migrate",))[0])
    assert not all(c.ok for c in steps.target_checks(old, ("rollback",))[0])


def test_existing_tables_name_each_grant_and_granting_them_lets_the_run_pass(
    dsn, role, target, as_the_role, clean_backup
) -> None:
    database = database_of(dsn)
    steps.migrate(target(clean_backup), progress=False)  # the DBA's tables, with 300 rows
    admin(dsn, grant("GRANT CREATE ON DATABASE {} TO {}", database, role))
    s = as_the_role(clean_backup, on_conflict="keep_newer")
    result = steps.preflight(s)
    assert not result.go
    assert result.grants == (
        grant("GRANT SELECT, INSERT, UPDATE ON TABLE {}.{} TO {};", "public", "sessions", role),
        grant(
            "GRANT SELECT, INSERT ON TABLE {}.{} TO {};",
            "public",
            "session_migration_rejects",
            role,
        ),
        grant(
            "GRANT USAGE ON SEQUENCE {}.{} TO {};",
            "public",
            "session_migration_rejects_id_seq",
            role,
        ),
        grant(
            "GRANT SELECT, INSERT ON TABLE {}.{} TO {};", "public", "session_migration_runs", role
        ),
        *digest_grants(dsn, role),
        grant("GRANT SELECT ON TABLE {}.{} TO {};", "public", "alembic_version", role),
    )
    sessions = next(c for c in result.checks if c.name == "table public.sessions")
    assert sessions.detail.startswith(
        "SELECT: migrate, reconcile; INSERT: migrate; UPDATE: migrate"
    )
    admin(dsn, *result.grants)  # the DBA runs exactly what preflight asked for
    again = steps.preflight(s)
    assert again.go, [c for c in again.checks if not c.ok]
    assert again.grants == () and again.existing_rows["sessions"] == 300
    migrated = steps.migrate(s, progress=False).outcome
    assert (migrated.unchanged, migrated.inserted) == (300, 0)
    assert steps.reconcile_step(s, progress=False).verdict == "PASS"


def test_empty_table_of_another_owner_needs_its_ownership(
    dsn, role, as_the_role, clean_backup
) -> None:
    database = database_of(dsn)
    schema.upgrade(dsn)  # the DBA created the tables, empty, owned by the superuser
    admin(
        dsn,
        grant("GRANT CREATE ON DATABASE {} TO {}", database, role),
        grant("GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA public TO {}", role),
        grant("GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {}", role),
    )
    s = as_the_role(clean_backup)
    result = steps.preflight(s)
    assert not result.go
    assert result.grants == (
        grant("GRANT CREATE ON SCHEMA {} TO {};", "public", role),  # to rebuild the keys
        grant("ALTER TABLE {}.{} OWNER TO {};", "public", "sessions", role),
    )
    # Into an empty table migrate locks it and drops and rebuilds its keys: the owner's rights.
    with pytest.raises(REFUSED, match="(permission denied for|must be owner of) table sessions"):
        steps.migrate(s, progress=False)
    admin(dsn, *result.grants)
    assert steps.preflight(s).go
    assert steps.migrate(s, progress=False).outcome.inserted == 300
    assert steps.reconcile_step(s, progress=False).verdict == "PASS"


def test_only_the_selected_steps_are_checked(dsn, role, target, as_the_role, clean_backup) -> None:
    s = as_the_role(clean_backup)
    assert steps.preflight(s, ["preflight", "inspect"]).go  # the runbook's first gate
    nothing = steps.preflight(s, ["analysis"])
    assert [(c.name, c.detail) for c in nothing.checks if not c.ok] == [
        ("table public.sessions", "missing; analysis cannot run without it: run migrate first")
    ]
    steps.migrate(target(clean_backup), progress=False)
    analysis = steps.preflight(s, "analysis")
    assert analysis.grants == (
        grant("GRANT SELECT ON TABLE {}.{} TO {};", "public", "sessions", role),
        *digest_grants(dsn, role),
    )
    with pytest.raises(steps.P.ParameterError, match="unknown step"):
        steps.preflight(s, ["migrat"])


def test_a_catchup_pass_needs_delete_on_sessions(
    dsn, role, target, as_the_role, clean_backup
) -> None:
    """A catch-up pass ends sessions in PostgreSQL, so preflight asks for DELETE too."""
    steps.migrate(target(clean_backup), progress=False)
    database = database_of(dsn)
    admin(
        dsn,
        grant("GRANT TEMPORARY ON DATABASE {} TO {}", database, role),
        grant("GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO {}", role),
    )
    result = steps.preflight(as_the_role(clean_backup), ["catchup"])
    assert not result.go
    assert grant("GRANT DELETE ON TABLE {}.{} TO {};", "public", "sessions", role) in result.grants
    sessions = next(c for c in result.checks if c.name == "table public.sessions")
    assert "DELETE: catchup" in sessions.detail
