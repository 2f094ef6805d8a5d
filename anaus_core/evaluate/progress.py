"""Rich progress bars for the nested loops of an evaluation (one live display, a task per loop)."""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")


class Bars:
    """``bars.wrap(iterable, "what")`` iterates with a bar (removed when done); a no-op when disabled."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress

    def wrap(self, iterable: Iterable[T], description: str) -> Iterator[T]:
        if self.progress is None:
            yield from iterable
            return
        items = list(iterable)
        task = self.progress.add_task(description, total=len(items))
        try:
            for item in items:
                yield item
                self.progress.advance(task)
        finally:
            self.progress.remove_task(task)

    def bind(self, description: str):
        """A one-argument wrapper (what the protocol functions take as ``progress``)."""
        return lambda iterable: self.wrap(iterable, description)


@contextlib.contextmanager
def progress_bars(console: Console | None, enabled: bool):
    if not enabled:
        yield Bars(None)
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console or Console(), transient=False) as progress:
        yield Bars(progress)
