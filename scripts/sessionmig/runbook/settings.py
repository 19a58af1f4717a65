"""Validated settings of one step: the declared parameters as typed values, and who runs it.

:func:`settings` turns parameter values (a notebook's globals, an environment file merged with
``-p``) into a frozen :class:`Settings`; :func:`complete` fills what a run fixes once — its id,
its ``as_of``, its operator, the backup's absolute path — for ``sessionmig run`` and a single
step alike. Defaults, checks and names come from :data:`sessionmig.runbook.params.PARAMETERS` only.
"""

from __future__ import annotations

import getpass
import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sessionmig.runbook import params as P

if TYPE_CHECKING:
    from sessionmig.rules.transform import Rules


def new_run_id(now: datetime | None = None) -> str:
    """A sortable, unique run id such as ``20261126T121500Z-3f9a``."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{os.urandom(2).hex()}"


def current_operator() -> str:
    """Who is running this: ``$USER``, else the login name of the process."""
    return os.environ.get("USER") or getpass.getuser()


@dataclass(frozen=True)
class Settings:
    """The parameters every engine reads (``params.SETTINGS``), validated, with derived values
    (zone, instant, rules). Build it with :func:`settings`, which fills the declared defaults."""

    sqlite_path: str
    database_url_env: str | None
    source_timezone: str
    as_of: datetime
    target_schema: str
    batch_rows: int
    on_conflict: str
    on_invalid_metadata: str
    on_extra_columns: str
    dry_run: bool
    expected_sha256: str
    max_retries: int
    reconcile_mode: str
    run_id: str
    operator: str
    declared: tuple[str, ...] = ()  # the names the caller gave (the report shows those)

    @property
    def rules(self) -> Rules:
        """The one way to build the rules: the backup's extra columns are carried into
        metadata only when ``on_extra_columns=into_metadata`` says so, for every step alike
        (migrate, reconcile, rollback, the analysis copy)."""
        from sessionmig.rules.transform import Rules
        from sessionmig.sqlite.source import extra_columns_of

        carry = self.on_extra_columns == "into_metadata" and self.sqlite_path
        extra = extra_columns_of(self.sqlite_path) if carry else ()
        return Rules(P.zone(self.source_timezone), self.on_invalid_metadata, extra)

    def dsn(self) -> str:
        return P.database_url(self.database_url_env)

    def public(self) -> dict[str, Any]:
        """Parameters as recorded in the audit row and manifest (no secrets exist here)."""
        out = asdict(self)
        out["as_of"] = self.as_of.isoformat()
        del out["declared"]
        return out


def complete(values: dict[str, Any], started: datetime | None = None) -> dict[str, Any]:
    """``values`` with what a run fixes once filled in: ``run_id`` (new when empty), ``as_of``
    (the run's start when empty, as ISO-8601 UTC), ``operator`` ($USER when empty) and
    ``sqlite_path`` made absolute (the steps' kernels may run elsewhere)."""
    started = started or datetime.now(UTC)
    out = dict(values)
    out["run_id"] = out.get("run_id") or new_run_id(started)
    out["as_of"] = P.resolve_as_of(out.get("as_of"), started).isoformat()
    out["operator"] = out.get("operator") or current_operator()
    if out.get("sqlite_path"):
        out["sqlite_path"] = str(Path(out["sqlite_path"]).resolve())
    return out


def settings(*, require_source: bool = True, **given: Any) -> Settings:
    """Validate parameter values and fill the declared defaults; raises ParameterError.

    Names that are not settings are ignored (an environment file may carry a step's own).
    ``require_source=False`` is for work that never reads the backup (queries on PostgreSQL):
    ``sqlite_path`` is then not checked (an environment file's may not exist on this host)."""
    known = {k: v for k, v in given.items() if k in P.SETTINGS}
    values = {name: known.get(name, P.default(name)) for name in P.SETTINGS}
    P.validate(values, skip=() if require_source else ("sqlite_path",))
    values = complete(values)
    return Settings(
        **{
            **values,
            "as_of": P.resolve_as_of(values["as_of"]),
            "expected_sha256": str(values["expected_sha256"] or "").lower(),
        },
        declared=tuple(known),
    )


def settings_from(namespace: dict[str, Any]) -> Settings:
    """:func:`settings` from a notebook's globals (the names its parameters cell defines)."""
    return settings(**{k: namespace[k] for k in P.SETTINGS if k in namespace})
