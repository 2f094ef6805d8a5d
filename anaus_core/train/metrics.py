"""Run metrics: one JSON object per logged step in ``RUN/metrics.jsonl`` (plus TensorBoard event
files when ``tensorboard`` is importable) and a window timer for throughput and data-wait.

``metrics.jsonl`` is the source of truth: plots and tests read it back with ``read_metrics``.
On resume the file is cut back to the checkpoint's step so a run that died between a log line
and its next checkpoint does not leave duplicated steps behind.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

METRICS_FILENAME = "metrics.jsonl"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` (a torn last line from a crash is ignored)."""
    records = []
    path = Path(path)
    if not path.exists():
        return records
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_metrics(path: str | Path, last_step: int) -> None:
    """Keep only records with ``step <= last_step`` (atomic rewrite)."""
    path = Path(path)
    if not path.exists():
        return
    kept = [r for r in read_metrics(path) if int(r.get("step", 0)) <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsWriter:
    """Append-only JSON-lines log, mirrored to TensorBoard when available.

    Only the main rank writes; other ranks get a writer with ``enabled=False`` so call sites do
    not need to branch.
    """

    def __init__(self, run_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True,
                 resume_step: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILENAME
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:
            truncate_metrics(self.path, resume_step)
        self._file = self.path.open("a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"),
                                         purge_step=resume_step + 1 if resume_step is not None else None)

    @property
    def tensorboard_enabled(self) -> bool:
        return self._tb is not None

    def log(self, record: Mapping[str, Any]) -> None:
        """Write one record; it must contain an integer ``step``."""
        if not self.enabled:
            return
        clean = {key: _jsonable(value) for key, value in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        if self._tb is not None:
            step = int(clean["step"])
            for key, value in clean.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    group = "loss" if key.startswith("loss") else "eval" if key.startswith("eval_") else "train"
                    self._tb.add_scalar(f"{group}/{key}", value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class WindowTimer:
    """Accumulates wall time spent waiting for data vs. total step time over a logging window.

    ``data_wait_fraction`` = time blocked in ``next(loader)`` / wall time of the window; images/s
    counts the global batch (all ranks) per optimiser step.
    """

    start: float = field(default_factory=time.perf_counter)
    data_wait: float = 0.0
    images: int = 0
    steps: int = 0

    def add_wait(self, seconds: float) -> None:
        self.data_wait += seconds

    def add_step(self, images: int) -> None:
        self.images += images
        self.steps += 1

    def summary(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {
            "images_per_s": self.images / elapsed,
            "step_time_s": elapsed / max(self.steps, 1),
            "data_wait_fraction": min(self.data_wait / elapsed, 1.0),
        }

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.data_wait = 0.0
        self.images = 0
        self.steps = 0


def eval_keys(records: Iterable[Mapping[str, Any]]) -> list[str]:
    """Online-evaluation accuracy columns present in the records (``eval_knn_top1``, ``eval_linear_acc``)."""
    keys: set[str] = set()
    for record in records:
        keys.update(k for k, v in record.items() if k.startswith("eval_") and (k.endswith("_acc") or "top1" in k)
                    and isinstance(v, (int, float)))
    return sorted(keys)


def loss_keys(records: Iterable[Mapping[str, Any]]) -> list[str]:
    """Loss columns present in the records, total first."""
    keys: set[str] = set()
    for record in records:
        keys.update(k for k, v in record.items() if k.startswith("loss") and isinstance(v, (int, float)))
    return sorted(keys, key=lambda k: (k != "loss", k))
