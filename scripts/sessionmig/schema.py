"""The one definition of the target tables (SQLAlchemy model) and how to create them (Alembic).

``sessions`` follows the digest's model with two deliberate changes: ``metadata`` is ``jsonb``
(mapped to the attribute ``metadata_``, since SQLAlchemy reserves ``metadata`` on declarative
classes) and the id columns are ``text`` rather than ``varchar(100)``, so that no valid source
value is ever truncated or refused for its length.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Index,
    Integer,
    Text,
    create_engine,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

MIGRATIONS = Path(__file__).parent / "migrations"


class Base(DeclarativeBase):
    """Declarative base of the target tables."""


class SessionRecord(Base):
    """A web-app session, as the new ``SessionManager`` stores it."""

    __tablename__ = "sessions"
    # Byte order: a session id is a token (revision 0002).
    session_id: Mapped[str] = mapped_column(Text(collation="C"), primary_key=True)
    user_id: Mapped[str | None] = mapped_column(Text)
    metadata_: Mapped[Any | None] = mapped_column("metadata", JSONB)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    last_activity: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    request_count: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))

    __table_args__ = (Index("idx_expires_at", "expires_at"),)


class MigrationReject(Base):
    """A source row that could not land: its raw values, why, and where it came from."""

    __tablename__ = "session_migration_rejects"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(Text, nullable=False, index=True)
    source_rowid: Mapped[int] = mapped_column(BigInteger, nullable=False)
    session_id: Mapped[str | None] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text, nullable=False)
    message: Mapped[str] = mapped_column(Text, nullable=False)
    raw: Mapped[Any] = mapped_column(JSONB, nullable=False)
    recorded_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )


class MigrationRun(Base):
    """One audit row per committed migrate (and later rollback/finalize) run."""

    __tablename__ = "session_migration_runs"
    run_id: Mapped[str] = mapped_column(Text, primary_key=True)
    step: Mapped[str] = mapped_column(Text, nullable=False)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    finished_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    dry_run: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=text("false"))
    source_path: Mapped[str] = mapped_column(Text, nullable=False)
    source_sha256: Mapped[str] = mapped_column(Text, nullable=False)
    source_timezone: Mapped[str] = mapped_column(Text, nullable=False)
    rows_read: Mapped[int] = mapped_column(BigInteger, nullable=False)
    inserted: Mapped[int] = mapped_column(BigInteger, nullable=False)
    unchanged: Mapped[int] = mapped_column(BigInteger, nullable=False)
    conflicting: Mapped[int] = mapped_column(BigInteger, nullable=False)
    updated: Mapped[int] = mapped_column(BigInteger, nullable=False)
    rejected: Mapped[int] = mapped_column(BigInteger, nullable=False)
    parameters: Mapped[Any] = mapped_column(JSONB, nullable=False)
    operator: Mapped[str | None] = mapped_column(Text)
    host: Mapped[str | None] = mapped_column(Text)


TABLES = ("sessions", "session_migration_rejects", "session_migration_runs")


def upgrade(dsn: str, target_schema: str = "public") -> str:
    """``alembic upgrade head`` on ``target_schema`` (created if missing); returns the revision."""
    from alembic import command
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext

    from .params import sqlalchemy_url

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["target_schema"] = target_schema
    engine = create_engine(sqlalchemy_url(dsn))
    try:
        with engine.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA IF NOT EXISTS {_quoted(conn, target_schema)}"))
            config.attributes["connection"] = conn
            command.upgrade(config, "head")
            context = MigrationContext.configure(conn, opts={"version_table_schema": target_schema})
            return context.get_current_revision() or ""
    finally:
        engine.dispose()


def _quoted(conn: Any, name: str) -> str:
    return conn.dialect.identifier_preparer.quote(name)
