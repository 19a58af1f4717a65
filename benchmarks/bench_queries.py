"""Every named analysis query on 1M sessions, on PostgreSQL and on the SQLite backup, side by side
(issue 22: each under 5 s on PostgreSQL and under 10 s on SQLite, the first query included).

    .venv/bin/python benchmarks/bench_queries.py --dsn postgresql://postgres@127.0.0.1:5432/postgres

makes a sample backup (``sessionmig.sample.generate``, reused when ``--backup`` exists), migrates
it into a fresh database on the server (dropped afterwards), times the analysis copy's build
(what the first SQLite query on a new backup waits for) in a cache of its own, then runs every
query ``--rounds`` times on each source and prints the medians as a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402

from sessionmig import queries, sample, steps  # noqa: E402
from sessionmig.connect import with_database  # noqa: E402

AS_OF = "2026-01-15T12:00:00+09:00"
ZONE = "Asia/Seoul"
# Each query with the parameters that make it work hardest on the sample.
CASES: list[tuple[str, dict]] = [
    ("active_at", {}),
    ("active_over_time", {"unit": "hour"}),
    ("active_over_time", {"unit": "15min", "timezone": "America/New_York"}),
    ("active_over_time", {"unit": "day", "start": "2025-12-15T00:00:00+09:00"}),
    ("sessions_started", {"unit": "hour"}),
    ("sessions_per_user", {"top_n": 10}),
    ("request_count_distribution", {"width": 10}),
    ("lifetime_hours", {}),
    ("percentiles", {}),
    ("ttl_used", {}),
    ("metadata_keys", {}),
    ("metadata_top_values", {"top_n": 3}),
    ("anomalies", {}),
    ("cutover_watch", {"hours": 24}),
    ("cutover_watch", {"hours": 168}),
    ("user_sessions", {"user_id": "user-000007"}),
    ("user_sessions", {"anonymous": True}),
]


def timed(work, *args, **kwargs) -> float:
    started = time.perf_counter()
    work(*args, **kwargs)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", required=True, help="admin URL of the PostgreSQL server")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--backup", default=str(ROOT / ".sessionmig" / "bench" / "queries-1m.db"))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    backup = Path(args.backup)
    if not backup.exists():
        print(f"generating {args.rows:,} sessions into {backup} …", file=sys.stderr)
        sample.generate(backup, rows=args.rows)
    name = f"bench_queries_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = with_database(args.dsn, name)
    os.environ["BENCH_QUERIES_DSN"] = dsn
    try:
        s = steps.settings(
            sqlite_path=str(backup),
            source_timezone=ZONE,
            as_of=AS_OF,
            database_url_env="BENCH_QUERIES_DSN",
        )
        print("migrating …", file=sys.stderr)
        steps.migrate(s, progress=False)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE sessions")
        with tempfile.TemporaryDirectory() as cache:
            holder: dict = {}
            build = timed(
                lambda: holder.update(
                    copy=queries.AnalysisCopy.build(backup, s.rules, cache_dir=cache)
                )
            )
            backends = queries.Backends(dsn=dsn, analysis=holder["copy"], timeout_s=600)
            print(f"analysis copy of {holder['copy'].rows:,} rows built in {build:.1f} s\n")
            print(
                "| query | parameters | PostgreSQL s (median) | SQLite s (median) "
                "| SQLite first query incl. copy s |"
            )
            print("|---|---|---|---|---|")
            worst = {"postgres": 0.0, "sqlite": 0.0}
            for qname, given in CASES:
                values = queries.resolve(queries.get(qname), given, s.as_of, s.source_timezone)
                runs: dict[str, list[float]] = {"postgres": [], "sqlite": []}
                for _ in range(args.rounds):  # side by side, round after round
                    for source in runs:
                        runs[source].append(timed(queries.run, qname, source, backends, values))
                med = {k: statistics.median(v) for k, v in runs.items()}
                for k in worst:
                    worst[k] = max(worst[k], med[k])
                shown = ", ".join(f"{k}={v}" for k, v in given.items()) or "—"
                print(
                    f"| {qname} | {shown} | {med['postgres']:.2f} | {med['sqlite']:.2f} | "
                    f"{build + med['sqlite']:.1f} |"
                )
            print(
                f"\nslowest median: PostgreSQL {worst['postgres']:.2f} s, SQLite "
                f"{worst['sqlite']:.2f} s; first SQLite query on a new backup ≤ "
                f"{build + worst['sqlite']:.1f} s (copy {build:.1f} s)"
            )
            holder["copy"].remove()
    finally:
        with psycopg.connect(args.dsn, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
