"""``sessionmig``: one small function per verb; each parses, delegates and sets the exit code.

Exit codes: 0 passed (warnings allowed), 1 a verdict is FAIL, 2 the run could not be carried out
— always with a one-line reason on stderr. Everything this process prints goes through the one
redaction path (:func:`sessionmig.mask.redact`), tracebacks included.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any

from . import mask
from . import params as P
from .errors import EXIT_ERROR, EXIT_FAIL, EXIT_OK, SessionmigError, TargetError
from .verdict import Verdict

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


def _settings(args: argparse.Namespace) -> Any:
    from . import steps

    merged = {**P.load_environment(args.env), **P.parse_overrides(args.param)}
    unknown = sorted(set(merged) - set(steps.Settings.__dataclass_fields__))
    if unknown:
        raise P.ParameterError(
            f"unknown parameter(s) {unknown}; known: "
            f"{', '.join(steps.Settings.__dataclass_fields__)}"
        )
    return steps.settings(**merged)


def cmd_sample(args: argparse.Namespace) -> int:
    """Write a sample backup in the legacy schema."""
    from .sample import generate

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


def cmd_run(args: argparse.Namespace) -> int:
    """Run the runbook's steps with papermill and write the reports."""
    from .orchestrate import run

    steps = [s.strip() for s in args.steps.split(",") if s.strip()] if args.steps else None
    outcome = run(args.env, steps, P.parse_overrides(args.param), args.reports_dir, args.fresh)
    print(f"reports: {outcome.index.resolve()}")
    if outcome.exit_code:
        print(f"sessionmig run: {outcome.message} (see {outcome.index})", file=sys.stderr)
    else:
        print(outcome.message)
    # What an operator pastes into the ticket, and the sha256 the next runbook command needs.
    for line in run_summary(outcome):
        print(f"  {line}")
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
        lines.append(
            ", ".join(
                f"{label} {counts[key]:,}"
                for key, label in (
                    ("rows_read", "rows read"),
                    ("inserted", "inserted"),
                    ("unchanged", "unchanged"),
                    ("rejected", "rejected"),
                )
                if isinstance(counts.get(key), int)
            )
        )
    if outcome.source_sha256:
        lines.append(f"source sha256 {outcome.source_sha256}")
    return [line for line in lines if line]


def cmd_migrate(args: argparse.Namespace) -> int:
    """Run the migrate engine directly (no notebook)."""
    from .steps import migrate

    settings = _settings(args)
    try:
        result = migrate(settings, progress=sys.stderr.isatty())
    except KeyboardInterrupt:
        print(f"sessionmig migrate: {interrupted_migrate(settings)}", file=sys.stderr)
        return EXIT_ERROR
    o = result.outcome
    print(
        f"{result.verdict}: read {o.rows_read}, inserted {o.inserted}, unchanged {o.unchanged}, "
        f"conflicting {o.conflicting}, updated {o.updated}, rejected {o.rejected} "
        f"in {o.seconds:.2f} s ({o.rows_per_second:,.0f} rows/s)"
        + (" — dry run, rolled back" if o.dry_run else "")
    )
    for reason, count in sorted(o.reject_counts.items()):
        print(f"  rejected {reason}: {count}")
    return EXIT_OK


def interrupted_migrate(settings: Any) -> str:
    """What an interrupted migrate left, in the target's own words (its audit row)."""
    import psycopg

    from .manifest import audit_rows, settle

    try:
        with psycopg.connect(settings.dsn(), connect_timeout=10, autocommit=True) as conn:
            settled = settle(conn)
            rows = [
                r
                for r in audit_rows(conn, settings.target_schema, settings.run_id)
                if r["step"] == "migrate" and not r["dry_run"]
            ]
    except (psycopg.Error, SessionmigError) as exc:
        return (
            f"interrupted; whether run {settings.run_id} committed is unknown (the target "
            f"could not be asked: {mask.redact(str(exc))}); look for it in "
            "session_migration_runs before running again"
        )
    if rows:
        row = rows[0]
        return (
            f"interrupted after the commit: the target's audit row for run {settings.run_id} "
            f"records {row['inserted']} inserted, {row['unchanged']} unchanged, "
            f"{row['rejected']} rejected; the rows are there — reconcile next"
        )
    return (
        f"interrupted before the commit: the target has no audit row for run {settings.run_id}"
        + ("" if settled else " (its connection was still closing)")
        + ", so nothing of it was committed; run it again"
    )


