"""``sessionmig``: one small function per verb; each parses, delegates and sets the exit code.

Exit codes: 0 passed (warnings allowed), 1 a verdict is FAIL, 2 the run could not be carried out
— always with a one-line reason on stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from . import params as P
from .errors import EXIT_ERROR, EXIT_FAIL, EXIT_OK, SessionmigError


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
    return outcome.exit_code


def cmd_migrate(args: argparse.Namespace) -> int:
    """Run the migrate engine directly (no notebook)."""
    from .steps import migrate

    result = migrate(_settings(args), progress=sys.stderr.isatty())
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


def cmd_reconcile(args: argparse.Namespace) -> int:
    """Run the reconcile engine directly (no notebook)."""
    from .steps import reconcile_step

    result = reconcile_step(_settings(args), progress=sys.stderr.isatty())
    print(f"{result.verdict}: {result.reason}")
    print(
        f"  source {result.source_rows} = migrated {result.migrated} + rejected "
        f"{result.rejected}: {'holds' if result.partition_holds else 'DOES NOT HOLD'}"
    )
    for d in result.differences[:20]:
        print(f"  {d.kind} {d.session} rowid={d.rowid}: {d.detail}")
    return EXIT_FAIL if result.verdict == "FAIL" else EXIT_OK


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


def cmd_verify(args: argparse.Namespace) -> int:
    """Re-hash every file of a run directory against its manifest."""
    from .manifest import verify

    result = verify(Path(args.run_dir))
    for problem in result.problems:
        print(problem)
    if result.ok:
        print(f"{args.run_dir}: {result.checked} files match the manifest")
        return EXIT_OK
    print(
        f"sessionmig verify: {len(result.problems)} problem(s) in {args.run_dir}", file=sys.stderr
    )
    return EXIT_FAIL


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
    p.add_argument("--steps", help="comma-separated: preflight,inspect,migrate,reconcile")
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
    p.set_defaults(func=cmd_verify)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except SessionmigError as exc:
        print(f"sessionmig {args.verb}: {P.redact(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # e.g. `sessionmig query … | head`: the reader has what it wanted
        sys.stderr.close()
        return EXIT_OK
    except KeyboardInterrupt:
        print(
            f"sessionmig {args.verb}: interrupted; nothing partial was committed", file=sys.stderr
        )
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
