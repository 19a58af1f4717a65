"""Progress on long loads: rows, rows/s and ETA in the notebook, and echoed to the terminal of
``sessionmig run`` through a file the kernel appends to."""

from __future__ import annotations

import io
import re
import threading
from pathlib import Path

from sessionmig.runbook import progress


class Polls:
    """Counts the echo thread's reads of its file, so that a test can wait until the thread
    has certainly read what was just written, however late a loaded machine runs it."""

    def __init__(self, echo: progress.ProgressEcho) -> None:
        self.count = 0
        self.changed = threading.Condition()
        show = echo.show

        def counted(final: bool = False) -> None:
            show(final)
            with self.changed:
                self.count += 1
                self.changed.notify_all()

        echo.show = counted  # type: ignore[method-assign]

    def settle(self, timeout: float = 30.0) -> None:
        """Wait for two more reads: the second began after this call, so after any write."""
        with self.changed:
            wanted = self.count + 2
            assert self.changed.wait_for(lambda: self.count >= wanted, timeout), "echo stalled"


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
    polls = Polls(echo)
    echo.start()
    polls.settle()  # no file yet: nothing shown, nothing raised
    path.write_text("\r 10%|  | 1/10 [00:01<00:09, 1rows/s]")
    polls.settle()
    path.write_text("\r 10%|  | 1/10\r100%|##| 10/10 [00:02<00:00, 5rows/s]")
    echo.stop()
    shown = out.getvalue()
    assert shown == (
        "\r  reconcile: 10%|  | 1/10 [00:01<00:09, 1rows/s]"
        "\r  reconcile: 100%|##| 10/10 [00:02<00:00, 5rows/s]\n"
    )


def test_plain_echo_writes_whole_lines_a_phase_at_a_time(tmp_path: Path) -> None:
    """Not a terminal (or NO_COLOR): no carriage returns, a line when the phase changes, the
    same phase repeated only every ``plain_every`` seconds, and the last state at the end."""
    path = tmp_path / "migrate.progress"
    out = io.StringIO()
    echo = progress.ProgressEcho("migrate", path, out, every=0.01, plain=True, plain_every=3600)
    polls = Polls(echo)
    echo.start()
    path.write_text("\rcopying rows:  10%|#  | 1/10 [00:01<00:09, 1rows/s]")
    polls.settle()
    path.write_text("\rcopying rows:  10%|#  | 1/10\rcopying rows:  50%|#####  | 5/10 [00:02]")
    polls.settle()  # the same phase again, within plain_every: not repeated
    path.write_text(path.read_text() + "\rrebuilding indexes: 100%|##| 10/10 [00:03]")
    polls.settle()
    # Two phases in one write (the echo may not read between two writes): only the last shows.
    last = "\rcommitting: 100%|##| 10/10 [00:04]\rcommitted: 100%|##| 10/10 [00:05]"
    path.write_text(path.read_text() + last)
    echo.stop()
    assert out.getvalue().splitlines() == [
        "  migrate: copying rows:  10%|#  | 1/10 [00:01<00:09, 1rows/s]",
        "  migrate: rebuilding indexes: 100%|##| 10/10 [00:03]",
        "  migrate: committed: 100%|##| 10/10 [00:05]",
    ]
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()


def test_terminal_echo_covers_a_longer_previous_line(tmp_path: Path) -> None:
    path = tmp_path / "inspect.progress"
    out = io.StringIO()
    echo = progress.ProgressEcho("inspect", path, out, every=0.01)
    polls = Polls(echo)
    echo.start()
    path.write_text("\rreading rows:  50%|#####     | 5/10 [00:01<00:01, 5rows/s]")
    polls.settle()
    path.write_text(path.read_text() + "\rdone: 10/10")
    echo.stop()
    first, second = out.getvalue().rstrip("\n").split("\r")[1:]
    assert second.startswith("  inspect: done: 10/10") and len(second) == len(first)


def test_plain_when_not_a_terminal_or_no_color(monkeypatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv(progress.NO_COLOR_VARIABLE, raising=False)
    assert progress.plain(io.StringIO()) is True
    assert progress.plain(Tty()) is False
    monkeypatch.setenv(progress.NO_COLOR_VARIABLE, "1")
    assert progress.plain(Tty()) is True
    monkeypatch.setenv(progress.NO_COLOR_VARIABLE, "")  # empty means unset (no-color.org)
    assert progress.plain(Tty()) is False


def test_a_phase_reaches_the_progress_file(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "migrate.progress"
    monkeypatch.setenv(progress.PROGRESS_VARIABLE, str(target))
    bar = progress.progress_bar(1000, True, phase="copying rows")
    bar.update(1000)
    bar.phase("rebuilding indexes")
    line = progress.last_progress(target.read_text())
    assert line is not None and line.startswith("rebuilding indexes: 100%")
    assert progress.phase_of(line) == "rebuilding indexes"
    bar.phase("reading rows", total=50)
    line = progress.last_progress(target.read_text())
    assert line is not None and line.startswith("reading rows:   0%") and "0/50" in line
    bar.close()
    assert progress.phase_of("100%|##| 10/10") == ""


def test_inspect_reports_its_phases_and_rows(tmp_path: Path, monkeypatch) -> None:
    """A long inspect is never silent: each phase and each batch of rows reach the bar."""
    from sessionmig.runbook import steps
    from sessionmig.sqlite import inspection, sample

    backup = tmp_path / "s.db"
    sample.generate(backup, rows=250, seed=3)
    phases: list[tuple[str, int | None]] = []
    rows: list[int] = []
    s = steps.settings(
        sqlite_path=str(backup), source_timezone="Asia/Seoul", database_url_env="UNUSED"
    )
    inspection.inspect_backup(
        s.sqlite_path,
        s.rules,
        s.as_of,
        s.source_timezone,
        batch_rows=100,
        progress=rows.append,
        phase=lambda text, total: phases.append((text, total)),
    )
    assert [p for p, _ in phases] == [
        "integrity check",
        "reading rows",
        "looking for repeated session ids",
        "checking the backup is unchanged",
    ]
    assert dict(phases)["reading rows"] == 250 and rows == [100, 100, 50]
    target = tmp_path / "inspect.progress"
    monkeypatch.setenv(progress.PROGRESS_VARIABLE, str(target))
    steps.inspect(s)
    written = target.read_text()
    assert "reading rows:" in written and "250/250" in written


def test_migrate_names_the_phases_after_the_copy(tmp_path: Path, target, monkeypatch) -> None:
    """The bar no longer sits at 100% without a word while indexes are rebuilt and the
    transaction commits: each phase is the bar's description, in the progress file."""
    from sessionmig.runbook import steps
    from sessionmig.sqlite import sample

    backup = tmp_path / "s.db"
    sample.generate(backup, rows=300, seed=4)
    first, second = tmp_path / "first.progress", tmp_path / "second.progress"
    monkeypatch.setenv(progress.PROGRESS_VARIABLE, str(first))
    steps.migrate(target(backup))
    monkeypatch.setenv(progress.PROGRESS_VARIABLE, str(second))
    steps.migrate(target(backup))

    def phases(path: Path) -> list[str]:
        seen = [progress.phase_of(line) for line in re.split(r"[\r\n]", path.read_text())]
        return list(dict.fromkeys(p for p in seen if p))

    assert phases(first) == [
        "copying rows",
        "rebuilding indexes",
        "recording rejects and the audit row",
        "checking the source is unchanged",
        "committing",
        "committed",
    ]
    assert "merging into sessions" in phases(second) and "rebuilding indexes" not in phases(second)
