"""The operator's clock (not a test): ``make bench`` times 1M sessions every way, side by side.

Every round, on the same backup and server, each way in a process of its own (wall time and peak
RSS from ``wait4``, a ``CHECKPOINT`` before each, every load into a fresh database):

- **the headline** — ``sessionmig run`` (preflight → inspect → migrate → reconcile, every report
  rendered and the folder sealed), as the operator runs it; each step's own time is read from
  the run's manifest;
- **the verbs** — ``sessionmig migrate`` and ``sessionmig reconcile`` (a sealed report folder
  each), as the runbook runs them (``expected_sha256`` given);
- **the engines** — ``steps.inspect``, ``steps.migrate``, ``steps.reconcile_step`` (with the
  application check) in a bare process: the breakdown, no kernel, no report;
- **pgloader** (when on PATH), configured correctly (``SET timezone`` to the source zone, casts
  to the target types), the bare load without any proof;
- **the ceiling** — a server-side binary ``COPY`` of the same rows into a table without
  indexes, then the primary key and ``idx_expires_at`` built: the load's floor on this machine.

The table shows medians and every round; ratios are taken within a round (this machine's speed
drifts between minutes). The load average before each round is printed. ``--baseline DIR``
adds the headline, the verbs and the engines of another checkout (e.g. a git worktree of an
earlier commit), for a before/after ratio. The fixed costs are measured on a 200-row backup:
each step's time beyond its engine cell (kernel, parameters, the report's other cells,
rendering), and the run's own beyond its steps (start-up, target, hashes, sealing).

Target server: ``--dsn`` (an admin URL, database ``postgres``), else the system PostgreSQL at
127.0.0.1:5432 when it answers, else the embedded server.
"""

from __future__ import annotations

import argparse
import json
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

from sessionmig.errors import TargetError
from sessionmig.postgres import embedded
from sessionmig.postgres.connect import connect
from sessionmig.sqlite.source import sha256_file

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"
DATABASE = "sessionmig_bench"
LOADER_DATABASE = "sessionmig_bench_pgloader"
CEILING_DATABASE = "sessionmig_bench_ceiling"
STEPS = ("preflight", "inspect", "migrate", "reconcile")

# The engines alone, as the notebooks call them (no kernel, no report).
ENGINE = (
    "import sys, yaml\n"
    "from sessionmig.runbook import steps\n"
    "given = yaml.safe_load(open(sys.argv[2]))\n"
    "given.update(expected_sha256=sys.argv[3]) if len(sys.argv) > 3 else None\n"
    "s = steps.settings(**given)\n"
    "r = {'inspect': lambda: steps.inspect(s, progress=False),\n"
    "     'migrate': lambda: steps.migrate(s, progress=False),\n"
    "     'reconcile': lambda: steps.reconcile_step(s, progress=False)}[sys.argv[1]]()\n"
    "ok = not [f for f in r.findings if f.severity == 'error'] if sys.argv[1] == 'inspect' "
    "else str(r.verdict) in ('PASS', 'PASS_WITH_WARNINGS')\n"
    "sys.exit(0 if ok else 1)\n"
)

Timed = tuple[float, float, int]  # wall seconds, peak RSS MB, exit code


