"""One function per ``sessionmig`` verb, for the command line and for Python alike.

Like Alembic's ``command`` module: each function takes plain values (an environment's name or
path, parameter values already typed, paths, flags) — never an ``argparse.Namespace`` — does
the verb's work and returns what it found as a result object, printing nothing of its own (the
runbook's step lines and progress during ``run`` are the orchestrator's). ``sessionmig.cli``
parses the command line, calls one of these and renders the result; a notebook, a script or a
test calls the same function and reads the same result::

    from sessionmig import command

    outcome = command.reconcile("prod", {"reconcile_mode": "after_cutover"})
    if outcome.exit_code: ...

Every result carries the exit code the command line returns: 0 passed (warnings allowed), 1 the
check found a difference, 2 could not be carried out. A run that cannot be carried out at all
raises a :class:`~sessionmig.errors.SessionmigError` (its ``exit_code`` is 2), as the engines do.

The heavy modules (papermill, pandas, the kernels) are imported inside the functions that need
them, so that ``sessionmig --help`` and ``sessionmig db …`` start in a fraction of a second.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sessionmig import defaults as D
from sessionmig.errors import EXIT_FAIL, EXIT_OK, ParameterError, TargetError, TargetUnreachable
from sessionmig.rules.verdict import Verdict
from sessionmig.runbook import params as P

if TYPE_CHECKING:  # only for the annotations: importing them pulls in papermill or pandas
    import pandas as pd

    from sessionmig.engines.catchup import CatchupResult
    from sessionmig.runbook.orchestrate import RunOutcome
    from sessionmig.runbook.settings import Settings
    from sessionmig.sqlite.snapshot import SnapshotResult

__all__ = [
    "DbResult",
    "QueryResult",
    "SampleResult",
    "SignResult",
    "VerifyResult",
    "catchup",
    "counts_of",
    "db",
    "list_queries",
    "migrate",
    "outcome_json",
    "query",
    "query_kinds",
    "reconcile",
    "resolve",
    "run",
    "sample",
    "settings_of",
    "sign",
    "snapshot",
    "verify",
]

# What every verb that reads an environment takes besides its own values.
Overrides = Mapping[str, Any]
DbAction = Literal["upgrade", "current", "history"]
QuerySource = Literal["sqlite", "postgres"]


# --- parameters: the one rule ------------------------------------------------------------------


def resolve(
    env: str,
    overrides: Overrides | None,
    steps: Sequence[str],
    extra: tuple[str, ...] = (),
    project_dir: str | Path | None = None,
) -> dict[str, Any]:
    """The environment file with ``overrides`` on top, by the one rule every verb and ``run``
    share (:func:`sessionmig.runbook.params.resolve`): a name the selected steps do not declare is
    refused."""
    return P.resolve(env, dict(overrides or {}), list(steps), extra=extra, project_dir=project_dir)


def settings_of(
    verb: str, env: str, overrides: Overrides | None = None, project_dir: str | Path | None = None
) -> Settings:
    """The settings the step ``verb`` (``migrate``, ``reconcile``, ``catchup``) runs with."""
    from sessionmig.runbook.settings import settings

    return settings(**resolve(env, overrides, [verb], project_dir=project_dir))


def _target(
    env: str, overrides: Overrides | None, project_dir: str | Path | None
) -> tuple[str | None, str]:
    """The name of the variable holding ``env``'s DSN (None: the embedded server) and its
    schema, checked."""
    keys = ("database_url_env", "target_schema")
    merged = resolve(env, overrides, [], extra=keys, project_dir=project_dir)
    name, schema = (merged.get(k, P.default(k)) for k in keys)
    P.validate({"database_url_env": name, "target_schema": schema})
    return name, str(schema)


# --- run, migrate, reconcile: the runbook's steps as notebooks ----------------------------------


def run(
    env: str,
    steps: Sequence[str] | None = None,
    overrides: Overrides | None = None,
    reports_dir: str | Path = "reports",
    fresh: bool = False,
    project_dir: str | Path | None = None,
    *,
    verb: str = "run",
) -> RunOutcome:
    """Run the runbook's steps as notebooks (preflight to reconcile unless --steps says
    otherwise) and leave a sealed report folder: one report per step, index.html, manifest.

    ``steps``: the steps in the order to run them (None: ``params.DEFAULT_STEPS``);
    ``overrides``: parameter values on top of the environment file; ``fresh``: the embedded
    server only, start from an empty database; ``verb``: the command the terminal's step lines
    name. Returns the orchestrator's :class:`~sessionmig.runbook.orchestrate.RunOutcome` (its
    ``exit_code``, ``verdict``, each step's record, the run folder)."""
    from sessionmig.runbook.kernels import Kernels

    chosen = list(steps) if steps else None
    with Kernels(os.getcwd()) as kernels:
        # The first step's kernel starts while the runbook's own modules load (papermill,
        # nbconvert, pandas: about a second), so the first step does not wait for both.
        kernels.start((chosen or list(P.DEFAULT_STEPS))[0])
        from sessionmig.runbook.orchestrate import run as orchestrate_run

        return orchestrate_run(
            env,
            chosen,
            dict(overrides or {}),
            reports_dir,
            fresh,
            project_dir=project_dir,
            verb=verb,
            kernels=kernels,
        )


