"""A pass's result as the report's tables (pandas): the only part of catch-up that
needs it."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pandas is heavy; only the notebook's functions need it
    import pandas as pd

from sessionmig.engines.catchup.apply import EXAMPLES
from sessionmig.engines.catchup.passes import CatchupResult

MEANINGS = {
    "inserted": "created on the old colour since the base: added to PostgreSQL",
    "changed": "changed on the old colour: its changes applied on top of PostgreSQL's row",
    "ended": "ended on the old colour (logout, cleanup): deleted from PostgreSQL",
    "stays_ended": "changed or ended on the old colour, already ended in PostgreSQL: stays ended",
    "recreated": "ended and created again under the same id on the old colour: the new session "
    "replaces the old one in PostgreSQL",
    "conflicts": "user_id/metadata/created_at changed on both colours: newer last_activity won",
    "unchanged": "the same in both snapshots: PostgreSQL's row untouched",
    "rejected": "live rows the migration's rules refuse: left as PostgreSQL has them",
}


def catchup_tables(result: CatchupResult) -> dict[str, pd.DataFrame]:
    """The pass's report tables (session ids masked): counts, snapshots, conflicts, examples,
    proof."""
    import pandas as pd

    counts = pd.DataFrame(
        [(k, v, MEANINGS[k]) for k, v in result.counts.items()],
        columns=["sessions", "count", "meaning"],
    ).set_index("sessions")
    snap = result.snapshot
    snapshots = pd.DataFrame(
        [
            ("base (carried by the previous pass)", result.base_path, result.base_sha256),
            ("live store", result.live_sqlite_path, f"{snap.journal_mode} mode, read only"),
            ("live snapshot (next pass's base)", result.live_snapshot, result.live_sha256),
        ],
        columns=["file", "path", "sha256"],
    ).set_index("file")
    timing = pd.DataFrame(
        [
            ("whole pass", f"{result.seconds:.2f} s"),
            ("snapshot of the live store", f"{snap.seconds:.2f} s"),
            ("waiting for the app's SQLite locks", f"{snap.waited_s:.2f} s"),
            ("snapshot restarts (app committed meanwhile)", str(snap.restarts)),
            ("longest time a part held touched rows locked", f"{result.locked_seconds:.2f} s"),
            ("parts (transactions, each proven and recorded)", f"{result.parts:,}"),
            ("sessions carried by an earlier run of this pass", f"{result.resumed:,}"),
            (
                "sessions the app wrote during the merge (merged again under the lock)",
                f"{result.remerged:,}",
            ),
            ("sessions in the live snapshot", f"{result.live_rows:,}"),
            ("audit row (session_migration_runs)", result.run_id if result.committed else "-"),
        ],
        columns=["measure", "value"],
    ).set_index("measure")
    conflicts = pd.DataFrame(
        [
            (c.session, c.column, c.winner, c.live_last_activity, c.postgres_last_activity)
            for c in result.conflict_details[:200]
        ],
        columns=["session", "column", "winner", "last_activity live", "last_activity postgres"],
    )
    examples = pd.DataFrame(
        [(kind, ", ".join(ids)) for kind, ids in result.examples.items()]
        + ([("rejected", ", ".join(result.rejected_examples))] if result.rejected else []),
        columns=["sessions", f"examples (first {EXAMPLES}, ids hashed)"],
    ).set_index("sessions")
    checks = (
        "every touched session equals merge(base, live, PostgreSQL before)",
        "each statement touched exactly the sessions the rules name",
        "no other row carries this pass's writes (xmin)",
    )
    proof = pd.DataFrame(
        [("mismatch: nothing was committed", m) for m in result.mismatches]
        or [(check, "holds") for check in checks],
        columns=["check", "result"],
    ).set_index("check")
    return {
        "counts": counts,
        "snapshots": snapshots,
        "timing": timing,
        "conflicts": conflicts,
        "examples": examples,
        "proof": proof,
    }
