"""Overlapping ingest with the masker in an in-process precompute run.

``prefetch_map(fn, items, workers=, depth=)`` is a bounded, ordered, exception-propagating
prefetch iterator: ``fn(item)`` runs in a thread pool for up to ``depth`` items ahead of the
consumer, results come out in input order, and an exception raised by ``fn`` is raised in the
consumer at that item's position (nothing after it is yielded; queued work is cancelled). Items
are pulled from ``items`` in the consumer's thread, so an iterator backed by the run's SQLite
tables is never touched from another thread.

``pipelined_source_batches(batches)`` is what ``run_precompute`` uses with the in-process
executor: the ingest of the next source batches (file decode, resize, ingest-cache write: I/O,
zlib and image decoders that release the GIL) runs in threads while this thread runs the masker
(the GPU) and the mask/pyramid stages of the current batch. Every cache entry and every result
is the same as ``run_source_batch`` without prefetching; only the wall time changes.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, Sequence

from pipeline.stages import IngestedBatch, SourceTask, StageSettings, TaskResult, ingest_source_batch, run_source_batch


def prefetch_map(fn: Callable[[Any], Any], items: Iterable[Any], *, workers: int = 2, depth: int = 4) -> Iterator[Any]:
    """``map(fn, items)`` with ``fn`` running in ``workers`` threads, at most ``depth`` items in
    flight or finished-but-not-consumed; ordered; ``fn``'s exceptions re-raised in order."""
    if workers < 1 or depth < 1:
        raise ValueError("workers and depth must be >= 1")
    iterator = iter(items)
    pending: deque = deque()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prefetch")
    exhausted = False
    try:
        while True:
            while not exhausted and len(pending) < depth:
                try:
                    item = next(iterator)
                except StopIteration:
                    exhausted = True
                    break
                pending.append(pool.submit(fn, item))
            if not pending:
                return
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def _ingest(batch: tuple[Sequence[SourceTask], StageSettings]) -> tuple[IngestedBatch, StageSettings]:
    tasks, settings = batch
    return ingest_source_batch(tasks, settings), settings


def pipelined_source_batches(batches: Iterable[tuple[Sequence[SourceTask], StageSettings]], *, workers: int = 2, depth: int = 2) -> Iterator[TaskResult]:
    """``run_source_batch(*batch)`` for each batch, in order, with the ingest of the next
    ``depth`` batches running in ``workers`` threads meanwhile."""
    for ingested, settings in prefetch_map(_ingest, batches, workers=workers, depth=depth):
        yield run_source_batch(ingested.tasks, settings, ingested=ingested)


def resolve_prefetch(prefetch: int | None, masker: str, executor_kind: str) -> int:
    """Batches to ingest ahead (0: off). ``None`` (auto): 2 for the model maskers (sam, lpsam)
    with the in-process executor, where the masker holds the device and ingest would otherwise
    stall it; 0 otherwise (worker processes already overlap ingest with masking)."""
    if executor_kind != "serial":
        return 0
    if prefetch is None:
        return 2 if str(masker).strip().lower() in ("sam", "lpsam") else 0
    return max(0, int(prefetch))
