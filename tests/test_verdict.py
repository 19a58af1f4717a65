"""The one verdict vocabulary: how verdicts combine and what each means for the exit code."""

from __future__ import annotations

import json

import pytest

from sessionmig.rules.verdict import Verdict, worst


def test_a_verdict_is_its_plain_text() -> None:
    assert Verdict.FAIL == "FAIL" and Verdict("NO-GO") is Verdict.NO_GO
    assert (
        json.dumps({"verdict": Verdict.PASS_WITH_WARNINGS}) == '{"verdict": "PASS_WITH_WARNINGS"}'
    )


@pytest.mark.parametrize(
    ("verdicts", "expected"),
    [
        ([], Verdict.SKIPPED),
        (["PASS", "SKIPPED"], Verdict.PASS),
        (["GO", "PASS", "PASS_WITH_WARNINGS"], Verdict.PASS_WITH_WARNINGS),
        (["PASS_WITH_WARNINGS", "FAIL", "PASS"], Verdict.FAIL),
        (["NO-GO", "PASS"], Verdict.NO_GO),
        (["FAIL", "ERROR", "PASS"], Verdict.ERROR),
    ],
)
def test_worst(verdicts, expected) -> None:
    assert worst(verdicts) is expected


def test_exit_codes_follow_the_runbook() -> None:
    assert [Verdict(v).exit_code for v in ("PASS", "GO", "PASS_WITH_WARNINGS", "SKIPPED")] == [
        0
    ] * 4
    assert Verdict.FAIL.exit_code == 1
    # a refusal is a run that could not be carried out: 2, as `sessionmig run` exits for it
    assert Verdict.ERROR.exit_code == Verdict.INTERRUPTED.exit_code == Verdict.NO_GO.exit_code == 2


def test_an_unknown_verdict_is_refused() -> None:
    with pytest.raises(ValueError):
        worst(["PASS", "OK"])


def test_failed_verdicts_are_the_ones_that_stop_a_run_and_match_their_text() -> None:
    from sessionmig.rules.verdict import FAILED

    assert {str(v) for v in FAILED} == {"NO-GO", "FAIL", "ERROR", "INTERRUPTED"}
    assert all(text in FAILED for text in ("NO-GO", "FAIL", "ERROR", "INTERRUPTED"))
    assert "PASS_WITH_WARNINGS" not in FAILED and "SKIPPED" not in FAILED
    assert Verdict("INTERRUPTED").exit_code == 2
