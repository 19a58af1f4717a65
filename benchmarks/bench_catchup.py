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

Then the app's side: the store the app uses (``SessionManager``, pool of 8) serves the load
``bench_store.py`` offers — 100 users, one request every 200 ms each (500 ops/s), open loop, the
app's mix — on a freshly migrated copy of the store, first for ``--load-seconds`` with no pass
(the baseline), then while one catch-up pass runs beside it in its own process; the p99 of the
requests scheduled while the pass ran is compared with the baseline's p99 (acceptance: within
2×). The users pick from sessions active at ``as_of`` drawn uniformly, so the pass's changed
sessions get their share of the traffic and no more. The store's clock is ``as_of`` plus the
time elapsed, so those sessions are live to it (the benchmark sample is dated ``as_of``).

``--trace DIR`` keeps, for each pass beside the load, every request (scheduled time, latency,
kind), the pass's phases (its functions timed in its own process) and the kernel's counters
(``catchup_trace.py``), and prints their timeline; ``--idle-pass`` runs a process that only
sleeps instead of the pass, which shows how far two stretches of the same load differ on this
machine by themselves.

Writes the table to ``benchmarks/CATCHUP.md`` (``--out``). Target server: ``--dsn`` (an admin URL,
database ``postgres``), else the system PostgreSQL at 127.0.0.1:5432 when it answers, else the
embedded server.
"""

from __future__ import annotations

import argparse
import asyncio
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
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import catchup_trace
import yaml
from bench_store import Sessions, closed_loop, one_operation, percentile
from target import server_url

from sessionmig.postgres import embedded
from sessionmig.postgres.connect import connect
from sessionmig.sqlite.source import sha256_file
from sessionmig.store import SessionManager

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"
DATABASE = "sessionmig_bench_catchup"
AS_OF = "2026-01-15T12:00:00+09:00"
LOAD_IDS = 400  # sessions the simulated users pick from (bench_store.py uses 200 new ones)
LEAD_S = 1.0  # the load runs alone this long before the pass starts
TAIL_S = 0.5  # and this long after it ends
LATENCY_HEADER = (
    "| changed | p99 ms, no pass | p99 ms, pass beside | × (rounds) | × pooled "
    "| p50 ms no pass / beside "
    "| requests in the pass's window | pass s beside the load | rows locked s "
    "| longest request s (the app's side) | errors |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)
DETAIL_HEADER = (
    "| changed | what the old colour did | changed / inserted / ended in PostgreSQL "
    "| snapshot s | rows locked s | pass s (in-process) |\n|---|---|---|---|---|---|"
)
# One pass as its own process: the notebook's function, its result as JSON on stdout.
PASS_DRIVER = """
import json, sys, yaml
from sessionmig.runbook import steps
s = steps.settings(**yaml.safe_load(open(sys.argv[1])))
r = steps.catchup_step(s, sys.argv[2], sys.argv[3])
print(json.dumps({"verdict": r.verdict, "counts": r.counts, "seconds": r.seconds,
                  "snapshot_s": r.snapshot.seconds, "locked_s": r.locked_seconds,
                  "live_rows": r.live_rows}))
"""
# No pass at all, as long as one (``--idle-pass``): the same two measurements then show how
# far the p99 of one stretch of the load differs from another's on this machine by itself.
IDLE_DRIVER = """
import json, sys, time
time.sleep(float(sys.argv[1]))
print(json.dumps({"verdict": "PASS", "locked_s": 0.0}))
"""
# No pass either, but N cores kept busy at the lowest priority Linux has (SCHED_IDLE) as long
# as the pass took (``--idle-burn N``): what CPU work costs the app when it yields at once.
BURN_DRIVER = """
import hashlib, json, os, sys, threading, time
os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
until, block = time.monotonic() + float(sys.argv[1]), bytes(1 << 20)
def burn():
    while time.monotonic() < until:
        hashlib.sha256(block).digest()  # releases the GIL: one core a thread
threads = [threading.Thread(target=burn) for _ in range(int(sys.argv[2]))]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({"verdict": "PASS", "locked_s": 0.0}))
"""
# The same pass with its phases timed (``--trace``): each function below, wrapped, appends
# (name, start, end) on the system's monotonic clock — the clock the load's event loop reads —
# to the file named by SESSIONMIG_TRACE_PHASES.
TRACED_PASS_DRIVER = """
import functools, json, os, sys, threading, time, yaml
from sessionmig.engines.catchup import apply, delta, passes, state
from sessionmig.sqlite import snapshot, source
from sessionmig.runbook import steps
phases = []
def timed(module, name, label=None):
    inner = getattr(module, name)
    @functools.wraps(inner)
    def wrapper(*a, **k):
        began = time.monotonic()
        try:
            return inner(*a, **k)
        finally:
            phases.append((label or name, began, time.monotonic()))
    setattr(module, name, wrapper)
# Each where the pass looks it up: a wrapper anywhere else would time nothing.
for module, name in [(state, "take"), (snapshot, "_copy"), (snapshot, "_finish"),
                     (snapshot, "_fsync"), (state, "sha256_file"), (source, "hash_files"),
                     (state, "diff"), (delta, "_ended_in_live"), (apply, "_copy_rows"),
                     (apply, "_read_targets"), (apply, "_lock_targets"),
                     (apply, "_replace_expected"), (apply, "_apply_statements"),
                     (apply, "_prove"), (passes, "_record_pass"), (passes, "_transaction"),
                     (passes, "_keep_snapshot"), (passes, "_prune"), (os, "fdatasync")]:
    if hasattr(module, name):
        timed(module, name)
s = steps.settings(**yaml.safe_load(open(sys.argv[1])))
began = time.monotonic()
r = steps.catchup_step(s, sys.argv[2], sys.argv[3])
phases.append(("catchup", began, time.monotonic()))
with open(os.environ["SESSIONMIG_TRACE_PHASES"], "w") as out:
    json.dump(phases, out)
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
            # Created as the app creates them: now (after everything the store held).
            "INSERT INTO sessions SELECT 'session-new-' || rowid, user_id, metadata, "
            "'2026-01-15 12:30:00', expires_at, '2026-01-15 12:30:00', 0 FROM sessions "
            "WHERE rowid = ?",
            [(r,) for r in new],
        )
    return {
        "validated": len(validated),
        "extended": len(extended),
        "ended": len(ended),
        "created": len(new),
    }


@dataclass(frozen=True)
class Latency:
    """One round of the app's load: without a pass, and with one beside it."""

    baseline: list[float]  # seconds, every request of the baseline run
    during: list[float]  # seconds, the requests scheduled while the pass ran
    trace: str  # the timeline of the pass beside the load (``--trace``), else ""
    pass_s: float
    detail: dict
    errors: int
    error_example: str


def active_ids(store: Path, count: int, seed: int = 11) -> list[str]:
    """``count`` sessions active at ``AS_OF``, drawn uniformly (the store's local times are
    Asia/Seoul, as ``AS_OF`` is written)."""
    local = AS_OF[:19].replace("T", " ")
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as conn:
        ids = [
            r[0]
            for r in conn.execute("SELECT session_id FROM sessions WHERE expires_at > ?", (local,))
        ]
    conn.close()
    return random.Random(seed).sample(ids, min(count, len(ids)))


class KindOf:
    """The store, remembering which of its methods each request (task) called last."""

    def __init__(self, store: SessionManager) -> None:
        self.store = store
        self.kinds: dict[asyncio.Task, str] = {}

    def __getattr__(self, name: str):
        method = getattr(self.store, name)

        def call(*args, **kwargs):
            task = asyncio.current_task()
            if task is not None:
                self.kinds[task] = name.removesuffix("_session")
            return method(*args, **kwargs)

        return call


async def offered_load(
    store: SessionManager,
    sessions: Sessions,
    users: int,
    interval_s: float,
    until: Callable[[float], bool],
) -> list[tuple[float, float, str]]:
    """Open loop, as ``bench_store.open_loop``: each user sends one request every
    ``interval_s`` at times fixed in advance, whether or not earlier ones have finished;
    ``(scheduled time, latency, kind)`` per request, until ``until(now)`` says stop."""
    loop = asyncio.get_running_loop()
    phase = random.Random(7)
    start = loop.time() + 0.05
    offsets = sorted(phase.uniform(0, interval_s) for _ in range(users))
    done: list[tuple[float, float, str]] = []
    tasks: list[asyncio.Task[None]] = []
    kinds = KindOf(store)

    async def request(at: float, user: int) -> None:
        await one_operation(kinds, sessions, user)  # type: ignore[arg-type]
        task = asyncio.current_task()
        done.append((at, loop.time() - at, kinds.kinds.pop(task, "?")))  # type: ignore[arg-type]

    k = 0
    while True:
        for user, offset in enumerate(offsets):
            at = start + k * interval_s + offset
            delay = at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if until(loop.time()):
                await asyncio.gather(*tasks)
                return done
            tasks.append(asyncio.create_task(request(at, user)))
        k += 1


async def app_latency(
    target_url: str,
    ids: list[str],
    pass_cmd: list[str],
    env: dict[str, str],
    args: argparse.Namespace,
) -> Latency:
    """The app's latency at a fixed offered load, without and then with a pass beside it."""
    loop = asyncio.get_running_loop()
    began, zero = datetime.fromisoformat(AS_OF), time.monotonic()
    store = SessionManager(
        target_url, clock=lambda: began + timedelta(seconds=time.monotonic() - zero)
    )
    sessions = Sessions(list(ids), random.Random(3))
    interval = args.interval_ms / 1000
    try:
        # Warm up as a running app is: pool full, statements prepared.
        await closed_loop(store, sessions, 20, 20)
        first = loop.time()
        baseline = await offered_load(
            store, sessions, args.users, interval, lambda now: now > first + args.load_seconds
        )
        window: dict[str, float] = {}
        result: dict[str, object] = {}

        async def one_pass() -> None:
            await asyncio.sleep(LEAD_S)
            window["start"] = loop.time()
            proc = await asyncio.create_subprocess_exec(
                *pass_cmd,
                cwd=ROOT,
                env={**os.environ, **env},
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await proc.communicate()
            window["end"] = loop.time()
            if proc.returncode:
                sys.exit(f"the pass beside the load exited {proc.returncode}: {err.decode()}")
            result.update(json.loads(out.decode().strip().splitlines()[-1]))

        running = asyncio.create_task(one_pass())
        with catchup_trace.Sampler() as sampler:
            beside = await offered_load(
                store,
                sessions,
                args.users,
                interval,
                lambda now: "end" in window and now > window["end"] + TAIL_S,
            )
            await running
    finally:
        await store.close()
    during = [lat for at, lat, _ in beside if window["start"] <= at <= window["end"]]
    trace = ""
    if args.trace:
        trace = catchup_trace.write(
            args.trace,
            args.trace_name,
            beside,
            Path(env["SESSIONMIG_TRACE_PHASES"]),
            sampler.rows,
            window["start"],
            window["end"],
        )
    return Latency(
        [lat for _, lat, _ in baseline],
        during,
        trace,
        window["end"] - window["start"],
        result,
        len(sessions.errors),
        sessions.errors[0] if sessions.errors else "",
    )


def fresh_database(url: str) -> str:
    embedded.ensure_database(url, DATABASE, fresh=True)
    return embedded.with_database(url, DATABASE)


def checkpoint(url: str) -> None:
    with connect(url, "bench", autocommit=True) as conn:
        conn.execute("CHECKPOINT")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument(
        "--store",
        type=Path,
        help="the store to start from (default: the shared sample of --rows sessions, "
        "generated without oddities)",
    )
    parser.add_argument("--changed", default="0.01,0.10", help="fractions of sessions changed")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the table shows medians")
    parser.add_argument("--dsn", default=os.environ.get("SESSIONMIG_BENCH_DSN"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "CATCHUP.md")
    parser.add_argument("--users", type=int, default=100, help="app load: simulated users")
    parser.add_argument("--interval-ms", type=float, default=200, help="app load: per user")
    parser.add_argument(
        "--load-seconds", type=float, default=10, help="app load: the baseline's duration"
    )
    parser.add_argument("--no-latency", action="store_true", help="skip the app's p99")
    parser.add_argument(
        "--idle-pass",
        action="store_true",
        help="beside the load, a process that only sleeps as long as the pass took: the "
        "noise floor of the p99 ratio on this machine",
    )
    parser.add_argument(
        "--idle-burn",
        type=int,
        default=0,
        metavar="N",
        help="beside the load, N cores kept busy at SCHED_IDLE as long as the pass took: "
        "what CPU work that yields at once still costs the app on this machine",
    )
    parser.add_argument(
        "--trace",
        type=Path,
        help="keep, in this folder, each pass-beside-the-load's timeline: every request "
        "(time, latency, kind), the pass's phases, and the kernel's I/O and CPU counters",
    )
    args = parser.parse_args()
    fractions = [float(f) for f in args.changed.split(",")]
    if args.trace:
        args.trace.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    store = args.store or sample(args.rows)
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
    latencies: dict[float, list[Latency]] = {f: [] for f in fractions}
    ids = [] if args.no_latency else active_ids(store, LOAD_IDS)
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
                if args.no_latency:
                    continue
                # The app's side: a fresh copy of the target, the load alone, then beside a pass.
                fresh_database(url)
                run_measured([*cli, "migrate", "--env", str(env_file)], env)
                checkpoint(url)
                pass_cmd = [sys.executable, "-c", PASS_DRIVER, str(env_file), str(live), str(state)]
                pass_env = env
                if args.trace:
                    args.trace_name = f"round{round_ + 1}-{fraction:g}"
                    phases = args.trace / f"{args.trace_name}-phases.json"
                    pass_env = {**env, "SESSIONMIG_TRACE_PHASES": str(phases)}
                    pass_cmd = [*pass_cmd[:2], TRACED_PASS_DRIVER, *pass_cmd[3:]]
                if args.idle_pass or args.idle_burn:
                    driver = IDLE_DRIVER if args.idle_pass else BURN_DRIVER
                    pass_cmd = [
                        sys.executable,
                        "-c",
                        driver,
                        f"{one.wall:.2f}",
                        str(args.idle_burn),
                    ]
                measured = asyncio.run(app_latency(target_url, ids, pass_cmd, pass_env, args))
                if measured.trace:
                    print(measured.trace, file=sys.stderr)
                assert measured.detail.get("verdict") == "PASS", measured.detail
                latencies[fraction].append(measured)
                shutil.rmtree(state, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        embedded.ensure_database(url, DATABASE, fresh=True)
    load = (load_before, os.getloadavg()[0])
    write_table(args, label, fractions, lives, migrates, passes, latencies, load)
    print(args.out.read_text())
    return 0


def latency_rows(fractions: list[float], latencies: dict[float, list[Latency]]) -> list[str]:
    rows = []
    ms = 1000
    for fraction in fractions:
        runs = latencies[fraction]
        if not runs:
            continue
        base = [percentile(r.baseline, 0.99) * ms for r in runs]
        beside = [percentile(r.during, 0.99) * ms for r in runs]
        ratios = [b / a for a, b in zip(base, beside, strict=True)]
        # Every round's requests together: the p99 of a few thousand requests moves with a
        # handful of them, so one round's ratio is noisy; pooled, the rounds' noise averages.
        pooled = percentile([x for r in runs for x in r.during], 0.99) / percentile(
            [x for r in runs for x in r.baseline], 0.99
        )
        p50 = statistics.median(percentile(r.baseline, 0.5) * ms for r in runs)
        p50_beside = statistics.median(percentile(r.during, 0.5) * ms for r in runs)
        rows.append(
            f"| {fraction:.0%} | {statistics.median(base):.1f} | {statistics.median(beside):.1f} "
            f"| {statistics.median(ratios):.2f} ({', '.join(f'{r:.2f}' for r in ratios)}) "
            f"| {pooled:.2f} "
            f"| {p50:.1f} / {p50_beside:.1f} "
            f"| {statistics.median(len(r.during) for r in runs):,.0f} "
            f"| {statistics.median(r.pass_s for r in runs):.1f} "
            f"| {statistics.median(float(r.detail['locked_s']) for r in runs):.2f} "
            # What the app saw of the pass's row locks: its slowest request in the window
            # (a request stopped by its statement timeout counts among the errors).
            f"| {max(max(r.during, default=0.0) for r in runs):.2f} "
            f"| {sum(r.errors for r in runs)} |"
        )
    for fraction in fractions:
        example = next((r.error_example for r in latencies[fraction] if r.error_example), "")
        if example:
            rows.append(
                f"\nErrors the app's store raised with {fraction:.0%} changed, e.g.: `{example}`"
            )
    return rows


def write_table(args, label, fractions, lives, migrates, passes, latencies, load) -> None:
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
    app_rows = latency_rows(fractions, latencies)
    idle_note = (
        "\n**`--idle-pass`: no pass ran beside the load, only a process sleeping as long as "
        "the pass took** — the ratio is this machine's noise floor."
        if args.idle_pass
        else f"\n**`--idle-burn {args.idle_burn}`: no pass ran beside the load, only "
        f"{args.idle_burn} core(s) kept busy at SCHED_IDLE as long as the pass took.**"
        if args.idle_burn
        else ""
    )
    latency_text = (
        ""
        if not app_rows
        else f"""
The app's latency on PostgreSQL while a pass runs beside it (medians of {args.repeat} rounds;
acceptance: the p99 beside a pass within 2× of the p99 without one). The app's store
(`SessionManager`, pool of 8, in the benchmark's process) serves an open-loop load of
{args.users} users × one request every {args.interval_ms:g} ms
({args.users * 1000 / args.interval_ms:,.0f} ops/s offered; latency from each request's
scheduled start, so queueing counts) with `bench_store.py`'s mix (70% validate, 10% get,
8% extend, 7% create, 5% delete) on {LOAD_IDS} sessions active at `as_of`, drawn uniformly from
the store — the pass's changed sessions get their share of the requests. On a freshly migrated
target: first {args.load_seconds:g} s of load alone, then the same load from {LEAD_S:g} s before
the pass (its own process, as above) until {TAIL_S:g} s after; "beside" counts the requests
scheduled while the pass ran; "× pooled" compares the p99 of every round's requests taken
together (beside the passes, and without). Client, server and pass share the 2 cores.{idle_note}

{LATENCY_HEADER}
{chr(10).join(app_rows)}
"""
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

A pass = a consistent snapshot of the live store (SQLite online backup API, written back to disk
every 4 MiB as it is made), hashed on a thread while SQLite compares it with the base (each live
row against the base row with its rowid, checked by session_id; logouts by key on a second
connection; only differing rows are normalised in Python by the migration's rules; the first
pass then re-hashes the migrated backup, which is evidence; all of it at a lower CPU priority:
nicer for the snapshot, idle for the hashing, the diff and the re-hash), then one
PostgreSQL transaction: binary COPY of the delta into a temporary table, `FOR UPDATE` of the
touched rows (by key), the merge rules in Python, set-based UPDATE / INSERT / DELETE, the
in-transaction proof (a join against the expected rows; PostgreSQL's count of the rows the
transaction wrote), the audit row. "Rows locked" is how long the app on PostgreSQL could wait on
a row the pass changes. Load average (1 min) of the machine
at the start and the end of the run: {load[0]:.1f} and {load[1]:.1f}.
{latency_text}"""
    args.out.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
