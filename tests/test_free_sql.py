"""Free SQL reads and nothing else, on PostgreSQL and on the SQLite analysis copy
and the analysis copy is private, reused and removable.

Every attack is checked by its effect: the rows are still there, the table or file was not
created, the backup and its -wal hash the same, no raw session id is shown.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from zoneinfo import ZoneInfo

import pandas as pd
import psycopg
import pytest
from conftest import ROOT, env_file, rows_of
from psycopg import sql
from psycopg.conninfo import make_conninfo

from sessionmig.engines import queries
from sessionmig.errors import ParameterError
from sessionmig.rules.mask import mask_id
from sessionmig.rules.transform import Rules

RULES = Rules(zone=ZoneInfo("Asia/Seoul"))
# Ids in the legacy format, and one that is not: masked by value, not by its shape.
IDS = [f"session-{uuid.UUID(int=i * 7919 + 1, version=4)}" for i in range(20)] + ["tok-0001"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------- PostgreSQL data


@pytest.fixture(params=["dsn_login", "owner_login"])
def pg(dsn: str, request: pytest.FixtureRequest) -> Iterator[queries.Backends]:
    """A target holding the sessions in ``IDS`` and a sequence, loaded directly; reached with
    the test server's (superuser) login, or with a plain login that owns the table, as an
    application's DSN would."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE sessions (session_id text PRIMARY KEY, user_id text, metadata jsonb,"
            " created_at timestamptz, expires_at timestamptz, last_activity timestamptz,"
            " request_count integer)"
        )
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO sessions VALUES (%s, %s, %s, now(), now() + interval '1 day',"
                " now(), %s)",
                [(sid, f"user-{i % 3}", '{"ip": "10.0.0.1"}', i) for i, sid in enumerate(IDS)],
            )
        conn.execute("CREATE SEQUENCE sessionmig_seq")
    if request.param == "dsn_login":
        yield queries.Backends(dsn=dsn, timeout_s=10)
        return
    name = f"smtest_owner_{uuid.uuid4().hex[:10]}"
    owner = sql.Identifier(name)
    password = uuid.uuid4().hex
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(owner, sql.Literal(password))
        )
        conn.execute(sql.SQL("ALTER TABLE sessions OWNER TO {}").format(owner))
        conn.execute(sql.SQL("ALTER SEQUENCE sessionmig_seq OWNER TO {}").format(owner))
    try:
        login = make_conninfo(dsn, user=name, password=password)
        assert not is_superuser(login)
        yield queries.Backends(dsn=login, timeout_s=10)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(owner))
            conn.execute(sql.SQL("DROP ROLE {}").format(owner))


def table_state(dsn: str) -> tuple:
    """Everything a write could change, in one comparable value."""
    return rows_of(
        dsn,
        "SELECT count(*), md5(string_agg(session_id || '|' || coalesce(user_id, '') || '|' ||"
        " request_count, ',' ORDER BY session_id)),"
        " (SELECT last_value FROM sessionmig_seq), to_regclass('pwned') IS NULL FROM sessions",
    )[0]


def is_superuser(dsn: str) -> bool:
    return rows_of(dsn, "SELECT rolsuper FROM pg_roles WHERE rolname = session_user")[0][0]


def attempt(text: str, backends: queries.Backends, source: str = "postgres") -> object:
    """Run an attack; what it raised or returned, so that its effect is checked first."""
    try:
        return queries.run_free_sql(text, source, backends)
    except Exception as exc:  # the effect is asserted before the kind of refusal
        return exc


def shown(outcome: object) -> str:
    """What the analyst would see: the result, or the error message."""
    if isinstance(outcome, pd.DataFrame):
        return queries.to_text(outcome, "json")
    return str(outcome)


def refused(outcome: object, match: str | None = None) -> str:
    """The attack was refused with a ParameterError (whose message matches ``match``)."""
    assert isinstance(outcome, ParameterError), f"not refused as a parameter error: {outcome!r}"
    if match:
        assert re.search(match, str(outcome)), str(outcome)
    return str(outcome)


