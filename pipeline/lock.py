"""One writer per output directory: ``anaus_core.outputs.OutputLock`` (shared by every writing
command), named here for the precompute job."""

from __future__ import annotations

from pathlib import Path

from anaus_core.outputs import LOCK_NAME, OutputLock as _OutputLock

__all__ = ["LOCK_NAME", "OutputLock"]


class OutputLock(_OutputLock):
    """``anaus_core.outputs.OutputLock`` whose holder is named ``precompute-masks``."""

    def __init__(self, out_dir: str | Path, *, command: str = "precompute-masks") -> None:
        super().__init__(out_dir, command=command)
