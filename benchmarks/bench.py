"""Benchmark migrate and reconcile at a given size (not a test): ``make bench`` runs 1M rows.

Generates a backup with ``sessionmig sample`` (cached under ``benchmarks/out``), migrates it into
a fresh database and reconciles it, each as its own ``sessionmig`` process so that wall time and
peak RSS (from ``wait4``) are the process's alone. When ``pgloader`` is on PATH it loads the same
file into another fresh database, configured correctly (``SET timezone`` to the source zone,
casts to the target types), for the side-by-side ratio. Each way runs ``--repeat`` times, side
by side in rounds with a CHECKPOINT before each run; the table shows medians. Migrate runs as
the runbook runs it, with ``expected_sha256`` (``--unreviewed`` adds a run without it, where
``quick_check`` runs beside the load).

Target server: ``--dsn`` (an admin URL, database ``postgres``), else the system PostgreSQL at
127.0.0.1:5432 when it answers, else the embedded server.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import yaml
from target import server_url

from sessionmig import embedded
from sessionmig.connect import connect
from sessionmig.errors import TargetError
from sessionmig.source import sha256_file

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"
UNREVIEWED = "sessionmig migrate, no expected_sha256"
BASELINE_MIGRATE = "baseline migrate"
BASELINE_RECONCILE = "baseline reconcile"


# The engines alone, as the notebooks call them (no kernel, no report): what `--engine` times, for
# this checkout and a baseline alike, since `sessionmig migrate|reconcile` now leave a report
# folder too.
ENGINE = (
    "import sys, yaml\n"
    "from sessionmig import steps\n"
    "given = yaml.safe_load(open(sys.argv[2]))\n"
    "given.update(expected_sha256=sys.argv[3]) if len(sys.argv) > 3 else None\n"
    "s = steps.settings(**given)\n"
    "r = steps.migrate(s, progress=False) if sys.argv[1] == 'migrate' "
    "else steps.reconcile_step(s, progress=False)\n"
    "sys.exit(0 if str(r.verdict) in ('PASS', 'PASS_WITH_WARNINGS') else 1)\n"
)


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, int]:
    """Run ``cmd``; return (wall seconds, peak RSS in MB, exit code) of that process alone."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()  # type: ignore[union-attr]
    code = os.waitstatus_to_exitcode(status)
    if code:
        print(f"{' '.join(cmd[:4])}… exited {code}:\n{out}\n{err}", file=sys.stderr)
    return wall, usage.ru_maxrss / 1024, code


def pgloader(backup: Path, url: str, zone: str) -> tuple[float, float, int] | None:
    """pgloader into its own fresh database, told the source zone and the target types."""
    if not shutil.which("pgloader"):
        return None
    embedded.ensure_database(url, "sessionmig_bench_pgloader", fresh=True)
    target = embedded.with_database(url, "sessionmig_bench_pgloader")
    load = f"""LOAD DATABASE FROM sqlite://{backup} INTO {target}
 WITH create tables, create indexes, reset sequences, workers = 2, concurrency = 1
 SET timezone = '{zone}'
 CAST column sessions.created_at to timestamptz, column sessions.expires_at to timestamptz,
      column sessions.last_activity to timestamptz, column sessions.metadata to jsonb
      using (lambda (x) x);
"""
    with tempfile.NamedTemporaryFile("w", suffix=".load", delete=False) as handle:
        handle.write(load)
    return timed(["pgloader", handle.name])


def landed(url: str, database: str) -> int:
    """Rows that actually arrived in ``database`` (pgloader reports success on failed batches)."""
    try:
        with connect(embedded.with_database(url, database), "bench") as conn:
            return conn.execute("SELECT count(*) FROM public.sessions").fetchone()[0]  # type: ignore[index]
    except (TargetError, psycopg.Error):
        return 0


def checkpoint(url: str) -> None:
    """Flush the previous way's dirty buffers now, so that no way pays for another's."""
    with connect(url, "bench", autocommit=True) as conn:
        conn.execute("CHECKPOINT")


