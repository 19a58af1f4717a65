"""The proof against hostile hands: a DBA's database or role settings,
the target's own definitions and values equal only by value can neither blind reconcile nor
crash it. Each attack is made on a real migrated target, on every server under test."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from sessionmig.engines.reconcile import FAIL, PASS, WARN
from sessionmig.errors import TargetError
from sessionmig.postgres import connect as C
from sessionmig.rules.mask import mask_id
from sessionmig.runbook import steps
from sessionmig.sqlite import sample
from sessionmig.store import SessionManager

# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def migrated(clean_backup: Path, target) -> steps.Settings:
    s = target(clean_backup, batch_rows=100)
    steps.migrate(s, progress=False)
    return s


def _database(dsn: str) -> str:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT current_database()").fetchone()[0]


def _alter_database(dsn: str, *settings: tuple[str, str]) -> None:
    """``ALTER DATABASE <this test's> SET name = value`` for each, as a DBA would."""
    database = _database(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name, value in settings:
            conn.execute(
                sql.SQL("ALTER DATABASE {} SET {} = {}").format(
                    sql.Identifier(database), sql.Identifier(name), sql.SQL(value)
                )
            )


# Every function and operator the fingerprint and the comparison could resolve by name,
# shadowed in a schema of the attacker's: each says every row is the same.
SHADOWS = """
CREATE SCHEMA evil;
CREATE FUNCTION evil.hash_record_extended(record, bigint) RETURNS bigint
    LANGUAGE plpgsql IMMUTABLE AS $$ BEGIN RETURN 0; END $$;
CREATE FUNCTION evil.hashint8extended(bigint, bigint) RETURNS bigint
    LANGUAGE sql IMMUTABLE AS $$ SELECT 0::bigint $$;
CREATE FUNCTION evil.hashtextextended(text, bigint) RETURNS bigint
    LANGUAGE sql IMMUTABLE AS $$ SELECT 0::bigint $$;
CREATE FUNCTION evil.always(text, text) RETURNS boolean
    LANGUAGE sql IMMUTABLE AS $$ SELECT true $$;
CREATE OPERATOR evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.always);
CREATE FUNCTION evil.zero(numeric, bigint) RETURNS numeric
    LANGUAGE sql IMMUTABLE AS $$ SELECT 0::numeric $$;
CREATE AGGREGATE evil.sum(bigint) (SFUNC = evil.zero, STYPE = numeric, INITCOND = '0');
"""


def _shadow(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute(SHADOWS)


def _change_user_id(dsn: str) -> str:
    with psycopg.connect(dsn) as conn:
        (sid,) = conn.execute(
            "SELECT min(session_id) FROM public.sessions WHERE user_id IS NOT NULL"
        ).fetchone()
        conn.execute(
            "UPDATE public.sessions SET user_id = user_id || '-attacker' "
            "WHERE session_id OPERATOR(pg_catalog.=) %s",
            (sid,),
        )
    return sid


def _changed(result) -> list:
    return [d for d in result.differences if d.kind == "changed"]


# --- session settings steer the proof ------------------------------------------------


def test_a_database_search_path_shadowing_the_fingerprint_cannot_hide_a_change(
    migrated, dsn
) -> None:
    _shadow(dsn)
    _alter_database(dsn, ("search_path", "evil, pg_catalog, public"))
    assert steps.reconcile_step(migrated, progress=False).verdict == PASS  # intact: passes
    sid = _change_user_id(dsn)
    result = steps.reconcile_step(migrated, progress=False)
    assert result.verdict == FAIL
    (diff,) = _changed(result)
    assert diff.session == mask_id(sid) and "user_id" in diff.detail


def test_a_role_search_path_shadowing_the_fingerprint_cannot_hide_a_change(migrated, dsn) -> None:
    _shadow(dsn)
    database = _database(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                "ALTER ROLE CURRENT_USER IN DATABASE {} SET search_path = evil, pg_catalog"
            ).format(sql.Identifier(database))
        )
    sid = _change_user_id(dsn)
    result = steps.reconcile_step(migrated, progress=False)
    assert result.verdict == FAIL
    assert [d.session for d in _changed(result)] == [mask_id(sid)]


HOSTILE_FORMATS = (
    ("DateStyle", "'SQL, DMY'"),
    ("TimeZone", "'America/St_Johns'"),
    ("IntervalStyle", "'sql_standard'"),
    ("extra_float_digits", "-15"),
    ("bytea_output", "'escape'"),
    ("lc_monetary", "'C'"),
    ("standard_conforming_strings", "off"),
)


def test_database_formats_neither_crash_nor_blind_reconcile(migrated, dsn) -> None:
    _alter_database(dsn, *HOSTILE_FORMATS)
    result = steps.reconcile_step(migrated, progress=False)
    assert result.verdict == PASS, result.reason
    sid = _change_user_id(dsn)
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "UPDATE public.sessions SET created_at = created_at + interval '1 microsecond' "
            "WHERE session_id = %s",
            (sid,),
        )
    result = steps.reconcile_step(migrated, progress=False)
    assert result.verdict == FAIL
    (diff,) = _changed(result)
    assert "user_id" in diff.detail and "0:00:00.000001" in diff.detail


