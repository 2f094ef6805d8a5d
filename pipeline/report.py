"""What a precompute run did: per-stage counts, shards, bytes, errors, time; progress bars.

The report is returned by ``run_precompute``, written to ``DIR/report.json`` and printed as a
rich table. Errors go to ``DIR/errors.jsonl`` (one JSON object per skipped input: path, stage,
reason, key when known), rewritten by every run so it lists exactly this run's skips.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from pipeline.cache import atomic_write_bytes

STAGE_ORDER = ("ingest", "region", "mask", "pyramid")

EXIT_OK = 0
EXIT_SKIPPED = 1
EXIT_STRICT_FAILURE = 3


@dataclass
class StageSummary:
    computed: int = 0
    reused: int = 0
    failed: int = 0
    seconds: float = 0.0


@dataclass
class PrecomputeReport:
    out_dir: str
    dry_run: bool = False
    sources: int = 0
    samples: int = 0  # samples in the index after the run (or that would be, for a dry run)
    stages: dict[str, StageSummary] = field(default_factory=lambda: {s: StageSummary() for s in STAGE_ORDER})
    shards_written: int = 0
    shards_reused: int = 0
    shards_removed: int = 0
    pack_seconds: float = 0.0
    bytes_written: int = 0  # shards + cache entries written by this run
    shard_bytes_total: int = 0  # size of every shard the index names
    index_written: bool = False
    masker_seconds: float = 0.0  # time inside masker calls (summed over workers)
    source_hash_seconds: float = 0.0
    sources_hashed: int = 0
    plan_seconds: float = 0.0
    wall_seconds: float = 0.0
    errors: list[dict[str, Any]] = field(default_factory=list)
    cache_removed: int = 0
    workers: int = 1
    task_processes: int = 0  # distinct processes that ran stage tasks (host:pid)
    executor: str = "serial"
    dry_run_plan: dict[str, Any] = field(default_factory=dict)
    exit_code: int = EXIT_OK

    @property
    def skipped(self) -> int:
        return len(self.errors)

    @property
    def did_no_work(self) -> bool:
        return all(s.computed == 0 for s in self.stages.values()) and self.shards_written == 0 and self.shards_removed == 0 and not self.index_written

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["skipped"] = self.skipped
        data["did_no_work"] = self.did_no_work
        return data

    def save(self, path: str | Path) -> None:
        atomic_write_bytes(path, json.dumps(self.to_dict(), indent=1).encode(), fsync=False)

    def summary_line(self) -> str:
        if self.dry_run:
            return f"dry run: {self.dry_run_plan.get('summary', '')}"
        if self.did_no_work:
            head = f"nothing to do: {self.samples} samples in {self.shards_reused} shards are up to date"
        else:
            # Per-stage counts are in the table above; this line stays short enough for one line.
            head = (
                f"{self.samples} samples in {self.shards_written + self.shards_reused} shards "
                f"({self.shards_written} written, {self.shards_reused} reused, {self.shards_removed} removed)"
            )
        tail = f"; {self.skipped} input(s) skipped, see {Path(self.out_dir) / 'errors.jsonl'}" if self.skipped else "; no input skipped"
        return f"{head}{tail}; {self.wall_seconds:.1f} s"


def write_errors(path: str | Path, errors: Iterable[dict[str, Any]]) -> None:
    lines = "".join(json.dumps(e, sort_keys=True) + "\n" for e in errors)
    atomic_write_bytes(path, lines.encode(), fsync=False)


def render_report(report: PrecomputeReport, console=None) -> None:
    """Print the per-stage table and the summary line (rich)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title="precompute-masks" + (" (dry run: would compute)" if report.dry_run else ""), show_edge=False)
    table.add_column("stage")
    table.add_column("computed" if not report.dry_run else "to compute", justify="right")
    table.add_column("reused", justify="right")
    table.add_column("failed", justify="right")
    table.add_column("time (s)", justify="right")
    table.add_column("computed/s", justify="right")
    if report.dry_run:
        for stage, row in report.dry_run_plan.get("stages", {}).items():
            table.add_row(stage, str(row["compute"]), str(row["reuse"]), str(row.get("failed", 0)), "", "")
    else:
        for stage, summary in report.stages.items():
            table.add_row(stage, str(summary.computed), str(summary.reused), str(summary.failed), f"{summary.seconds:.2f}", _rate(summary.computed, summary.seconds))
        table.add_row("pack (shards)", str(report.shards_written), str(report.shards_reused), "", f"{report.pack_seconds:.2f}", _rate(report.shards_written, report.pack_seconds))
    console.print(table)
    if not report.dry_run:
        # Stage times are summed over workers; samples/s is over the run's wall time.
        computed = report.stages["mask"].computed
        throughput = f"{computed / report.wall_seconds:.1f} computed samples/s" if report.wall_seconds > 0 and computed else "nothing computed"
        console.print(
            f"wall {report.wall_seconds:.2f} s, {throughput} (planning {report.plan_seconds:.2f} s, masker {report.masker_seconds:.2f} s); "
            f"executor {report.executor}, {report.workers} worker(s)",
            highlight=False, markup=False,
        )
        console.print(f"written {_human(report.bytes_written)} (cache entries + shards); shards total {_human(report.shard_bytes_total)}", highlight=False, markup=False)
    for error in report.errors[:10]:
        console.print(f"  skipped {error['path']} [{error['stage']}]: {error['reason']}", markup=False, highlight=False)
    if len(report.errors) > 10:
        console.print(f"  ... and {len(report.errors) - 10} more in errors.jsonl")
    console.print(report.summary_line(), markup=False, highlight=False)


