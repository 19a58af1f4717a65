"""Figures for the inspect report (matplotlib, rendered inline into the notebook)."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt


def plot_created_per_day(census: Any) -> Any:
    """Sessions created per local day."""
    days = sorted(census.created_per_day)
    fig, ax = plt.subplots(figsize=(9, 3))
    ax.bar(days, [census.created_per_day[d] for d in days], color="#0969da")
    ax.set_title("Sessions created per day (source_timezone)")
    ax.set_ylabel("sessions")
    ax.tick_params(axis="x", labelrotation=70, labelsize=7)
    fig.tight_layout()
    return fig


def plot_remaining_ttl(census: Any) -> Any:
    """How many hours active sessions have left at ``as_of``."""
    hours = sorted(census.remaining_ttl_hours)
    fig, ax = plt.subplots(figsize=(9, 3))
    ax.bar(hours, [census.remaining_ttl_hours[h] for h in hours], color="#1a7f37")
    ax.set_title("Active sessions by remaining TTL at as_of (48 = 48 h or more)")
    ax.set_xlabel("hours left")
    ax.set_ylabel("sessions")
    fig.tight_layout()
    return fig
