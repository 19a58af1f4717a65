"""Issue 22 item 4: the analysis page never contradicts itself.

* the zone, unit and window every bucketed answer uses are stated at the top of the page (the
  verdict's figures and the first line under it), not only in the collapsed appendix;
* bucket labels carry their UTC offset in the page's tables (the CSV and JSON exports are
  checked in ``test_queries.py`` and ``test_query_oracle.py``); New York's repeated 01:00 on
  the fall-back day is two buckets, drawn as two bars an hour apart, each tick with its offset;
* histograms are bars at their real values on a numeric axis, counts from zero, both axes
  titled with their units;
* SQLite and PostgreSQL share one panel (filled bars and outlined bars), their differences
  marked and counted in the title — never two identical panels;
* no long table before the first chart: each query's chart comes before its rows, and rows
  longer than a dozen lines are folded.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import matplotlib
import pandas as pd
import pytest

matplotlib.use("Agg")

from sessionmig.engines import queries  # noqa: E402
from sessionmig.reports import plots, report  # noqa: E402
from sessionmig.runbook import steps  # noqa: E402
from sessionmig.sqlite.sample import generate  # noqa: E402

AS_OF = datetime(2026, 1, 15, 3, tzinfo=UTC)
FALL_BACK = [
    "2025-11-02 00:00-04:00",
    "2025-11-02 01:00-04:00",
    "2025-11-02 01:00-05:00",
    "2025-11-02 02:00-05:00",
]


def two_sources(
    name: str, rows: list[tuple], differ: dict | None = None, **context
) -> pd.DataFrame:
    """An answer as ``run_many`` returns it for source=both: PostgreSQL's rows first."""
    x, y = plots.SPECS[name][:2]
    pg = pd.DataFrame(rows, columns=[x, y]).assign(source="postgres")
    lite = pd.DataFrame(rows, columns=[x, y]).assign(source="sqlite")
    for key, value in (differ or {}).items():
        lite.loc[lite[x] == key, y] = value
    frame = pd.concat([pg, lite], ignore_index=True)
    frame.attrs["context"] = context
    return frame


def bars(ax) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """(x, height) of the filled bars and of the outlined bars."""
    filled = sorted((p.get_x(), p.get_height()) for p in ax.patches if p.get_fill())
    outline = sorted((p.get_x(), p.get_height()) for p in ax.patches if not p.get_fill())
    return filled, outline


def test_item4_two_sources_share_one_panel_and_their_differences_are_marked() -> None:
    rows = [(-1, 3), (15, 40), (24, 500), (25, 7), (26, 2), (48, 1)]
    frame = two_sources("lifetime_hours", rows, differ={25: 6})
    fig = plots.plot_query("lifetime_hours", frame)
    assert len(fig.axes) == 1  # one panel, not one per source
    ax = fig.axes[0]
    filled, outline = bars(ax)
    # SQLite filled (with its 6 at 25 h), PostgreSQL outlined over it, at the real hours.
    assert filled == [(-1, 3), (15, 40), (24, 500), (25, 6), (26, 2), (48, 1)]
    assert outline == [(-1, 3), (15, 40), (24, 500), (25, 7), (26, 2), (48, 1)]
    marks = ax.collections[0].get_offsets()
    assert [tuple(m) for m in marks] == [(25.45, 7)]  # over the middle of the 25 h bar
    assert ax.get_title(loc="left").endswith("1 difference, marked")
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend.index("SQLite (the backup)") < legend.index("PostgreSQL (the target)")
    # bars on a numeric axis: the gap between 26 h and 48 h is 22 hours wide, counts from 0
    assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] >= 500
    assert ax.get_xlabel() == "lifetime, expires_at − created_at (whole hours)"
    assert ax.get_ylabel() == "sessions"
    same = plots.plot_query("lifetime_hours", two_sources("lifetime_hours", rows))
    assert same.axes[0].get_title(loc="left").endswith("the same on both")
    assert len(same.axes[0].collections) == 0


def test_item4_fall_back_hour_is_two_bars_an_hour_apart_with_their_offsets() -> None:
    frame = two_sources(
        "active_over_time",
        list(zip(FALL_BACK, [3, 5, 4, 2], strict=True)),
        timezone="America/New_York",
        unit="hour",
        start="2025-11-02T04:00:00.000000Z",
        end="2025-11-02T08:00:00.000000Z",
    )
    ax = plots.plot_query("active_over_time", frame).axes[0]
    filled, _ = bars(ax)
    hours = [round((x - filled[0][0]) * 24, 6) for x, _ in filled]
    assert hours == [0, 1, 2, 3] and [h for _, h in filled] == [3, 5, 4, 2]
    widths = [round(p.get_width() * 24, 6) for p in ax.patches if p.get_fill()]
    assert widths == [1, 1, 1, 1]  # the last bucket ends at the window's end
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == ["00:00\n−04:00", "01:00\n−04:00", "01:00\n−05:00", "02:00\n−05:00"]
    assert "local time in America/New_York (UTC−04:00 / UTC−05:00)" in ax.get_xlabel()
    # the first bar is at 04:00 UTC, where its label says
    start = plots.bucket_instants(["2025-11-02 00:00-04:00"])[0]
    assert start == datetime(2025, 11, 2, 4, tzinfo=UTC)
    assert filled[0][0] == pytest.approx(matplotlib.dates.date2num(start))


