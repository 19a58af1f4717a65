"""The runbook's parameters: one declaration each, and how values are read, merged and checked.

:data:`PARAMETERS` is the only place a parameter's name, type, default, help, check and steps are
written. It drives :class:`sessionmig.runbook.settings.Settings`, validation, the notebooks'
parameters cells (``tools/make_notebooks.py``), ``sessionmig … --help`` and the RUNBOOK's table
(between its ``parameters`` markers; ``python -m sessionmig.runbook.params runbook/RUNBOOK.md``
rewrites it).

Values come from an environment file and ``-p name=value`` overrides, merged by one rule
(:func:`resolve`). Nothing here touches a database: the DSN is read from the environment
variable the parameters *name*, so a secret never travels as a parameter value.
"""

from __future__ import annotations

import json
import os
import re
import string
import sys
import textwrap
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from sessionmig import defaults as D
from sessionmig.errors import ParameterError
from sessionmig.rules import mask
from sessionmig.rules.instant import parse_instant as parse_instant
from sessionmig.runbook.project import locate

ON_CONFLICT = ("fail", "skip", "keep_newer")
ON_INVALID_METADATA = ("reject", "keep_as_json_string")
ON_EXTRA_COLUMNS = ("fail", "into_metadata")
RECONCILE_MODES = ("strict", "after_cutover")
SOURCES = ("postgres", "sqlite", "both")
UNITS = ("15min", "hour", "day", "week", "month")  # queries.UNITS
# Every step of the runbook, in the order ``sessionmig run --steps`` lists them.
STEPS = (
    "preflight",
    "inspect",
    "migrate",
    "reconcile",
    "catchup",
    "analysis",
    "rollback",
    "finalize",
)
DEFAULT_STEPS = ("preflight", "inspect", "migrate", "reconcile")  # `sessionmig run` alone
_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_ENV_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# --- checks: each raises ParameterError naming the parameter and the fix ---------------------


def resolve_as_of(value: Any, started: datetime | None = None) -> datetime:
    """``as_of`` as an aware UTC instant, defaulting to the run's start."""
    return parse_instant(value) or (started or datetime.now(UTC))


def zone(name: Any) -> ZoneInfo:
    """The IANA zone the naive source timestamps were written in; required, never guessed."""
    if not name:
        raise ParameterError(
            "source_timezone is empty: say which IANA zone the legacy server wrote its naive "
            "timestamps in (the seed's server ran in Asia/Seoul)"
        )
    try:
        return ZoneInfo(str(name))
    except (ZoneInfoNotFoundError, ValueError):
        raise ParameterError(
            f"source_timezone={name!r} is not an IANA zone name; use e.g. Asia/Seoul or UTC"
        ) from None


def _require_file(value: Any) -> None:
    if not value:
        raise ParameterError("sqlite_path is empty: give the path of the SQLite backup file")
    path = Path(str(value))
    if not path.exists():
        raise ParameterError(
            f"sqlite_path={value!r}: no such file (relative paths are read from {Path.cwd()}); "
            "point it at the backup, e.g. -p sqlite_path=backup/sessions.db"
        )
    if not path.is_file():
        raise ParameterError(f"sqlite_path={value!r} is not a regular file")


