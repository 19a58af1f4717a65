"""The run's cover page as data: what ``index.html`` shows, built from the manifest's data.

Pure: :func:`cover` turns the plain dicts the manifest holds into a frozen :class:`Cover`;
``templates/index.html.j2`` (through :func:`sessionmig.render.cover_page`) lays it out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .render import verdict_class
from .verdict import Verdict

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
    figures: tuple[tuple[str, str], ...]
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


def _figures(step: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    summary = step.get("summary") or {}
    given = summary.get("key_figures")
    if given:
        return tuple((str(label), str(value)) for label, value in given[:FIGURES_ON_COVER])
    return tuple(
        (label, f"{summary[key]:,}")
        for key, label in STEP_FIGURES
        if isinstance(summary.get(key), int) and not isinstance(summary.get(key), bool)
    )


def _when(text: Any) -> str:
    return str(text or "—").replace("T", " ").split(".")[0].replace("+00:00", " UTC")


def describe_target(identity: dict[str, Any] | None) -> str:
    """One line naming a target database for the index and messages."""
    if not identity:
        return "not recorded"
    return (
        f"{identity.get('dbname')} on {identity.get('host')}:{identity.get('port')} "
        f"(PostgreSQL {identity.get('server_version')}, system identifier "
        f"{identity.get('system_identifier')})"
    )


def cover(data: dict[str, Any], permissions: str | None = None) -> Cover:
    """The cover of one run from its manifest data (already scrubbed)."""
    steps = []
    for step in data.get("steps", []):
        verdict = step.get("verdict") or str(step.get("status", "")).upper()
        links = tuple(
            (name, "report" if name.endswith(".html") else "notebook")
            for name in step.get("outputs", [])
        )
        steps.append(
            StepLine(
                name=step["name"],
                verdict=verdict,
                kind=verdict_class(verdict),
                reason=step.get("reason") or "",
                seconds=f"{float(step.get('duration_s') or 0):,.1f}\u00a0s",
                figures=_figures(step),
                links=links,
            )
        )
    source = data.get("source") or {}
    before, after = source.get("sha256_before"), source.get("sha256_after")
    git = data.get("git") or {}
    failed = [s for s in steps if s.kind == "fail"]
    verdict = str(data.get("verdict", ""))
    if failed:
        headline = f"{failed[0].name}: {failed[0].reason}"
    elif verdict == Verdict.PASS_WITH_WARNINGS:
        headline = "every step passed; warnings to read below"
    else:
        headline = "every step passed"
    facts = []
    record = data.get("manifest_record")
    if record:
        facts.append(("manifest digest in the target", str(record.get("status", ""))))
    if data.get("interrupted"):
        facts.append(("interrupted", str(data["interrupted"].get("what_happened", ""))))
    if permissions:
        facts.append(("permissions", permissions))
    env = data.get("environment", "ENV")
    return Cover(
        run_id=str(data.get("run_id", "")),
        environment=str(env),
        verdict=verdict,
        kind=verdict_class(verdict),
        headline=headline,
        started=_when(data.get("started_at")),
        finished=_when(data.get("finished_at")),
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
        facts=tuple(facts),
        verify=f"sessionmig verify reports/{env}/{data.get('run_id', '')} --env {env}",
    )
