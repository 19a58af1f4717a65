"""Each step's Jupyter kernel: started ahead of its step, warmed, and ended with it.

A kernel costs about a second and a half before its first cell does any work: the interpreter,
ipykernel, then the runbook's own modules (pandas, SQLAlchemy, psycopg …). The run starts the
kernel of the next step while the current one runs, with those modules imported at start-up
(``exec_lines``: no cell, nothing in the notebook), so a step waits for no start-up. Each
kernel is given its step's environment when it starts (where to write its result and its
progress), and is stopped once its step is over: a finished step leaves no process behind.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import suppress
from pathlib import Path
from typing import Any

from jupyter_client.manager import AsyncKernelManager

WARM_UP = "from sessionmig import plots, report, steps"
"""What every step's notebook imports first; imported as the kernel starts."""


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
    if km.kernel_pid:
        with suppress(ProcessLookupError, ChildProcessError):
            os.kill(km.kernel_pid, 9)
            os.waitpid(km.kernel_pid, 0)
    with suppress(Exception):
        # The connection file and the control socket; async on this manager.
        asyncio.run(km._async_cleanup_resources())
    if km.log_file is not None:
        km.log_file.close()


class Kernels:
    """The run's kernels, each started ahead for a named step (:meth:`start`) and handed to it
    (:meth:`take`); whatever was started and not taken is stopped on :meth:`close`."""

    def __init__(self, folder: Path, cwd: str, environment: Callable[[str], dict[str, str]]):
        self.folder, self.cwd, self.environment = folder, cwd, environment
        self._started: dict[str, tuple[KernelManager, Future[None]]] = {}

    def start(self, step: str) -> None:
        """Start ``step``'s kernel on a thread of its own, with the step's environment."""
        if step in self._started:
            return
        km = new_kernel(self.folder / f"{step}.kernel.log")
        env = self.environment(step)
        done: Future[None] = Future()

        def launch() -> None:
            try:
                asyncio.run(
                    km.start_kernel(
                        env=env,
                        cwd=self.cwd,
                        extra_arguments=[f"--IPKernelApp.exec_lines={WARM_UP}"],
                    )
                )
                done.set_result(None)
            except BaseException as exc:  # told to take(), which starts afresh
                done.set_exception(exc)

        threading.Thread(target=launch, name=f"sessionmig-kernel-{step}", daemon=True).start()
        self._started[step] = (km, done)

    def take(self, step: str) -> KernelManager:
        """``step``'s kernel, started ahead when it was; else one papermill will start."""
        km, done = self._started.pop(step, (None, None))
        if km is not None and done is not None:
            try:
                done.result()
                return km
            except Exception:
                end(km)  # papermill starts one the usual way, and says why if it cannot
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
