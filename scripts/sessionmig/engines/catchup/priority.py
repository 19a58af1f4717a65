"""The pass's SQLite side at background priority, so that the app beside it keeps
the CPU it needs."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from sessionmig.sqlite.source import in_background

if TYPE_CHECKING:  # pandas is heavy; only the notebook's functions need it
    pass


T = TypeVar("T")


# --- one pass --------------------------------------------------------------------------------

BACKGROUND_NICE = 10
"""How much lower the CPU priority of the pass's SQLite side is (snapshot, hashing, diff: all
CPU, several threads at once) than the PostgreSQL transaction's. On a host the app or
PostgreSQL shares, that work yields the CPU to them (measured on 2 cores: with three of the
pass's threads busy, CPU pressure stays at 80-100 % and the app's requests queue behind them;
``benchmarks/CATCHUP.md``); alone on a host it runs as fast as before. The snapshot's own
thread is only this much nicer, never idle: in rollback-journal mode its steps hold the live
file's read lock, and the old colour's writer waits for it; the hashing and the diff after it
hold no such lock and run idle (:func:`_idle_priority`)."""


def _in_background_priority(nice: int, work: Callable[..., T], *args: Any) -> T:
    """``work(*args)`` on a thread ``nice`` steps nicer than this one; the threads it starts
    inherit that. Linux only (its nice value is per thread, and a thread can lower its own
    priority but never raise it back, hence a thread of its own); elsewhere it runs as is."""

    def niced() -> T:
        if nice > 0 and sys.platform.startswith("linux"):
            me = threading.get_native_id()
            with contextlib.suppress(OSError):
                os.setpriority(
                    os.PRIO_PROCESS, me, min(19, os.getpriority(os.PRIO_PROCESS, me) + nice)
                )
        return work(*args)

    return in_background(niced).result()


def _idle_priority() -> None:
    """This thread, and those it starts, run only when nothing else wants the CPU (Linux's
    SCHED_IDLE: any other task waking up takes the CPU from it at once). For the hashing and
    the diff, which hold no lock anyone waits for; not for the snapshot, whose steps hold the
    live file's read lock in rollback-journal mode."""
    if sys.platform.startswith("linux") and hasattr(os, "SCHED_IDLE"):
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