# ---


def test_commit_then_delete_is_refused(pg: queries.Backends) -> None:
    before = table_state(pg.dsn)
    outcome = attempt("SELECT 1; COMMIT; DELETE FROM sessions", pg)
    assert table_state(pg.dsn) == before and before[0] == len(IDS)
    refused(outcome, "exactly one statement")


def test_rollback_then_create_table_is_refused(pg: queries.Backends) -> None:
    outcome = attempt("ROLLBACK; CREATE TABLE pwned (x int)", pg)
    assert rows_of(pg.dsn, "SELECT to_regclass('pwned')") == [(None,)]
    refused(outcome)


@pytest.mark.parametrize(
    "text",
    [
        "SELECT 1 /* ; */; DELETE FROM sessions",
        "SELECT ';' AS s; DELETE FROM sessions",
        "SELECT $x$ ; COMMIT; $x$; DELETE FROM sessions",
        "SELECT 1 -- ;\n; DELETE FROM sessions",
        "SELECT E'\\';'; DELETE FROM sessions",
        "SELECT 1;\nCOMMIT;\nCREATE TABLE pwned (x int)",
    ],
)
def test_second_statement_hidden_in_comments_strings_or_dollar_quotes_is_refused(
    pg: queries.Backends, text: str
) -> None:
    before = table_state(pg.dsn)
    outcome = attempt(text, pg)
    assert table_state(pg.dsn) == before
    refused(outcome)


@pytest.mark.parametrize(
    "text",
    [
        "SET statement_timeout = 0",
        "RESET ALL",
        "SET ROLE NONE",
        "SET SESSION AUTHORIZATION DEFAULT",
        "BEGIN READ WRITE",
        "SET TRANSACTION READ WRITE",
        "COMMIT",
        "DO $$BEGIN DELETE FROM sessions; END$$",
        "COPY sessions TO STDOUT",
        "CREATE TABLE pwned (x int)",
        "DELETE FROM sessions",
        "UPDATE sessions SET user_id = 'x'",
        "WITH d AS (DELETE FROM sessions RETURNING 1) SELECT count(*) FROM d",
        "SELECT * FROM sessions FOR UPDATE",
        "SELECT nextval('sessionmig_seq')",
        "SELECT set_config('transaction_read_only', 'off', true), count(*) FROM sessions",
        "SELECT 1 INTO pwned",
    ],
)
def test_statements_that_write_or_leave_the_transaction_are_refused(
    pg: queries.Backends, text: str
) -> None:
    before = table_state(pg.dsn)
    outcome = attempt(text, pg)
    assert table_state(pg.dsn) == before
    refused(outcome)


def test_timeout_cannot_be_lifted_by_the_statement(pg: queries.Backends) -> None:
    quick = queries.Backends(dsn=pg.dsn, timeout_s=1)
    for text in (
        "SELECT set_config('statement_timeout', '0', true), pg_sleep(30)",
        "SELECT set_config('statement_timeout', '0', false), pg_sleep(30)",
    ):
        started = time.monotonic()
        outcome = attempt(text, quick)
        assert time.monotonic() - started < 25  # not the 30 s sleep, however loaded the machine
        refused(outcome, "ran longer than 1 s")


def test_copy_to_program_writes_no_file(pg: queries.Backends) -> None:
    if not is_superuser(pg.dsn):
        pytest.skip("COPY TO PROGRAM needs a superuser DSN")
    # In /tmp: the server's OS user must be able to create it, were the attack to work.
    target = Path(f"/tmp/sessionmig-pwned-{uuid.uuid4().hex}")
    me = rows_of(pg.dsn, "SELECT session_user")[0][0]
    texts = [
        f"COPY sessions TO PROGRAM 'touch {target}'",
        f"SELECT query_to_xml('COPY sessions TO PROGRAM ''touch {target}''', true, true, '')",
        f"SELECT set_config('session_authorization', '{me}', true),"
        f" query_to_xml('SELECT lo_export(0, ''{target}'')', true, true, '')",
    ]
    try:
        for text in texts:
            outcome = attempt(text, pg)
            assert not target.exists(), text
            refused(outcome)
    finally:
        target.unlink(missing_ok=True)


