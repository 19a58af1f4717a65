"""Benchmark the two session stores under the digest's load (not a test).

100 concurrent clients for a fixed number of operations each (75% validate, 10% extend,
10% create, 5% delete) against the async PostgreSQL ``SessionManager`` and the legacy SQLite
one; prints operations/s and p50/p99 latency per store.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from target import server_url

from sessionmig import embedded, schema
from sessionmig.store import LegacySQLiteSessionManager, SessionManager


async def load(manager, clients: int, ops: int, seed: int) -> tuple[float, list[float]]:
    rng = random.Random(seed)
    ids = [(await manager.create_session(f"user-{i}", {"i": i}))[0] for i in range(200)]
    latencies: list[float] = []

    async def client(n: int) -> None:
        for _ in range(ops):
            sid, roll = rng.choice(ids), rng.random()
            start = time.perf_counter()
            if roll < 0.75:
                await manager.validate_session(sid)
            elif roll < 0.85:
                await manager.extend_session(sid, 1)
            elif roll < 0.95:
                ids.append((await manager.create_session(f"client-{n}"))[0])
            else:
                await manager.delete_session(sid)
            latencies.append(time.perf_counter() - start)

    began = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(clients)))
    return time.perf_counter() - began, latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--ops", type=int, default=50, help="operations per client")
    args = parser.parse_args()
    url, label = server_url()
    embedded.ensure_database(url, "sessionmig_bench_store", fresh=True)
    dsn = embedded.with_database(url, "sessionmig_bench_store")
    schema.upgrade(dsn)
    with tempfile.TemporaryDirectory() as tmp:
        stores = {
            f"SessionManager on {label}": SessionManager(dsn, pool_size=20),
            "LegacySQLiteSessionManager": LegacySQLiteSessionManager(
                Path(tmp) / "sessions.db", zone="Asia/Seoul"
            ),
        }
        print(
            f"{args.clients} clients × {args.ops} operations (75% validate, 10% extend, "
            f"10% create, 5% delete)\n"
        )
        print("| store | ops | wall s | ops/s | p50 ms | p99 ms |")
        print("|---|---|---|---|---|---|")
        for name, manager in stores.items():
            wall, lat = asyncio.run(load(manager, args.clients, args.ops, 1))
            asyncio.run(manager.close())
            cuts = statistics.quantiles(lat, n=100)
            print(
                f"| {name} | {len(lat)} | {wall:.2f} | {len(lat) / wall:,.0f} | "
                f"{cuts[49] * 1000:.1f} | {cuts[98] * 1000:.1f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
