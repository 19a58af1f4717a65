"""Benchmark one catch-up pass beside a full migrate of the same store (not a test).

A store of ``--rows`` sessions (the sample ``bench.py`` uses, cached under ``benchmarks/out``
and never modified) is migrated into a fresh database by ``sessionmig migrate`` — as the runbook
runs it, with ``expected_sha256`` — and then one catch-up pass carries a live copy of the store
in which ``--changed`` fractions of the sessions were changed the way the old colour changes
them (of the sessions touched: 80 % validated, 10 % extended by a day, 10 % logged out; plus
new sessions, a tenth of their number). Each is its own process, so wall time and peak RSS
(``wait4``) are its alone. Every round migrates afresh before each pass and runs the two side by
side, because this machine's speed drifts between minutes: only the ratio within a round is
fair; the table shows medians.

Writes the table to ``benchmarks/CATCHUP.md`` (``--out``). Target server: ``--dsn`` (an admin URL,
database ``postgres``), else the system PostgreSQL at 127.0.0.1:5432 when it answers, else the
embedded server.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
import yaml
from target import server_url

from sessionmig import embedded
from sessionmig.source import sha256_file

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"
DATABASE = "sessionmig_bench_catchup"
DETAIL_HEADER = (
    "| changed | what the old colour did | changed / inserted / ended in PostgreSQL "
    "| snapshot s | rows locked s | pass s (in-process) |\n|---|---|---|---|---|---|"
)
# One pass as its own process: the notebook's function, its result as JSON on stdout.
PASS_DRIVER = """
import json, sys, yaml
from sessionmig import catchup, steps
s = steps.settings(**yaml.safe_load(open(sys.argv[1])))
r = catchup.catchup_step(s, sys.argv[2], sys.argv[3])
print(json.dumps({"verdict": r.verdict, "counts": r.counts, "seconds": r.seconds,
                  "snapshot_s": r.snapshot.seconds, "locked_s": r.locked_seconds,
                  "live_rows": r.live_rows}))
"""


@dataclass(frozen=True)
class Run:
    wall: float
    rss_mb: float
    detail: dict


def run_measured(cmd: list[str], env: dict[str, str]) -> Run:
    """Run ``cmd``: its wall seconds, its own peak RSS (``wait4``) and its JSON result line."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out_file, tempfile.TemporaryFile() as err_file:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env={**os.environ, **env}, stdout=out_file, stderr=err_file
        )
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        out_file.seek(0)
        err_file.seek(0)
        out, err = out_file.read().decode(), err_file.read().decode()
    code = os.waitstatus_to_exitcode(status)
    if code:
        sys.exit(f"{' '.join(cmd[:5])}… exited {code}:\n{out[-3000:]}\n{err[-3000:]}")
    lines = out.strip().splitlines()
    detail = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    return Run(wall, usage.ru_maxrss / 1024, detail)


def sample(rows: int) -> Path:
    """The benchmark store (generated once, shared with bench.py)."""
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"sessions-{rows}.db"
    if not path.exists():
        print(f"generating {rows:,} sessions into {path} …", file=sys.stderr)
        cli = [sys.executable, "-m", "sessionmig.cli", "sample", "--rows", str(rows)]
        subprocess.run([*cli, "--oddities", "0", "--out", str(path)], check=True)
    return path