def test_superuser_dsn_cannot_take_its_powers_back(pg: queries.Backends) -> None:
    if not is_superuser(pg.dsn):
        pytest.skip("needs a superuser DSN")
    me = rows_of(pg.dsn, "SELECT session_user")[0][0]
    # A file of every data directory, with a line no result would hold otherwise.
    secret = "Do not edit this file manually"
    assert secret in rows_of(pg.dsn, "SELECT pg_read_file('postgresql.auto.conf')")[0][0]
    for text in (
        "SELECT pg_read_file('postgresql.auto.conf') AS f",
        f"SELECT set_config('role', '{me}', true), pg_read_file('postgresql.auto.conf') AS f",
        f"SELECT set_config('session_authorization', '{me}', true),"
        " query_to_xml('SELECT pg_read_file(''postgresql.auto.conf'') AS f', true, true, '')",
    ):
        outcome = attempt(text, pg)
        assert secret not in shown(outcome), text
        refused(outcome)
    # A backend of the DSN's (superuser) role survives an attempt to terminate it.
    with psycopg.connect(pg.dsn, autocommit=True) as victim:
        outcome = attempt(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()",
            pg,
        )
        assert victim.execute("SELECT 1").fetchone() == (1,)
        refused(outcome)


def test_transient_login_leaves_no_role_and_no_grant(pg: queries.Backends) -> None:
    if not is_superuser(pg.dsn):
        pytest.skip("the transient login is used for superuser DSNs only")
    acl_query = (
        "SELECT relacl::text, (SELECT datacl::text FROM pg_database"
        " WHERE datname = current_database()) FROM pg_class WHERE oid = 'sessions'::regclass"
    )
    acl = rows_of(pg.dsn, acl_query)
    # One left by a killed run, expired: swept by the next call.
    stale = f"sessionmig_ro_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN VALID UNTIL '2000-01-01'").format(sql.Identifier(stale))
        )
    got = queries.run_free_sql(
        "SELECT count(*) AS n, current_user AS who FROM sessions", "postgres", pg
    )
    reader = got.loc[0, "who"]
    assert got.loc[0, "n"] == len(IDS) and reader.startswith("sessionmig_ro_")
    left = rows_of(
        pg.dsn, "SELECT rolname FROM pg_roles WHERE rolname IN (%s, %s)", (reader, stale)
    )
    assert left == [] and rows_of(pg.dsn, acl_query) == acl


@pytest.mark.parametrize(
    "text",
    [
        "SELECT session_id AS t FROM sessions ORDER BY session_id",
        "SELECT session_id || '' AS x, user_id FROM sessions ORDER BY 1",
        "SELECT jsonb_build_object('id', session_id) AS j FROM sessions",
        "SELECT array_agg(session_id) AS a FROM sessions",
        "SELECT 'token ' || session_id AS s FROM sessions",
        "SELECT session_id, session_id AS again FROM sessions",
    ],
)
def test_session_ids_are_masked_on_postgresql_whatever_the_column_is_called(
    pg: queries.Backends, text: str
) -> None:
    frame = queries.run_free_sql(text, "postgres", pg)
    shown = "".join(queries.to_text(frame, f) for f in ("table", "csv", "json"))
    assert len(frame) > 0
    assert not [sid for sid in IDS if sid in shown]
    clear = queries.run_free_sql(text, "postgres", pg, show_ids=True)
    assert "tok-0001" in queries.to_text(clear, "json")  # asked for explicitly


