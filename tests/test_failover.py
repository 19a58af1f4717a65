"""A failover costs no session: the store follows a promoted standby without a restart, loses
and doubles nothing acknowledged, answers StoreUnavailable within 2 s while no server is
writable, is back within 3 s of the promotion, and says so once in the log.

The servers are the test's own (``tests/pgcluster.py``: a primary and a synchronous streaming
standby from the PostgreSQL binaries), so the test does not depend on the server under test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from failover import measure
from pgcluster import needs_pg_bin, primary_and_standby

from sessionmig.postgres import schema

pytestmark = [needs_pg_bin, pytest.mark.slow]
PROMOTE_AFTER_S = 3.0


def test_a_failover_under_load_loses_nothing_and_is_told_at_once(tmp_path: Path) -> None:
    with primary_and_standby(tmp_path) as (primary, standby):
        schema.upgrade(primary.url())
        dsn = (
            f"postgresql://postgres@127.0.0.1:{primary.port},127.0.0.1:{standby.port}/postgres"
            "?target_session_attrs=read-write"
        )
        figures = measure(
            dsn,
            lambda: primary.stop("immediate"),
            standby.promote,
            users=100,
            interval_s=0.2,
            before_s=2.0,
            promote_after_s=PROMOTE_AFTER_S,
            after_s=4.0,
        )
    print(figures.table())
    ledger = figures.ledger
    assert ledger.errors == [], ledger.errors[:5]
    # Nothing acknowledged lost, nothing counted twice, no valid session called invalid.
    lost, invented, miscounted = figures.check_ledger()
    assert (lost, invented, miscounted) == ([], [], []), figures.table()
    assert ledger.invalidated == []
    assert len(ledger.created) > 100 and sum(ledger.validated.values()) > 1000
    # While no server was writable: told within 2 s, never left waiting.
    during = figures.phase("during")
    assert during and not any(r.ok for r in during if r.done < figures.t_promote)
    assert figures.longest_wait_s < 2.0, figures.table()
    # Back within 3 s of the promotion, and everything sent 3 s after it served.
    assert figures.back_after_promote_s < 3.0, figures.table()
    assert figures.failed_after == [], figures.table()
    # Said once (and once that it is over), not once per attempt.
    assert len(figures.records) == 2, figures.records
    assert "unreachable or not writable" in figures.records[0]
    assert "answers again" in figures.records[1]
