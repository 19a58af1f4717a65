"""Progress of long steps — rows, rows/s, time left, and the phase — where the operator looks.

The engines draw a tqdm bar on stderr: the notebook's under papermill. A notebook's stderr never
reaches the terminal of ``sessionmig run``, so the kernel also appends the bar to a file named by
``SESSIONMIG_PROGRESS_FILE`` and the orchestrator echoes that file's latest line
(:class:`ProgressEcho`). A phase that moves no rows (rebuilding indexes, committing) is the bar's
description, so it reaches the terminal the same way.

On a terminal the echo redraws one line; when stderr is not a terminal, or ``NO_COLOR`` is set
(https://no-color.org), it writes occasional plain lines instead: no carriage returns, no escape
codes, so a CI log or a ticket reads cleanly.
"""

from __future__ import annotations

import io
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

PROGRESS_VARIABLE = "SESSIONMIG_PROGRESS_FILE"
NO_COLOR_VARIABLE = "NO_COLOR"
# How often plain output repeats a phase's progress (a new phase is always shown at once).
PLAIN_EVERY_S = 30.0
_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def plain(stream: Any = None) -> bool:
    """Whether what goes to ``stream`` (stderr by default) must be plain lines: it is not a
    terminal, or ``NO_COLOR`` is set to anything but empty."""
    if os.environ.get(NO_COLOR_VARIABLE):
        return True
    isatty = getattr(stream if stream is not None else sys.stderr, "isatty", None)
    try:
        return not (isatty is not None and isatty())
    except ValueError:  # a closed stream
        return True


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


class ProgressBar(tqdm):
    """tqdm that names its phase and closes the extra progress file it was given."""

    extra: Any = None

    def phase(self, text: str, total: int | None = None) -> None:
        """Start a phase: ``text`` becomes the bar's description, shown at once; with
        ``total``, the bar counts that phase's rows from zero."""
        if self.disable:
            return
        self.set_description_str(text, refresh=total is None)
        if total is not None:
            self.reset(total=total)  # which redraws

    def close(self) -> None:
        super().close()
        if self.extra is not None:
            self.extra.close()
            self.extra = None


def progress_bar(total: int | None, enabled: bool, phase: str | None = None) -> ProgressBar:
    """A bar of rows on stderr, also appended to ``SESSIONMIG_PROGRESS_FILE`` when it is set."""
    path = os.environ.get(PROGRESS_VARIABLE)
    extra = open(path, "a", encoding="utf-8") if path and enabled else None  # noqa: SIM115
    stream = _Tee(sys.stderr, extra) if extra else sys.stderr
    bar = ProgressBar(
        total=total,
        desc=phase,
        unit="rows",
        unit_scale=True,
        mininterval=2,
        disable=not enabled,
        file=stream,
        ascii=True,  # the same characters in a notebook, a log and any terminal
    )
    bar.extra = extra
    return bar


def last_progress(text: str) -> str | None:
    """The latest progress line in what tqdm wrote (it redraws with carriage returns)."""
    lines = [line.strip() for line in re.split(r"[\r\n]", _ESCAPE.sub("", text)) if line.strip()]
    return lines[-1] if lines else None


def phase_of(line: str) -> str:
    """The phase a progress line names (its description; empty when it names none)."""
    match = re.match(r"^([^\d\s][^:|]*):\s", line)
    return match.group(1) if match else ""


class ProgressEcho(threading.Thread):
    """Echo a step's progress file to the terminal while its notebook runs: one redrawn line
    on a terminal, else (``plain``) a line per phase and one every ``plain_every`` seconds."""

    def __init__(
        self,
        name: str,
        path: Path,
        out: Any = None,
        every: float = 1.0,
        plain: bool = False,
        plain_every: float = PLAIN_EVERY_S,
    ) -> None:
        super().__init__(daemon=True)
        self.label, self.path, self.out, self.every = name, path, out or sys.stderr, every
        self.plain, self.plain_every = plain, plain_every
        self.done = threading.Event()
        self.shown: str | None = None
        self.written: str | None = None  # plain mode: the last line written
        self.written_at = 0.0
        self.width = 0  # terminal mode: the length of the line shown

    def run(self) -> None:
        while not self.done.wait(self.every):
            self.show()
        self.show(final=True)
        if self.shown and not self.plain:
            self.out.write("\n")
            self.out.flush()

    def show(self, final: bool = False) -> None:
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return
        line = last_progress(text)
        if not line:
            return
        if not self.plain:
            if line != self.shown:
                # Spaces, not an erase escape, cover what a longer previous line left.
                shown = f"  {self.label}: {line}"
                self.out.write(f"\r{shown.ljust(self.width)}")
                self.out.flush()
                self.shown, self.width = line, len(shown)
            return
        if line == self.written:
            return
        now = time.monotonic()
        new_phase = self.written is None or phase_of(line) != phase_of(self.written)
        if final or new_phase or now - self.written_at >= self.plain_every:
            self.out.write(f"  {self.label}: {line}\n")
            self.out.flush()
            self.shown = self.written = line
            self.written_at = now

    def stop(self) -> None:
        self.done.set()
        self.join()
