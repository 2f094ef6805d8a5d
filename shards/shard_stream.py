"""``ShardStream``: one rank's share of an epoch of shards as batches (stream and indexed modes).
"""

from __future__ import annotations

import bisect
import math
import tarfile
from typing import Any, Callable, Iterator, Mapping

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from shards.epoch_plan import _PLAN_SALT, EpochPlan, batches_before, make_epoch_plan, stream_batch_positions
from shards.source import ShardReadError, ShardSource, _sample_key, open_url



class _SkipFirstSamples:
    """``select_files`` predicate for webdataset's tar iterator: drop the members of the first n samples."""

    def __init__(self, count: int) -> None:
        self.count, self.seen, self.last = count, 0, None

    def __call__(self, name: str) -> bool:
        key = _sample_key(name)
        if key != self.last:
            self.last, self.seen = key, self.seen + 1
        return self.seen > self.count


def read_shard(url: str, *, skip: int = 0) -> Iterator[dict[str, Any]]:
    """Raw webdataset samples (``{"__key__", "__url__", ext: bytes}``) of one tar, after skipping
    the first ``skip`` samples without reading their member data into Python objects."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    try:
        stream = open_url(url)
    except OSError as error:
        raise ShardReadError(f"{url}: cannot open shard ({error})") from error
    try:
        files = tar_file_expander([{"url": url, "stream": stream}],
                                  select_files=_SkipFirstSamples(skip) if skip else None)
        yield from group_by_keys(files)
    except (tarfile.TarError, OSError, ValueError) as error:
        raise ShardReadError(f"{url}: shard is unreadable ({error})") from error
    finally:
        stream.close()


def _read_exactly(handle, size: int) -> bytes:
    """``size`` bytes from ``handle`` (fewer only at the end of the file): unbuffered and fsspec
    streams may return short reads."""
    chunk = handle.read(size)
    if len(chunk) >= size or not chunk:
        return chunk
    parts = [chunk]
    received = len(chunk)
    while received < size:
        more = handle.read(size - received)
        if not more:
            break
        parts.append(more)
        received += len(more)
    return b"".join(parts)


class RawSample:
    """Default per-sample transform of ``ShardStream``: the key and sample number, nothing decoded."""

    def __call__(self, raw: Mapping[str, Any], number: int, epoch: int) -> dict[str, Any]:
        return {"__key__": raw["__key__"], "index": number}


def _as_list(samples: list) -> list:
    return samples


class ShardStream(IterableDataset):
    """One rank's share of an epoch of shards, as batches (picklable; use with ``batch_size=None`` loaders).

    Two modes, same guarantees (equal batches per rank, deterministic, resumable):

    * ``"stream"`` (any source): shards in a per-epoch order, read sequentially by each
      (rank, worker) stream, shuffled inside windows of ``shuffle_buffer`` samples.
    * ``"indexed"`` (``shuffle_buffer=0`` and a shard directory with its index): one global
      permutation of all samples per epoch; every sample is read by one seek + read of its byte
      range. Batch contents do not depend on the number of workers.

    Args:
        source: the shards and their sample counts (``resolve_shards``).
        batch_size: samples per batch on this rank.
        seed, epoch: the plan and every random draw derive from these.
        rank, world_size: this process's place in the job.
        num_workers: DataLoader workers that will iterate this dataset (0 = main process).
        start_batch: rank batches of this epoch already consumed (resume).
        shuffle_buffer: samples per shuffle window (rounded up to whole batches); 0 = global
            shuffle through the index when the source has one, else windows of 1024.
        shuffle_shards: permute shard order per epoch (stream mode).
        transform: ``(raw sample, sample number, epoch) -> sample``; default keeps the key only.
            The sample number is canonical (shards in name order, members in tar order).
        collate: ``list of samples -> batch``; default returns the list.
        batch_transform: ``(raw samples, sample numbers, epoch, batch number) -> batch``; when
            given it replaces ``transform`` + ``collate`` (the whole batch at once). The batch
            number is global in the epoch (``rank * batches_per_epoch + rank batch``), so it is
            the same whichever worker makes the batch and after a resume.
    """

    DEFAULT_WINDOW = 1024

    def __init__(self, source: ShardSource, *, batch_size: int, seed: int = 0, epoch: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, start_batch: int = 0, shuffle_buffer: int = 1024,
                 shuffle_shards: bool = True, transform: Callable[[Mapping[str, Any], int, int], Any] | None = None,
                 collate: Callable[[list], Any] | None = None,
                 batch_transform: Callable[[list, np.ndarray, int, int], Any] | None = None) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.source = source
        self.batch_size = int(batch_size)
        self.seed, self.epoch = int(seed), int(epoch)
        self.rank, self.world_size = int(rank), int(world_size)
        self.num_workers = int(num_workers)
        self.start_batch = int(start_batch)
        self.mode = "indexed" if int(shuffle_buffer) <= 0 and source.indexed else "stream"
        buffer = int(shuffle_buffer) if int(shuffle_buffer) > 0 else self.DEFAULT_WINDOW
        self.window = max(1, math.ceil(buffer / self.batch_size)) * self.batch_size
        self.shuffle_shards = bool(shuffle_shards)
        self.transform = transform if transform is not None else RawSample()
        self.collate = collate if collate is not None else _as_list
        self.batch_transform = batch_transform
        plan = self.plan()
        if not 0 <= self.start_batch <= plan.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} is outside the epoch (0..{plan.batches_per_epoch})")

    @property
    def streams_per_rank(self) -> int:
        return max(1, self.num_workers)

    def plan(self) -> EpochPlan:
        return make_epoch_plan(self.source.sizes, seed=self.seed, epoch=self.epoch, world_size=self.world_size,
                               batch_size=self.batch_size, streams_per_rank=self.streams_per_rank,
                               shuffle_shards=self.shuffle_shards)

    @property
    def batches_per_epoch(self) -> int:
        return self.source.num_samples // (self.world_size * self.batch_size)

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    # -- which samples ------------------------------------------------------------------------
    def _global_permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch, _PLAN_SALT, 1]).permutation(self.source.num_samples)

    def _indexed_batch(self, permutation: np.ndarray, rank_batch: int) -> np.ndarray:
        start = (self.rank * self.batches_per_epoch + rank_batch) * self.batch_size
        return permutation[start:start + self.batch_size]

    def virtual_to_sample(self, position: int, plan: EpochPlan | None = None) -> int:
        """Canonical sample number at a virtual position of the stream-mode plan."""
        plan = plan or self.plan()
        slot = bisect.bisect_right(plan.shard_starts, position) - 1
        shard = plan.shard_order[slot]
        return int(self.source.first_sample[shard] + position - plan.shard_starts[slot])

    def rank_batch_samples(self) -> list[np.ndarray]:
        """Canonical sample numbers of every batch this rank yields this epoch (from ``start_batch``),
        in order, computed without reading anything."""
        if self.mode == "indexed":
            permutation = self._global_permutation()
            return [self._indexed_batch(permutation, j) for j in range(self.start_batch, self.batches_per_epoch)]
        plan = self.plan()
        per_stream = []
        for worker in range(self.streams_per_rank):
            stream = self.rank * self.streams_per_rank + worker
            per_stream.append([p for _, p in stream_batch_positions(plan, stream, batch_size=self.batch_size,
                                                                    window=self.window, seed=self.seed, epoch=self.epoch)])
        # rank batch j is batch j // R of stream j % R
        ordered = [per_stream[j % self.streams_per_rank][j // self.streams_per_rank] for j in range(plan.batches_per_epoch)]
        return [np.array([self.virtual_to_sample(int(p), plan) for p in batch]) for batch in ordered[self.start_batch:]]

    # -- reading ------------------------------------------------------------------------------
    def _raw_from(self, plan: EpochPlan, position: int) -> Iterator[tuple[int, dict[str, Any]]]:
        """``(position, raw sample)`` from virtual ``position`` on, crossing shards in plan order."""
        slot = bisect.bisect_right(plan.shard_starts, position) - 1
        skip = position - plan.shard_starts[slot]
        for slot_index in range(slot, len(plan.shard_order)):
            shard = plan.shard_order[slot_index]
            url, expected = self.source.urls[shard], self.source.sizes[shard]
            delivered = skip
            for raw in read_shard(url, skip=skip):
                if delivered >= expected:
                    raise ShardReadError(f"{url}: holds more than the {expected} samples the index lists")
                yield plan.shard_starts[slot_index] + delivered, raw
                delivered += 1
            if delivered != expected:
                raise ShardReadError(f"{url}: delivered {delivered} samples, the index lists {expected} "
                                     "(truncated or rewritten shard; run `anaus validate`/re-run precompute-masks)")
            skip = 0

    def _worker_slot(self) -> tuple[int, int]:
        """(logical stream of this worker, batches it skips). The DataLoader always starts its round
        robin at worker 0; after a resume the next rank batch (start_batch) belongs to stream
        start_batch % R, so the streams are rotated."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.streams_per_rank:
            raise RuntimeError(f"ShardStream was planned for {self.streams_per_rank} stream(s) per rank but runs in "
                               f"{workers}; build it with num_workers equal to the DataLoader's")
        logical = (worker + self.start_batch) % self.streams_per_rank
        return logical, batches_before(logical, self.streams_per_rank, self.start_batch)

    def __iter__(self) -> Iterator[Any]:
        return self._iter_indexed() if self.mode == "indexed" else self._iter_stream()

    def _iter_indexed(self) -> Iterator[Any]:
        from shards.reader import parse_sample_bytes

        logical, _ = self._worker_slot()
        permutation = self._global_permutation()
        first = self.start_batch + (logical - self.start_batch) % self.streams_per_rank
        handles: dict[int, Any] = {}
        try:
            for rank_batch in range(first, self.batches_per_epoch, self.streams_per_rank):
                samples, numbers = [], self._indexed_batch(permutation, rank_batch)
                for number in numbers:
                    number = int(number)
                    shard, _ = self.source.locate(number)
                    url = self.source.urls[shard]
                    if shard not in handles:
                        handles[shard] = open_url(url, random_access=True)
                    handle = handles[shard]
                    handle.seek(int(self.source.offsets[number]))
                    chunk = _read_exactly(handle, int(self.source.nbytes[number]))
                    if len(chunk) != int(self.source.nbytes[number]):
                        raise ShardReadError(f"{url}: truncated (sample {number} ends past the end of the file)")
                    raw = parse_sample_bytes(chunk, url).as_webdataset_dict(url)
                    samples.append(raw if self.batch_transform is not None else self.transform(raw, number, self.epoch))
                yield self._finish(samples, numbers, rank_batch)
        finally:
            for handle in handles.values():
                handle.close()

    def _finish(self, samples: list, numbers: np.ndarray, rank_batch: int) -> Any:
        """The batch from its raw samples (``batch_transform``) or transformed ones (``collate``)."""
        if self.batch_transform is None:
            return self.collate(samples)
        return self.batch_transform(samples, np.asarray(numbers, np.int64), self.epoch,
                                    self.rank * self.batches_per_epoch + rank_batch)

    def _iter_stream(self) -> Iterator[Any]:
        logical, skip_batches = self._worker_slot()
        plan = self.plan()
        stream = self.rank * self.streams_per_rank + logical
        batches = stream_batch_positions(plan, stream, batch_size=self.batch_size, window=self.window,
                                         seed=self.seed, epoch=self.epoch)
        raw_iter: Iterator[tuple[int, dict[str, Any]]] | None = None
        window_raw: dict[int, dict[str, Any]] = {}
        current_window = -1
        try:
            for batch_number, (window_index, positions) in enumerate(batches):
                if batch_number < skip_batches:
                    continue
                if window_index != current_window:
                    window_start = plan.stream_starts[stream] + window_index * self.window
                    window_end = min(window_start + self.window,
                                     plan.stream_starts[stream] + plan.stream_batches[stream] * self.batch_size)
                    if raw_iter is None:
                        raw_iter = self._raw_from(plan, window_start)
                    window_raw = {}
                    for position, raw in raw_iter:
                        window_raw[position] = raw
                        if position + 1 >= window_end:
                            break
                    if len(window_raw) != window_end - window_start:
                        raise ShardReadError(f"stream {stream}: window {window_index} has {len(window_raw)} of "
                                             f"{window_end - window_start} samples")
                    current_window = window_index
                numbers = np.array([self.virtual_to_sample(int(p), plan) for p in positions], np.int64)
                raws = [window_raw.pop(int(p)) for p in positions]
                if self.batch_transform is None:
                    raws = [self.transform(raw, int(n), self.epoch) for raw, n in zip(raws, numbers)]
                # this stream's batch_number-th batch is rank batch logical + batch_number·R
                yield self._finish(raws, numbers, logical + batch_number * self.streams_per_rank)
        finally:
            if raw_iter is not None:
                raw_iter.close()
