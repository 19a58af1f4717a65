"""Run the runbook's steps in order with papermill and leave an auditable run directory.

``run()`` reads as the procedure: resolve parameters (the environment file and ``-p``, by the one
rule of :func:`sessionmig.runbook.params.resolve`), prepare the target, execute each step,
render it, then seal the manifest and index. The notebooks come from
:func:`sessionmig.runbook.project.locate` (the checkout, the installed package or
``--project-dir``); reports go under the current directory unless ``reports_dir`` says
otherwise.

Whatever happens after the run folder exists — a step fails, the operator presses Ctrl-C, the
process gets SIGTERM — the folder is sealed with what happened. What a step committed is taken
from the target's own audit row, never assumed. The folder is ``0750``, its files ``0640``.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import papermill
from papermill.exceptions import PapermillExecutionError

from sessionmig import defaults as D
from sessionmig.errors import EXIT_ERROR, EXIT_FAIL, EXIT_OK, ParameterError, SessionmigError
from sessionmig.postgres import embedded
from sessionmig.reports.cover import of_step, run_headline, when
from sessionmig.reports.render import Answer, notebook_to_html, scrub_notebook, warm
from sessionmig.reports.report import RESULT_VARIABLE
from sessionmig.rules import mask
from sessionmig.rules.verdict import FAILED, Verdict, partition, worst
from sessionmig.runbook import manifest
from sessionmig.runbook import params as P
from sessionmig.runbook.kernels import KernelManager, Kernels, end, new_kernel
from sessionmig.runbook.progress import PROGRESS_VARIABLE, ProgressEcho, plain
from sessionmig.runbook.project import ENVIRONMENTS, PROJECT_DIR_VARIABLE, locate
from sessionmig.runbook.settings import complete, new_run_id
from sessionmig.sqlite.source import hash_files

# The notebook of each step (P.STEPS, in that order; a test holds them equal).
STEPS: dict[str, str] = {
    "preflight": "00_preflight.ipynb",
    "inspect": "01_inspect.ipynb",
    "migrate": "02_migrate.ipynb",
    "reconcile": "03_reconcile.ipynb",
    "catchup": "07_catchup.ipynb",
    "analysis": "04_session_analysis.ipynb",
    "rollback": "05_rollback.ipynb",
    "finalize": "06_finalize.ipynb",
}
DEFAULT_STEPS = P.DEFAULT_STEPS
# Steps that never connect to the target: a run of only these has no target to describe.
SOURCE_ONLY_STEPS = frozenset({"inspect"})
# How long an interrupted step may take to stop before its kernel is killed.
KILL_AFTER_S = 30.0
# The run's verdict when the operator stopped it (a run's, never a step's).
INTERRUPTED = Verdict.INTERRUPTED


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
    interrupted: bool = False
    died: bool = False  # its kernel died (killed, out of memory, crashed) before it concluded


@dataclass(frozen=True)
class RunOutcome:
    exit_code: int
    run_dir: Path
    index: Path
    message: str
    steps: tuple[StepRecord, ...] = ()
    source_sha256: str | None = None
    verdict: str | None = None  # the run's, as the manifest records it
    verify: str = ""  # the command that re-checks the folder, as the cover prints it


def resolve_parameters(
    env: str, overrides: dict[str, Any], steps: list[str], project_dir: str | Path | None = None
) -> dict[str, Any]:
    """Environment file + ``-p`` by the one merge rule, every value the steps need checked."""
    merged = P.resolve(env, overrides, steps, project_dir=project_dir)
    P.validate(merged, steps)
    return merged


def secrets_of(merged: dict[str, Any]) -> tuple[str, ...]:
    """The target's password as libpq reads it (in the DSN, or libpq's PGPASSWORD), to scrub
    from reports even where no pattern would find it. The redaction path also derives the
    pieces of a malformed DSN itself (:func:`mask.dsn_secrets`)."""
    name = merged.get("database_url_env")
    value = os.environ.get(name, "") if name else ""
    found = list(mask.dsn_secrets(value).passwords) if value else []
    if value:
        mask.register_dsn(value)
    found.append(os.environ.get("PGPASSWORD", ""))
    unique = dict.fromkeys(p for p in found if p and len(p) >= mask.MIN_SECRET)
    # libpq's reading first: it is the value actually sent, and the one tests pin.
    return tuple(unique)


def _target_name(merged: dict[str, Any]) -> str | None:
    return merged.get("database_url_env", D.DATABASE_URL_ENV)


def prepare_target(merged: dict[str, Any], fresh: bool) -> str:
    """Start the embedded server (``database_url_env: null``) or check the named variable."""
    name = _target_name(merged)
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


def _signal_kernel(km: KernelManager, signum: int) -> None:
    if km.kernel_pid:
        with suppress(ProcessLookupError):  # it ended on its own meanwhile
            os.kill(km.kernel_pid, signum)


def _execute(km: KernelManager, record: StepRecord, **papermill_args: Any) -> BaseException | None:
    """Run papermill on a worker thread and turn Ctrl-C into an interrupt of the running cell.

    On the main thread nbclient would take SIGINT for itself and let the cell run on; here the
    main thread keeps it: the first Ctrl-C interrupts the cell (a load then rolls back, unless
    it already committed), the second kills the kernel, the third stops waiting for it.
    Returns what papermill raised, if anything."""
    outcome: dict[str, BaseException] = {}
    done = threading.Event()

    def work() -> None:
        try:
            papermill.execute_notebook(km=km, **papermill_args)
        except BaseException as exc:  # handed to the main thread
            outcome["error"] = exc
        finally:
            done.set()

    worker = threading.Thread(target=work, name=f"sessionmig-{record.name}", daemon=True)
    worker.start()
    presses = 0
    interrupted_at = 0.0
    # Polled with sleep, not Thread.join: a KeyboardInterrupt inside join() can leave the
    # thread marked as stopped while it still runs (CPython's bpo-45274 handling).
    while not done.is_set():
        try:
            time.sleep(0.1)
        except KeyboardInterrupt:
            presses += 1
            record.interrupted = True
            if presses == 1:
                interrupted_at = time.monotonic()
                print(
                    f"\nsessionmig run: interrupting {record.name}; the run folder will be "
                    "sealed with what happened (Ctrl-C again stops the step at once)",
                    file=sys.stderr,
                )
                _signal_kernel(km, signal.SIGINT)
            elif presses == 2:
                _signal_kernel(km, signal.SIGKILL)
            else:
                break
        if presses == 1 and time.monotonic() - interrupted_at > KILL_AFTER_S:
            # An interrupt that lands in the kernel's own machinery (writing an output, say)
            # can leave it waiting forever; the database already rolled back or committed.
            print(
                f"sessionmig run: {record.name} did not stop within {KILL_AFTER_S:.0f} s of "
                "the interrupt; stopping its kernel",
                file=sys.stderr,
            )
            presses = 2
            _signal_kernel(km, signal.SIGKILL)
    return outcome.get("error")


KEY_FIGURES = {
    "source_rows": "source rows",
    "rows_read": "rows read",
    "migrated": "migrated",
    "matched": "matched",
    "inserted": "inserted",
    "unchanged": "unchanged",
    "rejected": "rejected",
}
"""The figures a step's one-line summary shows, when its result has them."""


