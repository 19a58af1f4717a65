"""What a killed run leaves of the embedded server is settled by the next.

Each test runs the server of its own data directory in subprocesses (the way ``sessionmig run``
does), kills them as an operator's SIGKILL would, and checks that the next ``start()`` works and
that, once it is done, no postgres process of that directory is left running.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from sessionmig.postgres import embedded

HOLD = """
import time
from sessionmig.postgres import embedded
server = embedded.start()
print(server.get_pid(), flush=True)
time.sleep(600)
"""

USE = """
import os
import sys
from sessionmig.postgres import embedded
from sessionmig.postgres.connect import connect
# A test may shorten how long a leftover server is given to answer and to shut down.
limits = {"ANSWER_TIMEOUT_S": "SMTEST_ANSWER_S", "SHUTDOWN_TIMEOUT_S": "SMTEST_STOP_S"}
for name, variable in limits.items():
    if variable in os.environ:
        setattr(embedded, name, float(os.environ[variable]))
server = embedded.start()
with connect(server.get_uri("postgres"), "test", connect_timeout=5) as conn:
    answer = conn.execute("SELECT 6 * 7").fetchone()[0]
print(server.get_pid(), answer, flush=True)
if sys.argv[1] == "stop":
    embedded.stop()  # as sessionmig run does; otherwise the package's exit hook stops it
"""


def processes_of(path: Path) -> list[psutil.Process]:
    """Every postgres process working in ``path`` (postmaster and children chdir there)."""
    found = []
    for process in psutil.process_iter(["name", "cwd"]):
        if process.info["name"] == "postgres" and process.info["cwd"] == str(path):
            found.append(process)
    return found


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting for init to reap it is not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def settle(path: Path, timeout: float = 60.0) -> list[psutil.Process]:
    """The processes of ``path`` still alive once a shutdown has had time to finish."""
    deadline = time.monotonic() + timeout
    while (left := processes_of(path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.fixture
def pgdata() -> Iterator[Path]:
    # Not under tmp_path: as root the server runs as another user, and pytest keeps its own
    # temporary root private (0700). Short, too: the server's socket lives in it.
    base = Path(tempfile.mkdtemp(prefix="smpg-")).resolve()
    base.chmod(0o755)
    path = base / "pg"
    yield path
    for process in processes_of(path):  # never leave a server behind, whatever the outcome
        process.kill()
    psutil.wait_procs(processes_of(path), timeout=5)
    shutil.rmtree(base, ignore_errors=True)


def python(script: str, pgdata: Path, *args: str, **extra: str) -> subprocess.Popen:
    env = {**os.environ, embedded.PGDATA_VARIABLE: str(pgdata), **extra}
    env.pop(embedded.URL_VARIABLE, None)
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def killed_holder(pgdata: Path) -> int:
    """Start the server in a process, SIGKILL that process; return the postmaster's pid."""
    holder = python(HOLD, pgdata)
    line = holder.stdout.readline()  # type: ignore[union-attr]
    assert line.strip().isdigit(), holder.stderr.read()  # type: ignore[union-attr]
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    holder.stdout.close()  # type: ignore[union-attr]
    holder.stderr.close()  # type: ignore[union-attr]
    return int(line)


def use(pgdata: Path, how: str, **extra: str) -> tuple[int, int]:
    """Start the server again in a new process, query it, end that process; (pid, answer)."""
    process = python(USE, pgdata, how, **extra)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-3000:]
    pid, answer = out.split()
    return int(pid), int(answer)


def test_orphan_of_a_killed_run_is_reused_then_stopped(pgdata: Path) -> None:
    orphan = killed_holder(pgdata)
    assert running(orphan)  # what SIGKILL of `run --env local` leaves today
    pid, answer = use(pgdata, "stop")
    assert (pid, answer) == (orphan, 42)  # it answered, so the next run reused it
    assert settle(pgdata) == []
    assert not running(orphan)
    assert not (pgdata / "postmaster.pid").exists()


def test_orphan_is_stopped_by_the_exit_hook_too(pgdata: Path) -> None:
    orphan = killed_holder(pgdata)
    pid, answer = use(pgdata, "exit")  # a notebook run alone never calls stop()
    assert (pid, answer) == (orphan, 42)
    assert settle(pgdata) == []


def test_stale_pid_file_after_the_postmaster_itself_was_killed(pgdata: Path) -> None:
    postmaster = killed_holder(pgdata)
    os.kill(postmaster, signal.SIGKILL)
    psutil.wait_procs([psutil.Process(postmaster)], timeout=10)
    assert (pgdata / "postmaster.pid").exists()  # stale: names a dead process
    pid, answer = use(pgdata, "exit")
    assert answer == 42 and pid != postmaster
    assert settle(pgdata) == []
    assert not (pgdata / "postmaster.pid").exists()


def test_an_orphan_that_does_not_answer_is_stopped_and_replaced(pgdata: Path) -> None:
    orphan = killed_holder(pgdata)
    os.kill(orphan, signal.SIGSTOP)  # alive, holding its socket and pid file, answering nobody
    try:
        pid, answer = use(pgdata, "stop", SMTEST_ANSWER_S="2", SMTEST_STOP_S="2")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(orphan, signal.SIGCONT)
    assert answer == 42 and pid != orphan  # a clean server was started in its place
    assert not running(orphan)
    assert settle(pgdata) == []


def test_pid_file_naming_an_unrelated_live_process(pgdata: Path) -> None:
    use(pgdata, "stop")  # a cluster, cleanly stopped
    assert settle(pgdata) == []
    stranger = subprocess.Popen(["sleep", "600"])
    try:
        # What a killed postmaster leaves once the system gives its pid to another process.
        (pgdata / "postmaster.pid").write_text(
            f"{stranger.pid}\n{pgdata}\n{int(time.time())}\n5432\n{pgdata}\n\n"
            "  5432001         0\nready\n"
        )
        pid, answer = use(pgdata, "stop")
        assert answer == 42 and pid != stranger.pid
        assert stranger.poll() is None  # the unrelated process was left alone
        assert settle(pgdata) == []
    finally:
        stranger.kill()
        stranger.wait()


def test_a_live_holder_keeps_the_server(pgdata: Path) -> None:
    """A server another live process holds is shared, never stopped under it."""
    holder = python(HOLD, pgdata)
    try:
        postmaster = int(holder.stdout.readline())  # type: ignore[union-attr]
        pid, answer = use(pgdata, "stop")
        assert (pid, answer) == (postmaster, 42)
        assert running(postmaster)  # still serving the live holder
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        holder.stdout.close()  # type: ignore[union-attr]
        holder.stderr.close()  # type: ignore[union-attr]
    use(pgdata, "stop")  # the holder is gone now: the next user stops the server after it
    assert settle(pgdata) == []
