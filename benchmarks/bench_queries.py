"""Every named analysis query on 1M sessions, on PostgreSQL and on the SQLite backup, side by side
(issue 22: each under 5 s on PostgreSQL and under 10 s on SQLite, the first query included).

    .venv/bin/python benchmarks/bench_queries.py --dsn postgresql://postgres@127.0.0.1:5432/postgres

makes a sample backup (``sessionmig.sqlite.sample.generate``, reused when ``--backup`` exists),
migrates it into a fresh database on the server (dropped afterwards; ``--database URL`` uses one
already migrated from the same backup instead), then runs ``--rounds`` rounds. Each round times the
analysis copy's build (what the first SQLite query on a new backup waits for) in a fresh cache,
then every query once on each source; the medians are printed as a Markdown table.

``--compare DIR`` measures another version of the code beside this one — ``DIR`` is its
``scripts`` folder, e.g. a worktree of an older commit (``git worktree add /tmp/old HEAD``).
Each version runs in a process of its own for the whole measurement, and they take turns build
by build and query by query (old first for one, new first for the next), so that a machine
shared with other work slows both alike; the table then has both columns.
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

from sessionmig.engines import queries  # noqa: E402
from sessionmig.postgres.connect import with_database  # noqa: E402
from sessionmig.runbook import steps  # noqa: E402
from sessionmig.sqlite import sample  # noqa: E402

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


def serve(backup: Path, dsn: str) -> None:
    """A measuring process for one version of the code: reads commands from stdin, one a line —
    ``build`` (a fresh analysis copy in a cache of its own, the last one removed) or ``case N``
    (the N-th case once on each source) — and answers each with one line of JSON."""
    os.environ["BENCH_QUERIES_DSN"] = dsn
    s = settings_for(backup)
    print(json.dumps({"code": str(Path(queries.__file__).parent)}), flush=True)
    holder: dict = {}
    with tempfile.TemporaryDirectory() as caches:
        for line in sys.stdin:
            command = line.split()
            if command == ["build"]:
                if "copy" in holder:
                    holder.pop("copy").remove()
                cache = tempfile.mkdtemp(dir=caches)
                took = timed(
                    lambda cache=cache: holder.update(
                        copy=queries.AnalysisCopy.build(backup, s.rules, cache_dir=cache)
                    )
                )
                print(json.dumps({"build": took, "rows": holder["copy"].rows}), flush=True)
            elif command[:1] == ["case"]:
                qname, given = CASES[int(command[1])]
                backends = queries.Backends(dsn=dsn, analysis=holder["copy"], timeout_s=600)
                values = queries.resolve(queries.get(qname), given, s.as_of, s.source_timezone)
                print(
                    json.dumps(
                        {src: timed(queries.run, qname, src, backends, values) for src in SOURCES}
                    ),
                    flush=True,
                )
            else:
                return


class Version:
    """A :func:`serve` process running the code in ``code`` (a ``scripts`` folder)."""

    def __init__(self, backup: Path, dsn: str, code: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve", "--backup", str(backup), "--database", dsn],
            env={**os.environ, "PYTHONPATH": str(code), "SESSIONMIG_BENCH_CODE": str(code)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        ran = self.read()["code"]
        if Path(ran).resolve() != (code / "sessionmig").resolve():
            raise SystemExit(f"the process runs {ran}, not {code}")

    def read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"a measuring process ended (exit {self.process.wait()})")
        return dict(json.loads(line))

    def ask(self, command: str) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait()


def measure(versions: dict[str, Path], backup: Path, dsn: str, rounds: int) -> dict[str, Any]:
    """Each round: every version builds a fresh copy, then runs each case, the versions taking
    turns (old first in one round or case, new first in the next)."""
    running = {n: Version(backup, dsn, code) for n, code in versions.items()}
    out: dict[str, dict[str, Any]] = {n: {"builds": [], "cases": []} for n in versions}
    try:
        for r in range(rounds):
            for n in list(versions)[:: 1 if r % 2 == 0 else -1]:
                print(f"round {r + 1}: {n} builds its copy …", file=sys.stderr)
                out[n]["builds"].append(running[n].ask("build")["build"])
            for i in range(len(CASES)):
                for n in list(versions)[:: 1 if (r + i) % 2 == 0 else -1]:
                    if r == 0:
                        out[n]["cases"].append([])
                    out[n]["cases"][i].append(running[n].ask(f"case {i}"))
    finally:
        for version in running.values():
            version.close()
    return out


def table(found: dict[str, Any]) -> list[str]:
    """The medians: one column per version and source, then the copy's build."""
    names = list(found)
    med = {
        n: [
            {src: statistics.median(run[src] for run in runs) for src in SOURCES}
            for runs in found[n]["cases"]
        ]
        for n in names
    }
    head = ["query", "parameters"]
    head += [f"PostgreSQL s ({n})" for n in names] + [f"SQLite s ({n})" for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, (qname, given) in enumerate(CASES):
        shown = ", ".join(f"{k}={v}" for k, v in given.items()) or "—"
        cells = [qname, shown]
        cells += [f"{med[n][i]['postgres']:.2f}" for n in names]
        cells += [f"{med[n][i]['sqlite']:.2f}" for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for n in names:
        worst = {s: max(c[s] for c in med[n]) for s in SOURCES}
        builds = found[n]["builds"]
        build = statistics.median(builds)
        lines.append(
            f"{n}: slowest median PostgreSQL {worst['postgres']:.2f} s, SQLite "
            f"{worst['sqlite']:.2f} s; the analysis copy built in {build:.1f} s (each round: "
            f"{', '.join(f'{b:.1f}' for b in builds)}), so the first SQLite query on a new "
            f"backup takes up to {build + worst['sqlite']:.1f} s ({len(builds)} rounds, medians)"
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
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--raw", help="also write every timing to this JSON file")
    args = parser.parse_args()

    backup = Path(args.backup)
    if args.serve:
        serve(backup, args.database)
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
        found = measure(versions, backup, dsn, args.rounds)
        if args.raw:
            Path(args.raw).write_text(json.dumps(found, indent=1))
        print("\n".join(table(found)))
    finally:
        if name is not None and args.dsn:
            with psycopg.connect(args.dsn, autocommit=True) as admin:
                admin.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