def announce(line: str, verb: str = "run") -> None:
    """One plain line on stderr for the operator (no colour, no escape codes), named after the
    command the operator typed (``run``, or ``migrate``/``reconcile``, which run one step)."""
    print(f"sessionmig {verb}: {line}", file=sys.stderr, flush=True)


def step_line(record: StepRecord) -> str:
    """What one step concluded, with its key figures and time, on one line."""
    figures = ", ".join(
        f"{label} {record.summary[key]:,}"
        for key, label in KEY_FIGURES.items()
        if isinstance(record.summary.get(key), int)
    )
    counts = [record.summary.get(k) for k in ("source_rows", "migrated", "rejected")]
    whole = [v for v in counts if isinstance(v, int) and not isinstance(v, bool)]
    if len(whole) == 3:
        holds = record.summary.get("partition_holds")
        figure, note, _ = partition(
            whole[0], whole[1], whole[2], holds if isinstance(holds, bool) else None
        )
        figures += f"; partition {figure}: {note}"
    verdict = of_step(record.verdict, record.status)
    tail = f" ({figures})" if figures else ""
    return f"{record.name}: {verdict} in {record.duration_s:.1f} s{tail}"


def step_environment(results: Path, step: str) -> dict[str, str]:
    """The environment a step's kernel runs with: the run's, and where that step writes its
    result and its progress."""
    return {
        **os.environ,
        RESULT_VARIABLE: str(results / f"{step}.json"),
        PROGRESS_VARIABLE: str(results / f"{step}.progress"),
    }


