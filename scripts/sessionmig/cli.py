"""``sessionmig``: one small function per verb; each parses, delegates and sets the exit code.

Exit codes: 0 passed (warnings allowed), 1 a verdict is FAIL, 2 the run could not be carried out
— always with a one-line reason on stderr. Everything this process prints goes through the one
redaction path (:func:`sessionmig.mask.redact`), tracebacks included. ``--format json`` (run,
migrate, reconcile, verify) prints one JSON object on stdout for a CI pipeline; the human text
then goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import textwrap
import traceback
from pathlib import Path
from typing import Any

from . import defaults as D
from . import mask
from . import params as P
from .connect import MALFORMED_DSN_HINT
from .errors import (
    EXIT_ERROR,
    EXIT_FAIL,
    EXIT_OK,
    ParameterError,
    SessionmigError,
    TargetError,
    TargetUnreachable,
)
from .project import PROJECT_DIR_VARIABLE, runbook_path
from .verdict import Verdict, partition

DEBUG_VARIABLE = "SESSIONMIG_DEBUG"


class RedactingStream:
    """A text stream that passes everything written through :func:`mask.redact` first."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def write(self, text: str) -> int:
        self.inner.write(mask.redact(text))
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _parameters(
    args: argparse.Namespace,
    steps: list[str],
    extra: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The environment file with ``-p`` on top, by the one rule every verb and ``run`` share."""
    overrides = P.parse_overrides(args.param)
    return P.resolve(args.env, overrides, steps, extra=extra, project_dir=args.project_dir)


def _settings(args: argparse.Namespace) -> Any:
    """The settings of the step this verb runs (``migrate``, ``reconcile``)."""
    from .settings import settings

    return settings(**_parameters(args, [args.verb]))


def cmd_sample(args: argparse.Namespace) -> int:
    """Write a made-up backup in the legacy schema, with the known oddities planted: for a
    demo, a rehearsal or a test."""
    from .sample import generate, is_sample

    out = Path(args.out)
    if out.exists() or out.is_symlink():
        if not args.replace:
            raise ParameterError(
                f"{out} exists; sample never overwrites a file (a typo could name the live "
                "store). Give a new path, or --replace to replace an earlier sample"
            )
        if not is_sample(out):
            raise ParameterError(
                f"{out} exists and is not a sample sessionmig wrote: refused even with "
                "--replace (it may be a real store). Give a new path"
            )
    applied = generate(
        args.out,
        rows=args.rows,
        seed=args.seed,
        as_of=args.as_of,
        zone=args.timezone,
        oddities=args.oddities,
    )
    lands = sum(o.lands for _, o in applied)
    print(
        f"{args.out}: {args.rows} sessions, {len(applied)} oddities "
        f"({len(applied) - lands} cannot land), as_of {args.as_of}"
    )
    return EXIT_OK


def _human(args: argparse.Namespace) -> Any:
    """Where the human text goes: stdout, or stderr when stdout carries ``--format json``."""
    return sys.stderr if getattr(args, "format", "text") == "json" else sys.stdout


def cmd_run(args: argparse.Namespace) -> int:
    """Run the runbook's steps as notebooks (preflight to reconcile unless --steps says
    otherwise) and leave a sealed report folder: one report per step, index.html, manifest."""
    steps = [s.strip() for s in args.steps.split(",") if s.strip()] if args.steps else None
    return _run_steps(args, steps, "run")


def _run_steps(args: argparse.Namespace, steps: list[str] | None, verb: str) -> int:
    """``sessionmig run`` of ``steps``: the step lines and progress on stderr, then the report
    path, the verdict and a summary a ticket can take (or the JSON of ``--format json``)."""
    from .kernels import Kernels

    with Kernels(os.getcwd()) as kernels:
        # The first step's kernel starts while the runbook's own modules load.
        kernels.start((steps or list(P.DEFAULT_STEPS))[0])
        from .orchestrate import run

        outcome = run(
            args.env,
            steps,
            P.parse_overrides(args.param),
            args.reports_dir,
            getattr(args, "fresh", False),
            project_dir=args.project_dir,
            verb=verb,
            kernels=kernels,
        )
    out = _human(args)
    print(f"reports: {outcome.index.resolve()}", file=out)
    if outcome.exit_code:
        print(f"sessionmig {verb}: {outcome.message} (see {outcome.index})", file=sys.stderr)
    else:
        print(outcome.message, file=out)
    # What an operator pastes into the ticket, and the sha256 the next runbook command needs.
    for line in run_summary(outcome):
        print(f"  {line}", file=out)
    if args.format == "json":
        print(json.dumps(outcome_json(outcome), indent=2, default=str))
    return outcome.exit_code


def run_summary(outcome: Any) -> list[str]:
    """The run in a few lines: each step's verdict and time, the load's counts, the sha256."""
    lines = [
        " · ".join(
            f"{r.name} {r.verdict or r.status.upper()} {r.duration_s:.1f} s" for r in outcome.steps
        )
    ]
    migrate = next((r for r in outcome.steps if r.name == "migrate" and r.summary), None)
    if migrate is not None:
        counts = migrate.summary
        read, rejected = counts.get("rows_read"), counts.get("rejected")
        new, there = counts.get("inserted"), counts.get("unchanged")
        if all(isinstance(v, int) for v in (read, rejected, new, there)):
            # The README's words: read / landed / rejected; landed = new rows + rows already there.
            lines.append(
                f"rows read {read:,}, landed {new + there:,} ({new:,} new, {there:,} already "
                f"there), rejected {rejected:,}"
            )
    reconcile = next((r for r in outcome.steps if r.name == "reconcile" and r.summary), None)
    if reconcile is not None:
        proved = reconcile.summary
        source, migrated = proved.get("source_rows"), proved.get("migrated")
        rejected = proved.get("rejected")
        if all(
            isinstance(v, int) and not isinstance(v, bool) for v in (source, migrated, rejected)
        ):
            holds = proved.get("partition_holds")
            figure, note, _ = partition(
                source, migrated, rejected, holds if isinstance(holds, bool) else None
            )
            lines.append(f"partition (source rows = migrated + rejected): {figure} — {note}")
    verify = getattr(outcome, "verify", None)
    if verify:
        lines.append(f"verify: {verify}")
    if outcome.source_sha256:
        lines.append(f"source sha256 {outcome.source_sha256}")
    return [line for line in lines if line]


def counts_of(steps: Any) -> dict[str, int | None]:
    """Rows read, landed and rejected: the load's when the run migrated, else reconcile's."""
    by_name = {r.name: r.summary for r in steps if r.summary}
    migrate, reconcile = by_name.get("migrate", {}), by_name.get("reconcile", {})

    def whole(value: Any) -> int | None:
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    if whole(migrate.get("rows_read")) is not None:
        read, rejected = whole(migrate.get("rows_read")), whole(migrate.get("rejected"))
        landed = read - rejected if read is not None and rejected is not None else None
        return {"read": read, "landed": landed, "rejected": rejected}
    return {
        "read": whole(reconcile.get("source_rows")),
        "landed": whole(reconcile.get("migrated")),
        "rejected": whole(reconcile.get("rejected")),
    }


def outcome_json(outcome: Any) -> dict[str, Any]:
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


def _check_target(args: argparse.Namespace, retries_allowed: bool) -> None:
    """Before a single-step verb makes its run folder: a target that refuses the login or a
    malformed DSN is one line and exit 2, with nothing written. One that cannot be reached is
    left to the step when it may retry (migrate's ``max_retries``): its report says so."""
    from .connect import connect

    merged = _parameters(args, [args.verb])
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


def cmd_migrate(args: argparse.Namespace) -> int:
    """Load the backup into PostgreSQL (the runbook's migrate step alone), with a sealed
    report folder of its own."""
    _check_target(args, retries_allowed=True)
    return _run_steps(args, ["migrate"], "migrate")


def cmd_reconcile(args: argparse.Namespace) -> int:
    """Compare the backup with PostgreSQL, every row and column (the reconcile step alone, e.g.
    to re-check days later), with a sealed report folder of its own."""
    _check_target(args, retries_allowed=False)
    return _run_steps(args, ["reconcile"], "reconcile")


def cmd_snapshot(args: argparse.Namespace) -> int:
    """Copy the live SQLite store while the app keeps writing to it (SQLite's online backup
    API; the app's writes never fail because of it). Prints the copy's sha256."""
    from .snapshot import snapshot

    result = snapshot(args.live, args.out)
    print(
        f"{result.path}: {result.sessions} sessions, journal mode {result.journal_mode}, "
        f"waited {result.waited_s:.1f} s for the app's locks, {result.seconds:.1f} s in all"
    )
    print(f"sha256 {result.sha256}")
    return EXIT_OK


def cmd_catchup(args: argparse.Namespace) -> int:
    """One catch-up pass of a live cutover: carry into PostgreSQL what the old colour changed
    since the last pass (run the same command each pass; see RUNBOOK "Live cutover")."""
    from .catchup import catchup_step
    from .settings import settings

    merged = _parameters(args, ["catchup"])
    result = catchup_step(
        settings(**merged),
        str(merged.get("live_sqlite_path") or ""),
        str(merged.get("state_dir") or ""),
        lock_timeout=merged.get("lock_timeout") or D.LOCK_TIMEOUT,
    )
    print(f"{result.verdict}: {result.reason}")
    return result.exit_code


def cmd_query(args: argparse.Namespace) -> int:
    """Run a named analysis query on the backup or on PostgreSQL (read only)."""
    from . import queries
    from .settings import settings as make_settings

    if args.list:
        print("\n".join(queries.listing()))
        return EXIT_OK
    if not args.name or not args.env:
        raise P.ParameterError("give a query name and --env (or --list to see the queries)")
    query = queries.get(args.name)
    kinds: dict[str, type] = {p.name: int for p in query.params if p.kind == "int"}
    overrides = P.parse_overrides(args.param, kinds)
    # Settings by the one rule; every other -p name is the query's, which names what it takes.
    extra = (*P.SETTINGS, *overrides)
    merged = P.resolve(args.env, overrides, [], extra=extra, project_dir=args.project_dir)
    # Only a query on the backup reads it: on PostgreSQL the file need not exist here.
    settings = make_settings(require_source=args.source == "sqlite", **merged)
    given = {k: v for k, v in overrides.items() if k not in P.SETTINGS}
    values = queries.resolve(query, given, settings.as_of, settings.source_timezone)
    backends = queries.backends_for(settings, (args.source,))
    frame = queries.run(
        args.name, args.source, backends, values, show_ids=args.show_ids, limit=args.limit + 1
    )
    print(queries.to_text(frame.head(args.limit), args.format))
    if len(frame) > args.limit:
        print(f"(first {args.limit} rows shown; raise --limit for more)", file=sys.stderr)
    return EXIT_OK


def _verify_target(args: argparse.Namespace, run_dir: Path) -> tuple[list[str], str]:
    """Check the manifest's digest against the one the run recorded in the target."""
    from . import embedded
    from .connect import connect
    from .manifest import check_recorded

    target = ("database_url_env", "target_schema")
    merged = _parameters(args, [], extra=target)
    name, schema = (merged.get(k, P.default(k)) for k in target)
    P.validate({"database_url_env": name, "target_schema": schema})
    try:
        try:
            conn = connect(P.database_url(name), "verify", autocommit=True)
        except TargetError as exc:
            raise TargetError(
                f"cannot reach the target of --env {args.env} to check the recorded digest: "
                f"{exc}; check the server and ${name}"
            ) from None
        with conn:
            check = check_recorded(run_dir, conn, schema)
        return list(check.problems), check.note
    finally:
        if name is None:
            embedded.stop()


def cmd_verify(args: argparse.Namespace) -> int:
    """Re-hash every file of a run folder against its manifest; with --env, also check the
    manifest's digest against the one the run recorded in the target."""
    from .manifest import check_signature, verify

    run_dir = Path(args.run_dir)
    result = verify(run_dir)
    if not result.found:
        raise P.ParameterError(result.problems[0])
    problems = list(result.problems)
    notes = []
    if args.env and not any("not valid JSON" in p for p in problems):
        found, note = _verify_target(args, run_dir)
        problems += found
        notes.append(note)
    elif not args.env:
        notes.append(
            "only its self-consistency was checked: without --env ENV nothing shows the folder "
            "was not edited and re-sealed"
        )
    allowed = Path(args.allowed_signers) if args.allowed_signers else None
    found, note = check_signature(run_dir, allowed, args.identity)
    problems += found
    notes.append(note)
    out = _human(args)
    for problem in problems:
        print(problem, file=out)
    said = "; ".join(n for n in notes if n)
    if not problems:
        print(f"{args.run_dir}: {result.checked} files match the manifest; {said}", file=out)
    else:
        print(f"sessionmig verify: {len(problems)} problem(s) in {args.run_dir}", file=sys.stderr)
    code = EXIT_FAIL if problems else EXIT_OK
    if args.format == "json":
        print(json.dumps(verify_json(run_dir, result.checked, problems, said, code), indent=2))
    return code


def verify_json(
    run_dir: Path, checked: int, problems: list[str], notes: str, code: int
) -> dict[str, Any]:
    """``verify`` for a CI pipeline, with what the sealed manifest says of the run."""
    try:
        sealed = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        sealed = {}
    source = sealed.get("source") if isinstance(sealed.get("source"), dict) else {}
    return {
        "verdict": Verdict.PASS if not problems else Verdict.FAIL,
        "exit_code": code,
        "run_folder": str(run_dir.resolve()),
        "files_checked": checked,
        "problems": problems,
        "notes": notes,
        "run_verdict": sealed.get("verdict"),
        "source_sha256": source.get("sha256_before"),
        "steps": [
            {"name": step.get("name"), "verdict": step.get("verdict")}
            for step in sealed.get("steps", [])
            if isinstance(step, dict)
        ],
    }


def cmd_sign(args: argparse.Namespace) -> int:
    """Sign a verified run's manifest.json with an SSH key (ssh-keygen -Y sign, as git does)."""
    from .manifest import SIGNATURE_NAMESPACE, sign, verify

    run_dir = Path(args.run_dir)
    result = verify(run_dir)
    if not result.found:
        raise P.ParameterError(result.problems[0])
    if not result.ok:
        for problem in result.problems:
            print(problem)
        print(f"sessionmig sign: {args.run_dir} does not verify; not signed", file=sys.stderr)
        return EXIT_FAIL
    signature = sign(run_dir, Path(args.key))
    print(
        f"{signature}: check it with `sessionmig verify {args.run_dir} --allowed-signers FILE`, "
        f'FILE holding a line `NAME namespaces="{SIGNATURE_NAMESPACE}" <public key>`'
    )
    return EXIT_OK


def _target_dsn(args: argparse.Namespace) -> tuple[str, str, str | None]:
    """The DSN and schema of ``--env``'s target (the same variable every verb reads)."""
    target = ("database_url_env", "target_schema")
    merged = _parameters(args, [], extra=target)
    name, schema = (merged.get(k, P.default(k)) for k in target)
    P.validate({"database_url_env": name, "target_schema": schema})
    return P.database_url(name), str(schema), name


def cmd_db(args: argparse.Namespace) -> int:
    """The target's schema revision (Alembic): upgrade it, show it, or list the revisions."""
    from . import embedded, schema

    if args.action == "history":
        print("\n".join(schema.db_history()))
        return EXIT_OK
    if not args.env:
        raise P.ParameterError(f"db {args.action} needs --env ENV (whose target to look at)")
    dsn, target_schema, name = _target_dsn(args)
    try:
        if args.action == "upgrade":
            print(f"{target_schema}: at revision {schema.db_upgrade(dsn, target_schema)}")
        else:
            current = schema.db_current(dsn, target_schema)
            print(f"{target_schema}: " + (f"at revision {current}" if current else "not migrated"))
    finally:
        if name is None:
            embedded.stop()
    return EXIT_OK


def version() -> str:
    """The installed package's version (``unknown`` when run from an uninstalled checkout)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("sessionmig")
    except PackageNotFoundError:
        return "unknown (not installed)"


EXIT_CODES = f"""\
exit codes:
  {EXIT_OK}  passed (PASS, PASS_WITH_WARNINGS, preflight's GO)
  {EXIT_FAIL}  a verdict is FAIL: a difference was found; do not go on
  {EXIT_ERROR}  could not be carried out (preflight's NO-GO, bad parameter, unreachable server,
     unreadable source, damaged target, interrupted), with a one-line reason on stderr"""

EXAMPLES: dict[str, tuple[str, ...]] = {
    "run": (
        "sessionmig run --env prod --steps preflight,inspect   # review the backup first",
        "sessionmig run --env prod -p expected_sha256=<sha256 from the inspect report>",
    ),
    "migrate": (
        "sessionmig migrate --env staging -p dry_run=true   # load, then roll back",
        "sessionmig migrate --env prod -p expected_sha256=<sha256> --format json",
    ),
    "reconcile": (
        "sessionmig reconcile --env prod   # re-check days later, without migrating again",
        "sessionmig reconcile --env prod -p reconcile_mode=after_cutover",
    ),
    "query": (
        "sessionmig query --list",
        "sessionmig query active_over_time --env prod -p unit=hour --format csv",
    ),
    "snapshot": (
        "sessionmig snapshot /srv/app/sessions.db /srv/cutover/snap0.db",
        "sessionmig snapshot /srv/app/sessions.db /srv/cutover/snap1.db   # a later pass",
    ),
    "catchup": (
        "sessionmig catchup --env prod -p live_sqlite_path=/srv/app/sessions.db "
        "-p state_dir=/srv/state",
        "sessionmig catchup --env staging -p live_sqlite_path=/tmp/live.db -p state_dir=/tmp/st",
    ),
    "verify": (
        "sessionmig verify reports/prod/<RUN_ID> --env prod",
        "sessionmig verify reports/prod/<RUN_ID> --allowed-signers ~/.ssh/allowed_signers "
        "--format json",
    ),
    "sign": (
        "sessionmig sign reports/prod/<RUN_ID> --key ~/.ssh/id_ed25519",
        "sessionmig sign reports/staging/<RUN_ID> --key /etc/sessionmig/signing_key",
    ),
    "db": (
        "sessionmig db current --env prod",
        "sessionmig db upgrade --env staging   # then: sessionmig db history",
    ),
    "sample": (
        "sessionmig sample --rows 1000 --out /tmp/sessions.db",
        "sessionmig sample --rows 200000 --out /tmp/big.db --oddities 0 --seed 3",
    ),
}

_JSON_HELP = (
    "text (default) for people; json prints one JSON object on stdout for a CI pipeline "
    "(verdict, exit code, counts, source sha256, run folder, each step's verdict) and sends "
    "the human text to stderr"
)


class _Help(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's layout; fills ``{steps}`` in an option's help from the orchestrator's
    own list of steps, imported only when help is shown (it pulls in papermill)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help
        if text and "{steps}" in text:
            from .orchestrate import DEFAULT_STEPS, STEPS

            listed = ", ".join(
                f"{name}{' (default)' if name in DEFAULT_STEPS else ''}" for name in STEPS
            )
            text = text.replace("{steps}", listed)
        return text


def _epilog(verb: str, steps: tuple[str, ...] | None = None) -> str:
    """Examples, exit codes and (for a verb that runs steps) the parameters it takes."""
    parts = ["examples:\n" + "\n".join(f"  {e}" for e in EXAMPLES[verb])]
    if verb not in ("query", "snapshot", "sign", "db", "sample"):
        parts.append(EXIT_CODES)
    else:
        parts.append(
            f"exit codes:\n  {EXIT_OK}  done\n  {EXIT_ERROR}  could not be carried out, with a "
            "one-line reason on stderr"
        )
    if steps:
        parts.append(P.help_text(steps))
    return "\n\n".join(parts)


def _verb(
    sub: Any, verb: str, func: Any, steps: tuple[str, ...] | None = None
) -> argparse.ArgumentParser:
    """A verb's parser: its docstring as help and description, examples and exit codes."""
    doc = " ".join((func.__doc__ or "").split())
    p: argparse.ArgumentParser = sub.add_parser(
        verb,
        help=doc,
        description=textwrap.fill(doc, 88),
        epilog=_epilog(verb, steps),
        formatter_class=_Help,
    )
    p.set_defaults(func=func)
    return p


def _env_args(
    p: argparse.ArgumentParser, required: bool = True, steps: tuple[str, ...] | None = None
) -> None:
    """--env, -p and --project-dir; with ``steps``, the parameters they take are in --help."""
    p.add_argument(
        "--env",
        required=required,
        help="an environment's name (runbook/environments/NAME.yaml) or the path of a .yaml "
        "file of your own",
    )
    p.add_argument(
        "-p",
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a parameter (repeatable)" + ("; they are listed below" if steps else ""),
    )
    p.add_argument(
        "--project-dir",
        default=None,
        help="a sessionmig checkout whose notebooks and environment files to use (default: "
        f"${PROJECT_DIR_VARIABLE}, else the ones this installation carries)",
    )


def _report_args(p: argparse.ArgumentParser) -> None:
    """--reports-dir and --format: the verbs that leave a run folder."""
    p.add_argument(
        "--reports-dir",
        default="reports",
        metavar="DIR",
        help="where run folders go: DIR/ENV/RUN_ID, each with index.html, a report per step "
        "and the sealed manifest.json (default: reports, under the current directory)",
    )
    p.add_argument("--format", choices=("text", "json"), default="text", help=_JSON_HELP)


DESCRIPTION = f"""\
sessionmig moves the web app's sessions from the legacy SQLite store (a backup file) into
PostgreSQL, proves that every row arrived or says why it could not, and leaves a sealed folder
of reports as evidence of each action. The procedure, its gates and sign-offs are in
{runbook_path()} (installed with sessionmig); the parameters of each environment in the
environment files (`--env NAME`: runbook/environments/NAME.yaml, or a .yaml of your own).

The commands below are listed in the order of the runbook. `sessionmig COMMAND --help`
explains each, with examples.

{EXIT_CODES}"""

TOP_EXAMPLES = """\
examples:
  sessionmig run --env staging -p sqlite_path=/srv/backups/sessions.db
  sessionmig reconcile --env prod   # re-check days later"""


def parser() -> argparse.ArgumentParser:
    from .sample import DEFAULT_AS_OF, DEFAULT_ZONE, ODDITIES

    top = argparse.ArgumentParser(
        prog="sessionmig",
        description=DESCRIPTION,
        epilog=TOP_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top.add_argument(
        "--version", action="version", version=f"sessionmig {version()}", help="print the version"
    )
    sub = top.add_subparsers(
        dest="verb",
        required=True,
        title="commands (in the order of the runbook)",
        metavar="COMMAND",
    )

    p = _verb(sub, "run", cmd_run, P.STEPS)
    _env_args(p, steps=P.STEPS)
    p.add_argument(
        "--steps",
        metavar="STEP,STEP",
        help="comma-separated, in the order to run them: {steps}",
    )
    _report_args(p)
    p.add_argument(
        "--fresh", action="store_true", help="embedded server only: start from an empty database"
    )

    for verb, func in (("migrate", cmd_migrate), ("reconcile", cmd_reconcile)):
        p = _verb(sub, verb, func, (verb,))
        _env_args(p, steps=(verb,))
        _report_args(p)

    p = _verb(sub, "query", cmd_query)
    p.add_argument("name", nargs="?", help="the query's name (see --list)")
    p.add_argument("--list", action="store_true", help="list the queries, one a line, and stop")
    _env_args(p, required=False)
    p.add_argument(
        "--source",
        choices=("sqlite", "postgres"),
        default="postgres",
        help="postgres (default): the target, no backup file needed; sqlite: the backup as the "
        "migration's rules read it (a private copy, built once per backup and reused)",
    )
    p.add_argument(
        "--format",
        choices=("table", "csv", "json"),
        default="table",
        help="table (default), csv, or json (one JSON object a row; [] when there is none)",
    )
    p.add_argument("--show-ids", action="store_true", help="show session ids in clear")
    p.add_argument("--limit", type=int, default=100, help="rows shown (default 100)")

    p = _verb(sub, "snapshot", cmd_snapshot)
    p.add_argument("live", help="the SQLite file the app writes to")
    p.add_argument("out", help="where the copy goes (a new file, written 0600)")

    p = _verb(sub, "catchup", cmd_catchup, ("catchup",))
    _env_args(p, steps=("catchup",))

    p = _verb(sub, "verify", cmd_verify)
    p.add_argument("run_dir", help="the run folder (REPORTS_DIR/ENV/RUN_ID)")
    _env_args(p, required=False)
    p.add_argument(
        "--allowed-signers",
        metavar="FILE",
        help="check manifest.json.sig against these keys (ssh-keygen's allowed_signers format)",
    )
    p.add_argument("--identity", help="the signer to check (default: whoever FILE names)")
    p.add_argument("--format", choices=("text", "json"), default="text", help=_JSON_HELP)

    p = _verb(sub, "sign", cmd_sign)
    p.add_argument("run_dir", help="the run folder (REPORTS_DIR/ENV/RUN_ID); it must verify")
    p.add_argument("--key", required=True, help="SSH private key (e.g. ~/.ssh/id_ed25519)")

    p = _verb(sub, "db", cmd_db)
    p.add_argument(
        "action",
        choices=("upgrade", "current", "history"),
        help="upgrade: bring the target's schema to the newest revision (creating it if "
        "missing); current: show its revision; history: list every revision (needs no --env)",
    )
    _env_args(p, required=False)

    p = _verb(sub, "sample", cmd_sample)
    p.add_argument("--rows", type=int, default=1000, help="sessions to write (default 1000)")
    p.add_argument("--out", required=True, help="the SQLite file to write (a new file)")
    p.add_argument(
        "--replace",
        action="store_true",
        help="replace --out if it is a sample sessionmig wrote earlier (never any other file)",
    )
    p.add_argument("--seed", type=int, default=7, help="random seed: the same seed, the same file")
    p.add_argument(
        "--as-of",
        default=DEFAULT_AS_OF,
        help=f"the sample's 'now', ISO-8601 (default {DEFAULT_AS_OF})",
    )
    p.add_argument(
        "--timezone",
        default=DEFAULT_ZONE,
        help=f"the IANA zone the legacy app wrote its wall-clock times in (default {DEFAULT_ZONE})",
    )
    p.add_argument(
        "--oddities",
        type=int,
        default=len(ODDITIES),
        help=f"how many of the {len(ODDITIES)} known oddities (rows the migration must reject "
        "or repair) to plant (default all; 0 for a clean file)",
    )
    return top


INTERRUPTED = {
    "run": "interrupted before any step ran; nothing was written",
    "migrate": "interrupted before the load started; nothing was written",
    "reconcile": "interrupted before the comparison started; nothing was written",
}


def one_line(text: str) -> str:
    """A message on one line (libpq's end in a newline and a tab-indented hint)."""
    return " ".join(text.split())


_MALFORMED = re.compile(
    r"percent-encoded|connection info string|URI query parameter|unterminated quoted string"
    r"|resolve host '[^']*(?:@|\*\*\*)|host name \"[^\"]*(?:@|\*\*\*)",
    re.IGNORECASE,
)


def with_hint(text: str) -> str:
    """``text`` plus what to do when it is libpq refusing a malformed DSN."""
    return f"{text} ({MALFORMED_DSN_HINT})" if _MALFORMED.search(text) else text


def unexpected(verb: str, exc: BaseException) -> str:
    """The one line for an error no layer expected, with what to do."""
    text = one_line(f"{type(exc).__name__}: {exc}")
    if _MALFORMED.search(text):
        return f"sessionmig {verb}: {with_hint(text)}"
    return f"sessionmig {verb}: {text} (unexpected; rerun with {DEBUG_VARIABLE}=1 for a traceback)"


JSON_VERBS = ("run", "migrate", "reconcile", "verify")


def failure_json(args: argparse.Namespace, message: str, code: int) -> None:
    """Under ``--format json``, a run that could not be carried out is JSON on stdout too."""
    if args.verb in JSON_VERBS and getattr(args, "format", "text") == "json":
        failed = {"verdict": Verdict.ERROR, "exit_code": code, "message": message}
        print(json.dumps(failed, indent=2))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = RedactingStream(sys.stdout), RedactingStream(sys.stderr)
    try:
        return args.func(args)
    except SessionmigError as exc:
        line = f"sessionmig {args.verb}: {with_hint(one_line(str(exc)))}"
        print(line, file=sys.stderr)
        failure_json(args, line, exc.exit_code)
        return exc.exit_code
    except BrokenPipeError:  # e.g. `sessionmig query … | head`: the reader has what it wanted
        sys.stderr.close()
        return EXIT_OK
    except KeyboardInterrupt:
        said = INTERRUPTED.get(args.verb, "interrupted")
        print(f"sessionmig {args.verb}: {said}", file=sys.stderr)
        failure_json(args, said, EXIT_ERROR)
        return EXIT_ERROR
    except Exception as exc:  # a bug or a library's surprise: still one line, never a secret
        if os.environ.get(DEBUG_VARIABLE):
            traceback.print_exc()
        print(unexpected(args.verb, exc), file=sys.stderr)
        failure_json(args, unexpected(args.verb, exc), EXIT_ERROR)
        return EXIT_ERROR
    finally:
        sys.stdout, sys.stderr = streams


if __name__ == "__main__":
    sys.exit(main())
