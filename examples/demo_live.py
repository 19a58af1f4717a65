"""The live cutover end to end (``make demo-live``): the app keeps serving, no session is lost,
no request goes uncounted.

Against the embedded PostgreSQL 18 server:

1. a live SQLite store (``sessionmig sample``, as of now, so a tenth of it is active);
2. **blue** — a uvicorn process of the example app on that file (``SESSION_DB_TYPE=sqlite``) —
   and simulated users logging in, chatting over the WebSocket, extending and logging out;
3. while blue serves: ``sessionmig snapshot``, then ``sessionmig run --env local`` (preflight,
   inspect, migrate, reconcile) on the snapshot, then a first catch-up pass
   (``sessionmig run --steps catchup``);
4. **green** — the same app on PostgreSQL (``SESSION_DB_TYPE=postgres``) — starts, and some users
   move to it while others stay on blue, on the same sessions; catch-up passes meanwhile;
5. blue is drained and stopped; the final catch-up pass runs while green keeps serving;
6. every user's ledger of acknowledged operations is checked against PostgreSQL.

Every step runs as a runbook step with its report (``reports/local/RUN_ID/index.html``); the
demo prints each run's index and ends with one line of counts. Exit 0 when every step passed and
PostgreSQL matches the ledger exactly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

from session_app.traffic import Colour, Ledger, adopt, client, compare  # noqa: E402

from sessionmig.postgres import embedded  # noqa: E402
from sessionmig.postgres.connect import connect  # noqa: E402

ZONE = "Asia/Seoul"
BLUE_USERS, GREEN_USERS = 5, 4
OVERLAP_PASSES = 2


def say(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)


async def sessionmig(*args: str) -> tuple[int, str]:
    """``sessionmig ARGS`` in its own process (the users keep going meanwhile): exit code and
    its output, which is also shown."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sessionmig.cli",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    text = out.decode()
    for line in text.strip().splitlines():
        print(f"    {line}", flush=True)
    return proc.returncode or 0, text


def index_of(output: str) -> str:
    found = re.search(r"^reports: (.+)$", output, re.MULTILINE)
    return found.group(1) if found else "(no index: see the output above)"