def execute_step(
    record: StepRecord,
    run_dir: Path,
    parameters: dict[str, Any],
    results: Path,
    secrets: tuple[str, ...] = (),
    notebooks: Path | None = None,
    kernels: Kernels | None = None,
) -> None:
    """Execute one notebook with papermill, render it, and fill ``record``.

    papermill writes the executed notebook to the private ``results`` folder; only its
    scrubbed copy enters the run folder, so a run killed mid-step never leaves a secret there.
    The notebook gets the parameters its step declares (``params.PARAMETERS``).
    """
    source = (notebooks or locate().notebooks) / record.notebook
    raw = results / record.notebook
    output = run_dir / record.notebook
    result_file = results / f"{record.name}.json"
    os.environ[RESULT_VARIABLE] = str(result_file)
    declared = {p.name for p in P.of_steps([record.name])}
    started = time.perf_counter()
    # Started ahead (warm) when the run could; else papermill starts it with os.environ.
    km = (
        kernels.take(record.name, step_environment(results, record.name))
        if kernels
        else new_kernel(results / f"{record.name}.kernel.log")
    )
    # The kernel appends its progress bars to this file; the echo shows them on stderr: a
    # redrawn line on a terminal, occasional plain lines in a log or under NO_COLOR.
    progress = results / f"{record.name}.progress"
    os.environ[PROGRESS_VARIABLE] = str(progress)
    echo = ProgressEcho(record.name, progress, plain=plain(sys.stderr))
    echo.start()
    try:
        error = _execute(
            km,
            record,
            input_path=str(source),
            output_path=str(raw),
            parameters={k: v for k, v in parameters.items() if k in declared},
            cwd=os.getcwd(),
            progress_bar=False,
            log_output=False,
        )
        cut = record.interrupted or (
            isinstance(error, PapermillExecutionError) and error.ename == "KeyboardInterrupt"
        )
        if error is None:
            record.status = "passed"  # a Ctrl-C between its last cells let it finish
        elif cut:
            record.status, record.interrupted = "interrupted", True
            record.reason = "interrupted by the operator"
            record.exit_code = EXIT_ERROR
        elif isinstance(error, PapermillExecutionError):
            record.status = "failed"
            record.reason = f"{error.ename}: {error.evalue}"
            record.exit_code = EXIT_ERROR
        elif _kernel_died(error):
            record.status, record.died = "failed", True
            record.reason = (
                f"its kernel (the Python process running the notebook) died before {record.name} "
                f"concluded ({type(error).__name__}: {error}); {writes(record.name, parameters)}"
            )
            record.exit_code = EXIT_ERROR
        else:
            record.status = "failed"
            record.reason = f"{type(error).__name__}: {error}"
            record.exit_code = EXIT_ERROR
    finally:
        record.duration_s = time.perf_counter() - started
        os.environ.pop(RESULT_VARIABLE, None)
        os.environ.pop(PROGRESS_VARIABLE, None)
        echo.stop()
        end(km)
    if result_file.exists():
        data = json.loads(result_file.read_text(encoding="utf-8"))
        record.verdict, record.reason = data["verdict"], data["reason"]
        record.summary = data.get("summary", {})
        if record.status == "failed":
            record.exit_code = data.get("exit_code") or EXIT_ERROR
        if record.status == "interrupted":
            record.reason = f"interrupted after it concluded {record.verdict}: {record.reason}"
    if raw.exists():
        # A Ctrl-C now waits until both files are whole: a half-written report is no evidence.
        with _deferred_interrupt(record):
            scrub_notebook(raw, secrets, dest=output)
            died = died_answer(record, parameters, None) if record.died else None
            html_path = notebook_to_html(output, output.with_suffix(".html"), stopped=died)
            record.outputs = [html_path.name, output.name]
    record.reason = P.redact(record.reason) if record.reason else record.reason