def _check_target(
    verb: str,
    env: str,
    overrides: Overrides | None,
    project_dir: str | Path | None,
    retries_allowed: bool,
) -> None:
    """Before a single-step verb makes its run folder: a target that refuses the login or a
    malformed DSN is one line and exit 2, with nothing written. One that cannot be reached is
    left to the step when it may retry (migrate's ``max_retries``): its report says so."""
    from sessionmig.postgres.connect import connect

    merged = resolve(env, overrides, [verb], project_dir=project_dir)
    name = merged.get("database_url_env", D.DATABASE_URL_ENV)
    if name is None:
        return  # the embedded server, which the run starts itself
    try:
        with connect(P.database_url(name), "check", autocommit=True):
            pass
    except TargetUnreachable:
        retries = merged.get("max_retries", D.MAX_RETRIES)
        if not (retries_allowed and retries):
            raise


def migrate(
    env: str,
    overrides: Overrides | None = None,
    reports_dir: str | Path = "reports",
    project_dir: str | Path | None = None,
) -> RunOutcome:
    """Load the backup into PostgreSQL (the runbook's migrate step alone), with a sealed
    report folder of its own.

    A target that refuses the login, or a malformed DSN, raises before any folder is made; an
    unreachable one is left to the step when ``max_retries`` lets it retry."""
    _check_target("migrate", env, overrides, project_dir, retries_allowed=True)
    return run(env, ["migrate"], overrides, reports_dir, project_dir=project_dir, verb="migrate")


def reconcile(
    env: str,
    overrides: Overrides | None = None,
    reports_dir: str | Path = "reports",
    project_dir: str | Path | None = None,
) -> RunOutcome:
    """Compare the backup with PostgreSQL, every row and column (the reconcile step alone, e.g.
    to re-check days later), with a sealed report folder of its own.

    A target that cannot be reached or refuses the login raises before any folder is made."""
    _check_target("reconcile", env, overrides, project_dir, retries_allowed=False)
    return run(
        env, ["reconcile"], overrides, reports_dir, project_dir=project_dir, verb="reconcile"
    )


def counts_of(steps: Sequence[Any]) -> dict[str, int | None]:
    """Rows read, landed and rejected: the load's when the run migrated, else reconcile's."""
    by_name = {r.name: r.summary for r in steps if r.summary}
    migrated, reconciled = by_name.get("migrate", {}), by_name.get("reconcile", {})

    def whole(value: Any) -> int | None:
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    if whole(migrated.get("rows_read")) is not None:
        read, rejected = whole(migrated.get("rows_read")), whole(migrated.get("rejected"))
        landed = read - rejected if read is not None and rejected is not None else None
        return {"read": read, "landed": landed, "rejected": rejected}
    return {
        "read": whole(reconciled.get("source_rows")),
        "landed": whole(reconciled.get("migrated")),
        "rejected": whole(reconciled.get("rejected")),
    }


