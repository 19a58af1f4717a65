"""Time inspect, bulk against row by row, beside migrate (not a test).

Inspect (the census) should take no longer than the migrate step on the same backup. Every
round migrates the backup into a fresh database on the target server (the migrate engine,
``steps.migrate``), then runs inspect both ways — ``fast`` (the bulk path) and ``rows`` (every
row through the rules, the reference the tests compare the bulk path with) — and, with
``--baseline``, the same step of another checkout. (Reconcile, with the application check in
it, is timed by ``bench.py``.) Each run is a process of its own; the time shown is the step's
own (measured inside the process, interpreter start excluded), with the peak RSS of the process
or of its largest worker process, whichever is larger. Ways alternate their order from round
to round; the machine's load average is printed with every round.

    .venv/bin/python benchmarks/bench_census.py --rows 1000000 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import yaml
from target import server_url

from sessionmig.postgres import embedded
from sessionmig.postgres.connect import connect

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"
DATABASE = "sessionmig_bench_census"

STEP = r"""
import json, resource, sys, time, yaml
from sessionmig.runbook import steps
way, step = sys.argv[1], sys.argv[2]
s = steps.settings(**yaml.safe_load(open(sys.argv[3])))
mode = {} if way == "baseline" else {"fast": way == "fast"}
start = time.perf_counter()
if step == "migrate":
    steps.migrate(s, progress=False)
    seen = None
elif step == "inspect":
    from sessionmig.sqlite.inspection import inspect_backup
    r = inspect_backup(s.sqlite_path, s.rules, s.as_of, s.source_timezone, s.batch_rows,
                       s.on_extra_columns, **mode)
    seen = [[f.code, f.count] for f in r.findings]
wall = time.perf_counter() - start
rss = max(resource.getrusage(who).ru_maxrss for who in
          (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 1024
print(json.dumps({"wall": wall, "rss": rss, "seen": seen}))
"""


def run(way: str, step: str, env_file: Path, env: dict[str, str], baseline: Path | None) -> dict:
    extra = {}
    if way == "baseline" and baseline is not None:
        extra["PYTHONPATH"] = str(baseline.resolve() / "scripts")
    done = subprocess.run(
        [sys.executable, "-c", STEP, way, step, str(env_file)],
        cwd=ROOT,
        env={**os.environ, **env, **extra},
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise SystemExit(f"{way} {step} failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--backup", type=Path, help="a backup to use (else a sample is made)")
    parser.add_argument("--dsn", default=os.environ.get("SESSIONMIG_BENCH_DSN"))
    parser.add_argument("--batch-rows", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="another checkout, timed beside")
    parser.add_argument("--steps", default="migrate,inspect")
    parser.add_argument("--ways", default="fast,rows", help="fast, rows (and baseline)")
    args = parser.parse_args()
    backup = args.backup or OUT / f"census-{args.rows}.db"
    if not backup.exists():
        OUT.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "sessionmig.cli", "sample", "--rows", str(args.rows)]
            + ["--out", str(backup)],
            check=True,
        )
    url, label = server_url(args.dsn)
    OUT.mkdir(parents=True, exist_ok=True)
    env_file = OUT / "bench-census.yaml"
    env_file.write_text(
        yaml.safe_dump(
            {
                "sqlite_path": str(backup),
                "database_url_env": "SESSIONMIG_BENCH_TARGET",
                "source_timezone": "Asia/Seoul",
                "as_of": "2026-01-15T12:00:00+09:00",
                "batch_rows": args.batch_rows,
            }
        )
    )
    env = {"SESSIONMIG_BENCH_TARGET": embedded.with_database(url, DATABASE)}
    wanted = args.steps.split(",")
    ways = args.ways.split(",") + (["baseline"] if args.baseline else [])
    times: dict[str, list[float]] = {}
    rss: dict[str, float] = {}
    seen: dict[str, object] = {}
    print(f"{backup} · {label} · {os.cpu_count()} cores", file=sys.stderr)
    for round_ in range(args.repeat):
        print(f"round {round_ + 1}: load {load()}", file=sys.stderr)
        order = ways if round_ % 2 == 0 else ways[::-1]
        embedded.ensure_database(url, DATABASE, fresh=True)
        with connect(url, "bench", autocommit=True) as conn:
            conn.execute("CHECKPOINT")
        runs = [("fast", "migrate")]
        runs += [(way, "inspect") for way in order]
        for way, step in runs:
            if step not in wanted and step != "migrate":
                continue
            got = run(way, step, env_file, env, args.baseline)
            name = "migrate" if step == "migrate" else f"{step} {way}"
            times.setdefault(name, []).append(got["wall"])
            rss[name] = max(rss.get(name, 0.0), got["rss"])
            if got["seen"] is not None:
                if step in seen and seen[step] != got["seen"]:
                    print(f"  {name} DIFFERS: {got['seen']} vs {seen[step]}", file=sys.stderr)
                seen.setdefault(step, got["seen"])
            print(f"  {name}: {got['wall']:.2f} s, {got['rss']:.0f} MB", file=sys.stderr)
        print(f"  load after round: {load()}", file=sys.stderr)
    print(f"\n{args.rows:,} rows · {label} · median of {args.repeat} round(s)")
    print("| step | wall s (median) | rounds | peak RSS MB | × migrate (median of rounds) |")
    print("|---|---|---|---|---|")
    for name, walls in times.items():
        ratios = [w / m for w, m in zip(walls, times["migrate"], strict=True)]
        rounds = ", ".join(f"{w:.1f}" for w in walls)
        print(
            f"| {name} | {statistics.median(walls):.1f} | {rounds} | {rss[name]:.0f} | "
            f"{statistics.median(ratios):.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
