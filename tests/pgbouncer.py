"""Debian's PgBouncer, started by a test in front of the test's own database and stopped by it.

Everything it writes (configuration, user list, log) is under the test's ``tmp_path``; it listens
on a free loopback port and on no Unix socket. Run as root, PgBouncer refuses to stay root: it
switches to the owner of the server's socket directory (so it can still reach the embedded
server's socket), or to ``nobody`` for a server on TCP.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict

PGBOUNCER = shutil.which("pgbouncer") or next(
    (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.access(p, os.X_OK)), None
)
needs_pgbouncer = pytest.mark.skipif(
    PGBOUNCER is None,
    reason="pgbouncer is not installed: `make pgbouncer` installs Debian's (apt-get, as root)",
)
START_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Bouncer:
    url: str  # the client's DSN: the same database name and user, through PgBouncer
    log: Path
    process: subprocess.Popen[bytes]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _run_as(host: str) -> str | None:
    if os.geteuid() != 0:
        return None
    if host.startswith("/"):
        return pwd.getpwuid(os.stat(host).st_uid).pw_name
    return "nobody"


@contextlib.contextmanager
def pgbouncer(tmp_path: Path, dsn: str, **settings: str) -> Iterator[Bouncer]:
    """PgBouncer in transaction mode, otherwise at its defaults (plus ``settings``), in front of
    ``dsn``'s database; yields its client URL."""
    assert PGBOUNCER is not None
    target = {k: str(v) for k, v in conninfo_to_dict(dsn).items() if v not in (None, "")}
    host = target.get("host", "localhost")
    user = target.get("user", "postgres")
    dbname = target.get("dbname", user)
    server = " ".join(
        f"{key}={target[key]}"
        for key in ("host", "port", "dbname", "user", "password")
        if key in target
    )
    port = free_port()
    home = tmp_path / f"pgbouncer-{port}"
    home.mkdir()
    users = home / "users.txt"
    users.write_text(f'"{user}" ""\n')
    lines = [
        "[databases]",
        f"{dbname} = {server}",
        "[pgbouncer]",
        "listen_addr = 127.0.0.1",
        f"listen_port = {port}",
        "unix_socket_dir =",
        "auth_type = trust",
        f"auth_file = {users}",
        "pool_mode = transaction",
        *(f"{key} = {value}" for key, value in settings.items()),
    ]
    run_as = _run_as(host)
    if run_as:
        lines.append(f"user = {run_as}")
    ini = home / "pgbouncer.ini"
    ini.write_text("\n".join(lines) + "\n")
    ini.chmod(0o600)  # it may hold the server's password
    log = home / "pgbouncer.log"
    with log.open("wb") as out:
        process = subprocess.Popen([PGBOUNCER, str(ini)], stdout=out, stderr=subprocess.STDOUT)
    bouncer = Bouncer(f"postgresql://{user}@127.0.0.1:{port}/{dbname}", log, process)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise AssertionError(f"pgbouncer exited at start: {bouncer.log_text()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"pgbouncer did not listen within {START_TIMEOUT_S} s")
            time.sleep(0.02)
        yield bouncer
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
