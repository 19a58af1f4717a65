"""Each step's Jupyter kernel: started ahead of its step, warmed, and ended with it.

A kernel costs about a second and a half before its first cell does any work: the interpreter,
ipykernel, then the runbook's own modules (pandas, SQLAlchemy, psycopg …). The run starts the
first step's kernel before anything else (while parameters are read, the target prepared and the
backup hashed) and the next step's while the current one runs, with those modules imported at
start-up (``exec_lines``: no cell, nothing in the notebook), so a step waits for no start-up.
A kernel started ahead is handed its step's environment (where to write its result and its
progress, the run's salt …) when the step takes it, before any cell runs; each kernel is stopped
once its step is over: a finished step leaves no process behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import threading
from concurrent.futures import Future
from contextlib import suppress
from pathlib import Path
from typing import Any

from jupyter_client.manager import AsyncKernelManager

WARM_UP = (
    "from sessionmig.reports import plots, report; from sessionmig.runbook import steps; "
    "from sessionmig.runbook.kernels import environment_before_the_first_cell as _e; _e(); del _e"
)
"""Run as the kernel starts: what every step's notebook imports first, and the hook that gives
the kernel its step's environment."""
ENVIRONMENT_VARIABLE = "SESSIONMIG_KERNEL_ENVIRONMENT"
"""Where a kernel started ahead finds its step's environment (a JSON file, read once)."""


def environment_before_the_first_cell() -> None:
    """In the kernel, at start-up: before the first cell runs, set the variables the file
    named by :data:`ENVIRONMENT_VARIABLE` holds (written when the step took the kernel), then
    delete the file and forget the hook — nothing of it shows in the notebook."""
    from IPython import get_ipython

    shell = get_ipython()
    path = os.environ.get(ENVIRONMENT_VARIABLE)
    if shell is None or not path:
        return

    def before(info: Any) -> None:
        shell.events.unregister("pre_run_cell", before)
        with suppress(FileNotFoundError):
            given = json.loads(Path(path).read_text(encoding="utf-8"))
            Path(path).unlink()
            os.environ.update(given["set"])
            for name in given["unset"]:
                os.environ.pop(name, None)

    shell.events.register("pre_run_cell", before)


class KernelManager(AsyncKernelManager):
    """A kernel whose own process log (not the notebook's output) goes to a file, so the
    operator's terminal shows the run's outcome rather than ipykernel's start-up warnings.
    It remembers the kernel's pid, so an interrupt can reach the running cell."""

    log_file: Any = None
    kernel_pid: int | None = None

    # jupyter_client types start_kernel as its synchronous wrapper; the async manager's, which
    # nbclient awaits, is a coroutine function.
    async def start_kernel(self, **kw: Any) -> None:  # type: ignore[override]
        if self.log_file is not None:
            kw.setdefault("stderr", self.log_file)
            kw.setdefault("stdout", self.log_file)
        await super().start_kernel(**kw)
        self.kernel_pid = getattr(self.provisioner, "pid", None)


def new_kernel(log: Path) -> KernelManager:
    """A kernel manager whose kernel is not started yet (papermill starts it)."""
    km = KernelManager(kernel_name="python3")
    km.log_file = open(log, "ab")  # noqa: SIM115 (closed by end())
    return km


def end(km: KernelManager) -> None:
    """Stop ``km``'s kernel now, if it runs, and close its log."""
    # Through the provisioner's own process object, never a bare pid: a pid reaped behind its
    # back could be another process's by the time anything signals it again.
    process = getattr(km.provisioner, "process", None)
    if process is not None:
        with suppress(ProcessLookupError, ChildProcessError, OSError):
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)
    with suppress(Exception):
        # The connection file and the control socket; async on this manager.
        asyncio.run(km._async_cleanup_resources())
    if km.log_file is not None:
        km.log_file.close()


class Kernels:
    """The run's kernels, each started ahead for a named step (:meth:`start`) and handed to it
    with its environment (:meth:`take`); whatever was started and not taken is stopped on
    :meth:`close`. Kernel logs go to a private folder that goes with it."""

    def __init__(self, cwd: str):
        self.cwd = cwd
        self._logs = tempfile.TemporaryDirectory(prefix="sessionmig-kernels-")
        self.folder = Path(self._logs.name)
        self._started: dict[str, tuple[KernelManager, Future[dict[str, str]]]] = {}

    def start(self, step: str) -> None:
        """Start ``step``'s kernel on a thread of its own, with the environment of now."""
        if step in self._started:
            return
        km = new_kernel(self.folder / f"{step}.kernel.log")
        env = {**os.environ, ENVIRONMENT_VARIABLE: str(self.folder / f"{step}.environment.json")}
        done: Future[dict[str, str]] = Future()

        def launch() -> None:
            try:
                asyncio.run(
                    km.start_kernel(
                        env=env,
                        cwd=self.cwd,
                        extra_arguments=[f"--IPKernelApp.exec_lines={WARM_UP}"],
                    )
                )
                done.set_result(env)
            except BaseException as exc:  # told to take(), which starts afresh
                done.set_exception(exc)

        threading.Thread(target=launch, name=f"sessionmig-kernel-{step}", daemon=True).start()
        self._started[step] = (km, done)

    def take(self, step: str, env: dict[str, str]) -> KernelManager:
        """``step``'s kernel with ``env`` in force from its first cell: the one started ahead,
        told what changed since it started; else one papermill will start (with the process's
        environment)."""
        km, done = self._started.pop(step, (None, None))
        if km is not None and done is not None:
            try:
                spawned = done.result()
                process = getattr(km.provisioner, "process", None)
                alive = process is not None and process.poll() is None
            except Exception:
                alive = False
            if not alive:
                end(km)  # papermill starts one the usual way, and says why if it cannot
            else:
                changes = {
                    "set": {k: v for k, v in env.items() if spawned.get(k) != v},
                    "unset": [k for k in spawned if k not in env and k != ENVIRONMENT_VARIABLE],
                }
                # Private: it may hold the run's salt (the folder is the owner's alone).
                path = Path(spawned[ENVIRONMENT_VARIABLE])
                descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(descriptor, "w", encoding="utf-8") as out:
                    json.dump(changes, out)
                return km
        return new_kernel(self.folder / f"{step}.kernel.log")

    def __enter__(self) -> Kernels:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every kernel started ahead and not taken (a step that never ran)."""
        for km, done in self._started.values():
            with suppress(Exception):
                done.result(timeout=60)
            end(km)
        self._started.clear()
        self._logs.cleanup()