def test_item4_a_dst_day_is_as_wide_as_it_is() -> None:
    days = ["2025-11-01 00:00-04:00", "2025-11-02 00:00-04:00", "2025-11-03 00:00-05:00"]
    frame = two_sources(
        "active_over_time",
        list(zip(days, [1, 2, 3], strict=True)),
        timezone="America/New_York",
        unit="day",
        end="2025-11-04T05:00:00.000000Z",
    )
    ax = plots.plot_query("active_over_time", frame).axes[0]
    widths = [round(p.get_width() * 24, 6) for p in ax.patches if p.get_fill()]
    assert widths == [24, 25, 24]


def test_item4_the_window_sentence_states_zone_unit_and_offsets() -> None:
    about = queries.analysis_window(
        {"timezone": "America/New_York", "unit": "hour", "start": "", "end": None},
        datetime(2025, 11, 5, 12, tzinfo=UTC),
        "Asia/Seoul",
    )
    assert (about["timezone"], about["unit"]) == ("America/New_York", "hour")
    assert (about["start"], about["end"]) == (
        "2025-10-29T12:00:00.000000Z",
        "2025-11-05T12:00:00.000000Z",
    )
    assert about["words"].startswith(
        "Buckets of one hour in America/New_York, over the window "
        "[2025-10-29 08:00-04:00, 2025-11-05 07:00-05:00)"
    )


@pytest.fixture(scope="module")
def backup(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("page") / "sessions.db"
    generate(path, rows=600, seed=13)
    return path


def _tables_outside_folds(markup: str) -> list[int]:
    """Rows of each table not folded in a ``<details class="rows">``, in page order."""
    open_part = re.sub(r'<details class="rows">.*?</details>', "", markup, flags=re.S)
    return [t.count("<tr>") for t in re.findall(r"<table.*?</table>", open_part, flags=re.S)]


def test_item4_the_page_states_its_window_first_and_charts_before_long_tables(
    backup, dsn, target, tmp_path
) -> None:
    from conftest import env_file

    from sessionmig.runbook import orchestrate

    s = target(backup, as_of=AS_OF.isoformat())
    steps.migrate(s, progress=False)
    env = env_file(tmp_path, backup, as_of=AS_OF.isoformat())
    outcome = orchestrate.run(
        str(env),
        ["analysis"],
        {
            "source": "both",
            "unit": "hour",
            "timezone": "Asia/Seoul",
            "query_names": ["active_at", "active_over_time", "lifetime_hours"],
        },
        tmp_path / "reports",
    )
    assert outcome.exit_code == 0, outcome.message
    page = (outcome.run_dir / "04_session_analysis.html").read_text()
    body = page[: page.index('<details class="appendix"')]
    # The zone, unit and window: in the verdict's figures and the first line under it.
    sentence = (
        "Buckets of one hour in Asia/Seoul, over the window "
        "[2026-01-08 12:00+09:00, 2026-01-15 12:00+09:00)"
    )
    assert sentence in body and body.index(sentence) < body.index("<h3>active_at</h3>")
    figures = body[: body.index("</section>")] if "</section>" in body else body
    assert "hour in Asia/Seoul" in figures
    assert "window [2026-01-08 12:00+09:00, 2026-01-15 12:00+09:00)" in figures
    # One chart per charted query (active_over_time and lifetime_hours), both sources on it.
    assert body.count("<img") == 2
    first_chart = body.index("<img")
    assert body.index("<h3>active_over_time</h3>") < first_chart
    # No long table before the first chart; the 168 hourly rows are folded under it.
    assert max(_tables_outside_folds(body[:first_chart])) <= report.FOLD_ROWS + 1
    assert max(_tables_outside_folds(body)) <= report.FOLD_ROWS + 1
    folded = re.findall(r'<details class="rows"><summary>(.*?)</summary>', body)
    assert folded[0] == "The answer: 168 rows per source (open to read)"
    assert body.index('<details class="rows">') > first_chart
    # Bucket labels with their offset in the page's tables.
    assert "<td>2026-01-08 12:00+09:00</td>" in body


def test_item4_the_first_and_last_buckets_are_drawn_over_their_part_in_the_window() -> None:
    days = ["2026-01-08 00:00+09:00", "2026-01-09 00:00+09:00", "2026-01-10 00:00+09:00"]
    frame = two_sources(
        "active_over_time",
        list(zip(days, [4, 13, 9], strict=True)),
        timezone="Asia/Seoul",
        unit="day",
        start="2026-01-08T03:00:00.000000Z",  # 12:00 in Seoul
        end="2026-01-10T03:00:00.000000Z",
    )
    ax = plots.plot_query("active_over_time", frame).axes[0]
    filled = sorted((p.get_x(), p.get_width()) for p in ax.patches if p.get_fill())
    assert [round(w * 24, 6) for _, w in filled] == [12, 24, 12]
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == ["08 Jan", "09 Jan", "10 Jan"]  # each bucket named as its label names it
    start = plots.bucket_instants(["2026-01-08 12:00+09:00"])[0]
    assert filled[0][0] == pytest.approx(matplotlib.dates.date2num(start))
