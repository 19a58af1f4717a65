"""Where benchmarks run: the system PostgreSQL when it answers, else the embedded server."""

from __future__ import annotations

from sessionmig.errors import TargetError
from sessionmig.postgres import embedded
from sessionmig.postgres.connect import connect

SYSTEM = "postgresql://postgres@127.0.0.1:5432/postgres"


def server_url(dsn: str | None = None) -> tuple[str, str]:
    """An admin URL (database ``postgres``) and a label for the table header."""
    if dsn:
        return dsn, "given server"
    try:
        with connect(SYSTEM, "bench", connect_timeout=3) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
        return SYSTEM, f"system PostgreSQL {version}"
    except TargetError:
        return embedded.start().get_uri("postgres"), "embedded PostgreSQL 18"
