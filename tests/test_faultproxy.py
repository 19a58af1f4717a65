"""The fault proxy does what it says, on a real server: checked by the rows left behind."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from urllib.parse import quote

import psycopg
import pytest
from conftest import TEST_PASSWORD, dsn_with_password, rows_of
from faultproxy import FaultProxy


@pytest.fixture
def proxy(dsn: str) -> Iterator[FaultProxy]:
    with FaultProxy.for_dsn(dsn) as p:
        yield p


@pytest.fixture
def table(dsn: str) -> str:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    return dsn


def ids(dsn: str) -> list[int]:
    return [r[0] for r in rows_of(dsn, "SELECT id FROM t ORDER BY id")]


def test_queries_pass_through(proxy: FaultProxy, table: str) -> None:
    with psycopg.connect(proxy.dsn(table), autocommit=True) as conn:
        conn.execute("INSERT INTO t VALUES (%s)", (1,))
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (1,)
        conn.execute("INSERT INTO t VALUES (2)")  # simple protocol too
    assert ids(table) == [1, 2]
    assert proxy.connections == 1


def test_dsn_keeps_the_form_and_every_other_parameter(proxy: FaultProxy) -> None:
    # The password is made per run, never written as scheme://user:password@ in a file; "@" in
    # it checks that the proxy keeps it percent-encoded.
    secret = quote(TEST_PASSWORD + "@x", safe="")
    url = proxy.dsn(
        dsn_with_password("u", secret, "db.example:6543/my%20db?application_name=x&host=/s")
    )
    assert url == dsn_with_password(
        "u", secret, f"127.0.0.1:{proxy.port}/my%20db?application_name=x&sslmode=disable"
    )
    kv = psycopg.conninfo.conninfo_to_dict(proxy.dsn("host=/run/pg dbname=d user=u options=-cx=1"))
    assert kv == {
        "host": "127.0.0.1",
        "port": str(proxy.port),
        "sslmode": "disable",
        "dbname": "d",
        "user": "u",
        "options": "-cx=1",
    }


def _commit_one(url: str, value: int) -> None:
    with psycopg.connect(url) as conn:
        conn.execute("INSERT INTO t VALUES (%s)", (value,))
        conn.commit()


def test_before_commit_the_transaction_is_lost(proxy: FaultProxy, table: str) -> None:
    fault = proxy.arm("^COMMIT", "before")
    with pytest.raises(psycopg.OperationalError):
        _commit_one(proxy.dsn(table), 1)
    assert fault.fired.is_set() and fault.triggered == 1
    assert ids(table) == []
    _commit_one(proxy.dsn(table), 2)  # times=1: the next commit goes through
    assert ids(table) == [2]


def test_after_commit_the_row_is_there_but_the_answer_is_lost(
    proxy: FaultProxy, table: str
) -> None:
    fault = proxy.arm("^COMMIT", "after")
    with pytest.raises(psycopg.OperationalError):
        _commit_one(proxy.dsn(table), 1)
    assert fault.wait(5)
    assert ids(table) == [1]


def test_after_on_an_autocommit_insert(proxy: FaultProxy, table: str) -> None:
    """Extended protocol, no prepared statement: the Bind of the unnamed Parse matches."""
    proxy.arm(r"INSERT INTO t", "after")
    with (
        psycopg.connect(proxy.dsn(table), autocommit=True) as conn,
        pytest.raises(psycopg.OperationalError),
    ):
        conn.execute("INSERT INTO t VALUES (%s)", (7,))
    assert ids(table) == [7]


def test_hold_then_release_forwards_the_answer(proxy: FaultProxy, table: str) -> None:
    fault = proxy.arm("^COMMIT", "hold")
    errors: list[BaseException] = []

    def commit() -> None:
        try:
            _commit_one(proxy.dsn(table), 1)
        except BaseException as exc:  # noqa: BLE001 — reported below
            errors.append(exc)

    worker = threading.Thread(target=commit)
    worker.start()
    assert fault.wait(10) and fault.answered.wait(10)
    assert ids(table) == [1]  # committed on the server while the client still waits
    assert worker.is_alive()
    fault.release(cut=False)
    worker.join(10)
    assert not worker.is_alive() and errors == []


def test_hold_then_cut_loses_the_answer(proxy: FaultProxy, table: str) -> None:
    fault = proxy.arm("^COMMIT", "hold")
    errors: list[BaseException] = []

    def commit() -> None:
        try:
            _commit_one(proxy.dsn(table), 1)
        except BaseException as exc:  # noqa: BLE001 — reported below
            errors.append(exc)

    worker = threading.Thread(target=commit)
    worker.start()
    assert fault.wait(10)
    fault.release(cut=True)
    worker.join(10)
    assert not worker.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], psycopg.OperationalError)
    assert ids(table) == [1]


@pytest.mark.parametrize("point, expected", [("before", [1, 2]), ("after", [1, 2, 3])])
def test_a_prepared_statement_is_matched_at_each_execution(
    proxy: FaultProxy, table: str, point: str, expected: list[int]
) -> None:
    """The statement is parsed once (named), then only bound: the Bind carries the match."""
    with psycopg.connect(proxy.dsn(table), autocommit=True) as conn:
        for value in (1, 2):
            conn.execute("INSERT INTO t VALUES (%s)", (value,), prepare=True)
        fault = proxy.arm(r"^INSERT INTO t", point)
        with pytest.raises(psycopg.OperationalError):
            conn.execute("INSERT INTO t VALUES (%s)", (3,), prepare=True)
    assert fault.fired.is_set()
    assert ids(table) == expected


def test_statements_prepared_automatically_are_matched(proxy: FaultProxy, table: str) -> None:
    """psycopg prepares a statement by itself after 5 executions: still matched."""
    with psycopg.connect(proxy.dsn(table), autocommit=True) as conn:
        for value in range(1, 9):
            conn.execute("INSERT INTO t VALUES (%s)", (value,))
        fault = proxy.arm(r"^INSERT INTO t", "before")
        with pytest.raises(psycopg.OperationalError):
            conn.execute("INSERT INTO t VALUES (%s)", (9,))
    assert fault.fired.is_set()
    assert ids(table) == list(range(1, 9))


def test_application_name_filter(proxy: FaultProxy, table: str) -> None:
    fault = proxy.arm(r"INSERT INTO t", "before", application_name="victim")
    url = proxy.dsn(table)
    with psycopg.connect(url, autocommit=True, application_name="bystander") as conn:
        conn.execute("INSERT INTO t VALUES (1)")
    assert not fault.fired.is_set()
    with (
        psycopg.connect(url, autocommit=True, application_name="victim-7") as conn,
        pytest.raises(psycopg.OperationalError),
    ):
        conn.execute("INSERT INTO t VALUES (2)")
    assert fault.fired.is_set()
    assert ids(table) == [1]


def test_times_counts_matching_statements(proxy: FaultProxy, table: str) -> None:
    proxy.arm(r"INSERT INTO t", "before", times=2)
    url = proxy.dsn(table)
    outcomes = []
    for value in (1, 2, 3):
        try:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("INSERT INTO t VALUES (%s)", (value,))
            outcomes.append(True)
        except psycopg.OperationalError:
            outcomes.append(False)
    assert outcomes == [False, False, True]
    assert ids(table) == [3]


def test_refuse_and_cut_all(proxy: FaultProxy, table: str) -> None:
    url = proxy.dsn(table)
    conn = psycopg.connect(url, autocommit=True)
    conn.execute("SELECT 1")
    proxy.cut_all()
    with pytest.raises(psycopg.OperationalError):
        conn.execute("INSERT INTO t VALUES (1)")
    conn.close()
    proxy.refuse()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=5)
    proxy.refuse(False)
    _commit_one(url, 2)
    assert ids(table) == [2]
    assert proxy.connections == 3


def test_a_cancel_reaches_the_server(proxy: FaultProxy, table: str) -> None:
    """psycopg's cancel opens a new connection to the proxy with a CancelRequest."""
    with psycopg.connect(proxy.dsn(table), autocommit=True) as conn:
        timer = threading.Timer(0.5, conn.cancel_safe)
        timer.start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(30)")
        timer.join()
        assert conn.execute("SELECT 1").fetchone() == (1,)