def outcome_json(outcome: RunOutcome) -> dict[str, Any]:
    """The run for a CI pipeline: verdict, exit code, counts, source sha256, folder, steps."""
    return {
        "verdict": outcome.verdict,
        "exit_code": outcome.exit_code,
        "message": outcome.message,
        "counts": counts_of(outcome.steps),
        "source_sha256": outcome.source_sha256,
        "run_folder": str(outcome.run_dir.resolve()),
        "index": str(outcome.index.resolve()),
        "steps": [
            {
                "name": r.name,
                "status": r.status,
                "verdict": r.verdict,
                "exit_code": r.exit_code,
                "seconds": round(r.duration_s, 1),
                "reason": r.reason,
            }
            for r in outcome.steps
        ],
    }


# --- the live cutover ---------------------------------------------------------------------------


def snapshot(live: str | Path, out: str | Path) -> SnapshotResult:
    """Copy the live SQLite store while the app keeps writing to it (SQLite's online backup
    API; the app's writes never fail because of it). Prints the copy's sha256.

    ``out`` must be a new file (written 0600). Returns the copy's path, sha256, sessions, the
    live file's journal mode and the time spent waiting for the app's locks."""
    from sessionmig.sqlite.snapshot import snapshot as copy_live

    return copy_live(live, out)


def catchup(
    env: str, overrides: Overrides | None = None, project_dir: str | Path | None = None
) -> CatchupResult:
    """One catch-up pass of a live cutover: carry into PostgreSQL what the old colour changed
    since the last pass (run the same command each pass; see RUNBOOK "Live cutover").

    ``overrides`` names ``live_sqlite_path`` and ``state_dir`` unless the environment file
    does. The same engine call as notebook ``07_catchup``; the result's ``exit_code`` is 0
    (the pass is proven), 1 (its proof found a difference) or 2."""
    from sessionmig.runbook.settings import settings
    from sessionmig.runbook.steps import catchup_step

    merged = resolve(env, overrides, ["catchup"], project_dir=project_dir)
    return catchup_step(
        settings(**merged),
        str(merged.get("live_sqlite_path") or ""),
        str(merged.get("state_dir") or ""),
        lock_timeout=merged.get("lock_timeout") or D.LOCK_TIMEOUT,
    )


# --- analysis -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueryResult:
    """A named query's answer: at most ``limit`` rows in ``frame``; ``more`` when the query
    had more rows than that."""

    name: str
    source: QuerySource
    frame: pd.DataFrame
    limit: int
    more: bool
    exit_code: int = EXIT_OK

    def text(self, fmt: str = "table") -> str:
        """The rows as ``table``, ``csv`` or ``json`` (one object a row; ``[]`` for none)."""
        from sessionmig.engines.queries import to_text

        return to_text(self.frame, fmt)


def list_queries() -> list[str]:
    """The named analysis queries, one line each: name, what it answers, its parameters."""
    from sessionmig.engines.queries import listing

    return listing()


def query_kinds(name: str | None, env: str | None) -> dict[str, type]:
    """The types of query ``name``'s own whole-number parameters, for reading ``-p`` text
    (:func:`sessionmig.runbook.params.parse_overrides`); refuses a missing name or environment and
    an unknown query, before anything is read."""
    from sessionmig.engines import queries

    if not name or not env:
        raise ParameterError("give a query name and --env (or --list to see the queries)")
    return {p.name: int for p in queries.get(name).params if p.kind == "int"}


def query(
    name: str,
    env: str,
    overrides: Overrides | None = None,
    *,
    source: QuerySource = "postgres",
    show_ids: bool = False,
    limit: int = 100,
    project_dir: str | Path | None = None,
) -> QueryResult:
    """Run a named analysis query on the backup or on PostgreSQL (read only).

    ``overrides`` holds runbook settings (``source_timezone``, ``as_of`` …) and the query's
    own parameters (``unit``, ``timezone`` …) together; session ids are masked unless
    ``show_ids``."""
    from sessionmig.engines import queries
    from sessionmig.runbook.settings import settings as make_settings

    query_kinds(name, env)  # the same refusals, in the same order, as the command line's
    given_all = dict(overrides or {})
    # Settings by the one rule; every other name is the query's, which names what it takes.
    extra = (*P.SETTINGS, *given_all)
    merged = P.resolve(env, given_all, [], extra=extra, project_dir=project_dir)
    # Only a query on the backup reads it: on PostgreSQL the file need not exist here.
    settings = make_settings(require_source=source == "sqlite", **merged)
    given = {k: v for k, v in given_all.items() if k not in P.SETTINGS}
    values = queries.resolve(queries.get(name), given, settings.as_of, settings.source_timezone)
    backends = queries.backends_for(settings, (source,))
    frame = queries.run(name, source, backends, values, show_ids=show_ids, limit=limit + 1)
    return QueryResult(name, source, frame.head(limit), limit, len(frame) > limit)