def test_aliased_ids_mask_to_the_same_text_as_named_columns(pg: queries.Backends) -> None:
    frame = queries.run_free_sql(
        'SELECT session_id AS t FROM sessions ORDER BY session_id COLLATE "C"', "postgres", pg
    )
    assert list(frame["t"]) == [mask_id(s) for s in sorted(IDS, key=lambda s: s.encode())]


def test_error_messages_mask_session_ids(pg: queries.Backends) -> None:
    outcome = attempt("SELECT session_id::int FROM sessions WHERE session_id = 'tok-0001'", pg)
    assert "tok-0001" not in shown(outcome) and mask_id("tok-0001") in refused(outcome)
    outcome = attempt(f"SELECT '{IDS[0]}'::int", pg)
    assert IDS[0] not in shown(outcome) and mask_id(IDS[0]) in refused(outcome)


def test_plain_queries_still_answer(pg: queries.Backends) -> None:
    got = queries.run_free_sql(
        "WITH u AS (SELECT user_id, count(*) AS n FROM sessions GROUP BY 1)"
        " SELECT user_id, n FROM u ORDER BY user_id;",
        "postgres",
        pg,
    )
    assert got.to_dict("records") == [
        {"user_id": "user-0", "n": 7},
        {"user_id": "user-1", "n": 7},
        {"user_id": "user-2", "n": 7},
    ]


# --------------------------------------------------------------------------- SQLite data


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's own cache folder (the user's real cache is never touched)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "sessionmig" / "analysis"


@pytest.fixture
def wal_backup(clean_backup: Path, tmp_path: Path) -> Path:
    """A backup copied from a running app: its last commits are still in ``-wal``."""
    live = sqlite3.connect(clean_backup)
    live.execute("PRAGMA journal_mode = WAL")
    live.execute("PRAGMA wal_autocheckpoint = 0")
    live.execute("UPDATE sessions SET request_count = request_count + 1 WHERE rowid <= 5")
    live.commit()
    folder = tmp_path / "backup"
    folder.mkdir()
    shutil.copyfile(clean_backup, folder / "sessions.db")
    shutil.copyfile(str(clean_backup) + "-wal", folder / "sessions.db-wal")
    live.close()
    return folder / "sessions.db"


def lite(text: str, copy: queries.AnalysisCopy, **kw) -> object:
    return queries.run_free_sql(text, "sqlite", queries.Backends(analysis=copy, timeout_s=10), **kw)


def lite_attempt(text: str, copy: queries.AnalysisCopy) -> object:
    return attempt(text, queries.Backends(analysis=copy, timeout_s=10), "sqlite")


# ---


def test_attach_of_the_backup_is_refused_and_its_wal_is_untouched(
    wal_backup: Path, cache: Path
) -> None:
    wal = Path(str(wal_backup) + "-wal")
    before = (sha256(wal_backup), sha256(wal))
    copy = queries.AnalysisCopy.build(wal_backup, RULES)
    outcome = lite_attempt(f"ATTACH DATABASE '{wal_backup}' AS e", copy)
    assert sorted(p.name for p in wal_backup.parent.iterdir()) == ["sessions.db", "sessions.db-wal"]
    assert (sha256(wal_backup), sha256(wal)) == before
    refused(outcome, "ATTACH")


@pytest.mark.parametrize(
    "text",
    [
        "ATTACH DATABASE '{new}' AS n",
        "ATTACH '{new}' AS n",
        "VACUUM INTO '{new}'",
        "SELECT * FROM sessions; ATTACH '{new}' AS n",
    ],
)
def test_attach_of_a_new_path_creates_no_file(
    clean_backup: Path, cache: Path, tmp_path: Path, text: str
) -> None:
    copy = queries.AnalysisCopy.build(clean_backup, RULES)
    new = tmp_path / "new.db"
    outcome = lite_attempt(text.format(new=new), copy)
    assert not new.exists()
    refused(outcome)