def changed_copy(store: Path, live: Path, fraction: float, seed: int = 7) -> dict[str, int]:
    """``live``: a copy of ``store`` in which ``fraction`` of the sessions were changed as the
    old colour changes them, and new sessions created (a tenth of that number)."""
    shutil.copyfile(store, live)
    rng = random.Random(seed)
    with sqlite3.connect(live) as conn:
        top = conn.execute("SELECT max(rowid) FROM sessions").fetchone()[0]
        touched = rng.sample(range(1, top + 1), int(top * fraction))
        n = len(touched)
        validated, extended, ended = (
            touched[: n * 8 // 10],
            touched[n * 8 // 10 : n * 9 // 10],
            touched[n * 9 // 10 :],
        )
        conn.executemany(
            "UPDATE sessions SET request_count = request_count + 1, "
            "last_activity = '2026-01-15 12:30:00.123456' WHERE rowid = ?",
            [(r,) for r in validated],
        )
        conn.executemany(
            "UPDATE sessions SET expires_at = datetime(expires_at, '+1 day') WHERE rowid = ?",
            [(r,) for r in extended],
        )
        conn.executemany("DELETE FROM sessions WHERE rowid = ?", [(r,) for r in ended])
        new = rng.sample(validated, len(touched) // 10)
        conn.executemany(
            "INSERT INTO sessions SELECT 'session-new-' || rowid, user_id, metadata, "
            "created_at, expires_at, last_activity, 0 FROM sessions WHERE rowid = ?",
            [(r,) for r in new],
        )
    return {
        "validated": len(validated),
        "extended": len(extended),
        "ended": len(ended),
        "created": len(new),
    }


def fresh_database(url: str) -> str:
    embedded.ensure_database(url, DATABASE, fresh=True)
    return embedded.with_database(url, DATABASE)


def checkpoint(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CHECKPOINT")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--changed", default="0.01,0.10", help="fractions of sessions changed")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the table shows medians")
    parser.add_argument("--dsn", default=os.environ.get("SESSIONMIG_BENCH_DSN"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "CATCHUP.md")
    args = parser.parse_args()
    fractions = [float(f) for f in args.changed.split(",")]
    load_before = os.getloadavg()[0]
    store = sample(args.rows)
    url, label = server_url(args.dsn)
    work = Path(tempfile.mkdtemp(prefix="sessionmig-bench-catchup-", dir=OUT))
    os.chmod(work, 0o700)
    target_url = embedded.with_database(url, DATABASE)
    env = {"SESSIONMIG_BENCH_TARGET": target_url}
    # The migrated snapshot is a private copy: the cached sample is never touched.
    snap0 = work / "snap0.db"
    shutil.copyfile(store, snap0)
    params = {
        "sqlite_path": str(snap0),
        "database_url_env": "SESSIONMIG_BENCH_TARGET",
        "source_timezone": "Asia/Seoul",
        "as_of": "2026-01-15T12:00:00+09:00",
        "expected_sha256": sha256_file(snap0),
    }
    env_file = work / "bench.yaml"
    env_file.write_text(yaml.safe_dump(params))
    lives = {}
    for fraction in fractions:
        live = work / f"live-{fraction}.db"
        lives[fraction] = (live, changed_copy(store, live, fraction))
    cli = [sys.executable, "-m", "sessionmig.cli"]
    migrates: list[Run] = []
    passes: dict[float, list[tuple[Run, Run]]] = {f: [] for f in fractions}
    try:
        for round_ in range(args.repeat):
            for fraction in fractions:
                print(
                    f"round {round_ + 1}/{args.repeat}, {fraction:.0%} changed …", file=sys.stderr
                )
                fresh_database(url)
                checkpoint(url)
                migrate = run_measured([*cli, "migrate", "--env", str(env_file)], env)
                migrates.append(migrate)
                checkpoint(url)
                live, _ = lives[fraction]
                state = work / f"state-{round_}-{fraction}"
                one = run_measured(
                    [sys.executable, "-c", PASS_DRIVER, str(env_file), str(live), str(state)],
                    env,
                )
                assert one.detail.get("verdict") == "PASS", one.detail
                passes[fraction].append((migrate, one))
                shutil.rmtree(state, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        embedded.ensure_database(url, DATABASE, fresh=True)
    load = (load_before, os.getloadavg()[0])
    write_table(args, label, fractions, lives, migrates, passes, load)
    print(args.out.read_text())
    return 0


def write_table(args, label, fractions, lives, migrates, passes, load) -> None:
    def med(values: list[float]) -> float:
        return statistics.median(values)

    rows = [
        "| way | sessions touched | wall s | peak RSS MB | × full migrate (rounds) |",
        "|---|---|---|---|---|",
        f"| `sessionmig migrate`, the whole store ({args.rows:,} sessions, `expected_sha256`) "
        f"| {args.rows:,} | {med([m.wall for m in migrates]):.1f} "
        f"| {max(m.rss_mb for m in migrates):.0f} | 1.00 |",
    ]
    details = []
    for fraction in fractions:
        pairs = passes[fraction]
        ratios = [one.wall / migrate.wall for migrate, one in pairs]
        made = lives[fraction][1]
        counts = pairs[0][1].detail["counts"]
        touched = counts["inserted"] + counts["changed"] + counts["ended"]
        rows.append(
            f"| one catch-up pass, {fraction:.0%} of sessions changed "
            f"| {touched:,} | {med([p.wall for _, p in pairs]):.1f} "
            f"| {max(p.rss_mb for _, p in pairs):.0f} | {med(ratios):.2f} "
            f"({', '.join(f'{r:.2f}' for r in ratios)}) |"
        )
        details.append(
            f"| {fraction:.0%} | {made['validated']:,} validated, {made['extended']:,} extended, "
            f"{made['ended']:,} logged out, {made['created']:,} created "
            f"| {counts['changed']:,} / {counts['inserted']:,} / {counts['ended']:,} "
            f"| {med([p.detail['snapshot_s'] for _, p in pairs]):.2f} "
            f"| {med([p.detail['locked_s'] for _, p in pairs]):.2f} "
            f"| {med([p.detail['seconds'] for _, p in pairs]):.2f} |"
        )
    text = f"""# Catch-up pass: figures

`benchmarks/bench_catchup.py --rows {args.rows} --changed {args.changed} --repeat {args.repeat}`,
{time.strftime("%Y-%m-%d")}. Target: {label}. Machine: {os.cpu_count()} cores shared by client and
server (and, during this run, by other people's work on the same machine: absolute times
drift, the ratio within a round is what holds), Python {platform.python_version()}, SQLite
{sqlite3.sqlite_version}. Store: the benchmark sample (legacy schema, naive Asia/Seoul
timestamps, ~200-byte JSON metadata), rollback-journal mode, nobody writing during the pass.
Each way is its own process (wall time and peak RSS from `wait4`); every round migrates into a
fresh database right before each pass; medians of {args.repeat} rounds.

{chr(10).join(rows)}

What the pass did and where its time went (medians):

{DETAIL_HEADER}
{chr(10).join(details)}

A pass = a consistent snapshot of the live store (SQLite online backup API), hashed on a thread
while SQLite compares it with the base (each live row against the base row with its rowid,
checked by session_id; logouts by key on a second connection; only differing rows are normalised
in Python by the migration's rules), then one PostgreSQL transaction: binary COPY of the delta
into a temporary table, `FOR UPDATE` of the touched rows (by key), the merge rules in Python,
set-based UPDATE / INSERT / DELETE, the in-transaction proof (a join against the expected rows;
PostgreSQL's count of the rows the transaction wrote), the audit row. "Rows locked" is how long
the app on PostgreSQL could wait on a row the pass changes. Load average (1 min) of the machine
at the start and the end of the run: {load[0]:.1f} and {load[1]:.1f}.
"""
    args.out.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