def test_a_database_s_timeouts_cut_no_step_short(clean_backup: Path, target, dsn) -> None:
    """Timeouts a DBA set for the app (1 ms each) and an asynchronous commit reach none of the
    runbook's connections; an operator's own options (DSN, PGOPTIONS) still decide."""
    s = target(clean_backup, batch_rows=100)
    _alter_database(
        dsn,
        ("statement_timeout", "'1ms'"),
        ("lock_timeout", "'1ms'"),
        ("idle_in_transaction_session_timeout", "'1ms'"),
        # and a commit acknowledged before it is on disk: lost in a crash after the answer
        ("synchronous_commit", "off"),
    )
    assert steps.migrate(s, progress=False).verdict in (PASS, WARN)
    assert steps.reconcile_step(s, progress=False).verdict in (PASS, WARN)
    with C.connect(dsn, "query") as conn:
        row = conn.execute(
            "SELECT current_setting('statement_timeout'), current_setting('synchronous_commit')"
        ).fetchone()
        assert row == ("0", "on")
    theirs = make_conninfo(C.libpq_dsn(dsn), options="-c statement_timeout=7s")
    with C.connect(theirs, "query") as conn:
        assert conn.execute("SELECT current_setting('statement_timeout')").fetchone() == ("7s",)


def test_the_runbook_s_defaults_stay_out_of_the_app_s_store_and_keep_stronger_durability(
    dsn,
) -> None:
    """The app's store keeps the DBA's timeouts (the runbook's connections do not); a
    ``synchronous_commit`` stronger than "on" is kept; ``idle_session_timeout`` ends no
    runbook session that waits between statements."""
    _alter_database(
        dsn,
        ("lock_timeout", "'50ms'"),
        ("synchronous_commit", "remote_apply"),
        ("idle_session_timeout", "'500ms'"),
    )
    shown = "SELECT current_setting('lock_timeout'), current_setting('synchronous_commit')"

    async def through_the_store() -> tuple:
        store = SessionManager(dsn)
        conn = await C.aconnect(dsn, "store", autocommit=True, **store._connection_settings())
        try:
            return await (await conn.execute(shown)).fetchone()  # type: ignore[return-value]
        finally:
            await conn.close()
            await store.close()

    assert asyncio.run(through_the_store()) == ("50ms", "remote_apply")
    with C.connect(dsn, "query") as conn:
        assert conn.execute(shown).fetchone() == ("0", "remote_apply")
        time.sleep(1.0)  # idle longer than the database's idle_session_timeout
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_a_database_that_ends_sessions_on_any_error_cannot_stop_a_migration(
    clean_backup: Path, target, dsn
) -> None:
    """``exit_on_error = on`` would end migrate's session at the first value PostgreSQL
    refuses, where the span is rolled back to its savepoint and redone by the rules."""
    with sqlite3.connect(clean_backup) as conn:
        row = conn.execute("SELECT * FROM sessions LIMIT 1").fetchone()
        conn.execute(
            "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?)",
            ("session-refused", row[1], '{"n": 1e1000000}', *row[3:]),
        )
    conn.close()
    _alter_database(dsn, ("exit_on_error", "on"))
    result = steps.migrate(target(clean_backup), progress=False)
    assert result.outcome.committed and result.outcome.spans_redone == 1
    assert result.outcome.reject_counts == {"refused_by_postgresql": 1}


def test_every_connection_fixes_what_its_reading_depends_on(dsn) -> None:
    _shadow(dsn)
    _alter_database(dsn, ("search_path", "evil, pg_catalog, public"), *HOSTILE_FORMATS)
    wanted = dict(C.FIXED_SETTINGS)
    names = sorted(wanted)
    query = "SELECT " + ", ".join(f"current_setting('{n}')" for n in names)

    def fixed(row: tuple) -> dict[str, str]:
        return dict(zip(names, row, strict=True))

    with C.connect(dsn, "query") as conn:
        found = fixed(conn.execute(query).fetchone())
    assert {n: found[n].replace(" ", "") for n in names} == {
        n: wanted[n].replace(" ", "") for n in names
    }

    async def through_aconnect() -> dict[str, str]:
        conn = await C.aconnect(dsn, "store")
        try:
            cur = await conn.execute(query)
            return fixed(await cur.fetchone())  # type: ignore[arg-type]
        finally:
            await conn.close()

    assert asyncio.run(through_aconnect()) == found
    # The operator's own options are kept beside ours; ours decide what the reading needs.
    theirs = make_conninfo(C.libpq_dsn(dsn), options="-c work_mem=7MB -c DateStyle=German")
    with C.connect(theirs, "query") as conn:
        row = conn.execute("SELECT current_setting('work_mem'), current_setting('DateStyle')")
        assert row.fetchone() == ("7MB", found["DateStyle"])