def timed(cmd: list[str], env: dict[str, str] | None = None) -> Timed:
    """Run ``cmd``; (wall seconds, peak RSS in MB, exit code) of that process, or of the
    largest of the processes it started and waited for (kernels, workers), from ``wait4``."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=out, stderr=out
        )
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        code = os.waitstatus_to_exitcode(status)
        if code:
            out.seek(0)
            print(f"{' '.join(cmd[:4])}… exited {code}:\n{out.read().decode()}", file=sys.stderr)
    return wall, usage.ru_maxrss / 1024, code


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def fresh(url: str, database: str) -> str:
    embedded.ensure_database(url, database, fresh=True)
    with connect(url, "bench", autocommit=True) as conn:
        conn.execute("CHECKPOINT")
    return embedded.with_database(url, database)


def checkpoint(url: str) -> None:
    with connect(url, "bench", autocommit=True) as conn:
        conn.execute("CHECKPOINT")


def pgloader_version() -> str:
    done = subprocess.run(["pgloader", "--version"], capture_output=True, text=True, check=False)
    first = (done.stdout or done.stderr).split("\n", 1)[0]
    return first.removeprefix("pgloader version ").strip('"') or "?"


def pgloader(backup: Path, url: str, zone: str) -> Timed | None:
    """pgloader into its own fresh database, told the source zone and the target types."""
    if not shutil.which("pgloader"):
        return None
    target = fresh(url, LOADER_DATABASE)
    load_file = f"""LOAD DATABASE FROM sqlite://{backup} INTO {target}
 WITH create tables, create indexes, reset sequences, workers = 2, concurrency = 1
 SET timezone = '{zone}'
 CAST column sessions.created_at to timestamptz, column sessions.expires_at to timestamptz,
      column sessions.last_activity to timestamptz, column sessions.metadata to jsonb
      using (lambda (x) x);
"""
    with tempfile.NamedTemporaryFile("w", suffix=".load", delete=False) as handle:
        handle.write(load_file)
    return timed(["pgloader", handle.name])


CEILING = """
import sys, time, psycopg
url, source = sys.argv[1], sys.argv[2]
with psycopg.connect(url, autocommit=True) as conn:
    conn.execute("CREATE TABLE sessions (session_id text COLLATE \\"C\\" NOT NULL, user_id text, "
                 "metadata jsonb, created_at timestamptz NOT NULL, expires_at timestamptz NOT "
                 "NULL, last_activity timestamptz NOT NULL, request_count int NOT NULL)")
    conn.execute("BEGIN")
    conn.execute(f"COPY sessions FROM '{source}' (FORMAT binary)")
    conn.execute("ALTER TABLE sessions ADD PRIMARY KEY (session_id)")
    conn.execute("CREATE INDEX idx_expires_at ON sessions (expires_at)")
    conn.execute("COMMIT")
