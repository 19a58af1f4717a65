"""The application's view of the migrated sessions: ask the new ``SessionManager`` which
sessions it would accept at ``as_of``, without changing any of them.

Every source row that normalises is expected active in PostgreSQL exactly when its
``expires_at`` is after ``as_of``; the manager answers with the same predicate
``validate_session`` uses, read only, so no ``request_count`` or ``last_activity`` moves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

from .keys import duplicate_rejects
from .mask import mask_id
from .source import Backup
from .store import SessionManager
from .transform import ROWID, Reject, Rules, normalise
from .verdict import Verdict

EXAMPLES = 10


@dataclass(frozen=True)
class AppCheck:
    """Active/expired as the app sees them, against what the source says."""

    checked: int
    expected_active: int
    accepted_active: int
    wrongly_rejected: int
    wrongly_accepted: int
    examples: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.wrongly_rejected or self.wrongly_accepted)


def combined_verdict(verdict: str, reason: str, app: AppCheck | None) -> tuple[str, str]:
    """The reconcile verdict, turned to FAIL when the app would treat a session differently.

    A skipped reconcile (a dry run wrote nothing) stays skipped: the app was asked nothing.
    """
    if app is None or app.ok or verdict in (Verdict.FAIL, Verdict.SKIPPED):
        return verdict, reason
    wrong = app.wrongly_rejected + app.wrongly_accepted
    return (
        Verdict.FAIL,
        f"the new SessionManager disagrees with the source on {wrong} sessions at as_of",
    )


async def _check(
    dsn: str,
    backup: Backup,
    rules: Rules,
    schema: str,
    as_of: datetime,
    batch_rows: int,
    mask: Callable[[str | None], str],
) -> AppCheck:
    manager = SessionManager(dsn, schema=schema, pool_size=1)
    checked = expected = accepted = rejected_wrongly = accepted_wrongly = 0
    examples: list[str] = []
    try:
        repeated = duplicate_rejects(backup, rules)  # later copies of a session_id never land
        for batch in backup.rows(batch_rows, extra=rules.extra_columns):
            rows = [
                r
                for r in (normalise(raw, rules) for raw in batch if raw[ROWID] not in repeated)
                if not isinstance(r, Reject)
            ]
            active = await manager.active_among([r.session_id for r in rows], as_of)
            for row in rows:
                checked += 1
                should = row.expires_at > as_of
                does = row.session_id in active
                expected += should
                accepted += does
                if should != does:
                    if should:
                        rejected_wrongly += 1
                    else:
                        accepted_wrongly += 1
                    if len(examples) < EXAMPLES:
                        examples.append(
                            f"{mask(row.session_id)}: source says "
                            f"{'active' if should else 'expired'}, the app says "
                            f"{'active' if does else 'not active'}"
                        )
    finally:
        await manager.close()
    return AppCheck(checked, expected, accepted, rejected_wrongly, accepted_wrongly, examples)


def check_with_manager(
    dsn: str,
    backup: Backup,
    rules: Rules,
    *,
    schema: str,
    as_of: datetime,
    batch_rows: int = 10_000,
    mask: Callable[[str | None], str] = mask_id,
) -> AppCheck:
    """Run the check (see the module docstring)."""
    work = _check(dsn, backup, rules, schema, as_of, batch_rows, mask)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(work)
    # Inside Jupyter an event loop is already running: give the check a loop of its own.
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, work).result()
