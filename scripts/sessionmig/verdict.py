"""The verdicts a step can reach, how bad each is, and the exit code each one means.

One vocabulary for every step, report and the orchestrator: a verdict is a ``StrEnum``, so it
reads, compares and serialises as its plain text (``Verdict.FAIL == "FAIL"``).
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum

from .errors import EXIT_ERROR, EXIT_FAIL, EXIT_OK


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
        """0 passed (warnings allowed), 1 FAIL or NO-GO, 2 ERROR (datacompy's convention)."""
        if self in (Verdict.ERROR, Verdict.INTERRUPTED):
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
