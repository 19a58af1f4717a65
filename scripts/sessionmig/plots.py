"""Figures for the step reports (matplotlib, rendered inline into the notebook).

Each function returns a figure, or ``None`` when there is nothing to draw — then the report
says so in words (:func:`sessionmig.report.say`) instead of showing a blank chart.

Every chart says what its axes are (labels with units), counts start at zero, and bins are
drawn where they are: bars over a real numeric or time axis, never a line through categories
whose spacing is not the data's. Two sources are laid out before → after: SQLite (the backup)
on the left, PostgreSQL on the right (:data:`sessionmig.report.SOURCE_ORDER`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import date, datetime, timedelta
from typing import Any

import matplotlib.dates as mdates
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter, MaxNLocator

from .report import SOURCE_WORDS, source_order
from .verdict import plural

BLUE, GREEN, ORANGE, GREY, RED = "#0969da", "#1a7f37", "#bc4c00", "#57606a", "#cf222e"
THOUSANDS = FuncFormatter(lambda v, _: f"{v:,.0f}")


def _style(ax: Any, title: str, ylabel: str, xlabel: str) -> None:
    """Title, both axis labels, thousands on the count axis, which starts at zero."""
    ax.set_title(title, loc="left", fontsize=10)
    ax.set_ylabel(ylabel)
    ax.set_xlabel(xlabel)
    ax.yaxis.set_major_formatter(THOUSANDS)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="y", alpha=0.3)


def _axes(title: str, ylabel: str, xlabel: str, width: float = 10) -> tuple[Any, Any]:
    fig, ax = plt.subplots(figsize=(width, 3.2))
    _style(ax, title, ylabel, xlabel)
    return fig, ax


def _days(keys: Sequence[Any]) -> list[date] | None:
    """``keys`` as calendar days when every one is one (``2026-01-15``), else None."""
    try:
        return [k if isinstance(k, date) else date.fromisoformat(str(k)) for k in keys]
    except ValueError:
        return None


def _date_axis(ax: Any) -> None:
    locator = mdates.AutoDateLocator(minticks=3, maxticks=12)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))


def _bars(counts: Mapping, title: str, colour: str, xlabel: str, ylabel: str = "sessions") -> Any:
    """Bars at their real place: a day on a time axis, a number on a numeric axis."""
    if not counts or not any(counts.values()):
        return None
    keys = sorted(counts)
    values = [counts[k] for k in keys]
    fig, ax = _axes(title, ylabel, xlabel)
    days = _days(keys)
    if days is not None:
        ax.bar(days, values, width=0.8, color=colour)
        _date_axis(ax)
    else:
        ax.bar([float(k) for k in keys], values, width=0.8, color=colour)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _style(ax, title, ylabel, xlabel)
    fig.tight_layout()
    return fig


def plot_created_per_day(census: Any) -> Any:
    """Sessions created per local day (None when no row could be read)."""
    return _bars(
        census.created_per_day,
        "Sessions created per day",
        BLUE,
        "day created (calendar day in source_timezone)",
    )


def plot_remaining_ttl(census: Any) -> Any:
    """How many hours active sessions have left at ``as_of`` (None when none is active)."""
    return _bars(
        census.remaining_ttl_hours,
        "Active sessions by time left at as_of (the bar at 48 counts 48 h or more)",
        GREEN,
        "time left before expiry (whole hours)",
    )


def plot_reconcile_days(per_day: Mapping[str, tuple[int, int]] | None) -> Any:
    """Sessions per day (by created_at), source against PostgreSQL, with the days that differ
    marked. ``per_day`` maps a day to (source rows, target rows)."""
    if not per_day:
        return None
    keys = sorted(per_day)
    source = [per_day[d][0] for d in keys]
    target = [per_day[d][1] for d in keys]
    fig, ax = _axes(
        "Sessions per day: the backup (bars) and PostgreSQL (outline)",
        "sessions",
        "day created (calendar day in source_timezone)",
    )
    days = _days(keys)
    x: list[Any] = list(days) if days is not None else list(range(len(keys)))
    ax.bar(x, source, width=0.8, color=BLUE, alpha=0.55, label="backup (rows that can land)")
    ax.step(x, target, where="mid", color=ORANGE, linewidth=1.5, label="PostgreSQL")
    bad = [i for i, (a, b) in enumerate(zip(source, target, strict=True)) if a != b]
    if bad:
        ax.scatter(
            [x[i] for i in bad],
            [max(source[i], target[i]) for i in bad],
            color=RED,
            marker="v",
            zorder=3,
            label=f"{plural(len(bad), 'day')} {'differs' if len(bad) == 1 else 'differ'}",
        )
    if days is not None:
        _date_axis(ax)
    else:
        ax.set_xticks(x, keys)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


# Per query: x column, y column, title, y label, x label, how x is drawn.
#   time: a local hour or day ("YYYY-MM-DD HH:MM") on a time axis, bars one bucket wide;
#   bins: the start of a bin of a number, bars as wide as the bin; hours: a line over the hours
#   since the cutover (evenly spaced, every hour present).
SPECS: dict[str, tuple[str, str, str, str, str, str]] = {
    "active_over_time": (
        "bucket",
        "peak",
        "Peak concurrent sessions",
        "sessions at the peak",
        "local hour or day",
        "time",
    ),
    "request_count_distribution": (
        "from_count",
        "sessions",
        "Sessions by request count",
        "sessions",
        "requests made (bin start; each bar is one bin wide)",
        "bins",
    ),
    "lifetime_hours": (
        "hours",
        "sessions",
        "Session lifetime",
        "sessions",
        "lifetime, expires_at − created_at (whole hours)",
        "bins",
    ),
    "ttl_used": (
        "tenths_used",
        "sessions",
        "Share of lifetime used before the last activity",
        "sessions",
        "share used (tenths: 0 = none … 10 = all of it)",
        "bins",
    ),
    "cutover_watch": (
        "hour",
        "active",
        "Active sessions since the cutover (solid) and a week before (dashed)",
        "active sessions",
        "hours since the cutover",
        "hours",
    ),
}
STYLES = {"sqlite": (BLUE, "o"), "postgres": (ORANGE, "s")}


def has_signal(name: str, frame: Any) -> bool:
    """Whether the query's chart would show anything but zeros."""
    spec = SPECS.get(name)
    if frame is None or len(frame) == 0 or spec is None:
        return False
    columns = [spec[1]] + (["week_before"] if name == "cutover_watch" else [])
    return any(bool((frame[c].fillna(0) != 0).any()) for c in columns if c in frame.columns)


