"""The store's SQL: every statement built once from the SQLAlchemy model
(:class:`~sessionstore.model.SessionRecord`, the one definition of the table) and compiled to
SQL text for psycopg, with the values it binds per call.

``now`` is the database's clock, read inside the statement itself (``statement_timestamp()``),
so a call that queued for a pool connection is judged at the moment it reaches the server, and
every app host shares one clock. ``validate_session`` is one atomic statement — an expired
session is deleted, an active one has ``last_activity`` bumped (never backwards) and
``request_count`` incremented (stopping at 2³¹−1, the column's ``integer``) — so concurrent
validations each count.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any, cast

from psycopg.rows import RowFactory, dict_row, tuple_row
from psycopg.types.numeric import Int8
from sqlalchemy import (
    BigInteger,
    ColumnElement,
    DateTime,
    Integer,
    any_,
    bindparam,
    delete,
    func,
    literal_column,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

from .record import MAX_REQUEST_COUNT, SESSIONS

TIMESTAMPTZ = DateTime(timezone=True)
# SQLAlchemy compiles the model's statements for psycopg: %(name)s placeholders, each cast to
# its column's type (so a prepared statement's parameter types never depend on the values).
_DIALECT = PGDialect_psycopg()


def micros(span: timedelta) -> Int8:
    """``span`` in whole microseconds, bound as ``bigint`` whatever its size (an int's own
    type would vary with its value, and with it the prepared statement psycopg picks)."""
    return Int8((span.days * 86_400 + span.seconds) * 1_000_000 + span.microseconds)


def exact_interval(name: str) -> ColumnElement[Any]:
    """The bigint parameter ``name`` (microseconds, see :func:`micros`) as an SQL interval of
    microseconds only. ``timestamptz + '1 day'`` is a calendar day in the session's TimeZone
    (23 or 25 hours across a DST change); a TTL is an exact duration."""
    return bindparam(name, type_=BigInteger()) * text("interval '1 microsecond'")


@dataclass(frozen=True)
class Statement:
    """One statement of the store, compiled once from the model."""

    sql: str
    # Running it twice is running it once (a read; the insert keyed by its own id): it may be
    # sent again after its connection was lost with the answer. A write that is not is never
    # sent twice — its lost answer is reported as an unknown outcome.
    resend_safe: bool
    # The model's own conversion of a Python value for a parameter (the jsonb column's, for
    # one), applied per call exactly as SQLAlchemy would apply it.
    processors: tuple[tuple[str, Callable[[Any], Any]], ...] = ()
    row_factory: RowFactory[Any] = tuple_row

    def bind(self, params: dict[str, Any]) -> dict[str, Any]:
        for name, process in self.processors:
            params[name] = process(params[name])
        return params


def _compile(
    statement: ClauseElement,
    schema: str,
    row_factory: RowFactory[Any] = tuple_row,
    *,
    resend_safe: bool,
) -> Statement:
    compiled = cast(
        SQLCompiler,  # what a dialect compiles a statement with; it knows the binds
        statement.compile(
            dialect=_DIALECT,
            # The schema is written into the text, quoted as needed, once.
            schema_translate_map={None: schema},
            render_schema_translate=True,
        ),
    )
    processors = []
    for name, param in compiled.binds.items():
        # Every value is a named parameter given per call; a constant must be SQL text, so that
        # no value is ever silently left at a default.
        if param.value is not None or param.callable is not None:
            raise AssertionError(f"{name}: a constant must be written as SQL, not bound")
        process = param.type.dialect_impl(_DIALECT).bind_processor(_DIALECT)
        if process is not None:
            processors.append((name, process))
    return Statement(str(compiled), resend_safe, tuple(processors), row_factory)


@dataclass(frozen=True)
class Statements:
    """Every statement the manager runs, for one schema and one kind of clock."""

    create: Statement
    created: Statement
    validate: Statement
    get: Statement
    delete: Statement
    extend: Statement
    cleanup: Statement
    count: Statement
    active_among: Statement
    active_at: Statement


@lru_cache(maxsize=16)
def statements(schema: str, database_clock: bool) -> Statements:
    """The store's statements, built from the model and compiled to SQL text (cached, so a
    manager costs nothing to make after the first of its kind).

    ``database_clock``: ``now`` is ``statement_timestamp()`` — one value for the whole statement,
    taken when it reaches the server, so the expired and the active branch of validate see the
    same instant, and a call that queued for a connection is judged when it runs. Otherwise
    ``now`` is the parameter ``now`` (an injected clock, read once a connection is held).
    """
    s = SESSIONS
    now: ColumnElement[datetime] = (
        func.statement_timestamp(type_=TIMESTAMPTZ)
        if database_clock
        else bindparam("now", type_=TIMESTAMPTZ)
    )
    sid = bindparam("session_id", type_=s.c.session_id.type)
    user_id = bindparam("user_id", type_=s.c.user_id.type)
    metadata = bindparam("metadata", type_=s.c.metadata.type)

    create = (
        pg_insert(s)
        .values(
            session_id=sid,
            user_id=user_id,
            metadata=metadata,
            created_at=now,
            expires_at=now + exact_interval("ttl_us"),
            last_activity=now,
            request_count=literal_column("0", Integer),
        )
        # Sent again with the same id after a lost answer, it cannot insert a second row:
        # no row comes back when the id is taken, and ``created`` tells whose row it is.
        .on_conflict_do_nothing()
        # The stored instant comes back with the insert: no second query.
        .returning(s.c.session_id, s.c.expires_at)
    )
    # The row an earlier attempt of this very create inserted (its answer lost): the same
    # random id with the same values. Run only when the insert found its id taken.
    created = select(s.c.session_id, s.c.expires_at).where(
        s.c.session_id == sid,
        s.c.user_id.is_not_distinct_from(user_id),
        s.c.metadata.is_not_distinct_from(metadata),
    )

    expired = (
        delete(s)
        .where(s.c.session_id == sid, s.c.expires_at <= now)
        .returning(s.c.session_id)
        .cte("expired")
    )
    bumped = (
        update(s)
        .where(s.c.session_id == sid, s.c.expires_at > now)
        .values(
            # A validation that waited on the row lock behind a later one must not move
            # last_activity back.
            last_activity=func.greatest(s.c.last_activity, now),
            # least() first, so the + 1 itself can never overflow the integer.
            request_count=func.least(
                s.c.request_count, literal_column(str(MAX_REQUEST_COUNT - 1), Integer)
            )
            + literal_column("1", Integer),
        )
        .returning(s.c.session_id)
        .cte("bumped")
    )
    # One statement: the delete-if-expired and the bump cannot interleave with anything.
    validate = select(
        select(func.count()).select_from(bumped).scalar_subquery(),
        select(func.count()).select_from(expired).scalar_subquery(),
    )

    return Statements(
        create=_compile(create, schema, resend_safe=True),
        created=_compile(created, schema, resend_safe=True),
        validate=_compile(validate, schema, resend_safe=False),
        get=_compile(select(s).where(s.c.session_id == sid), schema, dict_row, resend_safe=True),
        delete=_compile(delete(s).where(s.c.session_id == sid), schema, resend_safe=False),
        extend=_compile(
            update(s)
            .where(s.c.session_id == sid, s.c.expires_at > now)
            .values(expires_at=s.c.expires_at + exact_interval("extra_us")),
            schema,
            resend_safe=False,
        ),
        cleanup=_compile(delete(s).where(s.c.expires_at <= now), schema, resend_safe=False),
        count=_compile(
            select(func.count()).select_from(s).where(s.c.expires_at > now),
            schema,
            resend_safe=True,
        ),
        active_among=_compile(
            select(s.c.session_id).where(
                # One array parameter, so one statement text whatever the number of ids.
                s.c.session_id == any_(bindparam("ids", type_=ARRAY(s.c.session_id.type))),
                s.c.expires_at > bindparam("at", type_=TIMESTAMPTZ),
            ),
            schema,
            resend_safe=True,
        ),
        # validate's and count's predicate over the whole table, with the instant given.
        active_at=_compile(
            select(s.c.session_id).where(s.c.expires_at > bindparam("at", type_=TIMESTAMPTZ)),
            schema,
            resend_safe=True,
        ),
    )
