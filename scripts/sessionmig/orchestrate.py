"""Run the runbook's steps in order with papermill and leave an auditable run directory.

``run()`` reads as the procedure: resolve parameters, check them against what the notebooks
declare, prepare the target, execute each step, render it, then seal the manifest and index.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import papermill
from jupyter_client.manager import AsyncKernelManager
from papermill.exceptions import PapermillExecutionError

from . import embedded, manifest, mask
from . import params as P
from .errors import EXIT_ERROR, EXIT_FAIL, EXIT_OK, ParameterError
from .progress import PROGRESS_VARIABLE, ProgressEcho
from .render import notebook_to_html, scrub_notebook
from .report import RESULT_VARIABLE
from .source import hash_files
from .steps import current_operator, new_run_id

STEPS: dict[str, str] = {
    "preflight": "00_preflight.ipynb",
    "inspect": "01_inspect.ipynb",
    "migrate": "02_migrate.ipynb",
    "reconcile": "03_reconcile.ipynb",
    "analysis": "04_session_analysis.ipynb",
    "rollback": "05_rollback.ipynb",
    "finalize": "06_finalize.ipynb",
}
DEFAULT_STEPS = ("preflight", "inspect", "migrate", "reconcile")


def notebooks_dir() -> Path:
    """``notebooks/`` of the checkout (``SESSIONMIG_NOTEBOOKS`` overrides)."""
    return Path(os.environ.get("SESSIONMIG_NOTEBOOKS", "notebooks")).resolve()


def declared_parameters(notebook: Path) -> set[str]:
    """The names a notebook's ``parameters`` cell declares (papermill reads them)."""
    return set(papermill.inspect_notebook(str(notebook)))


@dataclass
class StepRecord:
    name: str
    notebook: str
    status: str = "skipped"
    verdict: str | None = None
    reason: str | None = None
    exit_code: int = EXIT_OK
    duration_s: float = 0.0
    outputs: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunOutcome:
    exit_code: int
    run_dir: Path
    index: Path
    message: str


def resolve_parameters(env: str, overrides: dict[str, Any], steps: list[str]) -> dict[str, Any]:
    """Environment file + ``-p``, refusing names no selected notebook declares."""
    unknown_steps = [s for s in steps if s not in STEPS]
    if unknown_steps:
        raise ParameterError(f"unknown step(s) {unknown_steps}; choose from {', '.join(STEPS)}")
    base = P.load_environment(env)
    every = set().union(*(declared_parameters(notebooks_dir() / nb) for nb in STEPS.values()))
    selected = set().union(*(declared_parameters(notebooks_dir() / STEPS[s]) for s in steps))
    typos = sorted(set(base) - every)
    if typos:
        raise ParameterError(
            f"environment {env!r} sets {typos}, which no notebook declares; "
            "fix the spelling in the environment file"
        )
    unknown = sorted(set(overrides) - selected)
    if unknown:
        raise ParameterError(
            f"-p {', '.join(unknown)}: not a parameter of the selected steps "
            f"({', '.join(steps)}); they declare: {', '.join(sorted(selected))}"
        )
    merged = {**base, **overrides}
    P.validate(merged)
    P.zone(merged.get("source_timezone"))
    return merged


def secrets_of(merged: dict[str, Any]) -> tuple[str, ...]:
    """The target's password (in the DSN, or libpq's PGPASSWORD), to scrub from reports even
    where no pattern would find it."""
    name = merged.get("database_url_env")
    value = os.environ.get(name, "") if name else ""
    password = urlsplit(value).password if "://" in value else None
    if password is None and "password" in value:
        found = re.search(r"password\s*=\s*('[^']*'|\S+)", value)
        password = found.group(1).strip("'") if found else None
    candidates = (password, os.environ.get("PGPASSWORD"))
    return tuple(p for p in candidates if p and len(p) >= 4)


def prepare_target(merged: dict[str, Any], fresh: bool) -> str:
    """Start the embedded server (``database_url_env: null``) or check the named variable."""
    name = merged.get("database_url_env", "DATABASE_URL")
    if name is None:
        server = embedded.start()
        base = server.get_uri("postgres")
        embedded.ensure_database(base, embedded.DEFAULT_DATABASE, fresh=fresh)
        os.environ[embedded.URL_VARIABLE] = base
        return f"embedded PostgreSQL at {embedded.pgdata()}"
    if fresh:
        raise ParameterError("--fresh drops the database: allowed only for the embedded server")
    P.database_url(name)  # raises with the fix when the variable is unset
    return f"the database named by ${name}"


class KernelManager(AsyncKernelManager):
    """A kernel whose own process log (not the notebook's output) goes to a file, so the
    operator's terminal shows the run's outcome rather than ipykernel's start-up warnings."""

    log_file: Any = None

    async def start_kernel(self, **kw: Any) -> None:
        if self.log_file is not None:
            kw.setdefault("stderr", self.log_file)
            kw.setdefault("stdout", self.log_file)
        await super().start_kernel(**kw)


