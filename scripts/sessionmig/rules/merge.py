"""The catch-up merge rules, as pure functions of plain values: what PostgreSQL must hold for one
session, given the base (the snapshot last carried into PostgreSQL), the live snapshot, and
PostgreSQL's row before the pass.

A row is a normalised session in ``transform.COLUMNS`` order — ``(session_id, user_id,
metadata, created_at, expires_at, last_activity, request_count)`` — with metadata spelled as
PostgreSQL prints ``jsonb`` (so equal JSON compares equal), or ``None`` for "no such session".

Per session:

* **unchanged** in live (live == base): PostgreSQL's row stays exactly as it is.
* **created** in live (not in base): inserted when PostgreSQL lacks it; when PostgreSQL already
  has it, merged as a change with no common ancestor: counts take the larger, instants the
  later, any other column that differs is a conflict.
* **changed** in live: its *changes* go on top of PostgreSQL's row — ``request_count`` gains
  ``live − base`` (so requests counted on both colours add up), ``last_activity`` and
  ``expires_at`` take the later of PostgreSQL's and live's when live changed them,
  ``user_id``/``metadata``/``created_at`` take the side that changed them; changed on both
  sides to different values is a **conflict**, won by the newer ``last_activity`` (a tie keeps
  PostgreSQL's, the colour that now serves). A session PostgreSQL has ended stays ended.
* **ended** in live (in base, not in live): ended in PostgreSQL — a token ended anywhere stays
  ended.
* **recreated** in live (the same id with a later ``created_at``: the session was ended and a
  new one created under its id): the old session is ended everywhere and the new one is live's,
  so PostgreSQL holds live's row exactly (inserted if PostgreSQL had ended the old one).

Columns live did not change are never touched: changes made only in PostgreSQL stay.
``catchup`` computes these for every touched session from PostgreSQL's row (read unlocked,
then again, locked, for rows the app wrote before the lock), applies the same rules with
set-based SQL to the locked rows, and proves in the same transaction that the two agree.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

from sessionmig.rules.mask import mask_id
from sessionmig.rules.transform import INT4_MAX, INT4_MIN

Row = tuple[str, str | None, str | None, datetime, datetime, datetime, int]
# Final: the type checker then knows each column's type when a row is indexed by its name.
USER: Final = 1
METADATA: Final = 2
CREATED: Final = 3
EXPIRES: Final = 4
LAST: Final = 5
COUNT: Final = 6
# Columns that are replaced by the side that changed them (conflict when both did).
REPLACED = {"user_id": USER, "metadata": METADATA, "created_at": CREATED}
# Instants that only move forward: the later value wins.
LATER = {"expires_at": EXPIRES, "last_activity": LAST}

# What a pass does to one session (``kind`` of an :class:`Outcome`).
UNCHANGED = "unchanged"  # live == base: PostgreSQL's row untouched
INSERTED = "inserted"  # created in live, absent from PostgreSQL
CHANGED = "changed"  # live's changes applied on top of PostgreSQL's row
ENDED = "ended"  # ended in live: deleted from PostgreSQL
STAYS_ENDED = "stays_ended"  # changed or ended in live, but PostgreSQL had already ended it
NOTHING = "nothing"  # in neither snapshot: PostgreSQL's business alone
RECREATED = "recreated"  # ended and created again under the same id in live: live's row
KINDS = (INSERTED, CHANGED, ENDED, STAYS_ENDED, UNCHANGED, RECREATED)


@dataclass(frozen=True)
class Conflict:
    """A column both sides changed to different values, and which side won."""

    column: str
    winner: str  # "live" or "postgres"


@dataclass(frozen=True)
class Outcome:
    """What PostgreSQL must hold for one session after the pass (``row`` None: absent)."""

    kind: str
    row: Row | None
    conflicts: tuple[Conflict, ...] = ()


def saturated(value: int) -> int:
    """``value`` held within PostgreSQL ``integer`` (the column saturates, never fails)."""
    return max(INT4_MIN, min(INT4_MAX, value))


def _changes_on_top(base: Row | None, live: Row, target: Row) -> tuple[Row, tuple[Conflict, ...]]:
    """Live's changes since ``base`` applied to ``target`` (``base`` None: no common ancestor)."""
    out: list[Any] = list(target)
    conflicts: list[Conflict] = []
    if base is None:
        out[COUNT] = max(target[COUNT], live[COUNT])
    else:
        out[COUNT] = saturated(target[COUNT] + (live[COUNT] - base[COUNT]))
    live_wins = live[LAST] > target[LAST]  # for a conflict: the side seen more recently
    # The loops below treat several columns alike, whatever their type.
    was: Sequence[Any] | None = base
    now: Sequence[Any] = live
    pg: Sequence[Any] = target
    for i in LATER.values():
        if was is None or now[i] != was[i]:
            out[i] = max(pg[i], now[i])
    for name, i in REPLACED.items():
        if was is not None and now[i] == was[i]:
            continue  # live did not change it: PostgreSQL's value stays
        if was is not None and pg[i] == was[i]:
            out[i] = now[i]  # only live changed it
        elif pg[i] != now[i]:
            # Both changed it, differently: the side seen more recently wins.
            out[i] = now[i] if live_wins else pg[i]
            conflicts.append(Conflict(name, "live" if live_wins else "postgres"))
    return _row(out), tuple(conflicts)


