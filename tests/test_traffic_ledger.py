"""The example clients' ledger: what counts as a lost session. Only a session a colour refused
after its expiry may be missing (the app deletes an expired session when it is presented);
one that expired untouched, or that a colour refused while still valid, must be there."""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta

import pytest
from conftest import ROOT

pytest.importorskip("httpx")
sys.path.insert(0, str(ROOT / "examples"))
from session_app.traffic import Ledger, compare  # noqa: E402

NOW = datetime.now(UTC)


def ledger_of(**expiries: timedelta) -> Ledger:
    ledger = Ledger()
    for sid, offset in expiries.items():
        ledger.add(sid, f"user-{sid}", None, "blue", NOW + offset)
    return ledger


def row(ledger: Ledger, sid: str) -> tuple:
    user, meta, expires, count = ledger.expected(sid)
    return (user, meta, expires, count)


def test_a_session_refused_after_its_expiry_may_be_absent() -> None:
    ledger = ledger_of(gone=-timedelta(seconds=1), kept=timedelta(hours=1))
    ledger.refused("gone")
    assert ledger.expired == {"gone"}
    assert compare(ledger, {"kept": row(ledger, "kept")}) == (0, 0, [])
    # … or present, with the values the ledger expects.
    both = {"kept": row(ledger, "kept"), "gone": row(ledger, "gone")}
    assert compare(ledger, both) == (0, 0, [])


def test_a_session_refused_while_valid_or_expired_untouched_is_lost_when_absent() -> None:
    ledger = ledger_of(not_yet_carried=timedelta(hours=1), expired_untouched=-timedelta(hours=1))
    ledger.refused("not_yet_carried")  # the other colour has not seen it yet: no excuse
    assert ledger.expired == set()
    assert compare(ledger, {})[0] == 2


def test_a_session_with_another_count_is_wrong_not_lost() -> None:
    ledger = ledger_of(token123=timedelta(hours=1))
    user, meta, expires, count = row(ledger, "token123")
    rows = {"token123": (user, meta, expires, count + 1), "x": ()}
    lost, extra, wrong = compare(ledger, rows)
    assert (lost, extra, len(wrong)) == (0, 1, 1)
    assert wrong[0].startswith("sid:") and "token123" not in wrong[0]  # shown hashed
