"""Progress on long loads: rows, rows/s and ETA in the notebook, and echoed to the terminal of
``sessionmig run`` through a file the kernel appends to."""

from __future__ import annotations

import io
import time
from pathlib import Path

from sessionmig import progress


def test_the_bar_also_writes_to_the_progress_file(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "migrate.progress"
    monkeypatch.setenv(progress.PROGRESS_VARIABLE, str(target))
    bar = progress.progress_bar(2_000_000, True)
    bar.update(1_000_000)
    bar.update(1_000_000)
    bar.close()
    line = progress.last_progress(target.read_text())
    assert line is not None and line.startswith("100%")
    assert "2.00M/2.00M" in line and "rows/s" in line


def test_no_progress_file_without_the_variable(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(progress.PROGRESS_VARIABLE, raising=False)
    bar = progress.progress_bar(10, True)
    bar.update(10)
    bar.close()
    assert bar.extra is None


def test_the_last_redrawn_line_is_the_progress() -> None:
    text = "\r  0%|   | 0/10 [00:00<?, ?rows/s]\r 50%|#  | 5/10 [00:01<00:01, 5rows/s]\r\n"
    assert progress.last_progress(text) == "50%|#  | 5/10 [00:01<00:01, 5rows/s]"
    assert progress.last_progress("\r\n") is None


def test_the_echo_shows_the_latest_line_and_ends_it(tmp_path: Path) -> None:
    path = tmp_path / "reconcile.progress"
    out = io.StringIO()
    echo = progress.ProgressEcho("reconcile", path, out, every=0.01)
    echo.start()
    time.sleep(0.05)  # no file yet: nothing shown, nothing raised
    path.write_text("\r 10%|  | 1/10 [00:01<00:09, 1rows/s]")
    time.sleep(0.05)
    path.write_text("\r 10%|  | 1/10\r100%|##| 10/10 [00:02<00:00, 5rows/s]")
    echo.stop()
    shown = out.getvalue()
    assert shown == (
        "\r  reconcile: 10%|  | 1/10 [00:01<00:09, 1rows/s]"
        "\r  reconcile: 100%|##| 10/10 [00:02<00:00, 5rows/s]\n"
    )
