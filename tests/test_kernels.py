"""Each step's kernel: started ahead with the runbook imported and the step's own environment,
and gone once its step is over — a run leaves no kernel process behind."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import psutil
import pytest
from conftest import env_file

from sessionmig.reports.report import RESULT_VARIABLE
from sessionmig.runbook import orchestrate
from sessionmig.runbook.kernels import Kernels, end
from sessionmig.runbook.progress import PROGRESS_VARIABLE


def kernels_of_this_process() -> list[psutil.Process]:
    return [
        p
        for p in psutil.Process().children(recursive=True)
        if "ipykernel_launcher" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE
    ]


def ask(km, code: str) -> str:
    """The text ``code`` prints in ``km``'s kernel."""

    async def run() -> str:
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=60)
        printed: list[str] = []
        await kc.execute_interactive(
            code,
            timeout=60,
            output_hook=lambda m: printed.append(m["content"].get("text", "")),
        )
        kc.stop_channels()
        return "".join(printed)

    return asyncio.run(run())


def test_a_kernel_started_ahead_has_the_runbook_imported_and_its_step_s_environment(
    tmp_path: Path,
) -> None:
    """Started before the step's variables exist; taken with them (one set, one removed)."""
    with Kernels(str(tmp_path)) as kernels:
        kernels.start("inspect")
        env = {**os.environ, RESULT_VARIABLE: "inspect", PROGRESS_VARIABLE: "p"}
        env.pop("HOME", None)
        km = kernels.take("inspect", env)
        try:
            printed = ask(
                km,
                "import os, sys; print('sessionmig.runbook.steps' in sys.modules, "
                f"os.environ[{RESULT_VARIABLE!r}], 'HOME' in os.environ, os.getcwd())",
            )
        finally:
            end(km)
    assert printed.split() == ["True", "inspect", "False", str(tmp_path)]
    assert not kernels_of_this_process()


def test_a_kernel_started_for_a_step_that_never_runs_is_stopped(tmp_path: Path) -> None:
    with Kernels(str(tmp_path)) as kernels:
        kernels.start("reconcile")
        deadline = time.monotonic() + 60
        while not kernels_of_this_process() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(kernels_of_this_process()) == 1
    assert kernels_of_this_process() == []


@pytest.mark.slow
def test_a_run_leaves_no_kernel_behind(
    clean_backup: Path, tmp_path: Path, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SMTEST_DSN", dsn)
    env = env_file(tmp_path, clean_backup)
    outcome = orchestrate.run(str(env), ["preflight", "inspect", "migrate"], {}, tmp_path / "r")
    assert outcome.exit_code == 0, outcome.message
    assert [s.verdict for s in outcome.steps] == ["GO", "PASS", "PASS"]
    assert kernels_of_this_process() == []