def _row(values: Sequence[Any]) -> Row:
    """A :data:`Row` of the seven values (in ``transform.COLUMNS`` order)."""
    session_id, user_id, metadata, created_at, expires_at, last_activity, count = values
    return (session_id, user_id, metadata, created_at, expires_at, last_activity, count)


def went_back(base: Row | None, live: Row | None) -> tuple[str, ...]:
    """What in ``live`` is older than ``base``, which no app ever does to a session it keeps:
    ``request_count`` lower (it only counts up), ``created_at`` different (set once). A live
    side that shows either is not a later state of the base's store (a restored copy, another
    environment's file), and carrying its "changes" would count requests back down and end the
    sessions created since. Empty when either side lacks the session."""
    if base is None or live is None or recreated(base, live):
        return ()
    back = []
    if live[COUNT] < base[COUNT]:
        back.append("request_count")
    if live[CREATED] != base[CREATED]:
        back.append("created_at")
    return tuple(back)


def recreated(base: Row | None, live: Row | None) -> bool:
    """Whether live's session is a new one under the base's id: created later than the base's
    (the app ended it and created another with the same id). An older ``created_at`` is never
    that — it is a restored copy or another store — and stays a refusal (:func:`went_back`)."""
    return base is not None and live is not None and live[CREATED] > base[CREATED]


def going_back(
    pairs: Iterable[tuple[str, Row | None, Row | None]],
) -> dict[str, tuple[int, str]]:
    """Of ``(session_id, base, live)`` triples, those that :func:`went_back`, per column:
    how many, and the first such session."""
    found: dict[str, tuple[int, str]] = {}
    for sid, base, live in pairs:
        for column in went_back(base, live):
            count, first = found.get(column, (0, sid))
            found[column] = (count + 1, first)
    return found


BEFORE_BASE: Final = "created before the base"


def created_before_base(
    pairs: Sequence[tuple[str, Row | None, Row | None]], margin: timedelta, now: datetime
) -> tuple[int, str] | None:
    """Sessions new in ``live`` whose ``created_at`` is more than ``margin`` before the latest
    instant of the base's sessions among ``pairs`` (each was created or active before the base
    was taken, so that instant is a lower bound of when it was): they existed when the base
    was taken, yet it does not have them — the live side is another store (another
    environment's file), not a later state of the base's. Instants after ``now`` (odd data)
    bound nothing. How many, and the first; None when there are none."""
    taken = max(
        (
            instant
            for _, base, _ in pairs
            if base is not None
            for instant in (base[CREATED], base[LAST])
            if instant <= now
        ),
        default=None,
    )
    if taken is None:
        return None
    older = [
        sid
        for sid, base, live in pairs
        if base is None and live is not None and live[CREATED] < taken - margin
    ]
    return (len(older), older[0]) if older else None


def describe_going_back(found: dict[str, tuple[int, str]]) -> str:
    """:func:`going_back`'s findings in words, with masked example sessions."""
    return "; ".join(
        f"{count:,} session{'s' * (count != 1)} {column} was taken, not in it "
        f"(e.g. {mask_id(first)})"
        if column == BEFORE_BASE
        else f"{column} went back in {count:,} session{'s' * (count != 1)} (e.g. {mask_id(first)})"
        for column, (count, first) in sorted(found.items())
    )


def merge(base: Row | None, live: Row | None, target: Row | None) -> Outcome:
    """What PostgreSQL must hold for a session: see the module docstring."""
    if live is None and base is None:
        return Outcome(NOTHING, target)
    if live is None:
        return Outcome(ENDED if target is not None else STAYS_ENDED, None)
    if base is not None and live == base:
        return Outcome(UNCHANGED, target)
    if recreated(base, live):
        return Outcome(RECREATED, live)
    if target is None:
        # Created in live: PostgreSQL has never had it. Changed in live: PostgreSQL ended it.
        return Outcome(INSERTED, live) if base is None else Outcome(STAYS_ENDED, None)
    row, conflicts = _changes_on_top(base, live, target)
    return Outcome(CHANGED, row, conflicts)
