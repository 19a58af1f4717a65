"""The one definition of the target tables (SQLAlchemy model): what the Alembic revisions
create, and what the store's statements are compiled from.

``sessions`` follows the digest's model with two deliberate changes: ``metadata`` is ``jsonb``
(mapped to the attribute ``metadata_``, since SQLAlchemy reserves ``metadata`` on declarative
classes) and the id columns are ``text`` rather than ``varchar(100)``, so that no valid source
value is ever truncated or refused for its length.

The store itself reads and writes only :class:`SessionRecord`. The three ``session_migration_*``
tables are sessionmig's audit trail; they live here because one Alembic history (revisions
0001–0004, applied by real databases) creates them all, and that history is the store's.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Boolean, DateTime, Index, Integer, Text, func, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


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

    # Revision 0004: one catch-up pass per number, one overlap rollback per migrate run, kept by
    # the target itself (a lock connection can vanish; a unique index cannot).
    __table_args__ = (
        Index(
            "uq_session_migration_runs_catchup_pass",
            text("(parameters->>'migrate_run_id')"),
            text("((parameters->>'catchup_pass')::int)"),
            unique=True,
            postgresql_where=text("step = 'catchup'"),
        ),
        Index(
            "uq_session_migration_runs_overlap_rollback",
            text("(parameters->>'migrate_run_id')"),
            unique=True,
            postgresql_where=text(
                "step = 'rollback' AND parameters->>'mode' = 'overlap' "
                "AND parameters->>'state' = 'intent'"
            ),
        ),
    )


class MigrationManifest(Base):
    """The digest of each run's sealed manifest, so a re-sealed run folder is caught (0003)."""

    __tablename__ = "session_migration_manifests"
    run_id: Mapped[str] = mapped_column(Text, primary_key=True)
    manifest_sha256: Mapped[str] = mapped_column(Text, nullable=False)
    environment: Mapped[str | None] = mapped_column(Text)
    verdict: Mapped[str | None] = mapped_column(Text)
    sealed_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )


TABLES = (
    "sessions",
    "session_migration_rejects",
    "session_migration_runs",
    "session_migration_manifests",
)
VERSION_TABLE = "alembic_version"
APPEND_ONLY_FUNCTION = "session_migration_append_only"  # revision 0004