def median_run(done: list[tuple[float, float, int]]) -> tuple[float, float, int]:
    """The median wall time, the largest peak RSS and the worst exit code of the rounds."""
    walls = sorted(wall for wall, _, _ in done)
    return statistics.median(walls), max(r for _, r, _ in done), max(c for _, _, c in done)


def papermill_overhead(env_file: Path, env: dict[str, str]) -> float:
    """Seconds a notebook step adds over the bare engine (kernel start, rendering), measured
    on a tiny backup so that the engine's own time is negligible."""
    tiny = OUT / "tiny.db"
    subprocess.run(
        [sys.executable, "-m", "sessionmig.cli", "sample", "--rows", "200", "--out", str(tiny)]
        + ["--replace"],
        check=True,
        capture_output=True,
    )
    data = yaml.safe_load(env_file.read_text())
    url = env["SESSIONMIG_BENCH_TARGET"]
    embedded.ensure_database(
        embedded.with_database(url, "postgres"), "sessionmig_bench_tiny", fresh=True
    )
    env = {"SESSIONMIG_BENCH_TARGET": embedded.with_database(url, "sessionmig_bench_tiny")}
    tiny_env = env_file.with_name("tiny.yaml")
    tiny_env.write_text(yaml.safe_dump({**data, "sqlite_path": str(tiny)}))
    bare, _, _ = timed(
        [sys.executable, "-m", "sessionmig.cli", "migrate", "--env", str(tiny_env)], env
    )
    with tempfile.TemporaryDirectory() as reports:
        step, _, _ = timed(
            [
                sys.executable,
                "-m",
                "sessionmig.cli",
                "run",
                "--env",
                str(tiny_env),
                "--steps",
                "migrate",
                "--reports-dir",
                reports,
            ],
            env,
        )
    return step - bare


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dsn", default=os.environ.get("SESSIONMIG_BENCH_DSN"))
    parser.add_argument("--batch-rows", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the table shows medians")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another checkout (e.g. a git worktree of an earlier commit) whose migrate and "
        "reconcile run beside this one's in every round, for a before/after ratio",
    )
    parser.add_argument(
        "--unreviewed",
        action="store_true",
        help="also migrate without expected_sha256 (quick_check runs beside the load)",
    )
    parser.add_argument(
        "--engine",
        action="store_true",
        help="time the engines alone (steps.migrate / steps.reconcile_step in a process of "
        "their own), not the CLI verbs, which now also write a report folder",
    )
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    backup = OUT / f"sessions-{args.rows}.db"
    if not backup.exists():
        print(f"generating {args.rows:,} rows into {backup} …", file=sys.stderr)
        # No oddities: pgloader stops a whole COPY batch on one bad value, so the comparison
        # would measure nothing. (Every oddity is handled by sessionmig; see the tests.)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "sessionmig.cli",
                "sample",
                "--rows",
                str(args.rows),
                "--oddities",
                "0",
                "--out",
                str(backup),
            ],
            check=True,
        )
    url, label = server_url(args.dsn)
    env_file = OUT / "bench.yaml"
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
    env = {"SESSIONMIG_BENCH_TARGET": embedded.with_database(url, "sessionmig_bench")}
    cli = [sys.executable, "-m", "sessionmig.cli"]
    if args.engine:

        def verb(name: str, *rest: str) -> list[str]:
            extra = [r.split("=", 1)[1] for r in rest if r.startswith("expected_sha256=")]
            return [sys.executable, "-c", ENGINE, name, str(env_file), *extra]
    else:

        def verb(name: str, *rest: str) -> list[str]:
            return [*cli, name, "--env", str(env_file), *[x for r in rest for x in ("-p", r)]]

    # As the runbook migrates: with the sha256 of the file that inspect checked in full.
    sha = sha256_file(backup)
    runs: dict[str, list[tuple[float, float, int]]] = {}
    arrived: dict[str, int] = {}
    # Rounds, each way side by side in every round: this machine's speed drifts by 10-20%
    # between minutes, so a ratio is only fair within a round; the table shows medians.
    for round_ in range(args.repeat):
        print(f"round {round_ + 1} of {args.repeat} …", file=sys.stderr)
        embedded.ensure_database(url, "sessionmig_bench", fresh=True)
        checkpoint(url)
        runs.setdefault("sessionmig migrate", []).append(
            timed(verb("migrate", f"expected_sha256={sha}"), env)
        )
        arrived["sessionmig migrate"] = landed(url, "sessionmig_bench")
        if args.unreviewed:
            embedded.ensure_database(url, "sessionmig_bench", fresh=True)
            checkpoint(url)
            runs.setdefault(UNREVIEWED, []).append(timed(verb("migrate"), env))
            arrived[UNREVIEWED] = landed(url, "sessionmig_bench")
        checkpoint(url)
        runs.setdefault("sessionmig reconcile", []).append(timed(verb("reconcile"), env))
        arrived["sessionmig reconcile"] = arrived["sessionmig migrate"]
        if args.baseline:
            before = {**env, "PYTHONPATH": str(args.baseline.resolve() / "scripts")}
            embedded.ensure_database(url, "sessionmig_bench", fresh=True)
            checkpoint(url)
            runs.setdefault(BASELINE_MIGRATE, []).append(
                timed(verb("migrate", f"expected_sha256={sha}"), before)
            )
            arrived[BASELINE_MIGRATE] = landed(url, "sessionmig_bench")
            checkpoint(url)
            runs.setdefault(BASELINE_RECONCILE, []).append(timed(verb("reconcile"), before))
            arrived[BASELINE_RECONCILE] = arrived[BASELINE_MIGRATE]
        checkpoint(url)
        loaded = pgloader(backup, url, "Asia/Seoul")
        if loaded:
            runs.setdefault("pgloader", []).append(loaded)
            arrived["pgloader"] = landed(url, "sessionmig_bench_pgloader")
    results = {way: median_run(done) for way, done in runs.items()}
    # A ratio only against a pgloader that finished and loaded every row.
    loaded_all = results.get("pgloader", (0.0, 0.0, 1))[2] == 0
    base = results["pgloader"][0] if loaded_all and arrived["pgloader"] == args.rows else 0.0
    print(
        f"\n{args.rows:,} rows · {label} · {os.cpu_count()} cores · batch_rows "
        f"{args.batch_rows} · median of {args.repeat} round(s)"
    )
    print("| way | rows in target | wall s | rows/s | peak RSS MB | throughput × pgloader |")
    print("|---|---|---|---|---|---|")
    for way, (wall, rss, code) in results.items():
        ratio = f"{base / wall:.2f}" if base else "–"
        status = "" if code == 0 else f" (exit {code})"
        print(
            f"| {way}{status} | {arrived[way]:,} | {wall:.1f} | {args.rows / wall:,.0f} | "
            f"{rss:.0f} | {ratio} |"
        )
    if base and args.repeat > 1:
        pairs = zip(runs["sessionmig migrate"], runs["pgloader"], strict=True)
        per_round = [f"{p[0] / m[0]:.2f}" for m, p in pairs]
        print(f"\nmigrate × pgloader per round: {', '.join(per_round)}")
    for way, baseline in (
        ("sessionmig migrate", BASELINE_MIGRATE),
        ("sessionmig reconcile", BASELINE_RECONCILE),
    ):
        if baseline in runs:
            pairs = zip(runs[way], runs[baseline], strict=True)
            ratios = ", ".join(f"{now[0] / then[0]:.2f}" for now, then in pairs)
            print(f"{way} time ÷ baseline's, per round: {ratios}")
    overhead = papermill_overhead(env_file, env)
    print(f"\npapermill step overhead (kernel start + rendering): {overhead:.1f} s")
    return max(code for _, _, code in results.values())


if __name__ == "__main__":
    sys.exit(main())
