"""Progress that is seen whether or not the output is a terminal.

rich draws a live bar on a terminal; when stdout/stderr is redirected (a cluster job, ``nohup``,
``| tee``) it draws nothing until the end, so a long job looks dead. ``make_progress`` returns
rich's ``Progress`` on a terminal and, otherwise, ``LineProgress``: the same object (same
``add_task``/``update``/``advance`` calls, same task fields) that prints one plain line per task
every ``interval`` seconds and a last line when it stops::

    pretrain: 120/2000 (6%) elapsed 0:01:02 eta 0:16:10 rate=31.2 loss=6.1234

The interval is ``ANAUS_PROGRESS_INTERVAL`` seconds (default 30).
"""

from __future__ import annotations

import datetime as _dt
import os
import time
from typing import Any

from rich.console import Console
from rich.progress import Progress, TaskID

DEFAULT_INTERVAL_S = 30.0


def progress_interval() -> float:
    try:
        return max(0.0, float(os.environ.get("ANAUS_PROGRESS_INTERVAL", DEFAULT_INTERVAL_S)))
    except ValueError:
        return DEFAULT_INTERVAL_S


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    return str(_dt.timedelta(seconds=int(max(0.0, seconds))))


class LineProgress(Progress):
    """``rich.progress.Progress`` for non-terminals: no live display, a line per task per interval."""

    def __init__(self, *columns: Any, interval: float | None = None, **kwargs: Any) -> None:
        kwargs.pop("transient", None)
        kwargs["disable"] = True  # no live display; tasks are still tracked
        super().__init__(*columns, **kwargs)
        self.interval = progress_interval() if interval is None else float(interval)
        self._last_print = 0.0
        self._printed_final = False

    def line(self, task) -> str:
        total = task.total
        done = int(task.completed)
        share = f" ({100.0 * done / total:.0f}%)" if total else ""
        head = f"{task.description}: {done}/{int(total) if total is not None else '?'}{share}"
        fields = " ".join(f"{k}={v}" for k, v in task.fields.items() if v not in ("", None, "-") and not str(k).startswith("_"))
        remaining = task.time_remaining if total else None
        return f"{head} elapsed {_clock(task.elapsed)} eta {_clock(remaining)}" + (f" {fields}" if fields else "")

    def print_lines(self) -> None:
        for task in self.tasks:
            if task.visible:
                self.console.print(self.line(task), markup=False, highlight=False, soft_wrap=True)
        self._last_print = time.monotonic()

    def _tick(self) -> None:
        if time.monotonic() - self._last_print >= self.interval:
            self.print_lines()

    def start(self) -> None:
        self._last_print = time.monotonic()

    def stop(self) -> None:
        if not self._printed_final and self.tasks:
            self.print_lines()
            self._printed_final = True

    def update(self, task_id: TaskID, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        self._tick()

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._tick()


def make_progress(*columns: Any, console: Console | None = None, disable: bool = False, interval: float | None = None,
                  **kwargs: Any) -> Progress:
    """rich's ``Progress`` on a terminal, ``LineProgress`` otherwise (same arguments)."""
    from rich import get_console

    console = console if console is not None else get_console()
    if disable or console.is_terminal:
        return Progress(*columns, console=console, disable=disable, **kwargs)
    return LineProgress(*columns, console=console, interval=interval, **kwargs)