# --- the shape check trusts too little of the shape ------------------------------------


def _refused(s: steps.Settings, *said: str) -> str:
    with pytest.raises(TargetError) as caught:
        steps.reconcile_step(s, progress=False)
    text = str(caught.value)
    for words in said:
        assert words in text, text
    return text


def test_a_view_in_place_of_the_table_is_refused_by_name(migrated, dsn) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute("ALTER TABLE public.sessions RENAME TO sessions_real")
        conn.execute("UPDATE public.sessions_real SET user_id = 'changed'")
        conn.execute(
            "CREATE VIEW public.sessions AS SELECT session_id, CASE WHEN user_id = 'changed' "
            "THEN NULL ELSE user_id END AS user_id, metadata, created_at, expires_at, "
            "last_activity, request_count FROM public.sessions_real"
        )
    _refused(migrated, "public.sessions is a view", "ordinary table")


def test_a_materialized_view_or_a_partitioned_table_is_refused(migrated, dsn) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute("ALTER TABLE public.sessions RENAME TO sessions_real")
        conn.execute("CREATE MATERIALIZED VIEW public.sessions AS TABLE public.sessions_real")
    _refused(migrated, "public.sessions is a materialized view")
    with psycopg.connect(dsn) as conn:
        conn.execute("DROP MATERIALIZED VIEW public.sessions")
        conn.execute(
            "CREATE TABLE public.sessions (LIKE public.sessions_real) PARTITION BY HASH "
            "(session_id)"
        )
        conn.execute(
            "CREATE TABLE public.sessions_p0 PARTITION OF public.sessions FOR VALUES WITH "
            "(MODULUS 1, REMAINDER 0)"
        )
        conn.execute("INSERT INTO public.sessions TABLE public.sessions_real")
    _refused(migrated, "public.sessions is a partitioned table")


def test_inheritance_children_are_refused(migrated, dsn) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE TABLE public.more_sessions () INHERITS (public.sessions)")
    _refused(migrated, "inheritance", "more_sessions")


def test_a_rule_on_the_table_is_refused(migrated, dsn) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE RULE keep_them AS ON DELETE TO public.sessions DO INSTEAD NOTHING")
    _refused(migrated, "rule", "keep_them")


def test_a_case_insensitive_session_id_cannot_pass_a_changed_token(migrated, dsn) -> None:
    with psycopg.connect(dsn) as conn:
        try:
            with conn.transaction():
                conn.execute(
                    "CREATE COLLATION public.anycase (provider = icu, "
                    "locale = 'und-u-ks-level2', deterministic = false)"
                )
        except psycopg.Error as exc:
            pytest.skip(f"this server build has no ICU collations: {exc}")
        conn.execute(
            "ALTER TABLE public.sessions ALTER COLUMN session_id TYPE text COLLATE public.anycase"
        )
        conn.execute(
            "UPDATE public.sessions SET session_id = upper(session_id) WHERE session_id = "
            "(SELECT min(session_id) FROM public.sessions WHERE expires_at < now())"
        )
    _refused(migrated, "session_id", "collation", "public.anycase")


def test_a_user_id_collation_that_is_not_deterministic_is_refused(migrated, dsn) -> None:
    with psycopg.connect(dsn) as conn:
        try:
            with conn.transaction():
                conn.execute(
                    "CREATE COLLATION public.anycase (provider = icu, "
                    "locale = 'und-u-ks-level2', deterministic = false)"
                )
        except psycopg.Error as exc:
            pytest.skip(f"this server build has no ICU collations: {exc}")
        conn.execute(
            "ALTER TABLE public.sessions ALTER COLUMN user_id TYPE text COLLATE public.anycase"
        )
    _refused(migrated, "user_id", "not deterministic")


def test_a_session_id_collation_other_than_bytewise_is_refused(migrated, dsn) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute(
            'ALTER TABLE public.sessions ALTER COLUMN session_id TYPE text COLLATE "POSIX"'
        )
    _refused(migrated, "session_id", 'collation "POSIX"', '"C"')


