"""Figures for the step reports (matplotlib, rendered inline into the notebook).

Each function returns a figure, or ``None`` when there is nothing to draw — then the report
says so in words (:func:`sessionmig.reports.report.say`) instead of showing a blank chart.

Every chart says what its axes are (labels with units), counts start at zero, and bins are
drawn where they are: bars over a real numeric or time axis, never a line through categories
whose spacing is not the data's. Time buckets sit at the instants their labels name (the label's
UTC offset decides, so a fall-back day's repeated hour is two bars an hour apart), as wide as
they really are, with local-time ticks in the answer's zone. Two sources share one panel:
SQLite (the backup, before) as filled bars, PostgreSQL (the target, after) as outlined bars
over them, every bucket where they differ marked, and the title saying whether they agree
(:data:`sessionmig.reports.report.SOURCE_ORDER`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime
from typing import Any
from zoneinfo import ZoneInfo

import matplotlib.dates as mdates
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter, MaxNLocator

from sessionmig.reports.report import SOURCE_WORDS, source_order
from sessionmig.rules.verdict import plural

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
#   time: a bucket label ("YYYY-MM-DD HH:MM+09:00") on a time axis, bars one bucket wide;
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
        "Active sessions since the cutover and a week before (dotted)",
        "active sessions",
        "hours since the cutover",
        "hours",
    ),
}
STYLES = {"sqlite": (BLUE, "o"), "postgres": (ORANGE, "s")}
SHORT = {"sqlite": "SQLite", "postgres": "PostgreSQL"}


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


def frame_zone(frame: Any) -> ZoneInfo | None:
    """The zone an answer's buckets are in (its context: see
    :func:`sessionmig.engines.queries.run`)."""
    name = (getattr(frame, "attrs", {}).get("context") or {}).get("timezone")
    try:
        return ZoneInfo(str(name)) if name else None
    except (ValueError, KeyError, OSError):
        return None


def bucket_instants(labels: Sequence[Any], zone: ZoneInfo | None = None) -> list[datetime]:
    """Bucket labels (``2026-11-01 01:00-05:00``) as the instants they name, UTC. A label
    without an offset is read in ``zone`` (UTC when there is none)."""
    out = []
    for label in labels:
        t = datetime.fromisoformat(str(label))
        if t.tzinfo is None:
            t = t.replace(tzinfo=zone or UTC)
        out.append(t.astimezone(UTC))
    return out


def _bucket_edges(frame: Any, labels: Sequence[Any]) -> tuple[list[datetime], list[float]]:
    """Each bucket's first instant and its real length in days (a DST day is 23 or 25 hours,
    New York's two 01:00 hours on the fall-back day are two buckets an hour apart); the last
    bucket ends at the window's end and the first starts at the window's start when the answer
    says where they are (the part of the bucket that was counted)."""
    zone = frame_zone(frame)
    firsts = bucket_instants(sorted(set(labels), key=lambda v: bucket_instants([v], zone)[0]), zone)
    context = (frame.attrs.get("context") or {}) if hasattr(frame, "attrs") else {}
    if context.get("start"):
        start = datetime.fromisoformat(str(context["start"]).replace("Z", "+00:00"))
        if firsts[0] < start and (len(firsts) < 2 or start < firsts[1]):
            firsts[0] = start
    numbers = [float(mdates.date2num(t)) for t in firsts]
    steps = [b - a for a, b in zip(numbers, numbers[1:], strict=False)]
    end = context.get("end")
    if end:
        last = float(mdates.date2num(datetime.fromisoformat(str(end).replace("Z", "+00:00"))))
        tail = last - numbers[-1] if last > numbers[-1] else None
    else:
        tail = None
    if tail is None:
        tail = min(steps) if steps else 1 / 24
    return firsts, [*steps, tail]


def _key(value: Any) -> Any:
    return str(value)


def _series(name: str, part: Any) -> dict[Any, float]:
    x, y = SPECS[name][:2]
    return {_key(k): float(v) for k, v in zip(part[x], part[y].fillna(0), strict=True)}


def _time_axis(ax: Any, zone: ZoneInfo | None) -> None:
    locator = mdates.AutoDateLocator(minticks=3, maxticks=12, tz=zone or UTC)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, tz=zone or UTC))


FEW_BUCKETS = 26


def _tick(t: datetime, zone: ZoneInfo | None, firsts: Sequence[datetime], unit: Any) -> str:
    """A tick's text: the bucket's local start as its label names it (hours and minutes for
    sub-day units, the day otherwise); its offset too when the window has several."""
    local = t.astimezone(zone or UTC)
    several = len({f.astimezone(zone or UTC).utcoffset() for f in firsts}) > 1
    if unit:
        subday = unit in ("15min", "hour")
    else:  # no context: a step shorter than the shortest DST day
        steps = [(b - a).total_seconds() for a, b in zip(firsts, firsts[1:], strict=False)]
        subday = any(step < 20 * 3600 for step in steps)
    text = local.strftime("%H:%M" if subday else "%d %b")
    if several:
        off = local.strftime("%z")
        text += f"\n{off[:3]}:{off[3:]}".replace("-", "−")
    return text


def _offsets(instants: Sequence[datetime], zone: ZoneInfo | None) -> str:
    """The UTC offsets in force over ``instants`` in ``zone``: ``UTC−05:00`` or two of them."""
    found: list[str] = []
    for t in instants:
        off = t.astimezone(zone or UTC).strftime("%z")
        text = f"UTC{off[:3]}:{off[3:]}".replace("-", "−")
        if text not in found:
            found.append(text)
    return " / ".join(found)


def _overlay(ax: Any, name: str, parts: list[tuple[str, Any]], frame: Any) -> tuple[str, list[Any]]:
    """Every source's answer on one axis: the first source as filled bars, the next as outlined
    bars over them (a line for the hours since the cutover); the x label and the keys whose
    values differ between the sources."""
    x, y, _, _, xlabel, kind = SPECS[name]
    series = [(src, _series(name, part)) for src, part in parts]
    keys = sorted({k for _, s in series for k in s}, key=lambda k: _sort_key(kind, k, frame))
    if kind == "time":
        zone = frame_zone(frame)
        firsts, widths = _bucket_edges(frame, keys)
        xs: list[float] = [float(mdates.date2num(t)) for t in firsts]
        ax.xaxis_date(tz=zone or UTC)
        _time_axis(ax, zone)
        unit = (frame.attrs.get("context") or {}).get("unit") if hasattr(frame, "attrs") else None
        if len(firsts) <= FEW_BUCKETS:
            # A tick per bucket, named as its label is: a repeated hour shows twice, each
            # time with the offset in force.
            named = bucket_instants(keys, zone)
            ax.set_xticks(xs, [_tick(t, zone, named, unit) for t in named], fontsize=8)
        where = zone.key if zone else "UTC"
        shown = (
            f"bucket start ({unit or 'bucket'}), local time in {where} ({_offsets(firsts, zone)})"
        )
    else:
        xs = [float(k) for k in keys]
        width = _width(xs)
        widths = [width * (0.9 if kind == "bins" else 1)] * len(xs)
        shown = xlabel
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for i, (src, values) in enumerate(series):
        colour, _ = STYLES.get(src, (BLUE, "o"))
        heights = [values.get(k, 0.0) for k in keys]
        label = SOURCE_WORDS.get(src, src) or None
        if kind == "hours":
            style = "-" if i == 0 else (0, (4, 3))
            ax.plot(xs, heights, linestyle=style, color=colour, linewidth=1.6, label=label)
            before = parts[i][1]
            if "week_before" in before.columns:
                past = dict(zip(map(_key, before[x]), before["week_before"].fillna(0), strict=True))
                ax.plot(
                    xs,
                    [float(past.get(k, 0)) for k in keys],
                    linestyle=":",
                    color=colour,
                    alpha=0.7,
                    label=f"{label} — a week before" if label else "a week before",
                )
        elif i == 0:
            ax.bar(xs, heights, width=widths, align="edge", color=colour, alpha=0.55, label=label)
        else:
            ax.bar(
                xs,
                heights,
                width=widths,
                align="edge",
                fill=False,
                edgecolor=colour,
                linewidth=1.4,
                label=label,
            )
    differ = []
    if len(series) > 1:
        for k, at, wide in zip(keys, xs, widths, strict=True):
            seen = {s.get(k) for _, s in series}
            if len(seen) > 1:
                differ.append(
                    (k, at + (wide / 2 if kind != "hours" else 0), max(v or 0 for v in seen))
                )
        if differ:
            ax.scatter(
                [d[1] for d in differ],
                [d[2] for d in differ],
                color=RED,
                marker="v",
                zorder=3,
                label=f"{plural(len(differ), 'bucket' if kind == 'time' else 'value')} "
                f"{'differs' if len(differ) == 1 else 'differ'}",
            )
    return shown, [d[0] for d in differ]


def _sort_key(kind: str, key: Any, frame: Any) -> Any:
    if kind == "time":
        return bucket_instants([key], frame_zone(frame))[0]
    return float(key)


def plot_query(name: str, frame: Any) -> Any:
    """A chart for the queries where a picture says more; None for the others and for an
    answer that is empty or all zeros. Two sources share one panel: SQLite (the backup) as
    filled bars, PostgreSQL (the target) as outlined bars over them, and every bucket where
    they differ marked; the title says whether they agree."""
    if not has_signal(name, frame):
        return None
    _, _, title, ylabel, _, _ = SPECS[name]
    if "source" in frame.columns:
        groups = {str(src): part for src, part in frame.groupby("source", sort=False)}
        parts = [(src, groups[src]) for src in source_order(groups)]
    else:
        parts = [("", frame)]
    fig, ax = plt.subplots(figsize=(10, 3.4))
    shown, differ = _overlay(ax, name, parts, frame)
    if len(parts) > 1:
        names = " and ".join(
            f"{SHORT.get(s, s)} ({'bars' if i == 0 else 'outline'})"
            for i, (s, _) in enumerate(parts)
        )
        if name == "cutover_watch":
            names = " and ".join(SHORT.get(s, s) for s, _ in parts)
        verdict = f"{plural(len(differ), 'difference')}, marked" if differ else "the same on both"
        title = f"{title}: {names} — {verdict}"
    elif parts[0][0]:
        title = f"{title} — {SOURCE_WORDS.get(parts[0][0], parts[0][0])}"
    _style(ax, title, ylabel, shown)
    if len(parts) > 1 or name == "cutover_watch":
        ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig
