"""Benchmark the two session stores as an app owner asks (not a test): ``benchmarks/STORE.md``.

Two measurements per store, in rounds side by side (the order of the stores alternates from
round to round), medians at the end:

1. **Fixed offered load, open loop** — the digest's 100 users, each sending one request every
   200 ms (500 ops/s offered). Every request's start time is scheduled before the run; a request
   starts at its time whether or not earlier ones have finished, and its latency runs from that
   scheduled time. A store that falls behind therefore shows its queue in the latency instead of
   slowing the client down (no coordinated omission). Reports p50/p99/p99.9.
2. **Saturation, closed loop** — 100 clients, each running ``--ops`` operations back to back;
   reports operations/s (and p50/p99, which here are mostly queueing).

The mix is the app's: 70% validate, 10% get, 8% extend, 7% create (a login), 5% delete (a
logout), on ids drawn from the live sessions (200 to start with). Before each store's
measurement the store is warmed up (its pool filled, its statements prepared), as a running app's
is. Each round starts both stores from an empty table.

3. **A failover** (``--failover``): a primary and its synchronous standby of the benchmark's
   own (the PostgreSQL binaries, in a temporary directory), the store on a multi-host DSN
   (``target_session_attrs=read-write``) under the same open-loop load, the primary stopped at
   once and the standby promoted ``--promote-after`` seconds later: the gap, the longest wait,
   the p99 before/during/after, and the ledger's lost/invented/miscounted sessions
   (``tests/failover.py`` runs it; ``tests/test_failover.py`` asserts on it).

Servers: ``--dsn`` (an admin URL, database ``postgres``) or ``--embedded`` (the embedded
PostgreSQL 18); else the system PostgreSQL when it answers, else the embedded one. The benchmark
creates a database of its own there and drops it at the end. The legacy SQLite store works on a
file in a temporary directory. Loopback only; every loop is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from psycopg import sql
from target import SYSTEM, server_url

from sessionmig.postgres import embedded, schema
from sessionmig.postgres.connect import connect
from sessionmig.store import DEFAULT_POOL_SIZE, LegacySQLiteSessionManager, SessionManager

DATABASE = "sessionmig_bench_store"
SEED_SESSIONS = 200
# The app's mix: validate dominates (every request), the rest are logins, logouts, reads.
MIX = (("validate", 0.70), ("get", 0.10), ("extend", 0.08), ("create", 0.07), ("delete", 0.05))
WARMUP_OPS = 400
Store = SessionManager | LegacySQLiteSessionManager


@dataclass
class Sessions:
    """The live session ids the simulated users pick from (logins add, logouts remove)."""

    ids: list[str]
    rng: random.Random
    errors: list[str] = field(default_factory=list)

    def pick(self) -> str:
        return self.ids[self.rng.randrange(len(self.ids))]


def choose(rng: random.Random) -> str:
    roll, acc = rng.random(), 0.0
    for name, weight in MIX:
        acc += weight
        if roll < acc:
            return name
    return MIX[0][0]


async def one_operation(store: Store, sessions: Sessions, user: int) -> None:
    """One request of the mix; an exception is recorded (the run reports it), not raised."""
    kind = choose(sessions.rng)
    sid = sessions.pick()
    try:
        if kind == "validate":
            await store.validate_session(sid)
        elif kind == "get":
            await store.get_session(sid)
        elif kind == "extend":
            await store.extend_session(sid, 1)
        elif kind == "create":
            new, _ = await store.create_session(f"user-{user}", {"user": user, "locale": "ko-KR"})
            sessions.ids.append(new)
        else:
            await store.delete_session(sid)
            # A logout: that user stops using the id (others may still hold it, as in life).
            if len(sessions.ids) > SEED_SESSIONS // 2 and sid in sessions.ids:
                sessions.ids.remove(sid)
    except Exception as exc:  # counted and shown: a benchmark with errors is not a result
        sessions.errors.append(f"{kind}: {type(exc).__name__}: {exc}")


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile (q in 0..1) of ``values``."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


async def open_loop(
    store: Store, sessions: Sessions, users: int, interval_s: float, seconds: float
) -> tuple[list[float], float]:
    """Latencies (from each request's scheduled start) at a fixed offered load, and the
    achieved rate. The whole schedule is fixed before the first request is sent."""
    loop = asyncio.get_running_loop()
    per_user = max(1, round(seconds / interval_s))
    phase = random.Random(7)
    start = loop.time() + 0.05
    schedule = sorted(
        (start + phase.uniform(0, interval_s) + k * interval_s, user)
        for user in range(users)
        for k in range(per_user)
    )
    latencies: list[float] = []

    async def request(at: float, user: int) -> None:
        await one_operation(store, sessions, user)
        latencies.append(loop.time() - at)

    tasks: list[asyncio.Task[None]] = []
    for at, user in schedule:
        delay = at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        # Sent at its time even if earlier requests are still waiting for the store.
        tasks.append(asyncio.create_task(request(at, user)))
    await asyncio.gather(*tasks)
    wall = loop.time() - start
    return latencies, len(latencies) / wall


async def closed_loop(
    store: Store, sessions: Sessions, clients: int, ops: int
) -> tuple[list[float], float]:
    """Latencies and operations/s of ``clients`` clients each running ``ops`` back to back."""
    latencies: list[float] = []

    async def client(user: int) -> None:
        for _ in range(ops):
            began = time.perf_counter()
            await one_operation(store, sessions, user)
            latencies.append(time.perf_counter() - began)

    began = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(clients)))
    return latencies, len(latencies) / (time.perf_counter() - began)


@dataclass
class Result:
    store: str
    open_p50: float
    open_p99: float
    open_p999: float
    open_rate: float
    closed_rate: float
    closed_p50: float
    closed_p99: float
    cpu_us_per_op: float
    errors: int


async def measure(
    name: str, make: Callable[[], Store], args: argparse.Namespace, seed: int
) -> Result:
    store = make()
    try:
        rng = random.Random(seed)
        ids = [(await store.create_session(f"user-{i}", {"i": i}))[0] for i in range(SEED_SESSIONS)]
        sessions = Sessions(ids, rng)
        # Warm up as a running app is: pool full, statements prepared, caches hot.
        await closed_loop(store, sessions, 20, WARMUP_OPS // 20)
        opened, open_rate = await open_loop(
            store, sessions, args.users, args.interval_ms / 1000, args.seconds
        )
        cpu = time.process_time()
        closed, closed_rate = await closed_loop(store, sessions, args.clients, args.ops)
        cpu_per_op = (time.process_time() - cpu) / len(closed) * 1e6
    finally:
        await store.close()
    if sessions.errors:
        print(f"  {name}: {len(sessions.errors)} errors, e.g. {sessions.errors[0]}")
    ms = 1000
    return Result(
        name,
        percentile(opened, 0.50) * ms,
        percentile(opened, 0.99) * ms,
        percentile(opened, 0.999) * ms,
        open_rate,
        closed_rate,
        percentile(closed, 0.50) * ms,
        percentile(closed, 0.99) * ms,
        cpu_per_op,
        len(sessions.errors),
    )


def reset_table(dsn: str) -> None:
    with connect(dsn, "bench", autocommit=True) as conn:
        conn.execute("TRUNCATE public.sessions")
        conn.execute("VACUUM ANALYZE public.sessions")


HEADER = (
    "| store | open p50 ms | open p99 ms | open p99.9 ms | achieved ops/s | "
    "saturation ops/s | closed p50 ms | closed p99 ms | client CPU µs/op | errors |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def row(r: Result, label: str | None = None) -> str:
    return (
        f"| {label or r.store} | {r.open_p50:.1f} | {r.open_p99:.1f} | {r.open_p999:.1f} | "
        f"{r.open_rate:,.0f} | {r.closed_rate:,.0f} | {r.closed_p50:.1f} | {r.closed_p99:.1f} | "
        f"{r.cpu_us_per_op:,.0f} | {r.errors} |"
    )


def median_result(name: str, results: list[Result]) -> Result:
    def med(attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in results)

    return Result(
        name,
        *(
            med(a)
            for a in (
                "open_p50",
                "open_p99",
                "open_p999",
                "open_rate",
                "closed_rate",
                "closed_p50",
                "closed_p99",
                "cpu_us_per_op",
            )
        ),
        sum(r.errors for r in results),  # type: ignore[arg-type]
    )


def drop_database(admin: str, name: str) -> None:
    with connect(admin, "bench", autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--dsn", help="admin URL of the PostgreSQL server (database postgres)")
    where.add_argument("--embedded", action="store_true", help="the embedded PostgreSQL 18")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--users", type=int, default=100, help="open loop: simulated users")
    parser.add_argument("--interval-ms", type=float, default=200, help="open loop: per user")
    parser.add_argument("--seconds", type=float, default=10, help="open loop: duration")
    parser.add_argument("--clients", type=int, default=100, help="closed loop: clients")
    parser.add_argument("--ops", type=int, default=50, help="closed loop: operations per client")
    parser.add_argument(
        "--pool-size",
        type=int,
        nargs="+",
        default=[DEFAULT_POOL_SIZE],
        help="SessionManager pool size(s); several sizes are measured side by side",
    )
    parser.add_argument("--no-sqlite", action="store_true", help="PostgreSQL only")
    parser.add_argument(
        "--failover", action="store_true", help="measure a failover instead (own servers)"
    )
    parser.add_argument(
        "--promote-after", type=float, default=8.0, help="failover: seconds without a primary"
    )
    args = parser.parse_args()
    if args.failover:
        return run_failover(args)

    if args.embedded:
        dsn = embedded.url(DATABASE)
        admin, where = embedded.with_database(dsn, "postgres"), "embedded"
    else:
        admin, _ = server_url(args.dsn)
        embedded.ensure_database(admin, DATABASE, fresh=True)
        dsn = embedded.with_database(admin, DATABASE)
        where = "system" if admin == SYSTEM else "given server"
    with connect(admin, "bench") as conn:
        version = conn.info.server_version
        where += f", {conn.info.host}:{conn.info.port}"
    label = f"PostgreSQL {version // 10000}.{version % 10000} ({where})"
    try:
        schema.upgrade(dsn)
        return run_rounds(args, dsn, label)
    finally:
        drop_database(admin, DATABASE)


def run_failover(args: argparse.Namespace) -> int:
    """The failover measurement (see the module docstring), on servers of its own."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from failover import measure as failover_measure
    from pgcluster import BIN, primary_and_standby

    if BIN is None:
        print("no PostgreSQL binaries (initdb, pg_ctl, pg_basebackup): set SESSIONMIG_PG_BIN")
        return 2
    with tempfile.TemporaryDirectory() as tmp, primary_and_standby(Path(tmp)) as (one, two):
        schema.upgrade(one.url())
        dsn = (
            f"postgresql://postgres@127.0.0.1:{one.port},127.0.0.1:{two.port}/postgres"
            "?target_session_attrs=read-write"
        )
        print(
            f"PostgreSQL binaries {BIN}; {args.users} users × 1 request / "
            f"{args.interval_ms:g} ms; primary stopped (immediate) after 5 s, standby promoted "
            f"{args.promote_after:g} s later, 5 s more\n"
        )
        figures = failover_measure(
            dsn,
            lambda: one.stop("immediate"),
            two.promote,
            users=args.users,
            interval_s=args.interval_ms / 1000,
            before_s=5.0,
            promote_after_s=args.promote_after,
            after_s=5.0,
        )
    print(figures.table())
    for record in figures.records:
        print("  log:", record)
    return 0


def run_rounds(args: argparse.Namespace, dsn: str, label: str) -> int:
    offered = args.users * 1000 / args.interval_ms
    print(
        f"{label}; open loop: {args.users} users × 1 request / {args.interval_ms:g} ms "
        f"= {offered:,.0f} ops/s offered for {args.seconds:g} s; closed loop: {args.clients} "
        f"clients × {args.ops} operations; mix "
        + ", ".join(f"{w:.0%} {n}" for n, w in MIX)
        + f"; {args.rounds} rounds\n"
    )
    results: dict[str, list[Result]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        makers: list[tuple[str, Callable[[], Store]]] = [
            (f"SessionManager (pool {size})", lambda size=size: SessionManager(dsn, pool_size=size))
            for size in args.pool_size
        ]
        if not args.no_sqlite:
            counter = iter(range(10**6))
            makers.append(
                (
                    "LegacySQLiteSessionManager",
                    lambda: LegacySQLiteSessionManager(
                        Path(tmp) / f"sessions-{next(counter)}.db", zone="Asia/Seoul"
                    ),
                )
            )
        print(HEADER.replace("| store |", "| round | store |").replace("|---|", "|---|---|", 1))
        for n in range(args.rounds):
            order = makers if n % 2 == 0 else makers[::-1]
            for name, make in order:
                if name.startswith("SessionManager"):
                    reset_table(dsn)
                result: Result = asyncio.run(measure(name, make, args, seed=n))
                results.setdefault(name, []).append(result)
                print(f"| {n + 1} " + row(result))
                sys.stdout.flush()
    medians = {name: median_result(name, rs) for name, rs in results.items()}
    print(f"\nMedians of {args.rounds} rounds ({label}):\n")
    print(HEADER)
    for r in medians.values():
        print(row(r))
    legacy = medians.get("LegacySQLiteSessionManager")
    if legacy:
        print()
        for r in medians.values():
            if r is legacy:
                continue
            ratio = r.closed_rate / legacy.closed_rate
            print(
                f"{r.store}: saturation {ratio:.2f}× the legacy store's "
                f"({'meets' if ratio >= 2 else 'misses'} ≥ 2×); open-loop p99 "
                f"{r.open_p99:.1f} ms vs {legacy.open_p99:.1f} ms "
                f"({'meets' if r.open_p99 < 20 and r.open_p99 < legacy.open_p99 else 'misses'}"
                " < 20 ms and below SQLite's)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
