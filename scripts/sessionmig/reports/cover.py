"""The run's cover page as data: what ``index.html`` shows, built from the manifest's data.

Pure: :func:`cover` turns the plain dicts the manifest holds into a frozen :class:`Cover`;
``templates/index.html.j2`` (through :func:`sessionmig.reports.render.cover_page`) lays it out.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sessionmig.reports.render import verdict_class
from sessionmig.rules.verdict import FAILED, Verdict, plural, worst

DIGEST_FIELD = "manifest_sha256"  # as manifest.DIGEST_FIELD (manifest imports this module)

FIGURES_ON_COVER = 3
STEP_FIGURES = (
    ("rows_read", "rows read"),
    ("source_rows", "source rows"),
    ("inserted", "inserted"),
    ("migrated", "migrated"),
    ("rejected", "rejected"),
    ("rows", "rows"),
)


@dataclass(frozen=True)
class StepLine:
    """One step on the cover: verdict, reason, key figures, time and links to its report."""

    name: str
    verdict: str
    kind: str
    reason: str
    seconds: str
    figures: tuple[tuple[str, str, str], ...]  # label, value, and the note of a bad sign
    links: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Cover:
    """Everything a reviewer checks before signing a run, in reading order."""

    run_id: str
    environment: str
    verdict: str
    kind: str
    headline: str
    started: str
    finished: str
    operator: str
    host: str
    commit: str
    clean: str
    source: str
    sha_before: str
    sha_after: str
    sha_same: bool
    target: str
    steps: tuple[StepLine, ...]
    facts: tuple[tuple[str, str], ...]
    verify: str
    digest: str = ""  # the manifest's digest, once sealed ("" when the page cannot carry it)
    digest_where: str = ""  # where the target keeps it, or why it does not


def _figures(step: dict[str, Any]) -> tuple[tuple[str, str, str], ...]:
    """The step's first key figures: ``[label, value]`` or ``[label, value, note, bad]`` as
    :func:`sessionmig.reports.report.conclude` records them, else its plain counts."""
    summary = step.get("summary") or {}
    given = summary.get("key_figures")
    if given:
        return tuple(
            (str(f[0]), str(f[1]), str(f[2] or "✘") if len(f) > 3 and f[3] else "")
            for f in given[:FIGURES_ON_COVER]
        )
    return tuple(
        (label, f"{summary[key]:,}", "")
        for key, label in STEP_FIGURES
        if isinstance(summary.get(key), int) and not isinstance(summary.get(key), bool)
    )


def when(text: Any) -> str:
    """An instant as a reviewer reads it, with its zone: ``2026-01-15 03:04:05 UTC``, or its
    UTC offset (``2026-01-15 12:04:05 +09:00``); a text that is no instant, as it is."""
    if not text:
        return "—"
    try:
        moment = datetime.fromisoformat(str(text))
    except ValueError:
        return str(text)
    shown = moment.replace(microsecond=0).isoformat(sep=" ")
    offset = moment.utcoffset()
    if offset is None:
        return f"{shown} (time zone not recorded)"
    if not offset:
        return f"{shown[: -len('+00:00')]} UTC"
    return f"{shown[:-6]} (UTC{shown[-6:]})"


def describe_target(identity: dict[str, Any] | None) -> str:
    """One line naming a target database for the index and messages."""
    if not identity:
        return "not recorded"
    return (
        f"{identity.get('dbname')} on {identity.get('host')}:{identity.get('port')} "
        f"(PostgreSQL {identity.get('server_version')}, system identifier "
        f"{identity.get('system_identifier')})"
    )


# What a run's verdict says when no step carries it (a failure outside every step).
RUN_WORDS = {
    Verdict.ERROR: "the run could not be carried out",
    Verdict.INTERRUPTED: "the run was stopped before its end",
    Verdict.FAIL: "a check failed",
    Verdict.NO_GO: "a step refused to go on",
}


def headline(
    run_verdict: str, steps: Sequence[tuple[str, str, str]], run_words: str = ""
) -> tuple[Verdict, str]:
    """The run's verdict and the sentence beside it, from the worst verdict whatever it is.

    ``steps`` are (name, verdict, reason) with verdicts as :func:`sessionmig.rules.verdict.of_step`
    gives them. The verdict shown is never better than any step's nor than the run's own
    (``run_verdict``, e.g. ERROR when the backup changed outside every step); a failed verdict
    names the first step that reached it, with its reason (and ``run_words``, what the run
    knows of its end, e.g. what the target's audit row says after an interrupt); a passing one
    says which steps passed, had warnings or were skipped, and never "every step passed"
    unless every one did."""
    given = [(name, Verdict(v), reason) for name, v, reason in steps]
    known = {v.value for v in Verdict}
    run = Verdict(run_verdict) if run_verdict in known else Verdict.ERROR if run_verdict else None
    # The run's own first: of equally bad verdicts it keeps the run's (PASS, not a preflight's GO).
    shown = worst([*([run] if run is not None else [Verdict.PASS]), *(v for _, v, _ in given)])
    shown = Verdict.PASS if shown == Verdict.GO else shown
    if not given and run is None:
        return Verdict.SKIPPED, "no step ran"
    if shown in FAILED:
        same = [s for s in given if s[1] == shown] or [s for s in given if s[1] in FAILED]
        tail = f"; {run_words}" if run_words else ""
        if same:
            name, verdict, reason = same[0]
            text = reason or RUN_WORDS.get(verdict, verdict.value)
            return shown, f"{name}: {text}{tail}"
        return shown, RUN_WORDS.get(shown, shown.value) + tail
    ran = [s for s in given if s[1] != Verdict.SKIPPED]
    skipped = [name for name, v, _ in given if v == Verdict.SKIPPED]
    warned = [name for name, v, _ in given if v == Verdict.PASS_WITH_WARNINGS]
    if not ran:
        return shown, "no step was carried out" + (
            f" ({', '.join(skipped)} skipped)" if skipped else ""
        )
    if not skipped:
        sentence = "every step passed"
    else:
        sentence = f"{plural(len(ran), 'step')} passed; skipped: {', '.join(skipped)}"
    if warned:
        sentence += f"; warnings to read below ({', '.join(warned)})"
    return shown, sentence


def run_headline(data: dict[str, Any]) -> tuple[Verdict, str]:
    """:func:`headline` of a run's manifest data."""
    steps = [
        (str(s.get("name", "")), of_step(s.get("verdict"), s.get("status")), s.get("reason") or "")
        for s in data.get("steps", [])
    ]
    stopped = data.get("interrupted") or {}
    words = str(stopped.get("what_happened") or "")
    return headline(str(data.get("verdict") or ""), steps, words)


def of_step(verdict: Any, status: Any) -> Verdict:
    """A step's verdict; when it recorded none, the one its status means (a step that stopped
    without concluding is ERROR, never a word such as FAILED that no verdict has)."""
    known = {v.value for v in Verdict}
    if verdict and str(verdict) in known:
        return Verdict(str(verdict))
    return {
        "passed": Verdict.PASS,
        "skipped": Verdict.SKIPPED,
        "interrupted": Verdict.INTERRUPTED,
    }.get(str(status or ""), Verdict.ERROR)


def _facts(data: dict[str, Any], permissions: str | None) -> Iterable[tuple[str, str]]:
    stopped = data.get("stopped")
    if stopped:
        yield f"what is known of {stopped.get('step')}", str(stopped.get("what_is_known", ""))
    if data.get("interrupted"):
        yield "interrupted", str(data["interrupted"].get("what_happened", ""))
    if permissions:
        yield "permissions", permissions


def verify_command(data: dict[str, Any]) -> str:
    """The command that re-checks the folder, as the run recorded it (it runs as printed);
    for a folder sealed before runs recorded it, the best that can be said from its data."""
    commands = data.get("commands") or {}
    if commands.get("verify"):
        return str(commands["verify"])
    env = data.get("environment", "ENV")
    return f"sessionmig verify reports/{env}/{data.get('run_id', '')} --env {env}"


def cover(data: dict[str, Any], permissions: str | None = None) -> Cover:
    """The cover of one run from its manifest data (already scrubbed)."""
    steps = []
    for step in data.get("steps", []):
        verdict = of_step(step.get("verdict"), step.get("status"))
        links = tuple(
            (name, "report" if name.endswith(".html") else "notebook")
            for name in step.get("outputs", [])
        )
        not_run = step.get("status") == "skipped" and not step.get("verdict")
        reason = step.get("reason") or (
            "not run: the run stopped before this step"
            if not_run and str(data.get("verdict")) in FAILED
            else "not run"
            if not_run
            else ""
        )
        steps.append(
            StepLine(
                name=step["name"],
                verdict=verdict.value,
                kind=verdict_class(verdict),
                reason=reason,
                seconds="—" if not_run else f"{float(step.get('duration_s') or 0):,.1f}\u00a0s",
                figures=_figures(step),
                links=links,
            )
        )
    source = data.get("source") or {}
    before, after = source.get("sha256_before"), source.get("sha256_after")
    git = data.get("git") or {}
    verdict, sentence = run_headline(data)
    record = data.get("manifest_record") or {}
    env = data.get("environment", "ENV")
    return Cover(
        run_id=str(data.get("run_id", "")),
        environment=str(env),
        verdict=verdict.value,
        kind=verdict_class(verdict),
        headline=sentence,
        started=when(data.get("started_at")),
        finished=when(data.get("finished_at")),
        operator=str(data.get("operator") or "—"),
        host=str(data.get("host") or "—"),
        commit=str(git.get("commit") or "not a git checkout"),
        clean="with uncommitted changes" if git.get("dirty") else "clean",
        source=str(source.get("path") or "—"),
        sha_before=str(before or "—"),
        sha_after=str(after or "—"),
        sha_same=bool(before) and before == after,
        target=describe_target(data.get("target_database")),
        steps=tuple(steps),
        facts=tuple(_facts(data, permissions)),
        verify=verify_command(data),
        digest=str(data.get(DIGEST_FIELD) or ""),
        digest_where=str(record.get("status") or ""),
    )