@pytest.mark.parametrize(
    "text",
    [
        "DELETE FROM sessions",
        "INSERT INTO sessions (session_id) VALUES ('x')",
        "UPDATE sessions SET user_id = 'x'",
        "CREATE TABLE pwned (x)",
        "CREATE TEMP TABLE pwned (x)",
        "CREATE TEMP VIEW v AS SELECT 1",
        "DROP TABLE sessions",
        "ALTER TABLE sessions ADD COLUMN x",
        "PRAGMA query_only = 0",
        "PRAGMA journal_mode = WAL",
        "PRAGMA writable_schema = 1",
        "PRAGMA wal_checkpoint(TRUNCATE)",
        "PRAGMA optimize",
        "BEGIN IMMEDIATE",
        "SAVEPOINT x",
        "DETACH DATABASE main",
        "REINDEX",
        "ANALYZE",
        "SELECT load_extension('/tmp/x')",
    ],
)
def test_writes_ddl_and_writing_pragmas_are_refused(
    clean_backup: Path, cache: Path, text: str
) -> None:
    copy = queries.AnalysisCopy.build(clean_backup, RULES)
    before = (sha256(copy.path), sorted(p.name for p in copy.path.parent.iterdir()))
    outcome = lite_attempt(text, copy)
    assert (sha256(copy.path), sorted(p.name for p in copy.path.parent.iterdir())) == before
    assert lite("SELECT count(*) AS n FROM sessions", copy).loc[0, "n"] == 300
    refused(outcome, "read-?only")


@pytest.mark.parametrize(
    "text",
    ["SELECT 1; DELETE FROM sessions", "SELECT ';'; PRAGMA query_only = 0", "SELECT 1 /* ; */; ;"],
)
def test_more_than_one_statement_is_refused(clean_backup: Path, cache: Path, text: str) -> None:
    copy = queries.AnalysisCopy.build(clean_backup, RULES)
    refused(lite_attempt(text, copy), "exactly one statement")


def test_reading_still_works(clean_backup: Path, cache: Path) -> None:
    copy = queries.AnalysisCopy.build(clean_backup, RULES)
    columns = lite("PRAGMA table_info(sessions)", copy)
    assert list(columns["name"])[:2] == ["session_id", "user_id"]
    assert len(lite("SELECT * FROM pragma_table_info('sessions')", copy)) == 7
    keys = lite("SELECT DISTINCT j.key FROM sessions, json_each(sessions.metadata) j", copy)
    assert {"ip", "locale", "client"} <= set(keys["key"])
    counted = lite(
        "WITH RECURSIVE w(h) AS (SELECT 0 UNION ALL SELECT h + 1 FROM w WHERE h < 4)"
        " SELECT count(*) AS n FROM w",
        copy,
    )
    assert counted.loc[0, "n"] == 5


@pytest.mark.parametrize(
    "text",
    [
        "SELECT session_id AS t FROM sessions",
        "SELECT session_id || '' AS x FROM sessions",
        "SELECT json_object('id', session_id) AS j FROM sessions",
        "SELECT 'token ' || session_id AS s FROM sessions",
    ],
)
def test_session_ids_are_masked_on_sqlite_whatever_the_column_is_called(
    clean_backup: Path, cache: Path, text: str
) -> None:
    copy = queries.AnalysisCopy.build(clean_backup, RULES)
    with sqlite3.connect(copy.path) as conn:
        ids = [r[0] for r in conn.execute("SELECT session_id FROM sessions")]
    frame = lite(text, copy)
    shown = "".join(queries.to_text(frame, f) for f in ("table", "csv", "json"))
    assert len(frame) == 300 and not [sid for sid in ids if sid in shown]


# ---


