"""Every named analysis query on 1M sessions, on PostgreSQL and on the SQLite backup, side by side
(issue 22: each under 5 s on PostgreSQL and under 10 s on SQLite, the first query included).

    .venv/bin/python benchmarks/bench_queries.py --dsn postgresql://postgres@127.0.0.1:5432/postgres

makes a sample backup (``sessionmig.sample.generate``, reused when ``--backup`` exists), migrates
it into a fresh database on the server (dropped afterwards; ``--database URL`` uses one already
migrated from the same backup instead), then runs ``--rounds`` rounds. Each round is a process
of its own that times the analysis copy's build (what the first SQLite query on a new backup
waits for) in a fresh cache of its own, then every query once on each source; the medians are
printed as a Markdown table.

``--compare DIR`` measures another version of the code beside this one — ``DIR`` is its
``scripts`` folder, e.g. a worktree of an older commit (``git worktree add /tmp/old HEAD``) —
in alternating rounds (old, new, new, old, …), so that a machine shared with other work slows
both alike; the table then has both columns.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if "SESSIONMIG_BENCH_CODE" not in os.environ:  # a --compare round brings its own code
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
SOURCES = ("postgres", "sqlite")


def timed(work, *args, **kwargs) -> float:
    started = time.perf_counter()
    work(*args, **kwargs)
    return time.perf_counter() - started


def settings_for(backup: Path) -> Any:
    return steps.settings(
        sqlite_path=str(backup),
        source_timezone=ZONE,
        as_of=AS_OF,
        database_url_env="BENCH_QUERIES_DSN",
    )


def one_round(backup: Path, dsn: str) -> dict[str, Any]:
    """One round in this process: the copy's build, then every case once on each source."""
    os.environ["BENCH_QUERIES_DSN"] = dsn
    s = settings_for(backup)
    out: dict[str, Any] = {"code": str(Path(queries.__file__).parent), "cases": []}
    with tempfile.TemporaryDirectory() as cache:
        holder: dict = {}
        out["build"] = timed(
            lambda: holder.update(copy=queries.AnalysisCopy.build(backup, s.rules, cache_dir=cache))
        )
        out["rows"] = holder["copy"].rows
        backends = queries.Backends(dsn=dsn, analysis=holder["copy"], timeout_s=600)
        for qname, given in CASES:
            values = queries.resolve(queries.get(qname), given, s.as_of, s.source_timezone)
            out["cases"].append(
                {src: timed(queries.run, qname, src, backends, values) for src in SOURCES}
            )
        holder["copy"].remove()
    return out


def round_in_process(backup: Path, dsn: str, code: Path) -> dict[str, Any]:
    """:func:`one_round` in a process running the code in ``code`` (a ``scripts`` folder)."""
    done = subprocess.run(
        [sys.executable, __file__, "--one-round", "--backup", str(backup), "--database", dsn],
        env={**os.environ, "PYTHONPATH": str(code), "SESSIONMIG_BENCH_CODE": str(code)},
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"a round with {code} failed:\n{done.stderr}")
    result = json.loads(done.stdout.splitlines()[-1])
    if Path(result["code"]).resolve() != (code / "sessionmig").resolve():
        raise SystemExit(f"the round ran {result['code']}, not {code}")
    return result


def table(rounds: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The medians: one column per version and source, then the copy's build."""
    names = list(rounds)
    med: dict[str, dict[str, Any]] = {}
    for name, runs in rounds.items():
        med[name] = {
            "build": statistics.median(r["build"] for r in runs),
            "cases": [
                {src: statistics.median(r["cases"][i][src] for r in runs) for src in SOURCES}
                for i in range(len(CASES))
            ],
        }
    head = ["query", "parameters"]
    head += [f"PostgreSQL s ({n})" for n in names] + [f"SQLite s ({n})" for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, (qname, given) in enumerate(CASES):
        shown = ", ".join(f"{k}={v}" for k, v in given.items()) or "—"
        cells = [qname, shown]
        cells += [f"{med[n]['cases'][i]['postgres']:.2f}" for n in names]
        cells += [f"{med[n]['cases'][i]['sqlite']:.2f}" for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for n in names:
        worst = {s: max(c[s] for c in med[n]["cases"]) for s in SOURCES}
        build = med[n]["build"]
        lines.append(
            f"{n}: slowest median PostgreSQL {worst['postgres']:.2f} s, SQLite "
            f"{worst['sqlite']:.2f} s; the analysis copy built in {build:.1f} s, so the first "
            f"SQLite query on a new backup takes up to {build + worst['sqlite']:.1f} s "
            f"({len(rounds[n])} rounds, medians)"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="admin URL of the PostgreSQL server")
    parser.add_argument("--database", help="URL of a database already migrated from --backup")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--backup", default=str(ROOT / ".sessionmig" / "bench" / "queries-1m.db"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compare", help="the scripts folder of another version of the code")
    parser.add_argument("--one-round", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    backup = Path(args.backup)
    if args.one_round:
        print(json.dumps(one_round(backup, args.database)))
        return 0
    if not backup.exists():
        print(f"generating {args.rows:,} sessions into {backup} …", file=sys.stderr)
        sample.generate(backup, rows=args.rows)
    name = None
    dsn = args.database
    if dsn is None:
        if not args.dsn:
            parser.error("give --dsn (a server to migrate into) or --database")
        name = f"bench_queries_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(args.dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        dsn = with_database(args.dsn, name)
    try:
        if name is not None:
            os.environ["BENCH_QUERIES_DSN"] = dsn
            print("migrating …", file=sys.stderr)
            steps.migrate(settings_for(backup), progress=False)
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("VACUUM ANALYZE sessions")
        versions = {"this": ROOT / "scripts"}
        if args.compare:
            versions = {"old": Path(args.compare).resolve(), "new": ROOT / "scripts"}
        rounds: dict[str, list[dict[str, Any]]] = {n: [] for n in versions}
        for r in range(args.rounds):
            order = list(versions) if r % 2 == 0 else list(reversed(versions))
            for n in order:
                print(f"round {r + 1}: {n} …", file=sys.stderr)
                rounds[n].append(round_in_process(backup, dsn, versions[n]))
        print("\n".join(table(rounds)))
    finally:
        if name is not None and args.dsn:
            with psycopg.connect(args.dsn, autocommit=True) as admin:
                admin.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
