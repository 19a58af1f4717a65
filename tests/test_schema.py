"""One source of truth for the tables: the SQLAlchemy model and the Alembic revision agree."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from sessionmig.postgres.connect import engine as make_engine
from sessionmig.postgres.schema import HEAD, Base, SessionRecord, upgrade


def test_autogenerate_against_a_migrated_database_finds_no_diff(dsn) -> None:
    assert upgrade(dsn) == HEAD
    engine = make_engine(dsn, "test")
    with engine.connect() as conn:
        conn.exec_driver_sql("SET search_path TO public")  # the tool's connections fix pg_catalog
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        indexes = {i["name"] for i in inspect(conn).get_indexes("sessions")}
    engine.dispose()
    assert diff == []
    assert "idx_expires_at" in indexes


def test_session_ids_sort_bytewise(dsn) -> None:
    upgrade(dsn)
    engine = make_engine(dsn, "test")
    with engine.connect() as conn:
        conn.exec_driver_sql("SET search_path TO public")
        (column,) = [c for c in inspect(conn).get_columns("sessions") if c["name"] == "session_id"]
    engine.dispose()
    assert column["type"].collation == "C"


def test_upgrade_is_idempotent_and_honours_the_schema(dsn) -> None:
    assert upgrade(dsn, "sessions_v2") == HEAD
    assert upgrade(dsn, "sessions_v2") == HEAD
    engine = make_engine(dsn, "test")
    with engine.connect() as conn:
        tables = set(inspect(conn).get_table_names(schema="sessions_v2"))
        public = set(inspect(conn).get_table_names(schema="public"))
    engine.dispose()
    assert {
        "sessions",
        "session_migration_rejects",
        "session_migration_runs",
        "alembic_version",
    } <= tables
    assert "sessions" not in public


def test_metadata_column_is_mapped_to_a_free_attribute_name() -> None:
    # SQLAlchemy reserves ``metadata`` on declarative classes; the digest's model did not import.
    assert SessionRecord.__table__.c.metadata.name == "metadata"
    assert "metadata_" in SessionRecord.__mapper__.attrs