def cmd_reconcile(args: argparse.Namespace) -> int:
    """Run the reconcile engine directly (no notebook)."""
    from .steps import reconcile_step

    result = reconcile_step(_settings(args), progress=sys.stderr.isatty())
    print(f"{result.verdict}: {result.reason}")
    if result.verdict == Verdict.SKIPPED:
        return EXIT_OK
    print(
        f"  source {result.source_rows} = migrated {result.migrated} + rejected "
        f"{result.rejected}: {'holds' if result.partition_holds else 'DOES NOT HOLD'}"
    )
    for d in result.differences[:20]:
        print(f"  {d.kind} {d.session} rowid={d.rowid}: {d.detail}")
    return Verdict(result.verdict).exit_code


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


CATCHUP_ONLY = ("live_sqlite_path", "state_dir", "lock_timeout")


def cmd_catchup(args: argparse.Namespace) -> int:
    """One catch-up pass of a live cutover: carry into PostgreSQL what the old colour changed
    since the last pass (run the same command each pass; see RUNBOOK "Live cutover")."""
    from . import steps
    from .catchup import LOCK_TIMEOUT, catchup_step

    merged = {**P.load_environment(args.env), **P.parse_overrides(args.param)}
    live, state, lock = (merged.pop(name, None) for name in CATCHUP_ONLY)
    unknown = sorted(set(merged) - set(steps.Settings.__dataclass_fields__))
    if unknown:
        raise P.ParameterError(f"unknown parameter(s) {unknown} for catchup")
    result = catchup_step(
        steps.settings(**merged),
        str(live or ""),
        str(state or ""),
        lock_timeout=lock or LOCK_TIMEOUT,
    )
    print(f"{result.verdict}: {result.reason}")
    return result.exit_code


