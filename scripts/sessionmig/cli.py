"""``sessionmig``: the command line's parsing, a dispatch table, and how each result is shown.

The work of each verb is :mod:`sessionmig.command`'s (one function per verb, plain values in, a
result object out, which notebooks, scripts and tests call too); here each verb's namespace is
read into those values, the command called and its result rendered — text for people, or with
``--format json`` (run, migrate, reconcile, verify) one JSON object on stdout for a CI pipeline,
the human text then on stderr.

Exit codes: 0 passed (warnings allowed), 1 a verdict is FAIL, 2 the run could not be carried out
— always with a one-line reason on stderr. Everything this process prints goes through the one
redaction path (:func:`sessionmig.rules.mask.redact`), tracebacks included.

Nothing heavy is imported here: ``sessionmig --help`` and ``sessionmig db …`` never load pandas
or papermill (the commands import what they need when they run).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import textwrap
import traceback
from collections.abc import Callable
from typing import Any

from sessionmig import command
from sessionmig.errors import EXIT_ERROR, EXIT_FAIL, EXIT_OK, SessionmigError
from sessionmig.postgres.connect import MALFORMED_DSN_HINT
from sessionmig.rules import mask
from sessionmig.rules.verdict import Verdict, partition
from sessionmig.runbook import params as P
from sessionmig.runbook.project import PROJECT_DIR_VARIABLE, runbook_path

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


# --- each verb: its namespace read into plain values, the command called, its result rendered --


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``-p NAME=VALUE`` typed as each parameter is declared (:func:`params.parse_overrides`)."""
    return P.parse_overrides(args.param)


def _settings(args: argparse.Namespace) -> Any:
    """The settings of the step this verb runs (``migrate``, ``reconcile``)."""
    return command.settings_of(args.verb, args.env, _overrides(args), args.project_dir)


def _human(args: argparse.Namespace) -> Any:
    """Where the human text goes: stdout, or stderr when stdout carries ``--format json``."""
    return sys.stderr if getattr(args, "format", "text") == "json" else sys.stdout


def _run(args: argparse.Namespace) -> int:
    steps = [s.strip() for s in args.steps.split(",") if s.strip()] if args.steps else None
    outcome = command.run(
        args.env, steps, _overrides(args), args.reports_dir, args.fresh, args.project_dir
    )
    return _outcome(args, outcome, "run")


def _migrate(args: argparse.Namespace) -> int:
    outcome = command.migrate(args.env, _overrides(args), args.reports_dir, args.project_dir)
    return _outcome(args, outcome, "migrate")


def _reconcile(args: argparse.Namespace) -> int:
    outcome = command.reconcile(args.env, _overrides(args), args.reports_dir, args.project_dir)
    return _outcome(args, outcome, "reconcile")


def _outcome(args: argparse.Namespace, outcome: Any, verb: str) -> int:
    """A run's end: the report path, the verdict and a summary a ticket can take (or the JSON
    of ``--format json``); the step lines and progress went to stderr as it ran."""
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
        print(json.dumps(command.outcome_json(outcome), indent=2, default=str))
    return int(outcome.exit_code)


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


def _snapshot(args: argparse.Namespace) -> int:
    result = command.snapshot(args.live, args.out)
    print(
        f"{result.path}: {result.sessions} sessions, journal mode {result.journal_mode}, "
        f"waited {result.waited_s:.1f} s for the app's locks, {result.seconds:.1f} s in all"
    )
    print(f"sha256 {result.sha256}")
    return EXIT_OK


def _catchup(args: argparse.Namespace) -> int:
    result = command.catchup(args.env, _overrides(args), args.project_dir)
    print(f"{result.verdict}: {result.reason}")
    return int(result.exit_code)


def _query(args: argparse.Namespace) -> int:
    if args.list:
        print("\n".join(command.list_queries()))
        return EXIT_OK
    # The query's own whole-number parameters are read as numbers; its name is checked first.
    overrides = P.parse_overrides(args.param, command.query_kinds(args.name, args.env))
    result = command.query(
        args.name,
        args.env,
        overrides,
        source=args.source,
        show_ids=args.show_ids,
        limit=args.limit,
        project_dir=args.project_dir,
    )
    print(result.text(args.format))
    if result.more:
        print(f"(first {args.limit} rows shown; raise --limit for more)", file=sys.stderr)
    return result.exit_code


def _verify(args: argparse.Namespace) -> int:
    result = command.verify(
        args.run_dir,
        args.env,
        _overrides(args),
        allowed_signers=args.allowed_signers,
        identity=args.identity,
        project_dir=args.project_dir,
    )
    out = _human(args)
    for problem in result.problems:
        print(problem, file=out)
    if not result.problems:
        print(
            f"{args.run_dir}: {result.checked} files match the manifest; {result.notes}", file=out
        )
    else:
        print(
            f"sessionmig verify: {len(result.problems)} problem(s) in {args.run_dir}",
            file=sys.stderr,
        )
    if args.format == "json":
        print(json.dumps(result.json(), indent=2))
    return result.exit_code