def _kernel_died(error: BaseException | None) -> bool:
    from nbclient.exceptions import DeadKernelError

    return isinstance(error, DeadKernelError)


def writes(step: str, parameters: dict[str, Any]) -> str:
    """What ``step`` writes, with these parameters: whether a dead step may have touched the
    live SQLite file, the target, or nothing."""
    live = parameters.get("live_sqlite_path") or ""
    if step == "rollback" and live:
        return f"rollback during the overlap writes the live SQLite file {live}"
    if step == "rollback":
        where = parameters.get("restore_path") or "restore_path"
        return (
            f"rollback writes the restored file {where} (the file the app reads after the "
            "switch back), not the live file the app serves from now"
        )
    if step == "finalize":
        return (
            f"finalize moves the live SQLite file {live or 'live_sqlite_path'} into "
            f"{parameters.get('archive_dir') or 'archive_dir'}"
        )
    if step == "catchup":
        return (
            f"catchup reads the live SQLite file {live or 'live_sqlite_path'} (never writes it) "
            "and writes the target"
        )
    if step == "migrate":
        return "migrate writes the target only; it never writes a SQLite file"
    return f"{step} writes no SQLite file and no session in the target"


def _audit_words(step: str, facts: TargetFacts | None) -> str:
    """What the target's audit rows for this run say of ``step`` (or that it is unknown)."""
    if facts is None:
        return "the target's audit rows are read when the run folder is sealed: see index.html"
    if facts.audit is None:
        problem = facts.problem or "the target could not be asked"
        return f"whether it recorded anything is unknown: {problem}"
    rows = [r for r in facts.audit if r.get("step") == step]
    if not rows:
        return (
            f"the target has no audit row of {step} for this run: it did not record its work; "
            "what it may have done before recording is found and finished, or redone, by "
            "running the same command again"
        )
    row = rows[-1]
    counts = ", ".join(
        f"{row.get(k)} {k.replace('rows_', '')}"
        for k in ("rows_read", "inserted", "updated", "rejected")
    )
    return (
        f"the target's audit row records {step} for this run as finished at "
        f"{when(row.get('finished_at'))} ({counts}): its work was committed"
    )


def died_answer(
    record: StepRecord, parameters: dict[str, Any], facts: TargetFacts | None
) -> Answer:
    """The answer of a step whose kernel died: which step, what it writes, what the target's
    audit row says (``facts``: None before the target was asked)."""
    known = f"{writes(record.name, parameters)}; {_audit_words(record.name, facts)}."
    return Answer(
        step=record.name,
        verdict=Verdict.ERROR,
        reason=(
            f"{record.name} did not conclude: its kernel (the Python process running the "
            "notebook) died — killed, out of memory, or crashed"
        ),
        todo=f"What is known: {known} Do not go on before that is settled.",
    )