def _width(xs: Sequence[float]) -> float:
    """A bin's width: the smallest step between bins present (1 when there is one bin)."""
    steps = [b - a for a, b in zip(xs, xs[1:], strict=False) if b > a]
    return min(steps) if steps else 1.0


def _draw(ax: Any, name: str, part: Any, colour: str) -> str:
    """Draw one source's answer; the x label when the data says more than the spec."""
    x, y, _, _, xlabel, kind = SPECS[name]
    part = part.sort_values(x)
    values = [float(v) for v in part[y].fillna(0)]
    if kind == "time":
        # Buckets are local wall-clock hours or days: drawn at their local time, the zone named.
        parsed = [datetime.fromisoformat(str(v)) for v in part[x]]
        stamps = [t.replace(tzinfo=None) for t in parsed]
        seconds = [t.timestamp() for t in parsed]
        wide = timedelta(seconds=_width(seconds)) if len(seconds) > 1 else timedelta(hours=1)
        ax.bar(stamps, values, width=wide, align="edge", color=colour)
        _date_axis(ax)
        offset = parsed[0].strftime("%z") if parsed and parsed[0].tzinfo else ""
        zone = f" (UTC{offset[:3]}:{offset[3:]})" if offset else ""
        unit = "day" if wide >= timedelta(days=1) else "hour"
        return f"local {unit}{zone}"
    elif kind == "bins":
        xs = [float(v) for v in part[x]]
        width = _width(xs)
        ax.bar(xs, values, width=width * 0.9, align="edge", color=colour)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        return xlabel
    else:
        xs = [float(v) for v in part[x]]
        ax.plot(xs, values, color=colour, linewidth=1.5, label="since the cutover")
        if "week_before" in part.columns:
            before = [float(v) for v in part["week_before"].fillna(0)]
            ax.plot(xs, before, linestyle="--", color=GREY, label="a week before")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7, frameon=False)
    return xlabel


def plot_query(name: str, frame: Any) -> Any:
    """A chart for the queries where a picture says more; None for the others and for an
    answer that is empty or all zeros. Two sources are drawn side by side, one panel each,
    SQLite (the backup) on the left and PostgreSQL on the right, sharing the count axis."""
    if not has_signal(name, frame):
        return None
    _, _, title, ylabel, _, _ = SPECS[name]
    if "source" in frame.columns:
        groups = {str(src): part for src, part in frame.groupby("source", sort=False)}
        panels = [(src, groups[src]) for src in source_order(groups)]
    else:
        panels = [("", frame)]
    fig, axes = plt.subplots(
        1, len(panels), figsize=(10 if len(panels) == 1 else 12, 3.4), sharey=True, squeeze=False
    )
    for ax, (label, part) in zip(axes[0], panels, strict=True):
        colour, _ = STYLES.get(label, (BLUE, "o"))
        shown = _draw(ax, name, part, colour)
        where = SOURCE_WORDS.get(label, label)
        _style(ax, title + (f" — {where}" if where else ""), ylabel, shown)
    fig.tight_layout()
    return fig