def execute_step(
    record: StepRecord,
    run_dir: Path,
    parameters: dict[str, Any],
    results: Path,
    secrets: tuple[str, ...] = (),
) -> None:
    """Execute one notebook with papermill, render it, and fill ``record``."""
    source = notebooks_dir() / record.notebook
    output = run_dir / record.notebook
    result_file = results / f"{record.name}.json"
    os.environ[RESULT_VARIABLE] = str(result_file)
    declared = declared_parameters(source)
    started = time.perf_counter()
    kernel_log = open(results / f"{record.name}.kernel.log", "wb")  # noqa: SIM115
    km = KernelManager(kernel_name="python3")
    km.log_file = kernel_log
    echo = None
    if sys.stderr.isatty():
        progress = results / f"{record.name}.progress"
        os.environ[PROGRESS_VARIABLE] = str(progress)
        echo = ProgressEcho(record.name, progress)
        echo.start()
    try:
        papermill.execute_notebook(
            str(source),
            str(output),
            parameters={k: v for k, v in parameters.items() if k in declared},
            cwd=os.getcwd(),
            progress_bar=False,
            log_output=False,
            km=km,
        )
        record.status = "passed"
    except PapermillExecutionError as exc:
        record.status = "failed"
        record.reason = f"{exc.ename}: {exc.evalue}"
        record.exit_code = EXIT_ERROR
    finally:
        record.duration_s = time.perf_counter() - started
        os.environ.pop(RESULT_VARIABLE, None)
        os.environ.pop(PROGRESS_VARIABLE, None)
        if echo is not None:
            echo.stop()
        kernel_log.close()
    if result_file.exists():
        data = json.loads(result_file.read_text(encoding="utf-8"))
        record.verdict, record.reason = data["verdict"], data["reason"]
        record.summary = data.get("summary", {})
        if record.status == "failed":
            record.exit_code = data.get("exit_code") or EXIT_ERROR
    if output.exists():
        scrub_notebook(output, secrets)
        html_path = notebook_to_html(output, output.with_suffix(".html"))
        record.outputs = [html_path.name, output.name]


def run(
    env: str,
    steps: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
    reports_dir: str | Path = "reports",
    fresh: bool = False,
) -> RunOutcome:
    """Run the selected steps for ``env``; see the module docstring."""
    steps = list(steps or DEFAULT_STEPS)
    started = datetime.now(UTC)
    merged = resolve_parameters(env, overrides or {}, steps)
    run_id = new_run_id(started)
    merged["run_id"] = run_id
    merged["as_of"] = P.resolve_as_of(merged.get("as_of"), started).isoformat()
    merged["sqlite_path"] = str(Path(merged["sqlite_path"]).resolve())
    merged["operator"] = merged.get("operator") or current_operator()
    run_dir = Path(reports_dir) / Path(env).stem / run_id
    run_dir.mkdir(parents=True, exist_ok=False)
    os.environ[mask.SALT_VARIABLE] = salt = os.urandom(16).hex()
    before = hash_files(Path(merged["sqlite_path"]))
    records = [StepRecord(name, STEPS[name]) for name in steps]
    exit_code = EXIT_OK
    target = None
    try:
        target = prepare_target(merged, fresh)
        with tempfile.TemporaryDirectory(prefix="sessionmig-results-") as results:
            for record in records:
                execute_step(record, run_dir, merged, Path(results), secrets_of(merged))
                if record.status == "failed":
                    exit_code = record.exit_code
                    break
    finally:
        if merged.get("database_url_env", "DATABASE_URL") is None:
            embedded.stop()
            os.environ.pop(embedded.URL_VARIABLE, None)
    after = hash_files(Path(merged["sqlite_path"]))
    if after != before:
        exit_code = EXIT_ERROR
        records.append(
            StepRecord(
                "source check",
                "",
                "failed",
                "ERROR",
                "the backup changed during the run",
                EXIT_ERROR,
            )
        )
    failed = [r for r in records if r.status == "failed"]
    verdict = (
        "FAIL"
        if exit_code == EXIT_FAIL
        else "ERROR"
        if exit_code
        else "PASS_WITH_WARNINGS"
        if any(r.verdict == "PASS_WITH_WARNINGS" for r in records)
        else "PASS"
    )
    data = {
        "run_id": run_id,
        "environment": Path(env).stem,
        "started_at": started.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "verdict": verdict,
        "exit_code": exit_code,
        "target": target,
        "operator": merged["operator"],
        "host": socket.gethostname(),
        "git": manifest.git_state(),
        "python": sys.version.split()[0],
        "packages": manifest.package_versions(),
        "parameters": {k: P.redact(v) if isinstance(v, str) else v for k, v in merged.items()},
        "id_salt_sha256": mask.salt_fingerprint(salt),
        "source": {
            "path": merged["sqlite_path"],
            "sha256_before": before[0].sha256,
            "sha256_after": after[0].sha256,
            "files_before": [vars(h) for h in before],
            "files_after": [vars(h) for h in after],
        },
        "steps": [vars(r) for r in records],
    }
    index = manifest.write_index(run_dir, data)
    manifest.write_manifest(run_dir, data)
    message = (
        f"{verdict}: {failed[0].name}: {failed[0].reason}"
        if failed
        else f"{verdict}: every step passed"
    )
    return RunOutcome(exit_code, run_dir, index, P.redact(message))
