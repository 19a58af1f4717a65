"""Load, override, validate and redact the runbook's parameters.

Parameters come from an environment file (``runbook/environments/ENV.yaml``) and ``-p name=value``
overrides. Nothing here touches a database: the DSN is read from the environment variable the
parameters *name*, so a secret never travels as a parameter value.
"""

from __future__ import annotations

import os
import re
import string
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from . import mask
from .errors import ParameterError

ENVIRONMENTS_DIR = Path("runbook") / "environments"
ON_CONFLICT = ("fail", "skip", "keep_newer")
ON_INVALID_METADATA = ("reject", "keep_as_json_string")
ON_EXTRA_COLUMNS = ("fail", "into_metadata")
_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_ENV_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def environment_file(env: str, root: Path | None = None) -> Path:
    """The parameter file for ``env``: a name under ``runbook/environments`` or a path."""
    candidate = Path(env)
    if candidate.suffix in (".yaml", ".yml") and candidate.exists():
        return candidate
    base = (root or Path.cwd()) / ENVIRONMENTS_DIR
    path = base / f"{env}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in base.glob("*.yaml")) if base.exists() else []
        raise ParameterError(
            f"environment {env!r}: no parameter file {path}; known environments: "
            f"{', '.join(known) or 'none'} (run from the repository root or pass a .yaml path)"
        )
    return path


def load_environment(env: str, root: Path | None = None) -> dict[str, Any]:
    """Read an environment's parameters (a flat YAML mapping, as ``papermill -f`` expects)."""
    path = environment_file(env, root)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ParameterError(f"{path}: not valid YAML ({exc}); fix the file") from None
    if not isinstance(data, dict):
        raise ParameterError(f"{path}: expected a mapping of parameter: value")
    return data


# How ``-p name=value`` text becomes a value. Every parameter not named here is a string, kept
# exactly as typed: a path, a zone, a schema, a digest or an id is never read as YAML (where
# ``x #c.db`` is ``x`` and ``on`` is ``True``).
BOOLEAN_PARAMETERS = frozenset({"dry_run", "confirm", "show_ids"})
INTEGER_PARAMETERS = frozenset({"batch_rows", "max_retries", "top_n", "width", "hours", "limit"})
NUMBER_PARAMETERS = frozenset({"soak_hours"})
LIST_PARAMETERS = frozenset({"query_names"})
# The DSN variable's name, or null for the embedded server.
NULLABLE_PARAMETERS = frozenset({"database_url_env"})
_TRUE = ("true", "yes")
_FALSE = ("false", "no")
_NULL = ("null", "~", "none")


def parse_value(name: str, raw: str) -> Any:
    """``raw`` typed as parameter ``name`` expects; text that is not of that type is kept as
    text, so the parameter's check names it with the fix."""
    text = raw.strip()
    if name in BOOLEAN_PARAMETERS:
        lowered = text.lower()
        return True if lowered in _TRUE else False if lowered in _FALSE else raw
    if name in INTEGER_PARAMETERS:
        try:
            return int(text)
        except ValueError:
            return raw
    if name in NUMBER_PARAMETERS:
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return raw
    if name in LIST_PARAMETERS:
        if text.startswith("["):
            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError:
                return raw
            return [str(v) for v in value] if isinstance(value, list) else raw
        return [part.strip() for part in text.split(",") if part.strip()]
    if name in NULLABLE_PARAMETERS and text.lower() in _NULL:
        return None
    return raw


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn ``-p name=value`` strings into values: see :func:`parse_value`."""
    out: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or not name.strip():
            raise ParameterError(f"-p {pair!r}: expected name=value, e.g. -p batch_rows=5000")
        out[name.strip()] = parse_value(name.strip(), raw)
    return out


def parse_instant(value: Any, name: str = "as_of") -> datetime | None:
    """An ISO-8601 instant as an aware UTC datetime; empty means "not given" (None)."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        parsed = value
    else:
        try:
            parsed = datetime.fromisoformat(str(value).strip())
        except ValueError:
            raise ParameterError(
                f"{name}={value!r} is not an ISO-8601 instant; "
                "write e.g. 2026-11-26T09:00:00+09:00 or leave it empty for the run's start"
            ) from None
    if parsed.tzinfo is None:
        raise ParameterError(
            f"{name}={value!r} has no UTC offset, so it is not one instant; "
            "add one, e.g. 2026-11-26T09:00:00+09:00 or ...Z"
        )
    return parsed.astimezone(UTC)


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


@dataclass(frozen=True)
class Check:
    """One parameter rule: the parameter it applies to and a function raising ParameterError."""

    name: str
    check: Any


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


def _positive_int(name: str) -> Any:
    def check(value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ParameterError(f"{name}={value!r} must be a whole number of at least 1")

    return check


def _non_negative_int(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10:
        raise ParameterError(f"max_retries={value!r} must be a whole number from 0 to 10")


def _hours(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ParameterError(f"soak_hours={value!r} must be a number of hours, 0 or more")


def _one_of(name: str, options: tuple[str, ...]) -> Any:
    def check(value: Any) -> None:
        if value not in options:
            raise ParameterError(f"{name}={value!r}: choose one of {', '.join(options)}")

    return check


def _boolean(name: str) -> Any:
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


CHECKS: tuple[Check, ...] = (
    Check("sqlite_path", _require_file),
    Check("database_url_env", _env_var),
    Check("source_timezone", zone),
    Check("as_of", parse_instant),
    Check("target_schema", _schema),
    Check("batch_rows", _positive_int("batch_rows")),
    Check("on_conflict", _one_of("on_conflict", ON_CONFLICT)),
    Check("on_invalid_metadata", _one_of("on_invalid_metadata", ON_INVALID_METADATA)),
    Check("on_extra_columns", _one_of("on_extra_columns", ON_EXTRA_COLUMNS)),
    Check("dry_run", _boolean("dry_run")),
    Check("expected_sha256", _sha256),
    Check("max_retries", _non_negative_int),
    Check("confirm", _boolean("confirm")),
    Check("source", _one_of("source", ("postgres", "sqlite", "both"))),
    Check("unit", _one_of("unit", ("hour", "day"))),
    Check("show_ids", _boolean("show_ids")),
    Check("soak_hours", _hours),
)


def validate(params: dict[str, Any]) -> None:
    """Check every known parameter present in ``params``; the first bad one raises."""
    for rule in CHECKS:
        if rule.name in params:
            rule.check(params[rule.name])


def database_url(database_url_env: str | None) -> str:
    """The target DSN: read from the named variable, or the embedded server's when None."""
    if database_url_env is None:
        from . import embedded

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


def redact_url(url: str) -> str:
    """A DSN safe to print: the password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def sqlalchemy_url(dsn: str) -> str:
    """The same DSN with the psycopg 3 driver named, as SQLAlchemy expects."""
    return re.sub(r"^postgres(?:ql)?(?:\+\w+)?://", "postgresql+psycopg://", dsn)
