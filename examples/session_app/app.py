"""The digest's chat backend, reduced to its session handling: a FastAPI app whose WebSocket
endpoint ``/ws/{session_id}`` validates every connection and every message through
``get_session_manager()``, with the HTTP routes that create, end and extend sessions.

Which store it uses is the environment's choice, read once at start-up, exactly as the digest's
rollback switch works: ``SESSION_DB_TYPE=sqlite`` (the legacy manager on the SQLite file at
``SESSION_SQLITE_PATH``, naive wall-clock times in ``SESSION_TIMEZONE``) is the blue colour,
``SESSION_DB_TYPE=postgres`` (the async ``SessionManager`` on ``DATABASE_URL``) the green one.
It needs only the ``sessionstore`` distribution (``examples/session_app/requirements.txt``), never
the runbook.

Every answer says whether the store accepted the operation, so a client can keep an exact
ledger of what succeeded: a WebSocket whose session is not valid is refused before the
handshake completes (HTTP 403), and a message on a session that ended meanwhile is answered
``session_ended`` and the socket closed (1008). Session ids never appear in the log.

An outage never ends a session: while the store cannot answer (``StoreUnavailable``: the
database is down, failing over, or too slow) nothing is known about any session, so the app says
exactly that — HTTP 503 with ``Retry-After``, and a WebSocket closed with 1013 "try again later"
(accepted first: a WebSocket refused during its handshake reaches the browser as HTTP 403,
which reads as "not logged in") — never 403/1008 or 404. Clients keep their tokens and carry on
when the database is back.

Run it: ``uvicorn --app-dir examples --factory session_app.app:create_app --port 8000``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

from fastapi import FastAPI, HTTPException, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from sessionstore import SessionStore, StoreUnavailable, get_session_manager

POLICY_VIOLATION = 1008  # RFC 6455: the session is not (or no longer) valid
TRY_AGAIN_LATER = 1013  # RFC 6455: a temporary condition; the session is untouched
UNAVAILABLE = "the session store is unavailable; try again later"
RETRY_AFTER_S = "1"


class Login(BaseModel):
    user_id: str | None = None
    metadata: dict[str, Any] | None = None


class Extension(BaseModel):
    hours: float = 24


def _instant(value: datetime) -> str:
    return value.isoformat()


def create_app(environ: dict[str, str] | None = None) -> FastAPI:
    """The app, its store chosen by ``environ`` (default: the process environment)."""
    env = dict(os.environ if environ is None else environ)
    colour = env.get("APP_COLOUR", env.get("SESSION_DB_TYPE", "postgres"))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Opened and checked before the first request (a database without the store's
        # migrations stops the start with StoreNotReady, saying what to run). A stopping colour
        # finishes its requests first (uvicorn drains), then lets go of the SQLite file or the
        # pool.
        async with get_session_manager(env) as sessions:
            app.state.sessions = sessions
            yield

    app = FastAPI(title="session app", lifespan=lifespan)

    @app.exception_handler(StoreUnavailable)
    async def unavailable(request: Request, exc: StoreUnavailable) -> JSONResponse:
        # Not a verdict on the session: the client keeps its token and asks again.
        return JSONResponse(
            {"detail": UNAVAILABLE}, status_code=503, headers={"Retry-After": RETRY_AFTER_S}
        )

    def store() -> SessionStore:
        return app.state.sessions  # type: ignore[no-any-return]

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "colour": colour,
            "store": env.get("SESSION_DB_TYPE", "postgres"),
            "active_sessions": await store().get_active_session_count(),
        }

    @app.post("/login")
    async def login(body: Login) -> dict[str, Any]:
        session_id, expires_at = await store().create_session(body.user_id, body.metadata)
        return {"session_id": session_id, "expires_at": _instant(expires_at), "colour": colour}

    @app.post("/sessions/{session_id}/logout")
    async def logout(session_id: str) -> dict[str, Any]:
        return {"ended": await store().delete_session(session_id), "colour": colour}

    @app.post("/sessions/{session_id}/extend")
    async def extend(session_id: str, body: Extension) -> dict[str, Any]:
        if not await store().extend_session(session_id, body.hours):
            return {"extended": False, "colour": colour}
        # The value the row holds right after (or a later extension's): what the user sees.
        found = await store().get_session(session_id)
        expires = None if found is None else _instant(found.expires_at)
        return {"extended": True, "expires_at": expires, "colour": colour}

    @app.get("/sessions/{session_id}")
    async def session(session_id: str) -> dict[str, Any]:
        found = await store().get_session(session_id)
        if found is None:
            raise HTTPException(status_code=404, detail="no such session")
        return {
            "user_id": found.user_id,
            "metadata": found.metadata,
            "created_at": _instant(found.created_at),
            "expires_at": _instant(found.expires_at),
            "last_activity": _instant(found.last_activity),
            "request_count": found.request_count,
            "colour": colour,
        }

    @app.websocket("/ws/{session_id}")
    async def chat(websocket: WebSocket, session_id: str) -> None:
        # The connection itself is a request: validated (and counted) before it is accepted.
        try:
            valid = await store().validate_session(session_id)
        except StoreUnavailable:
            await websocket.accept()
            await websocket.close(code=TRY_AGAIN_LATER, reason=UNAVAILABLE)
            return
        if not valid:
            await websocket.close(code=POLICY_VIOLATION)
            return
        await websocket.accept()
        await websocket.send_json({"type": "connected", "colour": colour})
        try:
            while True:
                message = await websocket.receive_json()
                try:
                    valid = await store().validate_session(session_id)
                except StoreUnavailable:
                    await websocket.send_json({"type": "unavailable", "detail": UNAVAILABLE})
                    await websocket.close(code=TRY_AGAIN_LATER, reason=UNAVAILABLE)
                    return
                if not valid:
                    await websocket.send_json({"type": "session_ended"})
                    await websocket.close(code=POLICY_VIOLATION)
                    return
                await websocket.send_json(
                    {"type": "reply", "echo": message.get("text"), "colour": colour}
                )
        except WebSocketDisconnect:
            return

    return app