@contextmanager
def _deferred_interrupt(record: StepRecord) -> Iterator[None]:
    """Ctrl-C or SIGTERM inside the block marks ``record`` interrupted once it has finished."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def later(signum: int, frame: Any) -> None:
        record.interrupted = True

    previous = {s: signal.signal(s, later) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (a stopped CI job, a closed session) is handled as Ctrl-C: sealed, not lost."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _sealing() -> Iterator[None]:
    """While the folder is sealed, further Ctrl-C and SIGTERM wait: sealing is the point."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def later(signum: int, frame: Any) -> None:
        print("sessionmig run: sealing the run folder first; a moment", file=sys.stderr)

    previous = {s: signal.signal(s, later) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def make_run_dir(reports_dir: str | Path, env: str, run_id: str) -> Path:
    """``REPORTS/ENV/RUN_ID``, each folder it creates ``0750``; a folder that cannot be
    written is a parameter problem (exit 2), named in one line.

    Modes are set on what the run writes, not through the process umask: the steps' own files
    (a restored sessions.db, an archive) keep the modes their readers need."""
    run_dir = Path(reports_dir) / Path(env).stem / run_id
    try:
        missing = [p for p in (*reversed(run_dir.parents), run_dir) if not p.exists()]
        for folder in missing:
            folder.mkdir(mode=manifest.DIR_MODE)
            folder.chmod(manifest.DIR_MODE)
        if run_dir not in missing:
            raise FileExistsError(errno.EEXIST, "a run folder of that id exists", str(run_dir))
        probe = run_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ParameterError(
            f"--reports-dir {reports_dir}: cannot write the run folder {run_dir} "
            f"({exc.strerror or exc}); give a folder you can write to, e.g. "
            "--reports-dir ~/sessionmig-reports"
        ) from None
    return run_dir


@dataclass
class TargetFacts:
    """What the target says at the end of a run (all None when it could not be asked)."""

    identity: dict[str, Any] | None = None
    audit: list[dict[str, Any]] | None = None
    settled: bool = True
    digest_ready: bool = False
    problem: str | None = None
    conn: Any = None


def _ask_target(merged: dict[str, Any], steps: list[str], interrupted: bool) -> TargetFacts:
    """Connect to the run's target and read who it is, this run's audit rows, and whether the
    manifest's digest can be recorded there. The connection stays open for the record."""
    if set(steps) <= SOURCE_ONLY_STEPS:
        return TargetFacts(problem="the run's steps do not use a target")
    import psycopg

    from sessionmig.postgres.connect import connect

    try:
        dsn = P.database_url(_target_name(merged))
        # Autocommit: pg_stat_activity is read afresh by each statement only outside a
        # transaction (settle polls it); the digest is then written in a transaction of its own.
        conn = connect(dsn, "seal", autocommit=True, statement_timeout_ms=30_000)
    except (psycopg.Error, SessionmigError) as exc:
        return TargetFacts(problem=f"the target could not be reached: {mask.redact(str(exc))}")
    schema = str(merged.get("target_schema") or D.TARGET_SCHEMA)
    try:
        settled = manifest.settle(conn) if interrupted else True
        facts = TargetFacts(
            identity=manifest.target_identity(conn),
            audit=manifest.audit_rows(conn, schema, merged["run_id"]),
            settled=settled,
            digest_ready=manifest.digest_table_ready(conn, schema),
            conn=conn,
        )
        return facts
    except psycopg.Error as exc:
        conn.close()
        return TargetFacts(problem=f"the target could not be asked: {mask.redact(str(exc))}")


def _account_for_interrupt(
    records: list[StepRecord], facts: TargetFacts, run_id: str
) -> dict[str, Any]:
    """Set each interrupted step's status from the target's audit rows; say what happened."""
    step = next((r for r in records if r.interrupted), None)
    committed = [
        row for row in facts.audit or [] if row.get("step") == "migrate" and not row.get("dry_run")
    ]
    migrate = next((r for r in records if r.name == "migrate"), None)
    if facts.audit is None:
        happened = (
            "whether anything was committed is unknown: "
            f"{facts.problem or 'the target could not be asked'}; look for run "
            f"{run_id} in session_migration_runs before running again"
        )
    elif committed:
        row = committed[0]
        happened = (
            f"migrate had committed: the target's audit row for this run records "
            f"{row['rows_read']} read, {row['inserted']} inserted, {row['unchanged']} "
            f"unchanged, {row['updated']} updated, {row['rejected']} rejected "
            f"(finished {when(row['finished_at'])})"
        )
        if migrate is not None and migrate.status in ("interrupted", "skipped", "failed"):
            # The commit is the step's work; its report was cut short, not its effect.
            migrate.status = "passed"
            migrate.verdict = Verdict.PASS_WITH_WARNINGS if row["rejected"] else Verdict.PASS
            migrate.reason = (
                f"committed, then interrupted before its report was complete: {happened}"
            )
            migrate.exit_code = EXIT_OK
            migrate.summary = {**migrate.summary, **{k: v for k, v in row.items()}}
    elif others := [row for row in facts.audit or [] if not row.get("dry_run")]:
        committed = others
        happened = "; ".join(_what_a_row_says(row) for row in others)
    else:
        happened = "nothing of this run was committed: the target has no audit row for it" + (
            "" if facts.settled else " (its connections were still closing)"
        )
        if step is not None and step.name in ("finalize", "rollback"):
            happened += (
                f"; {step.name} may have moved or written a file before its record: the same "
                "command finishes it exactly once"
            )
    return {
        "step": step.name if step else None,
        "committed": None if facts.audit is None else bool(committed),
        "what_happened": happened,
        "audit_rows": facts.audit,
    }


def _what_a_row_says(row: dict[str, Any]) -> str:
    """One audit row of this run, in words (for a run interrupted after a step committed)."""
    step, finished = row.get("step"), when(row.get("finished_at"))
    if step == "catchup":
        return f"catch-up pass {row.get('catchup_pass')} had committed (finished {finished})"
    if step == "catchup_part":
        return (
            f"a part of catch-up pass {row.get('catchup_pass')} had committed (finished "
            f"{finished}; the pass is carried in part: the same command finishes it)"
        )
    if step == "rollback" and row.get("state") == "intent":
        return (
            "the rollback during the overlap had recorded its intent (catch-up is refused from "
            "then on); whether it wrote the live file is in the file's marker: run the same "
            "command again, it completes the rollback exactly once"
        )
    if step == "rollback":
        return f"the rollback had committed and recorded it (finished {finished})"
    if step == "finalize":
        return f"finalize had moved the live file and recorded it (finished {finished})"
    return f"{step} had committed (finished {finished})"


def _record_digest(
    facts: TargetFacts, merged: dict[str, Any], run_dir: Path, env: str, verdict: str
) -> str | None:
    """Record the sealed manifest's digest in the target; a problem's text, or None."""
    if facts.conn is None:
        return None
    digest = manifest.digest_of(run_dir)
    schema = str(merged.get("target_schema") or D.TARGET_SCHEMA)
    try:
        if not facts.digest_ready:
            return None  # the manifest says why
        with facts.conn.transaction():
            manifest.record_digest(
                facts.conn, schema, merged["run_id"], str(digest), Path(env).stem, verdict
            )
        return None
    except Exception as exc:
        return f"the manifest's digest could not be recorded in the target: {mask.redact(str(exc))}"
    finally:
        facts.conn.close()


def _record_status(facts: TargetFacts, merged: dict[str, Any]) -> dict[str, Any]:
    schema = str(merged.get("target_schema") or D.TARGET_SCHEMA)
    table = f"{schema}.{manifest.DIGEST_TABLE}"
    if facts.conn is not None and facts.digest_ready:
        status = f"recorded in {table} when this manifest was sealed"
    elif facts.conn is not None:
        status = (
            f"not recorded: the target has no {table} (no migrate has brought it to revision "
            "0003); only this folder's self-consistency can be verified"
        )
    else:
        status = f"not recorded: {facts.problem}"
    return {
        "table": table,
        "status": status,
        "recorded": facts.conn is not None and facts.digest_ready,
    }


def run(
    env: str,
    steps: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
    reports_dir: str | Path = "reports",
    fresh: bool = False,
    project_dir: str | Path | None = None,
    verb: str = "run",
    kernels: Kernels | None = None,
) -> RunOutcome:
    """Run the selected steps for ``env``; see the module docstring. ``verb`` names the
    command in what the terminal is told (``sessionmig migrate`` runs this with one step).
    ``kernels``: the caller's, when it started the first step's kernel even earlier."""
    steps = list(steps or DEFAULT_STEPS)
    with nullcontext(kernels) if kernels else Kernels(os.getcwd()) as running:
        running.start(steps[0])  # it starts while the parameters are read and the target prepared
        return _run(env, steps, overrides or {}, reports_dir, fresh, project_dir, verb, running)


def _run(
    env: str,
    steps: list[str],
    overrides: dict[str, Any],
    reports_dir: str | Path,
    fresh: bool,
    project_dir: str | Path | None,
    verb: str,
    kernels: Kernels,
) -> RunOutcome:
    started = datetime.now(UTC)
    merged = resolve_parameters(env, overrides, steps, project_dir)
    notebooks = locate(project_dir).notebooks
    # One id, one "now", one operator for every step of the run; a run's id is always new.
    merged = complete({**merged, "run_id": new_run_id(started)}, started)
    merged["run_steps"] = steps  # preflight checks what these steps need, and only that
    secrets = secrets_of(merged)
    with _terminate_as_interrupt():
        run_dir = make_run_dir(reports_dir, env, merged["run_id"])
        os.environ[mask.SALT_VARIABLE] = salt = os.urandom(16).hex()
        records = [StepRecord(name, STEPS[name]) for name in steps]
        exit_code = EXIT_OK
        target = None
        interrupted = False
        before: tuple = ()
        try:
            try:
                with tempfile.TemporaryDirectory(prefix="sessionmig-results-") as folder:
                    results = Path(folder)
                    warm()  # the HTML exporter, ready for the first page
                    try:
                        target = prepare_target(merged, fresh)
                    finally:
                        before = hash_files(Path(merged["sqlite_path"]))
                    for i, record in enumerate(records):
                        if i + 1 < len(records):
                            kernels.start(records[i + 1].name)  # warming while this step runs
                        announce(f"{record.name}: running {record.notebook}", verb)
                        execute_step(record, run_dir, merged, results, secrets, notebooks, kernels)
                        announce(step_line(record), verb)
                        if record.interrupted:
                            interrupted = True
                            break
                        if record.status == "failed":
                            exit_code = record.exit_code
                            break
            except KeyboardInterrupt:
                interrupted = True
            except Exception as exc:  # sealed with what stopped it, then reported in one line
                code = getattr(exc, "exit_code", EXIT_ERROR)
                reason = (
                    str(exc) if isinstance(exc, SessionmigError) else f"{type(exc).__name__}: {exc}"
                )
                records.append(
                    StepRecord("run", "", "failed", Verdict.ERROR, P.redact(reason), code)
                )
                exit_code = code
            with _sealing():
                return _seal(
                    env,
                    steps,
                    merged,
                    run_dir,
                    records,
                    started,
                    before,
                    target,
                    salt,
                    interrupted,
                    exit_code,
                    {"verify": verify_command(env, run_dir, overrides or {}, project_dir)},
                )
        finally:
            if _target_name(merged) is None:
                embedded.stop()
                os.environ.pop(embedded.URL_VARIABLE, None)


def run_verdict(exit_code: int, verdicts: list[Verdict]) -> Verdict:
    """The run's verdict: the worst step's, whatever it is (NO-GO stays NO-GO, ERROR stays
    ERROR); the exit code's own (FAIL, ERROR) only when no step's verdict explains it."""
    steps = worst([Verdict.PASS, *verdicts]) if verdicts else Verdict.PASS
    if exit_code == EXIT_OK or steps in FAILED:
        return steps
    return {EXIT_FAIL: Verdict.FAIL}.get(exit_code, Verdict.ERROR)


def verify_command(
    env: str, run_dir: Path, overrides: dict[str, Any], project_dir: str | Path | None = None
) -> str:
    """``sessionmig verify`` of this run folder, as it runs when pasted anywhere: the folder's
    absolute path; ``--env`` as given when it names an environment (with the ``--project-dir``
    it was found in, unless that is this installation's own), the file's absolute path when it
    is one; and any ``-p`` that moved the target (``database_url_env``, ``target_schema``)."""
    args = ["sessionmig", "verify", str(Path(run_dir).resolve())]
    candidate = Path(env).expanduser()
    if candidate.suffix in (".yaml", ".yml") or os.sep in env or candidate.is_file():
        args += ["--env", str(candidate.resolve())]
    else:
        args += ["--env", env]
        found = locate(project_dir)
        if found.origin in ("--project-dir", f"${PROJECT_DIR_VARIABLE}"):
            root = found.environments
            for _ in ENVIRONMENTS.parts:
                root = root.parent
            args += ["--project-dir", str(root)]
    for name in ("database_url_env", "target_schema"):
        if name in overrides:
            value = overrides[name]
            args += ["-p", f"{name}={'null' if value is None else value}"]
    return shlex.join(args)


def _seal(
    env: str,
    steps: list[str],
    merged: dict[str, Any],
    run_dir: Path,
    records: list[StepRecord],
    started: datetime,
    before: tuple,
    target: str | None,
    salt: str,
    interrupted: bool,
    exit_code: int,
    commands: dict[str, str] | None = None,
) -> RunOutcome:
    """Write index.html and manifest.json for what happened, and record the digest."""
    after = hash_files(Path(merged["sqlite_path"]))
    if before and after != before:
        exit_code = EXIT_ERROR
        records.append(
            StepRecord(
                "source check",
                "",
                "failed",
                Verdict.ERROR,
                "the backup changed during the run",
                EXIT_ERROR,
            )
        )
    facts = (
        _ask_target(merged, steps, interrupted)
        if target is not None
        else TargetFacts(problem="the target was not prepared")
    )
    interruption = _account_for_interrupt(records, facts, merged["run_id"]) if interrupted else None
    stopped = None
    for record in records:
        if record.died:
            # Its report said what was known before the target was asked; now say the rest.
            answer = died_answer(record, merged, facts)
            page = run_dir / Path(record.notebook).with_suffix(".html")
            if (run_dir / record.notebook).exists():
                notebook_to_html(run_dir / record.notebook, page, stopped=answer)
            stopped = {"step": record.name, "what_is_known": answer.todo}
    verdict: str
    if interrupted:
        exit_code = EXIT_ERROR
        verdict = INTERRUPTED
    else:
        verdict = run_verdict(exit_code, [of_step(r.verdict, r.status) for r in records])
    data: dict[str, Any] = {
        "run_id": merged["run_id"],
        "environment": Path(env).stem,
        "started_at": started.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "verdict": verdict,
        "exit_code": exit_code,
        "target": target,
        "target_database": facts.identity,
        "operator": merged["operator"],
        "host": socket.gethostname(),
        "git": manifest.git_state(),
        "python": sys.version.split()[0],
        "packages": manifest.package_versions(),
        "parameters": dict(merged.items()),
        "id_salt_sha256": mask.salt_fingerprint(salt),
        "source": {
            "path": merged["sqlite_path"],
            "sha256_before": before[0].sha256 if before else None,
            "sha256_after": after[0].sha256,
            "files_before": [vars(h) for h in before],
            "files_after": [vars(h) for h in after],
        },
        "steps": [vars(r) for r in records],
        "manifest_record": _record_status(facts, merged),
    }
    if interruption is not None:
        data["interrupted"] = interruption
    if stopped is not None:
        data["stopped"] = stopped
    if commands:
        data["commands"] = commands
    index = manifest.write_index(run_dir, data)
    manifest.write_manifest(run_dir, data)
    problem = _record_digest(facts, merged, run_dir, env, verdict)
    if interruption is not None:
        where = f" during {interruption['step']}" if interruption["step"] else ""
        message = f"{INTERRUPTED}{where}: {interruption['what_happened']}"
    else:  # the cover's headline (the verdict already says there are warnings to read)
        shown, sentence = run_headline(data)
        message = f"{shown}: {sentence if shown in FAILED else sentence.split('; warnings')[0]}"
    if problem:
        exit_code = exit_code or EXIT_ERROR
        message += f"; {problem}"
    return RunOutcome(
        exit_code,
        run_dir,
        index,
        P.redact(message),
        tuple(records),
        before[0].sha256 if before else after[0].sha256,
        verdict,
        (commands or {}).get("verify", ""),
    )
