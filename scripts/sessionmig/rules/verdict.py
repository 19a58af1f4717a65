"""The verdicts a step can reach, how bad each is, and the exit code each one means.

One vocabulary for every step, report and the orchestrator: a verdict is a ``StrEnum``, so it
reads, compares and serialises as its plain text (``Verdict.FAIL == "FAIL"``).
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum

from sessionmig.errors import EXIT_ERROR, EXIT_FAIL, EXIT_OK


class Verdict(StrEnum):
    """What a step concluded."""

    PASS = "PASS"
    GO = "GO"  # preflight's PASS
    SKIPPED = "SKIPPED"  # nothing to judge (e.g. reconcile after a dry run)
    PASS_WITH_WARNINGS = "PASS_WITH_WARNINGS"
    NO_GO = "NO-GO"  # preflight's FAIL
    FAIL = "FAIL"
    ERROR = "ERROR"  # the step could not be carried out
    INTERRUPTED = "INTERRUPTED"  # a run stopped by a signal (Ctrl-C, SIGTERM) before its end

    @property
    def severity(self) -> int:
        """0 nothing to say … 4 could not be carried out; :func:`worst` compares by it."""
        return _SEVERITY[self]

    @property
    def passed(self) -> bool:
        """Whether the run may go on after this verdict (warnings allowed)."""
        return self.severity <= _SEVERITY[Verdict.PASS_WITH_WARNINGS]

    @property
    def exit_code(self) -> int:
        """0 passed (warnings allowed), 1 FAIL, 2 could not be carried out: ERROR, INTERRUPTED
        and preflight's NO-GO, as a run exits and its help says (datacompy's convention)."""
        if self in (Verdict.ERROR, Verdict.INTERRUPTED, Verdict.NO_GO):
            return EXIT_ERROR
        return EXIT_OK if self.passed else EXIT_FAIL


_SEVERITY = {
    Verdict.SKIPPED: 0,
    Verdict.PASS: 1,
    Verdict.GO: 1,
    Verdict.PASS_WITH_WARNINGS: 2,
    Verdict.NO_GO: 3,
    Verdict.FAIL: 3,
    Verdict.ERROR: 4,
    Verdict.INTERRUPTED: 4,
}
FAILED = frozenset(v for v, severity in _SEVERITY.items() if severity >= 3)


def worst(verdicts: Iterable[str]) -> Verdict:
    """The worst of some verdicts (text or :class:`Verdict`); SKIPPED when there are none."""
    return max((Verdict(v) for v in verdicts), key=lambda v: v.severity, default=Verdict.SKIPPED)


# --- the words of the figures a verdict rests on ------------------------------------------------


def plural(count: int, word: str, many: str | None = None) -> str:
    """``1 row``, ``2 rows``, ``1,000 days``: a count with its noun agreeing (``many`` for an
    irregular plural: ``plural(n, "entry", "entries")``)."""
    return f"{count:,} {word if count == 1 else (many or word + 's')}"


def _noun_phrase(count: int, phrase: str) -> str:
    """``1 row unaccounted``: the count and the first word of ``phrase`` agreeing."""
    word, _, rest = phrase.partition(" ")
    return plural(count, word) + (f" {rest}" if rest else "")


MARK_HOLDS, MARK_BROKEN = "✔", "✘"


def partition(
    source: int, migrated: int, rejected: int, holds: bool | None = None, why: str = ""
) -> tuple[str, str, bool]:
    """The partition proof (source = migrated + rejected) as (figure, note, holds).

    The figure never reads as an equation that holds when it does not: ``50,000 ≠ 49,992 + 7``
    with ``1 row unaccounted``, marked ✘. ``holds`` is the reconcile's own judgement (it also
    fails on a row counted twice whose sums still agree); ``why`` says what broke it then."""
    gap = source - (migrated + rejected)
    ok = gap == 0 if holds is None else bool(holds) and gap == 0
    sign = "=" if gap == 0 else "≠"
    figure = f"{source:,} {sign} {migrated:,} + {rejected:,}"
    if ok:
        return f"{MARK_HOLDS} {figure}", "holds: every source row is accounted for once", True
    if gap > 0:
        note = _noun_phrase(gap, "row unaccounted") + " (in neither PostgreSQL nor the rejects)"
    elif gap < 0:
        note = _noun_phrase(-gap, "row more") + " in PostgreSQL and the rejects than the source has"
    else:
        note = "the sums agree, but rows are counted in the wrong place" + (
            f": {why}" if why else ""
        )
    return f"{MARK_BROKEN} {figure}", f"does NOT hold: {note}", False
