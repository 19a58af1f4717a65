"""What the machine did while a catch-up pass ran beside the app's load (``bench_catchup.py
--trace DIR``): a sampler of the kernel's counters, and a timeline that puts the app's slow
requests beside the pass's phases.

The sampler reads, every ``interval`` seconds, the pressure-stall totals (``/proc/pressure``:
time some task waited for CPU or for I/O), the page cache's dirty and under-writeback bytes
(``/proc/meminfo``), the CPU's busy/iowait jiffies (``/proc/stat``) and the disk's writes and
queue (``/proc/diskstats``). All times are the system's monotonic clock, the one the load's
event loop and the traced pass read, so the three line up.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path


def _pressure(kind: str) -> tuple[int, int]:
    """Microseconds some / all tasks stalled on ``kind`` since boot (0, 0 without PSI)."""
    try:
        lines = Path(f"/proc/pressure/{kind}").read_text().splitlines()
    except OSError:
        return 0, 0
    totals = [int(line.rsplit("total=", 1)[1]) for line in lines]
    return totals[0], totals[1] if len(totals) > 1 else 0


def _meminfo() -> tuple[int, int]:
    dirty = writeback = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Dirty:"):
            dirty = int(line.split()[1])
        elif line.startswith("Writeback:"):
            writeback = int(line.split()[1])
    return dirty, writeback  # KiB


def _cpu() -> tuple[int, int, int]:
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle, iowait = fields[3], fields[4]
    return sum(fields) - idle - iowait, iowait, sum(fields)


def _disk() -> tuple[int, int, int]:
    """Sectors written, I/Os in flight, and ms spent with I/O queued, summed over whole
    disks (partitions and virtual devices left out)."""
    written = flight = weighted = 0
    for line in Path("/proc/diskstats").read_text().splitlines():
        parts = line.split()
        name = parts[2]
        if name.startswith(("loop", "ram", "zram", "dm-")) or name[-1].isdigit():
            continue
        written += int(parts[9])
        flight += int(parts[11])
        weighted += int(parts[13])
    return written, flight, weighted


class Sampler:
    """Samples the counters on a thread until stopped; ``rows`` holds one dict per sample."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.rows: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            cpu_some, _ = _pressure("cpu")
            io_some, io_full = _pressure("io")
            dirty, writeback = _meminfo()
            busy, iowait, total = _cpu()
            written, flight, weighted = _disk()
            self.rows.append(
                {
                    "t": time.monotonic(),
                    "cpu_some_us": cpu_some,
                    "io_some_us": io_some,
                    "io_full_us": io_full,
                    "dirty_kb": dirty,
                    "writeback_kb": writeback,
                    "busy": busy,
                    "iowait": iowait,
                    "jiffies": total,
                    "sectors_written": written,
                    "in_flight": flight,
                    "queue_ms": weighted,
                }
            )
            self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def timeline(
    requests: list[tuple[float, float, str]],
    phases: list[tuple[str, float, float]],
    samples: list[dict[str, float]],
    start: float,
    end: float,
    bucket: float = 0.1,
) -> str:
    """A table per ``bucket`` seconds from ``start`` to ``end``: requests scheduled, the
    slowest (and its kind), the kernel's counters, and the pass's phases running then."""
    lines = [
        "t s   | reqs | max ms | slow kinds        | dirty MB | wb MB | MB written/s | io some % "
        "| io full % | cpu some % | busy % | iowait % | phases"
    ]
    t = start
    while t < end:
        inside = [r for r in requests if t <= r[0] < t + bucket]
        slow = sorted(inside, key=lambda r: -r[1])
        kinds: dict[str, int] = {}
        for r in slow:
            if r[1] > 0.05:
                kinds[r[2]] = kinds.get(r[2], 0) + 1
        window = [s for s in samples if t <= s["t"] < t + bucket + 1e-9]
        before = [s for s in samples if s["t"] < t]
        counters = ""
        if window and before:
            a, b = before[-1], window[-1]
            dt = (b["t"] - a["t"]) * 1e6
            jiffies = max(1.0, b["jiffies"] - a["jiffies"])
            counters = (
                f"{b['dirty_kb'] / 1024:8.0f} | {b['writeback_kb'] / 1024:5.0f} | "
                f"{(b['sectors_written'] - a['sectors_written']) * 512 / 1e6 / (dt / 1e6):12.0f} | "
                f"{100 * (b['io_some_us'] - a['io_some_us']) / dt:9.0f} | "
                f"{100 * (b['io_full_us'] - a['io_full_us']) / dt:9.0f} | "
                f"{100 * (b['cpu_some_us'] - a['cpu_some_us']) / dt:10.0f} | "
                f"{100 * (b['busy'] - a['busy']) / jiffies:6.0f} | "
                f"{100 * (b['iowait'] - a['iowait']) / jiffies:8.0f}"
            )
        running = sorted(
            {name for name, s, e in phases if s < t + bucket and (e == 0.0 or e > t)}
            - {"catchup", "process"}
        )
        worst = f"{slow[0][1] * 1000:6.0f}" if slow else "     -"
        kind_text = ",".join(f"{k}:{n}" for k, n in sorted(kinds.items()))
        lines.append(
            f"{t - start:5.1f} | {len(inside):4d} | {worst} | {kind_text:17.17s} | {counters} "
            f"| {' '.join(running)}"
        )
        t += bucket
    return "\n".join(lines)


def write(
    folder: Path,
    name: str,
    requests: list[tuple[float, float, str]],
    phases_file: Path,
    samples: list[dict[str, float]],
    start: float,
    end: float,
) -> str:
    """Keep the raw series in ``folder`` and return the timeline of one pass."""
    phases = [tuple(p) for p in json.loads(phases_file.read_text())] if phases_file.exists() else []
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(
        json.dumps({"requests": requests, "phases": phases, "samples": samples})
    )
    text = timeline(requests, phases, samples, start - 0.5, end + 0.3)  # type: ignore[arg-type]
    phase_text = "\n".join(
        f"  {p[0]:18s} {p[1] - start:7.3f} → {p[2] - start:7.3f} s ({p[2] - p[1]:.3f} s)"
        for p in sorted(phases, key=lambda p: p[1])
        if p[0] != "process"
    )
    report = f"phases (from the pass's start):\n{phase_text}\n\n{text}\n"
    (folder / f"{name}.txt").write_text(report)
    return report