def _rate(count: int, seconds: float) -> str:
    return f"{count / seconds:.1f}" if count and seconds > 0 else ""


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


class StageProgress:
    """One rich progress bar per stage; a no-op when disabled.

    Each bar counts every item of its stage, but its rate and ETA come from the items this run
    *computes* only: cached items are counted in at once (``advance(..., reused=True)``) and
    would otherwise make the rate absurd and the ETA far too short on a partly cached corpus.
    The bar's text says how many items were computed and how many reused.
    """

    def __init__(self, enabled: bool, console=None) -> None:
        self.enabled = enabled
        self._console = console
        self._progress = None
        self._tasks: dict[str, Any] = {}
        self._counts: dict[str, list] = {}  # stage -> [computed, reused, start time]

    def __enter__(self) -> "StageProgress":
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            from anaus_core.progress import make_progress

            self._progress = make_progress(
                TextColumn("{task.description:<7}"),
                BarColumn(bar_width=30),
                MofNCompleteColumn(),
                TextColumn("{task.fields[detail]}", style="dim"),
                TextColumn("{task.fields[rate]:>15}"),
                TimeElapsedColumn(),
                TextColumn("ETA {task.fields[eta]:>7}"),
                console=self._console or Console(stderr=True),
                transient=False,
            )
            self._progress.__enter__()
        return self

    def add(self, stage: str, total: int | None, unit: str = "samples") -> None:
        if self._progress is not None:
            import time

            self._counts[stage] = [0, 0, time.perf_counter()]
            self._tasks[stage] = self._progress.add_task(stage, total=total, unit=unit, detail="", rate="", eta="-:--:--")

    def set_total(self, stage: str, total: int) -> None:
        if self._progress is not None and stage in self._tasks:
            self._progress.update(self._tasks[stage], total=total)
            self._refresh_fields(stage)

    def advance(self, stage: str, amount: int, *, reused: bool = False) -> None:
        """Count ``amount`` items of ``stage`` as done: computed by this run, or ``reused``
        from the cache."""
        if self._progress is None or stage not in self._tasks or not amount:
            return
        self._counts[stage][1 if reused else 0] += amount
        self._progress.advance(self._tasks[stage], amount)
        self._refresh_fields(stage)

    def _refresh_fields(self, stage: str) -> None:
        import time

        task_id = self._tasks[stage]
        task = self._progress.tasks[task_id]
        computed, reused, start = self._counts[stage]
        unit = task.fields.get("unit", "samples")
        detail = f"{computed} new, {reused} cached"
        elapsed = time.perf_counter() - start
        remaining = max(0.0, (task.total or 0) - task.completed)
        if remaining == 0 and task.total is not None:
            rate, eta = (f"{computed / elapsed:.1f} {unit}/s" if computed and elapsed > 0 else ""), "0:00:00"
        elif computed and elapsed > 0:
            speed = computed / elapsed
            rate, eta = f"{speed:.1f} {unit}/s", _clock(remaining / speed)
        else:
            rate, eta = "", "-:--:--"
        self._progress.update(task_id, detail=detail, rate=rate, eta=eta)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