def test_copy_is_private_in_the_user_cache(clean_backup: Path, cache: Path) -> None:
    copy = queries.AnalysisCopy.build(clean_backup, RULES)
    assert copy.path.is_relative_to(cache)
    assert copy.path.parent.name.startswith(sha256(clean_backup))
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert stat.S_IMODE(copy.path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(copy.path.stat().st_mode) == 0o600
    assert copy.rows == 300 and copy.left_out == 0


def test_second_query_does_not_rebuild(
    clean_backup: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    fill = queries._fill
    monkeypatch.setattr(queries, "_fill", lambda *a: calls.append(1) or fill(*a))
    first = queries.AnalysisCopy.build(clean_backup, RULES)
    assert len(calls) == 1
    made = first.path.stat()
    second = queries.AnalysisCopy.build(clean_backup, RULES)
    assert len(calls) == 1  # not one row normalised again
    assert second.path == first.path and (second.rows, second.left_out) == (300, 0)
    assert (second.path.stat().st_ino, second.path.stat().st_mtime_ns) == (
        made.st_ino,
        made.st_mtime_ns,
    )
    assert lite("SELECT count(*) AS n FROM sessions", second).loc[0, "n"] == 300


def test_another_backup_or_zone_never_reuses_a_copy(
    clean_backup: Path, cache: Path, tmp_path: Path
) -> None:
    first = queries.AnalysisCopy.build(clean_backup, RULES)
    utc = queries.AnalysisCopy.build(clean_backup, Rules(zone=ZoneInfo("UTC")))
    assert utc.path != first.path
    other = tmp_path / "other.db"
    shutil.copyfile(clean_backup, other)
    with sqlite3.connect(other) as conn:
        conn.execute("DELETE FROM sessions WHERE rowid = 1")
    changed = queries.AnalysisCopy.build(other, RULES)
    assert changed.path != first.path and changed.rows == 299
    assert len(list(cache.iterdir())) == 3


def test_failed_build_leaves_nothing_behind(
    clean_backup: Path, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))

    def broken(*_a: object) -> None:
        raise RuntimeError("boom")

    # Half-way through the rows, on either path (the rules', or plain rows' fast one).
    monkeypatch.setattr(queries, "normalise", broken)
    monkeypatch.setattr(queries, "_plain_metadata", broken)
    with pytest.raises(RuntimeError, match="boom"):
        queries.AnalysisCopy.build(clean_backup, RULES)
    assert list(scratch.iterdir()) == []
    assert not cache.exists() or list(cache.iterdir()) == []


def test_copies_can_be_removed(clean_backup: Path, cache: Path) -> None:
    copy = queries.AnalysisCopy.build(clean_backup, RULES)
    copy.remove()
    assert not copy.path.parent.exists()
    old = queries.AnalysisCopy.build(clean_backup, RULES)
    assert old.built
    queries.AnalysisCopy.build(clean_backup, Rules(zone=ZoneInfo("UTC")))
    week_ago = time.time() - 7 * 86400
    os.utime(old.path.parent, (week_ago, week_ago))
    assert queries.prune_analysis_copies() == 1 and not old.path.exists()
    assert queries.remove_analysis_copies() == 1 and list(cache.iterdir()) == []


def test_query_command_leaves_nothing_in_tmp_and_builds_once(
    clean_backup: Path, tmp_path: Path
) -> None:
    scratch, xdg = tmp_path / "scratch", tmp_path / "xdg"
    scratch.mkdir()
    env = {
        **os.environ,
        "TMPDIR": str(scratch),
        "XDG_CACHE_HOME": str(xdg),
        "SMTEST_DSN": "postgresql://nobody@127.0.0.1:1/none",
    }
    config = env_file(tmp_path, clean_backup)
    command = [sys.executable, "-m", "sessionmig.cli", "query", "anomalies", "--env", str(config)]
    command += ["--source", "sqlite", "--format", "json"]
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr
    (entry,) = (xdg / "sessionmig" / "analysis").iterdir()
    built = (entry / "analysis.db").stat().st_mtime_ns
    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    assert second.returncode == 0 and second.stdout == first.stdout
    assert (entry / "analysis.db").stat().st_mtime_ns == built
    assert list(scratch.iterdir()) == []