def _sign(args: argparse.Namespace) -> int:
    result = command.sign(args.run_dir, args.key)
    if result.signature is None:
        for problem in result.problems:
            print(problem)
        print(f"sessionmig sign: {args.run_dir} does not verify; not signed", file=sys.stderr)
        return result.exit_code
    print(
        f"{result.signature}: check it with `sessionmig verify {args.run_dir} --allowed-signers "
        f'FILE`, FILE holding a line `NAME namespaces="{result.namespace}" <public key>`'
    )
    return result.exit_code


def _db(args: argparse.Namespace) -> int:
    result = command.db(args.action, args.env, _overrides(args), args.project_dir)
    if result.action == "history":
        print("\n".join(result.history))
    elif result.action == "upgrade":
        print(f"{result.schema}: at revision {result.revision}")
    else:
        shown = f"at revision {result.revision}" if result.revision else "not migrated"
        print(f"{result.schema}: {shown}")
    return result.exit_code


def _sample(args: argparse.Namespace) -> int:
    result = command.sample(
        args.out,
        args.rows,
        seed=args.seed,
        as_of=args.as_of,
        timezone=args.timezone,
        oddities=args.oddities,
        replace=args.replace,
    )
    print(
        f"{result.path}: {result.rows} sessions, {result.oddities} oddities "
        f"({result.cannot_land} cannot land), as_of {result.as_of}"
    )
    return result.exit_code


# The one place a verb meets its command: (the command whose docstring is the verb's help, the
# function that reads the namespace, calls it and renders its result). In the runbook's order.
Handler = Callable[[argparse.Namespace], int]
VERBS: dict[str, tuple[Callable[..., Any], Handler]] = {
    "run": (command.run, _run),
    "migrate": (command.migrate, _migrate),
    "reconcile": (command.reconcile, _reconcile),
    "query": (command.query, _query),
    "snapshot": (command.snapshot, _snapshot),
    "catchup": (command.catchup, _catchup),
    "verify": (command.verify, _verify),
    "sign": (command.sign, _sign),
    "db": (command.db, _db),
    "sample": (command.sample, _sample),
}


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
            from sessionmig.runbook.orchestrate import DEFAULT_STEPS, STEPS

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


def _verb(sub: Any, verb: str, steps: tuple[str, ...] | None = None) -> argparse.ArgumentParser:
    """A verb's parser: its command's docstring (the first paragraph) as help and description,
    examples and exit codes."""
    doc = " ".join((VERBS[verb][0].__doc__ or "").split("\n\n")[0].split())
    p: argparse.ArgumentParser = sub.add_parser(
        verb,
        help=doc,
        description=textwrap.fill(doc, 88),
        epilog=_epilog(verb, steps),
        formatter_class=_Help,
    )
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
    from sessionmig.sqlite.sample import DEFAULT_AS_OF, DEFAULT_ZONE, ODDITIES

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

    p = _verb(sub, "run", P.STEPS)
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

    for verb in ("migrate", "reconcile"):
        p = _verb(sub, verb, (verb,))
        _env_args(p, steps=(verb,))
        _report_args(p)

    p = _verb(sub, "query")
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

    p = _verb(sub, "snapshot")
    p.add_argument("live", help="the SQLite file the app writes to")
    p.add_argument("out", help="where the copy goes (a new file, written 0600)")

    p = _verb(sub, "catchup", ("catchup",))
    _env_args(p, steps=("catchup",))

    p = _verb(sub, "verify")
    p.add_argument("run_dir", help="the run folder (REPORTS_DIR/ENV/RUN_ID)")
    _env_args(p, required=False)
    p.add_argument(
        "--allowed-signers",
        metavar="FILE",
        help="check manifest.json.sig against these keys (ssh-keygen's allowed_signers format)",
    )
    p.add_argument("--identity", help="the signer to check (default: whoever FILE names)")
    p.add_argument("--format", choices=("text", "json"), default="text", help=_JSON_HELP)

    p = _verb(sub, "sign")
    p.add_argument("run_dir", help="the run folder (REPORTS_DIR/ENV/RUN_ID); it must verify")
    p.add_argument("--key", required=True, help="SSH private key (e.g. ~/.ssh/id_ed25519)")

    p = _verb(sub, "db")
    p.add_argument(
        "action",
        choices=("upgrade", "current", "history"),
        help="upgrade: bring the target's schema to the newest revision (creating it if "
        "missing); current: show its revision; history: list every revision (needs no --env)",
    )
    _env_args(p, required=False)

    p = _verb(sub, "sample")
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
        return VERBS[args.verb][1](args)
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
