"""``get_session`` answers with a typed, frozen record (both stores alike), not a dict."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from sessionstore import LegacySQLiteSessionManager, Session, SessionManager
from sessionstore.migrate import upgrade

START = datetime(2026, 3, 29, 0, 30, tzinfo=UTC)  # the night Europe's clocks go forward


@pytest.fixture(params=["postgres", "sqlite"])
def manager(request: pytest.FixtureRequest, backend: str, tmp_path: Path):
    clock = lambda: START  # noqa: E731
    if request.param == "postgres":
        dsn = request.getfixturevalue("dsn")
        upgrade(dsn)
        store: SessionManager | LegacySQLiteSessionManager = SessionManager(dsn, clock=clock)
    else:
        store = LegacySQLiteSessionManager(tmp_path / "s.db", zone="Europe/Berlin", clock=clock)
    yield store
    asyncio.run(store.close())


def test_get_session_returns_the_typed_record(manager) -> None:
    meta = {"ip": "10.0.0.1", "tags": ["아파트", 1, None]}

    async def scenario() -> tuple[str, Session | None, Session | None]:
        sid, _ = await manager.create_session("user-7", meta)
        await manager.validate_session(sid)
        return sid, await manager.get_session(sid), await manager.get_session("session-none")

    sid, got, absent = asyncio.run(scenario())
    assert absent is None
    assert isinstance(got, Session)
    assert got == Session(
        session_id=sid,
        user_id="user-7",
        metadata=meta,
        created_at=START,
        expires_at=START + timedelta(hours=24),
        last_activity=START,
        request_count=1,
    )
    assert all(t.utcoffset() == timedelta(0) for t in (got.created_at, got.expires_at))
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.request_count = 99  # type: ignore[misc]
    assert got.as_dict()["metadata"] == meta and list(got.as_dict())[0] == "session_id"