async def demo(args: argparse.Namespace, work: Path) -> int:
    live = work / "app" / "sessions.db"
    snap0 = work / "snapshots" / "snap0.db"
    state = work / "catchup-state"  # private: the snapshots it keeps hold session ids
    now = datetime.now(UTC)
    as_of = now.isoformat(timespec="seconds")
    code, _ = await sessionmig(
        "sample", "--rows", str(args.rows), "--out", str(live), "--as-of", as_of, "--oddities", "0"
    )
    if code:
        return code
    ledger = Ledger()
    active = adopt(live, ZONE, ledger, now)
    say(f"live store: {args.rows:,} sessions, {active:,} active now")

    server = embedded.start()  # held by this process for the whole demo
    url = embedded.with_database(server.get_uri("postgres"), embedded.DEFAULT_DATABASE)
    blue = Colour(
        "blue",
        {"SESSION_DB_TYPE": "sqlite", "SESSION_SQLITE_PATH": str(live), "SESSION_TIMEZONE": ZONE},
        work / "blue.log",
    )
    green = Colour("green", {"SESSION_DB_TYPE": "postgres", "DATABASE_URL": url}, work / "g.log")
    runs: list[tuple[str, str]] = []
    local = ("--env", "local", "-p", f"sqlite_path={snap0}", "-p", f"as_of={as_of}")
    catchup = (
        "run",
        *local,
        "--steps",
        "catchup",
        "-p",
        f"live_sqlite_path={live}",
        "-p",
        f"state_dir={state}",
    )
    stop_blue, stop_green = asyncio.Event(), asyncio.Event()
    on_blue: list[asyncio.Task[None]] = []
    on_green: list[asyncio.Task[None]] = []

    async def step(title: str, *command: str) -> bool:
        say(title)
        code, output = await sessionmig(*command)
        if command[0] == "run":
            runs.append((title, index_of(output)))
        if code:
            say(f"{title}: exit {code}; stopping the demo (blue still served every request)")
        return code == 0

    try:
        await asyncio.to_thread(blue.start)
        say(f"blue (SQLite) serves at {blue.url}; {BLUE_USERS} users log in, chat, extend, leave")
        on_blue = [
            asyncio.create_task(client(blue.url, "blue", stop_blue, ledger, k, pace_s=0.02))
            for k in range(BLUE_USERS)
        ]
        await asyncio.sleep(2)
        ok = (
            await step("snapshot of the live store", "snapshot", str(live), str(snap0))
            and await step("preflight, inspect, migrate, reconcile", "run", *local, "--fresh")
            and await step("catch-up pass 1 (blue alone)", *catchup)
        )
        if ok:
            await asyncio.to_thread(green.start)
            say(f"green (PostgreSQL) serves at {green.url}; {GREEN_USERS} users move to it")
            on_green = [
                asyncio.create_task(client(green.url, "green", stop_green, ledger, 100 + k, 0.02))
                for k in range(GREEN_USERS)
            ]
            for n in range(OVERLAP_PASSES):
                await asyncio.sleep(2)
                ok = ok and await step(f"catch-up pass {n + 2} (both colours serve)", *catchup)
        stop_blue.set()
        await asyncio.gather(*on_blue)
        await asyncio.to_thread(blue.stop)
        say("blue drained and stopped")
        if ok:
            ok = await step("final catch-up pass (green serves)", *catchup)
        await asyncio.sleep(1)
        stop_green.set()
        await asyncio.gather(*on_green)
    finally:
        stop_blue.set()
        stop_green.set()
        for task in (*on_blue, *on_green):
            task.cancel()
        blue.stop()
        green.stop()

    say("reports:")
    for title, index in runs:
        print(f"    {title}: {index}")
    if not ok:
        return 1
    with connect(url, "demo-live") as conn:
        rows = {
            r[0]: r[1:]
            for r in conn.execute(
                "SELECT session_id, user_id, metadata, expires_at, request_count "
                "FROM public.sessions"
            )
        }
    lost, extra, wrong = compare(ledger, rows)
    ops = ledger.ops
    both = sum(1 for c in ledger.validations.values() if c["blue"] and c["green"])
    print(
        f"\nblue: {ops['create blue']} logins, {ops['validate blue']} validations, "
        f"{ops['extend blue']} extensions, {ops['delete blue']} logouts; green: "
        f"{ops['create green']} logins, {ops['validate green']} validations, "
        f"{ops['extend green']} extensions, {ops['delete green']} logouts; "
        f"{both} sessions validated on both colours; {len(ledger.errors)} errors"
    )
    for problem in [*ledger.errors[:5], *wrong[:5]]:
        print(f"    {problem}")
    verdict = "MATCH" if (lost, extra, len(wrong), len(ledger.errors)) == (0, 0, 0, 0) else "FAIL"
    print(
        f"{verdict}: PostgreSQL holds {len(rows):,} sessions; ledger {len(ledger.alive()):,} "
        f"alive ({len(ledger.expired):,} refused after they expired: absent or not, both "
        f"right), {len(ledger.ended):,} ended; {lost} lost, {extra} invented or not ended, "
        f"{len(wrong)} with a wrong count or expiry"
    )
    return 0 if verdict == "MATCH" else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000, help="sessions in the live store")
    args = parser.parse_args()
    os.chdir(ROOT)  # the embedded server's data and the reports are the checkout's
    work = ROOT / ".sessionmig" / "demo-live" / time.strftime("%Y%m%dT%H%M%S")
    work.mkdir(parents=True, mode=0o700)
    started = time.monotonic()
    try:
        code = asyncio.run(demo(args, work))
    finally:
        with contextlib.suppress(Exception):
            embedded.stop()
    say(f"done in {time.monotonic() - started:.0f} s; the app's files in {work}")
    return code


if __name__ == "__main__":
    sys.exit(main())
