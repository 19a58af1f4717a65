"""Figures for the step reports (matplotlib, rendered inline into the notebook).

Each function returns a figure, or ``None`` when there is nothing to draw — then the report
says so in words (:func:`sessionmig.report.say`) instead of showing a blank chart.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter, MaxNLocator

BLUE, GREEN, ORANGE, GREY = "#0969da", "#1a7f37", "#bc4c00", "#57606a"
THOUSANDS = FuncFormatter(lambda v, _: f"{v:,.0f}")


def _axes(title: str, ylabel: str, xlabel: str = "", width: float = 10) -> tuple[Any, Any]:
    fig, ax = plt.subplots(figsize=(width, 3.2))
    ax.set_title(title, loc="left", fontsize=11)
    ax.set_ylabel(ylabel)
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.yaxis.set_major_formatter(THOUSANDS)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="y", alpha=0.3)
    return fig, ax


def _thin_labels(ax: Any, count: int, most: int = 24) -> None:
    """At most ``most`` x labels: a month of days stays readable."""
    step = max(1, -(-count // most))
    for i, label in enumerate(ax.get_xticklabels()):
        label.set_visible(i % step == 0)
    ax.tick_params(axis="x", labelrotation=60, labelsize=8)


def _bars(counts: Mapping, title: str, colour: str, xlabel: str = "") -> Any:
    if not counts or not any(counts.values()):
        return None
    keys = sorted(counts)
    fig, ax = _axes(title, "sessions", xlabel)
    ax.bar([str(k) for k in keys], [counts[k] for k in keys], color=colour)
    _thin_labels(ax, len(keys))
    fig.tight_layout()
    return fig


def plot_created_per_day(census: Any) -> Any:
    """Sessions created per local day (None when no row could be read)."""
    return _bars(
        census.created_per_day,
        "Sessions created per day (days in source_timezone)",
        BLUE,
        "day created",
    )


def plot_remaining_ttl(census: Any) -> Any:
    """How many hours active sessions have left at ``as_of`` (None when none is active)."""
    return _bars(
        census.remaining_ttl_hours,
        "Active sessions by hours left at as_of (48 = 48 h or more)",
        GREEN,
        "hours left before expiry",
    )


def plot_reconcile_days(per_day: Mapping[str, tuple[int, int]] | None) -> Any:
    """Sessions per day (by created_at), source against PostgreSQL, with the days that differ
    marked. ``per_day`` maps a day to (source rows, target rows)."""
    if not per_day:
        return None
    days = sorted(per_day)
    source = [per_day[d][0] for d in days]
    target = [per_day[d][1] for d in days]
    fig, ax = _axes("Sessions per day: source (bars) and PostgreSQL (line)", "sessions", "day")
    x = list(range(len(days)))
    ax.bar(x, source, color=BLUE, alpha=0.55, label="source (backup, landable rows)")
    ax.plot(x, target, color=ORANGE, marker=".", linewidth=1.5, label="PostgreSQL")
    bad = [i for i, (a, b) in enumerate(zip(source, target, strict=False)) if a != b]
    if bad:
        ax.scatter(
            bad,
            [max(source[i], target[i]) for i in bad],
            color="#cf222e",
            marker="v",
            zorder=3,
            label=f"{len(bad)} days differ",
        )
    ax.set_xticks(x, days)
    _thin_labels(ax, len(days))
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


SPECS = {
    "active_over_time": ("bucket", "peak", "Peak concurrent sessions", "sessions"),
    "request_count_distribution": (
        "from_count",
        "sessions",
        "Sessions by request count",
        "sessions",
    ),
    "lifetime_hours": ("hours", "sessions", "Session lifetime (hours)", "sessions"),
    "ttl_used": ("tenths_used", "sessions", "Share of lifetime used (tenths)", "sessions"),
    "cutover_watch": (
        "hour",
        "active",
        "Active sessions since cutover (solid) vs the week before (dashed)",
        "active sessions",
    ),
}
STYLES = {"sqlite": (BLUE, "o", "-"), "postgres": (ORANGE, "s", "-")}


def has_signal(name: str, frame: Any) -> bool:
    """Whether the query's chart would show anything but zeros."""
    spec = SPECS.get(name)
    if frame is None or len(frame) == 0 or spec is None:
        return False
    columns = [spec[1]] + (["week_before"] if name == "cutover_watch" else [])
    return any(bool((frame[c].fillna(0) != 0).any()) for c in columns if c in frame.columns)


def plot_query(name: str, frame: Any) -> Any:
    """A chart for the queries where a picture says more; None for the others and for an
    answer that is empty or all zeros. Two sources are drawn side by side, one panel each,
    with their own colour and marker, so identical answers still show both."""
    if not has_signal(name, frame):
        return None
    x, y, title, ylabel = SPECS[name]
    groups = list(frame.groupby("source")) if "source" in frame.columns else [("", frame)]
    fig, axes = plt.subplots(
        1, len(groups), figsize=(10 if len(groups) == 1 else 12, 3.2), sharey=True, squeeze=False
    )
    for ax, (label, part) in zip(axes[0], groups, strict=False):
        colour, marker, _ = STYLES.get(str(label), (BLUE, "o", "-"))
        xs = part[x].astype(str).tolist()
        ax.plot(xs, part[y], marker=marker, markersize=3, color=colour, label=label or y)
        if name == "cutover_watch" and "week_before" in part.columns:
            ax.plot(xs, part["week_before"], linestyle="--", color=GREY, label="week before")
        ax.set_title(f"{title}" + (f" — {label}" if label else ""), loc="left", fontsize=10)
        ax.set_ylabel(ylabel)
        ax.yaxis.set_major_formatter(THOUSANDS)
        ax.spines[["top", "right"]].set_visible(False)
        ax.grid(axis="y", alpha=0.3)
        _thin_labels(ax, len(xs), 16 if len(groups) > 1 else 24)
        ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return fig