# --- evidence -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyResult:
    """What ``verify`` found in a run folder: ``problems`` empty means it checks out."""

    run_dir: Path
    checked: int  # files re-hashed against the manifest
    problems: tuple[str, ...]
    notes: str  # what was and was not checked, in words

    @property
    def exit_code(self) -> int:
        return EXIT_FAIL if self.problems else EXIT_OK

    def json(self) -> dict[str, Any]:
        """``verify`` for a CI pipeline, with what the sealed manifest says of the run."""
        import json

        try:
            sealed = json.loads((self.run_dir / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            sealed = {}
        source = sealed.get("source") if isinstance(sealed.get("source"), dict) else {}
        return {
            "verdict": Verdict.PASS if not self.problems else Verdict.FAIL,
            "exit_code": self.exit_code,
            "run_folder": str(self.run_dir.resolve()),
            "files_checked": self.checked,
            "problems": list(self.problems),
            "notes": self.notes,
            "run_verdict": sealed.get("verdict"),
            "source_sha256": source.get("sha256_before"),
            "steps": [
                {"name": step.get("name"), "verdict": step.get("verdict")}
                for step in sealed.get("steps", [])
                if isinstance(step, dict)
            ],
        }


def _recorded(
    env: str, run_dir: Path, overrides: Overrides | None, project_dir: str | Path | None
) -> tuple[list[str], str]:
    """Check the manifest's digest against the one the run recorded in ``env``'s target."""
    from sessionmig.postgres import embedded
    from sessionmig.postgres.connect import connect
    from sessionmig.runbook.manifest import check_recorded

    name, schema = _target(env, overrides, project_dir)
    try:
        try:
            conn = connect(P.database_url(name), "verify", autocommit=True)
        except TargetError as exc:
            raise TargetError(
                f"cannot reach the target of --env {env} to check the recorded digest: "
                f"{exc}; check the server and ${name}"
            ) from None
        with conn:
            check = check_recorded(run_dir, conn, schema)
        return list(check.problems), check.note
    finally:
        if name is None:
            embedded.stop()


def verify(
    run_dir: str | Path,
    env: str | None = None,
    overrides: Overrides | None = None,
    *,
    allowed_signers: str | Path | None = None,
    identity: str | None = None,
    project_dir: str | Path | None = None,
) -> VerifyResult:
    """Re-hash every file of a run folder against its manifest; with --env, also check the
    manifest's digest against the one the run recorded in the target.

    With ``allowed_signers`` (ssh-keygen's format), ``manifest.json.sig`` is checked against
    those keys (``identity``: the signer to check). A folder without a manifest raises
    :class:`~sessionmig.errors.ParameterError`."""
    from sessionmig.runbook.manifest import check_signature
    from sessionmig.runbook.manifest import verify as rehash

    folder = Path(run_dir)
    result = rehash(folder)
    if not result.found:
        raise ParameterError(result.problems[0])
    problems = list(result.problems)
    notes = []
    if env and not any("not valid JSON" in p for p in problems):
        found, note = _recorded(env, folder, overrides, project_dir)
        problems += found
        notes.append(note)
    elif not env:
        notes.append(
            "only its self-consistency was checked: without --env ENV nothing shows the folder "
            "was not edited and re-sealed"
        )
    signers = Path(allowed_signers) if allowed_signers else None
    found, note = check_signature(folder, signers, identity)
    problems += found
    notes.append(note)
    return VerifyResult(folder, result.checked, tuple(problems), "; ".join(n for n in notes if n))


@dataclass(frozen=True)
class SignResult:
    """``sign``'s outcome: the signature's path, or the problems that kept it from signing."""

    run_dir: Path
    signature: Path | None
    problems: tuple[str, ...] = ()
    namespace: str = ""  # ssh-keygen's -n, which an allowed_signers line must name

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.signature is not None else EXIT_FAIL


def sign(run_dir: str | Path, key: str | Path) -> SignResult:
    """Sign a verified run's manifest.json with an SSH key (ssh-keygen -Y sign, as git does).

    A folder that does not verify is not signed: the result carries its problems (exit 1)."""
    from sessionmig.runbook.manifest import SIGNATURE_NAMESPACE
    from sessionmig.runbook.manifest import sign as ssh_sign
    from sessionmig.runbook.manifest import verify as rehash

    folder = Path(run_dir)
    result = rehash(folder)
    if not result.found:
        raise ParameterError(result.problems[0])
    if not result.ok:
        return SignResult(folder, None, tuple(result.problems), SIGNATURE_NAMESPACE)
    return SignResult(folder, ssh_sign(folder, Path(key)), (), SIGNATURE_NAMESPACE)


# --- the target's schema ------------------------------------------------------------------------


@dataclass(frozen=True)
class DbResult:
    """What ``db`` found or did: the schema's revision (None: not migrated), or the history."""

    action: DbAction
    schema: str | None = None
    revision: str | None = None
    history: tuple[str, ...] = ()
    exit_code: int = EXIT_OK


def db(
    action: DbAction,
    env: str | None = None,
    overrides: Overrides | None = None,
    project_dir: str | Path | None = None,
) -> DbResult:
    """The target's schema revision (Alembic): upgrade it, show it, or list the revisions.

    ``upgrade`` and ``current`` need ``env`` (whose target); ``history`` needs none. On the
    embedded server (``database_url_env: null``) the server is stopped again afterwards."""
    from sessionmig.postgres import embedded, schema

    if action == "history":
        return DbResult(action, history=tuple(schema.db_history()))
    if not env:
        raise ParameterError(f"db {action} needs --env ENV (whose target to look at)")
    name, target_schema = _target(env, overrides, project_dir)
    dsn = P.database_url(name)
    try:
        if action == "upgrade":
            return DbResult(action, target_schema, schema.db_upgrade(dsn, target_schema))
        return DbResult(action, target_schema, schema.db_current(dsn, target_schema))
    finally:
        if name is None:
            embedded.stop()


# --- a made-up backup ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleResult:
    """The sample written: its path, sessions, the oddities planted and how many cannot land."""

    path: str  # as given
    rows: int
    oddities: int
    cannot_land: int
    as_of: str
    exit_code: int = EXIT_OK


def sample(
    out: str | Path,
    rows: int = 1000,
    *,
    seed: int = 7,
    as_of: str | None = None,
    timezone: str | None = None,
    oddities: int | None = None,
    replace: bool = False,
) -> SampleResult:
    """Write a made-up backup in the legacy schema, with the known oddities planted: for a
    demo, a rehearsal or a test.

    Never overwrites a file, except, with ``replace``, a sample this function wrote earlier
    (a typo must never name the live store). ``as_of``, ``timezone`` and ``oddities`` default
    to :mod:`sessionmig.sqlite.sample`'s (all the oddities)."""
    from sessionmig.sqlite.sample import DEFAULT_AS_OF, DEFAULT_ZONE, ODDITIES, generate, is_sample

    path = Path(out)
    if path.exists() or path.is_symlink():
        if not replace:
            raise ParameterError(
                f"{out} exists; sample never overwrites a file (a typo could name the live "
                "store). Give a new path, or --replace to replace an earlier sample"
            )
        if not is_sample(path):
            raise ParameterError(
                f"{out} exists and is not a sample sessionmig wrote: refused even with "
                "--replace (it may be a real store). Give a new path"
            )
    when = as_of or DEFAULT_AS_OF
    applied = generate(
        out,
        rows=rows,
        seed=seed,
        as_of=when,
        zone=timezone or DEFAULT_ZONE,
        oddities=len(ODDITIES) if oddities is None else oddities,
    )
    lands = sum(o.lands for _, o in applied)
    return SampleResult(str(out), rows, len(applied), len(applied) - lands, when)
