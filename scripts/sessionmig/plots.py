"""Figures for the inspect report (matplotlib, rendered inline into the notebook)."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt


def _bars(counts: dict, title: str, colour: str, xlabel: str = "") -> Any:
    keys = sorted(counts)
    fig, ax = plt.subplots(figsize=(9, 3))
    ax.bar(keys, [counts[k] for k in keys], color=colour)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("sessions")
    ax.tick_params(axis="x", labelrotation=70, labelsize=7)
    fig.tight_layout()
    return fig


def plot_created_per_day(census: Any) -> Any:
    """Sessions created per local day."""
    return _bars(census.created_per_day, "Sessions created per day (source_timezone)", "#0969da")


def plot_remaining_ttl(census: Any) -> Any:
    """How many hours active sessions have left at ``as_of``."""
    return _bars(
        census.remaining_ttl_hours,
        "Active sessions by remaining TTL at as_of (48 = 48 h or more)",
        "#1a7f37",
        "hours left",
    )


def plot_query(name: str, frame: Any) -> Any:
    """A chart for the queries where a picture says more; None for the others."""
    if frame is None or len(frame) == 0:
        return None
    spec = {
        "active_over_time": ("bucket", "peak", "Peak concurrent sessions"),
        "request_count_distribution": ("from_count", "sessions", "Sessions by request count"),
        "lifetime_hours": ("hours", "sessions", "Session lifetime (hours)"),
        "ttl_used": ("tenths_used", "sessions", "Share of lifetime used (tenths)"),
        "cutover_watch": ("hour", "active", "Active sessions since cutover vs a week before"),
    }.get(name)
    if spec is None:
        return None
    x, y, title = spec
    fig, ax = plt.subplots(figsize=(9, 3))
    groups = frame.groupby("source") if "source" in frame.columns else [("", frame)]
    for label, part in groups:
        ax.plot(part[x].astype(str), part[y], marker="o", label=label or y)
        if name == "cutover_watch":
            ax.plot(
                part[x].astype(str),
                part["week_before"],
                linestyle="--",
                label=f"{label} week before".strip(),
            )
    ax.set_title(title)
    ax.tick_params(axis="x", labelrotation=70, labelsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