def _env_var(value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not _ENV_VAR_NAME.match(value):
        raise ParameterError(
            f"database_url_env={value!r} must be the NAME of an environment variable "
            "(e.g. DATABASE_URL), never the connection string itself; null starts the embedded "
            "server"
        )


def _schema(value: Any) -> None:
    if not isinstance(value, str) or not _SCHEMA_NAME.match(value):
        raise ParameterError(
            f"target_schema={value!r}: use a plain identifier such as public or sessions_v2"
        )


def _whole(name: str, low: int, high: int | None = None) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        bad = isinstance(value, bool) or not isinstance(value, int) or value < low
        if bad or (high is not None and value > high):
            span = f"from {low} to {high}" if high is not None else f"of at least {low}"
            raise ParameterError(f"{name}={value!r} must be a whole number {span}")

    return check


def _hours(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ParameterError(f"soak_hours={value!r} must be a number of hours, 0 or more")


def _one_of(name: str, options: tuple[str, ...]) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if value not in options:
            raise ParameterError(f"{name}={value!r}: choose one of {', '.join(options)}")

    return check


def _boolean(name: str) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if not isinstance(value, bool):
            raise ParameterError(f"{name}={value!r} must be true or false")

    return check


def _sha256(value: Any) -> None:
    if value in (None, ""):
        return
    text = str(value).lower()
    if len(text) != 64 or any(c not in string.hexdigits for c in text):
        raise ParameterError(
            f"expected_sha256={value!r} is not a sha256 hex digest (64 hex characters); "
            "copy it from the inspect report or leave it empty"
        )


# --- the declaration -------------------------------------------------------------------------


@dataclass(frozen=True)
class Parameter:
    """One parameter, declared once.

    ``type`` is how ``-p`` text is read (str is kept exactly as typed); ``steps`` are the
    notebooks that declare it (and the ``sessionmig`` verbs of the same name that take it);
    ``setting`` marks the fields of :class:`~sessionmig.runbook.settings.Settings`; ``detail`` is
    what the RUNBOOK's table adds to ``help``; ``step_help`` is its help where one step gives
    it another meaning."""

    name: str
    type: type
    default: Any
    help: str
    steps: tuple[str, ...]
    check: Callable[[Any], Any] | None = None
    setting: bool = False
    nullable: bool = False
    detail: str = ""
    step_help: tuple[tuple[str, str], ...] = ()

    def help_for(self, step: str) -> str:
        """The help comment in ``step``'s notebook."""
        return dict(self.step_help).get(step, self.help)

    @property
    def literal(self) -> str:
        """The default as Python source, as the notebooks' parameters cells write it."""
        if isinstance(self.default, str):
            return json.dumps(self.default, ensure_ascii=False)
        return repr(self.default)


ALL = STEPS
# The parameters an environment file carries: every notebook declares them, so papermill run
# directly with ``-f ENV.yaml`` never warns of an unknown parameter.
ENVIRONMENT = ("sqlite_path", "database_url_env", "source_timezone", "as_of", "target_schema")
_ROWS = ("inspect", "migrate", "reconcile", "catchup", "rollback")
_RULES = ("inspect", "migrate", "reconcile", "catchup")

PARAMETERS: tuple[Parameter, ...] = (
    Parameter(
        "sqlite_path",
        str,
        "",
        "the SQLite backup file (opened read-only and immutable, hashed before and after, "
        "never modified)",
        ALL,
        _require_file,
        setting=True,
        detail="It is evidence: with `-wal`/`-journal` beside it, it is copied privately "
        "first, so SQLite's recovery never touches it. Relative paths are read from the "
        "current directory",
        step_help=(
            (
                "catchup",
                "the migrated snapshot: the first pass's base (its sha256 must be the latest "
                "migrate run's)",
            ),
        ),
    ),
    Parameter(
        "database_url_env",
        str,
        D.DATABASE_URL_ENV,
        "NAME of the environment variable holding the target DSN; None starts the embedded server",
        ALL,
        _env_var,
        setting=True,
        nullable=True,
        detail="The DSN itself is never a parameter; `null` (local only) starts the embedded "
        "PostgreSQL 18 server",
    ),
    Parameter(
        "source_timezone",
        str,
        "",
        'IANA zone the legacy server wrote its naive timestamps in, e.g. "Asia/Seoul" (required)',
        ALL,
        zone,
        setting=True,
        detail="Never defaulted",
    ),
    Parameter(
        "as_of",
        str,
        "",
        'ISO-8601 instant used as "now" for active/expired; empty means the start of the run',
        ALL,
        parse_instant,
        setting=True,
        detail="Needs a UTC offset; fixed once per run, shared by its steps",
    ),
    Parameter(
        "target_schema",
        str,
        D.TARGET_SCHEMA,
        "PostgreSQL schema that holds the sessions tables",
        ALL,
        _schema,
        setting=True,
    ),
    Parameter(
        "batch_rows",
        int,
        D.BATCH_ROWS,
        "rows per batch (SQLite fetch and COPY)",
        _ROWS,
        _whole("batch_rows", 1),
        setting=True,
    ),
    Parameter(
        "on_conflict",
        str,
        D.ON_CONFLICT,
        "rows already in the target that differ: fail | skip | keep_newer (by last_activity)",
        ("preflight", "migrate"),
        _one_of("on_conflict", ON_CONFLICT),
        setting=True,
    ),
    Parameter(
        "on_invalid_metadata",
        str,
        "reject",
        "metadata that is not storable JSON: reject | keep_as_json_string",
        _RULES,
        _one_of("on_invalid_metadata", ON_INVALID_METADATA),
        setting=True,
    ),
    Parameter(
        "on_extra_columns",
        str,
        "fail",
        "columns beyond the legacy schema: fail | into_metadata (kept under _legacy_columns)",
        _RULES,
        _one_of("on_extra_columns", ON_EXTRA_COLUMNS),
        setting=True,
        detail="`fail`: inspect reports an error, migrate refuses. `into_metadata`: rows whose "
        "metadata is not a JSON object are rejected as `extra_columns_unplaceable`",
    ),
    Parameter(
        "dry_run",
        bool,
        False,
        "True: do all the work, report what would happen, then roll back (reconcile: skipped)",
        ("migrate", "reconcile", "catchup"),
        _boolean("dry_run"),
        setting=True,
        detail="Reconcile then says `SKIPPED` (nothing was written to compare) and the run "
        "keeps migrate's verdict",
        step_help=(
            (
                "catchup",
                "True: do the whole pass, prove it, report it, then roll back (nothing recorded)",
            ),
        ),
    ),
    Parameter(
        "expected_sha256",
        str,
        "",
        "when set, refuse a backup whose sha256 differs (the reviewed file is the migrated file)",
        ("preflight", "migrate"),
        _sha256,
        setting=True,
    ),
    Parameter(
        "max_retries",
        int,
        D.MAX_RETRIES,
        "lost connections are retried this many times, waiting 1, 2, 4 s between attempts",
        ("migrate", "catchup"),
        _whole("max_retries", 0, 10),
        setting=True,
        detail="Each attempt is the whole atomic load, so a retry can neither duplicate nor "
        "half-write",
        step_help=(
            (
                "catchup",
                "a pass that met the app's row locks (lock_timeout, deadlock) is redone from "
                "scratch this many times",
            ),
        ),
    ),
    Parameter(
        "reconcile_mode",
        str,
        "strict",
        "strict: the target must equal the backup exactly (the frozen-store procedure, right "
        "after migrate) | after_cutover: for re-checking once the app serves from PostgreSQL, "
        "changes the application explains are counted and reported, changes nothing explains "
        "fail",
        ("reconcile",),
        _one_of("reconcile_mode", RECONCILE_MODES),
        setting=True,
    ),
    Parameter(
        "run_steps",
        list,
        [],
        "the steps of this run, whose privileges preflight checks; empty means preflight, "
        "inspect, migrate, reconcile",
        ("preflight",),
        detail="Set by `sessionmig run`",
    ),
    Parameter(
        "restore_path",
        str,
        "",
        "where the restored SQLite file is written: the path the app reads (SESSION_SQLITE_PATH)",
        ("rollback",),
    ),
    Parameter(
        "migrate_manifest",
        str,
        "",
        "run folder (or its manifest.json) of the run that migrated this backup",
        ("rollback",),
    ),
    Parameter(
        "confirm",
        bool,
        False,
        "True allows replacing an existing file at restore_path",
        ("rollback",),
        _boolean("confirm"),
    ),
    Parameter(
        "live_sqlite_path",
        str,
        "",
        "the SQLite file the old app used, to be archived (moved, never deleted)",
        ("catchup", "rollback", "finalize"),
        step_help=(
            (
                "catchup",
                "the SQLite store the old colour still writes to (read only, through SQLite's "
                "backup API)",
            ),
            (
                "rollback",
                "during a live cutover's overlap: the SQLite store the old colour still serves "
                "from; PostgreSQL's changes since the last catch-up base are merged into it in "
                "place (restore_path is then not used). Empty: restore the backup to "
                "restore_path",
            ),
        ),
    ),
    Parameter(
        "archive_dir",
        str,
        "",
        "folder that receives the archived file, named with the run id",
        ("finalize",),
    ),
    Parameter(
        "reconcile_manifest",
        str,
        "",
        "run folder (or manifest.json) of a reconcile run whose verdict was PASS",
        ("finalize",),
    ),
    Parameter(
        "soak_hours",
        float,
        D.SOAK_HOURS,
        "hours that must have passed since that reconcile run before archiving",
        ("finalize",),
        _hours,
    ),
    Parameter(
        "state_dir",
        str,
        "",
        "private directory (0700, never a report folder) keeping each pass's snapshot: the next "
        "pass's base (a rollback during the overlap finds its base there)",
        ("catchup", "rollback"),
    ),
    Parameter(
        "lock_timeout",
        str,
        D.LOCK_TIMEOUT,
        "longest wait for a row the app holds before the pass gives up, committing nothing "
        "(500ms, 5s, 1min)",
        ("catchup",),
    ),
    Parameter(
        "source",
        str,
        "postgres",
        "where the queries run: postgres, sqlite (the backup) or both side by side",
        ("analysis",),
        _one_of("source", SOURCES),
    ),
    Parameter(
        "query_names",
        list,
        [],
        "named queries to run (sessionmig query --list); empty runs them all",
        ("analysis",),
    ),
    Parameter(
        "window_start",
        str,
        "",
        "ISO-8601 start of the time window; empty means 7 days before as_of",
        ("analysis",),
    ),
    Parameter(
        "window_end",
        str,
        "",
        "ISO-8601 end of the time window (exclusive); empty means as_of",
        ("analysis",),
    ),
    Parameter(
        "unit",
        str,
        D.UNIT,
        "time bucket: 15min, hour, day, week (ISO, from Monday) or month, local to timezone",
        ("analysis",),
        _one_of("unit", UNITS),
    ),
    Parameter(
        "timezone",
        str,
        "",
        "IANA zone for time buckets; empty means source_timezone",
        ("analysis",),
    ),
    Parameter(
        "user_id",
        str,
        "",
        "a user to list the sessions of (query user_sessions); empty skips it",
        ("analysis",),
    ),
    Parameter("top_n", int, 10, "rows kept by the top-N queries", ("analysis",)),
    Parameter("free_sql", str, "", "optional read-only SQL over the table sessions", ("analysis",)),
    Parameter(
        "show_ids",
        bool,
        False,
        "True shows session ids in clear; they are bearer tokens, so hashed by default",
        ("analysis",),
        _boolean("show_ids"),
    ),
    Parameter(
        "run_id",
        str,
        "",
        "run id shared by the steps of one run as set by sessionmig run; empty means a new one",
        tuple(s for s in STEPS if s != "analysis"),
        setting=True,
    ),
    Parameter(
        "operator",
        str,
        "",
        "who runs this step, for the audit row; empty means the USER environment variable",
        ("migrate", "catchup", "rollback", "finalize"),
        setting=True,
    ),
)
BY_NAME: dict[str, Parameter] = {p.name: p for p in PARAMETERS}
SETTINGS = tuple(p.name for p in PARAMETERS if p.setting)
"""The parameters every engine reads through :class:`~sessionmig.runbook.settings.Settings`."""


def default(name: str) -> Any:
    """The declared default of ``name`` (a fresh list for a list)."""
    value = BY_NAME[name].default
    return list(value) if isinstance(value, list) else value


def of_steps(steps: Iterable[str]) -> tuple[Parameter, ...]:
    """The parameters ``steps`` declare, in declaration order."""
    wanted = set(steps)
    unknown = sorted(wanted - set(STEPS))
    if unknown:
        raise ParameterError(f"unknown step(s) {unknown}; choose from {', '.join(STEPS)}")
    return tuple(p for p in PARAMETERS if wanted & set(p.steps))


# --- reading ``-p`` text ---------------------------------------------------------------------

_TRUE = ("true", "yes")
_FALSE = ("false", "no")
_NULL = ("null", "~", "none")


def parse_value(name: str, raw: str, kind: type | None = None) -> Any:
    """``raw`` typed as parameter ``name`` is declared (or as ``kind``, for a name the
    declaration does not hold, such as a query's own parameter). Text is kept exactly as typed:
    a path, a zone, a schema, a digest or an id is never read as YAML (where ``x #c.db`` is
    ``x`` and ``on`` is ``True``); text that is not of the type is kept too, so the
    parameter's check names it with the fix."""
    declared = BY_NAME.get(name)
    kind = kind or (declared.type if declared else str)
    text = raw.strip()
    if kind is bool:
        lowered = text.lower()
        return True if lowered in _TRUE else False if lowered in _FALSE else raw
    if kind is int:
        try:
            return int(text)
        except ValueError:
            return raw
    if kind is float:
        for number in (int, float):
            try:
                return number(text)
            except ValueError:
                pass
        return raw
    if kind is list:
        if text.startswith("["):
            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError:
                return raw
            return [str(v) for v in value] if isinstance(value, list) else raw
        return [part.strip() for part in text.split(",") if part.strip()]
    if declared is not None and declared.nullable and text.lower() in _NULL:
        return None
    return raw


def parse_overrides(pairs: list[str], kinds: Mapping[str, type] | None = None) -> dict[str, Any]:
    """Turn ``-p name=value`` strings into values: see :func:`parse_value`."""
    out: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or not name.strip():
            raise ParameterError(f"-p {pair!r}: expected name=value, e.g. -p batch_rows=5000")
        out[name.strip()] = parse_value(name.strip(), raw, (kinds or {}).get(name.strip()))
    return out


# --- environment files and the one merge rule ------------------------------------------------


def environment_file(env: str, project_dir: str | Path | None = None) -> Path:
    """The parameter file for ``env``: a path to a .yaml file (the operator's own, anywhere),
    or the name of one of the runbook's environments (``runbook/environments/NAME.yaml``)."""
    candidate = Path(env).expanduser()
    if candidate.suffix in (".yaml", ".yml") or os.sep in env or candidate.is_file():
        if not candidate.is_file():
            raise ParameterError(
                f"--env {env}: no such file ({candidate.absolute()}); give an environment "
                "file's path or the name of one of the runbook's environments"
            )
        return candidate
    base = locate(project_dir).environments
    path = base / f"{env}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in base.glob("*.yaml"))
        raise ParameterError(
            f"environment {env!r}: no parameter file {path}; known environments: "
            f"{', '.join(known) or 'none'} (or pass the path of a .yaml file)"
        )
    return path


def load_environment(env: str, project_dir: str | Path | None = None) -> dict[str, Any]:
    """Read an environment's parameters (a flat YAML mapping, as ``papermill -f`` expects)."""
    path = environment_file(env, project_dir)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ParameterError(f"{path}: not valid YAML ({exc}); fix the file") from None
    if not isinstance(data, dict):
        raise ParameterError(f"{path}: expected a mapping of parameter: value")
    return data


def resolve(
    env: str,
    overrides: Mapping[str, Any],
    steps: Iterable[str],
    *,
    extra: Iterable[str] = (),
    project_dir: str | Path | None = None,
) -> dict[str, Any]:
    """The one merge rule, for ``sessionmig run`` and every verb: the environment file, then
    ``-p`` on top. A name the file sets that no parameter has is a typo and refused; a ``-p``
    name the selected ``steps`` do not declare (nor ``extra``, a verb's own names) is refused,
    where papermill would only warn. Values are checked by :func:`validate`, by the caller."""
    steps = list(steps)
    base = load_environment(env, project_dir)
    typos = sorted(set(base) - set(BY_NAME))
    if typos:
        raise ParameterError(
            f"environment {env!r} sets {typos}, which is no parameter; fix the spelling in the "
            "environment file"
        )
    allowed = {p.name for p in of_steps(steps)} | set(extra)
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ParameterError(
            f"-p {', '.join(unknown)}: not a parameter of the selected steps "
            f"({', '.join(steps)}); they declare: {', '.join(sorted(allowed))}"
        )
    return {**base, **overrides}


def validate(
    values: Mapping[str, Any], steps: Iterable[str] | None = None, skip: Iterable[str] = ()
) -> None:
    """Check every declared parameter present in ``values``; with ``steps``, also the
    parameters those steps declare that ``values`` leaves at their default (so a required one,
    such as ``source_timezone``, cannot be missing). The first bad one raises."""
    needed = {p.name for p in of_steps(steps)} if steps is not None else set()
    for p in PARAMETERS:
        if p.check is None or p.name in skip:
            continue
        if p.name in values:
            p.check(values[p.name])
        elif p.name in needed:
            p.check(default(p.name))


# --- the target's DSN --------------------------------------------------------------------------


def database_url(database_url_env: str | None) -> str:
    """The target DSN: read from the named variable, or the embedded server's when None."""
    if database_url_env is None:
        from sessionmig.postgres import embedded

        return embedded.url()
    _env_var(database_url_env)
    value = os.environ.get(database_url_env, "")
    if not value:
        raise ParameterError(
            f"database_url_env={database_url_env!r}, but that environment variable is not set; "
            f"export {database_url_env}=postgresql://user@host:5432/dbname and keep the "
            "password in ~/.pgpass or PGPASSWORD"
        )
    # From here on every output of this process hides this DSN's password, however malformed.
    mask.register_dsn(value)
    return value


def redact(text: str) -> str:
    """``text`` without any password: the one redaction path (see :func:`mask.redact`)."""
    return mask.redact(text)


def sqlalchemy_url(dsn: str) -> str:
    """The same DSN with the psycopg 3 driver named, as SQLAlchemy expects."""
    return re.sub(r"^postgres(?:ql)?(?:\+\w+)?://", "postgresql+psycopg://", dsn)


# --- what the declaration is shown as -----------------------------------------------------------


def help_text(steps: Iterable[str] = STEPS) -> str:
    """``-p`` names for ``sessionmig … --help``: each parameter of ``steps`` with its default
    and help."""
    lines = ["parameters (-p NAME=VALUE; an environment file sets the same names):"]
    for p in of_steps(steps):
        lines.append(f"  {p.name} = {p.literal}")
        lines.append(textwrap.fill(p.help, 88, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return "\n".join(lines)


RUNBOOK_BEGIN = "<!-- parameters:begin (generated from sessionmig/runbook/params.py) -->"
RUNBOOK_END = "<!-- parameters:end -->"


def runbook_table() -> str:
    """The RUNBOOK's parameter table, as Markdown."""
    rows = ["| name | default | steps | meaning |", "|---|---|---|---|"]
    for p in PARAMETERS:
        steps = "all" if p.steps == ALL else ", ".join(p.steps)
        meaning = (f"{p.help}. {p.detail}" if p.detail else p.help).replace("|", "\\|")
        rows.append(f"| `{p.name}` | `{p.literal}` | {steps} | {meaning} |")
    return "\n".join(rows)


def with_runbook_table(text: str) -> str:
    """``text`` (the RUNBOOK) with the table between its markers made current."""
    head, found, rest = text.partition(RUNBOOK_BEGIN)
    _, found_end, tail = rest.partition(RUNBOOK_END)
    if not (found and found_end):
        raise ParameterError(f"the RUNBOOK has no {RUNBOOK_BEGIN} … {RUNBOOK_END} markers")
    return f"{head}{RUNBOOK_BEGIN}\n{runbook_table()}\n{RUNBOOK_END}{tail}"


if __name__ == "__main__":  # python -m sessionmig.runbook.params runbook/RUNBOOK.md
    for name in sys.argv[1:]:
        target = Path(name)
        target.write_text(with_runbook_table(target.read_text(encoding="utf-8")), "utf-8")
