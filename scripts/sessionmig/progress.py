"""Progress of long loads — rows, rows/s, time left — where the operator is looking.

The engines draw a tqdm bar on stderr: the terminal under ``sessionmig migrate|reconcile``, the
notebook under papermill. A notebook's stderr never reaches the terminal of ``sessionmig run``,
so there the kernel also appends the bar to a file named by ``SESSIONMIG_PROGRESS_FILE`` and the
orchestrator echoes that file's latest line (:class:`ProgressEcho`).
"""

from __future__ import annotations

import io
import os
import re
import sys
import threading
from pathlib import Path
from typing import Any

from tqdm import tqdm

PROGRESS_VARIABLE = "SESSIONMIG_PROGRESS_FILE"


class _Tee(io.TextIOBase):
    """A text stream that writes to several."""

    def __init__(self, *streams: Any) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


class _ProgressBar(tqdm):
    """tqdm that closes the extra progress file it was given."""

    extra: Any = None

    def close(self) -> None:
        super().close()
        if self.extra is not None:
            self.extra.close()
            self.extra = None


def progress_bar(total: int, enabled: bool) -> tqdm:
    """A bar of rows on stderr, also appended to ``SESSIONMIG_PROGRESS_FILE`` when it is set."""
    path = os.environ.get(PROGRESS_VARIABLE)
    extra = open(path, "a", encoding="utf-8") if path and enabled else None  # noqa: SIM115
    stream = _Tee(sys.stderr, extra) if extra else sys.stderr
    bar = _ProgressBar(
        total=total, unit="rows", unit_scale=True, mininterval=2, disable=not enabled, file=stream
    )
    bar.extra = extra
    return bar


def last_progress(text: str) -> str | None:
    """The latest progress line in what tqdm wrote (it redraws with carriage returns)."""
    lines = [line.strip() for line in re.split(r"[\r\n]", text) if line.strip()]
    return lines[-1] if lines else None


class ProgressEcho(threading.Thread):
    """Echo a step's progress file to the terminal while its notebook runs."""

    def __init__(self, name: str, path: Path, out: Any = None, every: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.label, self.path, self.out, self.every = name, path, out or sys.stderr, every
        self.done = threading.Event()
        self.shown: str | None = None

    def run(self) -> None:
        while not self.done.wait(self.every):
            self.show()
        self.show()
        if self.shown:
            self.out.write("\n")
            self.out.flush()

    def show(self) -> None:
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return
        line = last_progress(text)
        if line and line != self.shown:
            self.out.write(f"\r  {self.label}: {line}")
            self.out.flush()
            self.shown = line

    def stop(self) -> None:
        self.done.set()
        self.join()