"""


def ceiling_source(url: str) -> str | None:
    """The migrated rows as a binary COPY file for the server to read (made once, from the
    database the headline run filled; readable by the server's own user)."""
    path = OUT / "ceiling.copy"
    if path.exists():
        return str(path)
    try:
        with (
            connect(embedded.with_database(url, DATABASE), "bench") as conn,
            conn.cursor().copy(
                "COPY (SELECT session_id, user_id, metadata, created_at, expires_at, "
                "last_activity, request_count FROM public.sessions) TO STDOUT (FORMAT binary)"
            ) as copy,
            open(path, "wb") as out,
        ):
            for chunk in copy:
                out.write(chunk)
    except (TargetError, psycopg.Error) as exc:
        print(f"no ceiling: could not read the migrated rows ({exc})", file=sys.stderr)
        return None
    path.chmod(0o644)
    return str(path)


def landed(url: str, database: str) -> int:
    """Rows that actually arrived in ``database`` (pgloader reports success on failed batches)."""
    try:
        with connect(embedded.with_database(url, database), "bench") as conn:
            return conn.execute("SELECT count(*) FROM public.sessions").fetchone()[0]  # type: ignore[index]
    except (TargetError, psycopg.Error):
        return 0


def step_times(reports: Path) -> dict[str, float]:
    """Each step's own time, from the one run folder under ``reports``."""
    (manifest,) = reports.glob("*/*/manifest.json")
    data = json.loads(manifest.read_text())
    return {s["name"]: s["duration_s"] for s in data["steps"]}


def engine_cell(notebook: Path) -> float:
    """Seconds the step's engine cell (the one that opens ``report.step``) took, per papermill."""
    cells = json.loads(notebook.read_text())["cells"]
    return sum(
        c["metadata"].get("papermill", {}).get("duration") or 0.0
        for c in cells
        if c["cell_type"] == "code" and "report.step(" in "".join(c["source"])
    )


def fixed_costs(env_file: Path, url: str, python: str, env: dict[str, str]) -> dict[str, float]:
    """What a run costs beyond its engines, on a 200-row backup (the engines' own time there
    is a few hundredths of a second): per step, its time less its engine cell's (kernel,
    parameters, the other cells, rendering); and the run's own (start-up, target, hashes,
    sealing), its wall time less its steps'."""
    tiny = OUT / "tiny.db"
    subprocess.run(
        [python, "-m", "sessionmig.cli", "sample", "--rows", "200", "--out", str(tiny)]
        + ["--replace"],
        check=True,
        capture_output=True,
        env={**os.environ, **env},
    )
    tiny_env = env_file.with_name("tiny.yaml")
    given = {**yaml.safe_load(env_file.read_text()), "sqlite_path": str(tiny)}
    tiny_env.write_text(yaml.safe_dump(given))
    target = {"SESSIONMIG_BENCH_TARGET": fresh(url, "sessionmig_bench_tiny")}
    with tempfile.TemporaryDirectory() as reports:
        wall, _, _ = timed(
            [python, "-m", "sessionmig.cli", "run", "--env", str(tiny_env)]
            + ["--reports-dir", reports],
            {**env, **target},
        )
        (manifest,) = Path(reports).glob("*/*/manifest.json")
        data = json.loads(manifest.read_text())
        costs = {
            s["name"]: s["duration_s"] - engine_cell(manifest.parent / s["notebook"])
            for s in data["steps"]
        }
        costs["the run itself"] = wall - sum(s["duration_s"] for s in data["steps"])
    return costs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dsn", default=os.environ.get("SESSIONMIG_BENCH_DSN"))
    parser.add_argument("--batch-rows", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the table shows medians")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another checkout whose run, verbs and engines are timed beside in every round",
    )
    parser.add_argument(
        "--ways",
        default="run,verbs,engines,pgloader,ceiling",
        help="which ways to time (comma-separated): run, verbs, engines, pgloader, ceiling",
    )
    args = parser.parse_args()
    ways = set(args.ways.split(","))
    OUT.mkdir(parents=True, exist_ok=True)
    backup = OUT / f"sessions-{args.rows}.db"
    if not backup.exists():
        print(f"generating {args.rows:,} rows into {backup} …", file=sys.stderr)
        # No oddities: pgloader stops a whole COPY batch on one bad value, so the comparison
        # would measure nothing. (Every oddity is handled by sessionmig; see the tests.)
        subprocess.run(
            [sys.executable, "-m", "sessionmig.cli", "sample", "--rows", str(args.rows)]
            + ["--oddities", "0", "--out", str(backup)],
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
    target = {"SESSIONMIG_BENCH_TARGET": embedded.with_database(url, DATABASE)}
    sha = sha256_file(backup)
    checkouts = {"": {}}
    if args.baseline:
        checkouts["baseline "] = {"PYTHONPATH": str(args.baseline.resolve() / "scripts")}
    cli = [sys.executable, "-m", "sessionmig.cli"]
    runs: dict[str, list[Timed]] = {}
    steps_of: dict[str, list[dict[str, float]]] = {}
    arrived: dict[str, int] = {}

    def note(way: str, done: Timed, database: str = DATABASE) -> None:
        runs.setdefault(way, []).append(done)
        arrived[way] = landed(url, database)

    loader_way = f"pgloader {pgloader_version()}, bare load" if shutil.which("pgloader") else ""
    for round_ in range(args.repeat):
        print(f"round {round_ + 1} of {args.repeat} · load {load()}", file=sys.stderr)
        for prefix, extra in checkouts.items():
            env = {**target, **extra}
            if "run" in ways:
                fresh(url, DATABASE)
                with tempfile.TemporaryDirectory() as reports:
                    done = timed(
                        [*cli, "run", "--env", str(env_file), "--reports-dir", reports], env
                    )
                    note(f"{prefix}sessionmig run", done)
                    steps_of.setdefault(f"{prefix}sessionmig run", []).append(
                        step_times(Path(reports))
                    )
            if "verbs" in ways:
                fresh(url, DATABASE)
                with tempfile.TemporaryDirectory() as reports:
                    given = ["--reports-dir", reports, "-p", f"expected_sha256={sha}"]
                    note(
                        f"{prefix}sessionmig migrate",
                        timed([*cli, "migrate", "--env", str(env_file), *given], env),
                    )
                checkpoint(url)
                with tempfile.TemporaryDirectory() as reports:
                    note(
                        f"{prefix}sessionmig reconcile",
                        timed(
                            [*cli, "reconcile", "--env", str(env_file), "--reports-dir", reports],
                            env,
                        ),
                    )
            if "engines" in ways:
                for step in ("inspect", "migrate", "reconcile"):
                    if step == "migrate":
                        fresh(url, DATABASE)
                    else:
                        checkpoint(url)
                    given = [sha] if step == "migrate" else []
                    note(
                        f"{prefix}engine: steps.{step}",
                        timed([sys.executable, "-c", ENGINE, step, str(env_file), *given], env),
                    )
        if "pgloader" in ways:
            done = pgloader(backup, url, "Asia/Seoul")
            if done:
                note(loader_way, done, LOADER_DATABASE)
        if "ceiling" in ways and (source := ceiling_source(url)):
            ceiling = fresh(url, CEILING_DATABASE)
            note(
                "server-side binary COPY, indexes after",
                timed([sys.executable, "-c", CEILING, ceiling, source]),
                CEILING_DATABASE,
            )
    loader = runs.get(loader_way)
    loaded_all = bool(loader) and arrived.get(loader_way) == args.rows

    def per_round(way: str) -> str:
        walls = [f"{w:.1f}" for w, _, _ in runs[way]]
        if not loaded_all or way.startswith("pgloader"):
            return ", ".join(walls)
        ratios = [f"{w / p[0]:.2f}×" for (w, _, _), p in zip(runs[way], loader, strict=False)]
        return ", ".join(f"{w} ({r})" for w, r in zip(walls, ratios, strict=True))

    print(
        f"\n{args.rows:,} sessions · {label} · {os.cpu_count()} cores · batch_rows "
        f"{args.batch_rows} · median of {args.repeat} round(s) · load after: {load()}"
    )
    print(
        "| way | rows in target | wall s (median) | × pgloader | peak RSS MB "
        "| rounds: s (× pgloader) |"
    )
    print("|---|---|---|---|---|---|")
    base = statistics.median(w for w, _, _ in loader) if loaded_all and loader else 0.0
    for way, done in runs.items():
        wall = statistics.median(w for w, _, _ in done)
        worst = max(c for _, _, c in done)
        status = "" if worst == 0 else f" (exit {worst})"
        times = f"{wall / base:.2f}" if base else "–"
        rss = max(r for _, r, _ in done)
        print(
            f"| {way}{status} | {arrived.get(way, 0):,} | {wall:.1f} | {times} | {rss:.0f} | "
            f"{per_round(way)} |"
        )
        for step in STEPS if way in steps_of else ():
            values = [t.get(step, 0.0) for t in steps_of[way]]
            print(
                f"| · its {step} step | | {statistics.median(values):.1f} | | | "
                f"{', '.join(f'{v:.1f}' for v in values)} |"
            )
    if "run" in ways:
        for prefix, extra in checkouts.items():
            costs = fixed_costs(env_file, url, sys.executable, {**target, **extra})
            shown = ", ".join(f"{name} {seconds:.2f}" for name, seconds in costs.items())
            print(f"\n{prefix}fixed costs, s (200-row backup, beyond the engines): {shown}")
    return max(c for done in runs.values() for _, _, c in done)


if __name__ == "__main__":
    sys.exit(main())