@pytest.fixture
def owner_role(dsn: str) -> Iterator[str]:
    """A role of this test's own (no superuser, no BYPASSRLS), dropped afterwards."""
    name = f"smtest_owner_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
    try:
        yield name
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def test_row_level_security_the_tool_is_subject_to_is_refused(
    migrated, dsn, owner_role, monkeypatch
) -> None:
    role = sql.Identifier(owner_role)
    with psycopg.connect(dsn) as conn:
        conn.execute(sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {}").format(role))
        conn.execute(sql.SQL("ALTER TABLE public.sessions OWNER TO {}").format(role))
        conn.execute("ALTER TABLE public.sessions ENABLE ROW LEVEL SECURITY")
        conn.execute(
            "CREATE POLICY hide ON public.sessions USING (user_id IS DISTINCT FROM 'nobody')"
        )
    monkeypatch.setenv("SMTEST_DSN", make_conninfo(C.libpq_dsn(dsn), user=owner_role))
    # The owner without FORCE is not subject to its table's policies: the proof holds.
    assert steps.reconcile_step(migrated, progress=False).verdict == PASS
    with psycopg.connect(dsn) as conn:
        conn.execute("ALTER TABLE public.sessions FORCE ROW LEVEL SECURITY")
    _refused(migrated, "row-level security", "public.sessions")


# --- equal by value is not equal -------------------------------------------------------


@pytest.fixture
def numbers_backup(tmp_path: Path) -> Path:
    """A clean sample whose first sessions hold numbers spelled 1.0 and 1.5 in metadata."""
    path = tmp_path / "numbers.db"
    sample.generate(path, rows=120, seed=3, oddities=0)
    with sqlite3.connect(path) as conn:
        conn.execute(
            'UPDATE sessions SET metadata = \'{"ratio": 1.0, "score": 1.5, "n": [2.50]}\' '
            "WHERE rowid <= 3"
        )
    return path


@pytest.mark.parametrize(
    ("changed", "path"),
    [
        ('{"ratio": 1, "score": 1.5, "n": [2.50]}', "$.ratio"),
        ('{"ratio": 1.0, "score": 1.50, "n": [2.50]}', "$.score"),
        ('{"ratio": 1.0, "score": 1.5, "n": [2.5]}', "$.n"),
    ],
)
def test_a_number_spelled_otherwise_is_a_change(numbers_backup, target, dsn, changed, path):
    s = target(numbers_backup)
    steps.migrate(s, progress=False)
    assert steps.reconcile_step(s, progress=False).verdict == PASS
    with psycopg.connect(dsn) as conn:
        (sid,) = conn.execute(
            "SELECT min(session_id) FROM public.sessions WHERE metadata ? 'ratio'"
        ).fetchone()
        conn.execute(
            "UPDATE public.sessions SET metadata = %s::jsonb WHERE session_id = %s",
            (changed, sid),
        )
        # Equal by value, as jsonb compares: only the spelling tells them apart.
        assert conn.execute(
            "SELECT metadata = %s::jsonb FROM public.sessions WHERE session_id = %s",
            ('{"ratio": 1.0, "score": 1.5, "n": [2.50]}', sid),
        ).fetchone() == (True,)
    result = steps.reconcile_step(s, progress=False)
    assert result.verdict == FAIL
    (diff,) = _changed(result)
    assert diff.session == mask_id(sid)
    assert f"metadata at {path}" in diff.detail, diff.detail
    after = steps.reconcile_step(replace(s, reconcile_mode="after_cutover"), progress=False)
    assert after.counts["metadata_changed"] == 1 and after.verdict == FAIL


def test_numbers_at_their_own_spelling_pass_both_ways(numbers_backup, target) -> None:
    s = target(numbers_backup)
    steps.migrate(s, progress=False)
    assert steps.reconcile_step(s, progress=False).verdict in (PASS, WARN)


def test_fingerprints_that_differ_while_every_row_compares_equal_fail() -> None:
    """Two readings of one pair of tables that contradict each other prove nothing."""
    from sessionmig.engines.reconcile import KINDS, _verdict

    counts = dict.fromkeys(KINDS, 0) | {"matched": 300}
    parity = {
        "fingerprints_agree": False,
        "readings_agree": False,
        "distributions_agree": True,
        "active_legacy_rule_sqlite_excluding_rejects": 5,
        "active_postgres": 5,
    }
    verdict, reason, _ = _verdict(counts, 0, parity, "run", [])
    assert verdict == FAIL and "by hash and by equality" in reason
    assert _verdict(counts, 0, parity | {"readings_agree": True}, "run", [])[0] == PASS