def cmd_query(args: argparse.Namespace) -> int:
    """Run a named analysis query on the backup or on PostgreSQL (read only)."""
    from . import queries, steps

    if args.list:
        print("\n".join(queries.listing()))
        return EXIT_OK
    if not args.name or not args.env:
        raise P.ParameterError("give a query name and --env (or --list to see the queries)")
    query = queries.get(args.name)
    merged = {**P.load_environment(args.env), **P.parse_overrides(args.param)}
    fields = set(steps.Settings.__dataclass_fields__)
    settings = steps.settings(**{k: v for k, v in merged.items() if k in fields})
    given = {k: v for k, v in merged.items() if k not in fields}
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
    import psycopg

    from . import embedded
    from .manifest import check_recorded

    merged = {**P.load_environment(args.env), **P.parse_overrides(args.param)}
    name = merged.get("database_url_env", "DATABASE_URL")
    schema = str(merged.get("target_schema") or "public")
    P.validate({"database_url_env": name, "target_schema": schema})
    try:
        try:
            conn = psycopg.connect(P.database_url(name), connect_timeout=10, autocommit=True)
        except psycopg.Error as exc:
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
    """Re-hash every file of a run directory against its manifest; with --env, also check the
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
    for problem in problems:
        print(problem)
    if not problems:
        said = "; ".join(n for n in notes if n)
        print(f"{args.run_dir}: {result.checked} files match the manifest; {said}")
        return EXIT_OK
    print(f"sessionmig verify: {len(problems)} problem(s) in {args.run_dir}", file=sys.stderr)
    return EXIT_FAIL


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


def _env_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "--env", required=required, help="environment name (runbook/environments) or path"
    )
    p.add_argument(
        "-p",
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a parameter (repeatable)",
    )


def parser() -> argparse.ArgumentParser:
    from .sample import DEFAULT_AS_OF, DEFAULT_ZONE, ODDITIES

    top = argparse.ArgumentParser(prog="sessionmig", description=__doc__.splitlines()[0])
    sub = top.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("run", help=cmd_run.__doc__)
    _env_args(p)
    p.add_argument(
        "--steps",
        help="comma-separated, in the order to run: preflight, inspect, migrate, reconcile "
        "(the default run), catchup, analysis, rollback, finalize",
    )
    p.add_argument("--reports-dir", default="reports")
    p.add_argument(
        "--fresh", action="store_true", help="embedded server only: start from an empty database"
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("sample", help=cmd_sample.__doc__)
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--as-of", default=DEFAULT_AS_OF)
    p.add_argument("--timezone", default=DEFAULT_ZONE)
    p.add_argument("--oddities", type=int, default=len(ODDITIES))
    p.set_defaults(func=cmd_sample)

    for verb, func in (("migrate", cmd_migrate), ("reconcile", cmd_reconcile)):
        p = sub.add_parser(verb, help=func.__doc__)
        _env_args(p)
        p.set_defaults(func=func)

    p = sub.add_parser("snapshot", help=cmd_snapshot.__doc__)
    p.add_argument("live", help="the SQLite file the app writes to")
    p.add_argument("out", help="where the copy goes (a new file, written 0600)")
    p.set_defaults(func=cmd_snapshot)

    p = sub.add_parser("catchup", help=cmd_catchup.__doc__)
    _env_args(p)
    p.set_defaults(func=cmd_catchup)

    p = sub.add_parser("query", help=cmd_query.__doc__)
    p.add_argument("name", nargs="?", help="query name (see --list)")
    p.add_argument("--list", action="store_true", help="list the queries, one a line")
    _env_args(p, required=False)
    p.add_argument("--source", choices=("sqlite", "postgres"), default="postgres")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--show-ids", action="store_true", help="show session ids in clear")
    p.add_argument("--limit", type=int, default=100, help="rows shown (default 100)")
    p.set_defaults(func=cmd_query)

    p = sub.add_parser("verify", help=cmd_verify.__doc__)
    p.add_argument("run_dir")
    _env_args(p, required=False)
    p.add_argument(
        "--allowed-signers",
        metavar="FILE",
        help="check manifest.json.sig against these keys (ssh-keygen's allowed_signers format)",
    )
    p.add_argument("--identity", help="the signer to check (default: whoever FILE names)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("sign", help=cmd_sign.__doc__)
    p.add_argument("run_dir")
    p.add_argument("--key", required=True, help="SSH private key (e.g. ~/.ssh/id_ed25519)")
    p.set_defaults(func=cmd_sign)
    return top


INTERRUPTED = {
    "run": "interrupted before any step ran; nothing was written",
    "migrate": "interrupted before the load started; nothing was written",
}


def one_line(text: str) -> str:
    """A message on one line (libpq's end in a newline and a tab-indented hint)."""
    return " ".join(text.split())


MALFORMED_DSN_HINT = (
    "the connection string is malformed: percent-encode the password's special characters "
    "(@ as %40, / as %2F, % as %25, space as %20) or keep the password in ~/.pgpass"
)
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


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = RedactingStream(sys.stdout), RedactingStream(sys.stderr)
    try:
        return args.func(args)
    except SessionmigError as exc:
        print(f"sessionmig {args.verb}: {with_hint(one_line(str(exc)))}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # e.g. `sessionmig query … | head`: the reader has what it wanted
        sys.stderr.close()
        return EXIT_OK
    except KeyboardInterrupt:
        said = INTERRUPTED.get(args.verb, "interrupted")
        print(f"sessionmig {args.verb}: {said}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # a bug or a library's surprise: still one line, never a secret
        if os.environ.get(DEBUG_VARIABLE):
            traceback.print_exc()
        print(unexpected(args.verb, exc), file=sys.stderr)
        return EXIT_ERROR
    finally:
        sys.stdout, sys.stderr = streams


if __name__ == "__main__":
    sys.exit(main())
