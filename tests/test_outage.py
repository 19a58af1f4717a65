"""An outage never ends a session: the example app under uvicorn, on a PostgreSQL server the test
starts, stops while users hold valid sessions (one with a WebSocket open), and starts again.

While the database is unreachable nothing is known about any session, so every answer must
say "try again later" — HTTP 503, WebSocket close 1013 — and never "not logged in" (403, 1008,
404, or a logout). Once the database is back the same tokens carry on, and every request the
app acknowledged was counted exactly once.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import ROOT
from pgcluster import needs_pg_bin, server

from sessionmig.postgres import schema

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
sys.path.insert(0, str(ROOT / "examples"))
from session_app.traffic import Colour  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402

pytestmark = [needs_pg_bin, pytest.mark.slow]
USERS = 4
# Each answer during the outage comes within this bound (the store's own: StoreUnavailable
# within 2 s), plus the app's and the client's share on a loaded CI machine.
ANSWER_BOUND_S = 3.0
BACK_WITHIN_S = 10.0


async def chat(base_ws: str, sid: str, messages: int) -> int:
    """Validations acknowledged on a new WebSocket (the handshake and each reply)."""
    async with connect(f"{base_ws}/ws/{sid}", open_timeout=10) as ws:
        assert json.loads(await ws.recv())["type"] == "connected"
        for k in range(messages):
            await ws.send(json.dumps({"text": f"hello {k}"}))
            assert json.loads(await ws.recv())["type"] == "reply"
    return 1 + messages


async def closed_with(ws_call) -> tuple[int | None, str, float]:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    with pytest.raises(ConnectionClosed) as closed:
        await ws_call()
    rcvd = closed.value.rcvd
    return (
        None if rcvd is None else rcvd.code,
        "" if rcvd is None else rcvd.reason,
        time.monotonic() - started,
    )


def test_an_outage_answers_try_again_later_and_ends_no_session(tmp_path: Path) -> None:
    with server(tmp_path) as pg:
        url = pg.url()
        schema.upgrade(url)
        app = Colour(
            "green", {"SESSION_DB_TYPE": "postgres", "DATABASE_URL": url}, tmp_path / "a.log"
        )
        app.start()
        try:
            asyncio.run(scenario(app, pg))
        finally:
            app.stop()
        log = (tmp_path / "a.log").read_text()
        assert "Traceback" not in log, log[-3000:]


async def scenario(app: Colour, pg) -> None:  # type: ignore[no-untyped-def]
    base_ws = "ws" + app.url.removeprefix("http")
    counted: dict[str, int] = {}
    async with httpx.AsyncClient(base_url=app.url, timeout=30) as http:
        tokens = []
        for n in range(USERS):
            answer = await http.post("/login", json={"user_id": f"u{n}", "metadata": {"n": n}})
            assert answer.status_code == 200
            tokens.append(answer.json()["session_id"])
            counted[tokens[-1]] = await chat(base_ws, tokens[-1], 1)

        async with connect(f"{base_ws}/ws/{tokens[0]}", open_timeout=10) as open_ws:
            assert json.loads(await open_ws.recv())["type"] == "connected"
            counted[tokens[0]] += 1

            await asyncio.to_thread(pg.stop, "fast")

            # The WebSocket that was open: its next message is answered "try again later".
            async def message() -> None:
                await open_ws.send(json.dumps({"text": "during the outage"}))
                while True:
                    answer = json.loads(await open_ws.recv())
                    assert answer["type"] == "unavailable", answer

            code, reason, took = await closed_with(message)
            assert (code, "try again later" in reason) == (1013, True), (code, reason)
            assert took < ANSWER_BOUND_S, took

        # A new WebSocket: accepted, then closed 1013 (a handshake refusal would be a 403).
        async def new_socket() -> None:
            async with connect(f"{base_ws}/ws/{tokens[1]}", open_timeout=10) as ws:
                await ws.recv()

        code, reason, took = await closed_with(new_socket)
        assert code == 1013 and "try again later" in reason, (code, reason)
        assert took < ANSWER_BOUND_S, took

        # Every HTTP route: 503 with Retry-After, never 403/404 or a logout.
        for method, path, body in (
            ("GET", f"/sessions/{tokens[2]}", None),
            ("POST", f"/sessions/{tokens[2]}/extend", {"hours": 1}),
            ("POST", f"/sessions/{tokens[3]}/logout", None),
            ("POST", "/login", {"user_id": "late"}),
            ("GET", "/health", None),
        ):
            started = time.monotonic()
            answer = await http.request(method, path, json=body)
            took = time.monotonic() - started
            assert answer.status_code == 503, (path, answer.status_code, answer.text)
            assert answer.headers.get("retry-after") == "1"
            assert "try again later" in answer.json()["detail"]
            assert took < ANSWER_BOUND_S, (path, took)

        # The database comes back: the same tokens carry on.
        await asyncio.to_thread(pg.start)
        deadline = time.monotonic() + BACK_WITHIN_S
        while (await http.get("/health")).status_code != 200:
            assert time.monotonic() < deadline, "the app did not recover"
            await asyncio.sleep(0.1)
        for sid in tokens:
            counted[sid] += await chat(base_ws, sid, 2)
            answer = await http.get(f"/sessions/{sid}")
            assert answer.status_code == 200
            # Every acknowledged validation counted once; none of the refused ones.
            assert answer.json()["request_count"] == counted[sid], sid[-6:]
