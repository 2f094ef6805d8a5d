"""Streaming pre-training input: WebDataset shards -> paired views -> collated batches.

Sources: a shard directory (``*.tar``; per-shard sample counts from the index when present), a
brace pattern (``shards/shard-{000000..000009}.tar``), an fsspec URL (``file:///…/shards``,
``memory://…``, ``s3://…`` when the fsspec backend is installed) or a ``pipe:`` command. Tars
are read with webdataset's own tar iterators (``tar_file_expander`` + ``group_by_keys``).

Equal batches on every rank (no DDP hang on uneven shards)
    Each epoch has a global plan, a pure function of ``(seed, epoch, world_size, batch_size,
    num_workers, shard sizes)``: the shards are permuted (seeded by seed and epoch) and laid end
    to end as one virtual sequence of N samples. Every rank gets exactly
    ``batches_per_epoch = N // (world_size * batch_size)`` batches; the remainder (< world ×
    batch samples) is dropped globally. A rank's batches are split over its DataLoader workers
    (worker ``w`` makes rank batches ``w, w+R, w+2R, …``, exactly the order in which the
    DataLoader interleaves workers; after a resume the workers are rotated so that worker 0 makes
    the next batch), and each (rank, worker) *stream* reads one contiguous run of
    the virtual sequence, crossing shard boundaries as needed. Shard sizes therefore never
    change how many batches a rank gets. A shard that holds fewer samples than the plan expects
    raises ``ShardReadError`` instead of ending the epoch early on one rank.

Shuffling and determinism
    Shard order is permuted per epoch; inside a stream, windows of ``shuffle_buffer`` samples
    (rounded up to whole batches) are permuted with a generator seeded by (seed, epoch, stream,
    window). A batch's augmentation draws come from one generator seeded by (seed, epoch, global
    batch number), so they do not depend on which worker made it or on a resume. Nothing reads
    global RNG state.

Global shuffle through the index (``shuffle_buffer=0``)
    For a shard directory with its index (per-sample byte offsets), an epoch is one global
    permutation of all samples; rank ``r`` takes batches ``r·bpe … (r+1)·bpe − 1`` of it and
    each sample is read with one seek + read of its byte range. Batch contents then do not
    depend on the number of workers either. Without an index (brace patterns, URLs) the
    windowed stream above is used.

Resume
    The resume state is ``{"epoch": e, "batches_done": n}`` (rank batches consumed). The plan is
    regenerated; each worker skips the windows that lie wholly before its next batch at the tar
    member level (``select_files`` drops the members, nothing is decoded), and inside a partly
    consumed window it reads the raw bytes, applies the same permutation and decodes only the
    samples not yet delivered. The stream-mode plan depends on ``num_workers``: resume with the
    same number of workers, world size and batch size (the indexed mode needs only the same
    world size and batch size).
"""

from __future__ import annotations

import bisect
import functools
import math
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from anaus_core.errors import UserInputError
from anaus_core.shard_urls import ShardUrlPolicy, check_shard_source

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_PLAN_SALT = 0x5EED_A7A5  # separates the shuffle streams from the per-sample augmentation streams
_AUGMENT_SALT = 0xA06_BA7C  # separates the per-batch augmentation streams from both


class ShardReadError(UserInputError):
    """A shard could not be read, or held a different number of samples than the plan expects."""


# ------------------------------------------------------------------------------------------------
# shard lists
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardSource:
    """The shards of one data set, in a fixed canonical order, and the samples in each."""

    urls: tuple[str, ...]
    sizes: tuple[int, ...]
    origin: str = ""
    # Per-sample byte ranges from the index (canonical order), when the source has one: enables
    # the globally shuffled random-access mode. None for brace patterns / URLs without an index.
    offsets: np.ndarray | None = field(default=None, repr=False, compare=False)
    nbytes: np.ndarray | None = field(default=None, repr=False, compare=False)
    # What the URLs may be besides local files (anaus_core/shard_urls.py): checked on construction,
    # so no ShardSource, however built, opens a pipe: or remote URL the caller did not allow.
    policy: ShardUrlPolicy = field(default=ShardUrlPolicy(), repr=False, compare=False)

    def __post_init__(self) -> None:
        check_shard_source(list(self.urls), policy=self.policy, origin=self.origin or "shards")

    @property
    def num_samples(self) -> int:
        return int(sum(self.sizes))

    @property
    def indexed(self) -> bool:
        return self.offsets is not None and self.nbytes is not None

    @functools.cached_property
    def first_sample(self) -> np.ndarray:
        """Canonical number of the first sample of each shard (shards in canonical order);
        cached: ``locate`` runs once per sample read."""
        return np.concatenate([[0], np.cumsum(np.asarray(self.sizes, dtype=np.int64))[:-1]]).astype(np.int64)

    def locate(self, sample: int) -> tuple[int, int]:
        """(shard number, sample number inside it) of a canonical sample number."""
        shard = int(np.searchsorted(self.first_sample, sample, side="right") - 1)
        return shard, int(sample - self.first_sample[shard])


def open_url(url: str, *, random_access: bool = False):
    """A binary read stream for a local path, ``file://``/fsspec URL or ``pipe:`` command.

    ``random_access``: the caller seeks to each sample and reads exactly its bytes, so a local
    file is opened unbuffered (a 1 MiB read-ahead buffer would be refilled, mostly in vain,
    after every seek)."""
    if url.startswith("pipe:"):
        import webdataset as wds

        return wds.gopen(url, "rb")
    if _SCHEME.match(url):
        import fsspec

        return fsspec.open(url, "rb").open()
    return open(url, "rb", buffering=0 if random_access else 1 << 20)


def _sample_key(name: str) -> str | None:
    from webdataset.tariterators import base_plus_ext

    if re.match(r"__[^/]*__($|/)", name):  # webdataset's skip_meta
        return None
    return base_plus_ext(name)[0]


def count_samples(url: str) -> int:
    """Number of samples (distinct consecutive keys) in one tar, reading headers only where possible."""
    count, last = 0, None
    try:
        if not url.startswith("pipe:") and not _SCHEME.match(url):
            with tarfile.open(url, mode="r:") as archive:  # seekable: skips member data
                members = archive.getmembers()
        else:
            with open_url(url) as stream, tarfile.open(fileobj=stream, mode="r|") as archive:
                members = list(archive)
    except (OSError, tarfile.TarError) as error:
        raise ShardReadError(f"{url}: cannot read shard ({error})") from error
    for member in members:
        if not member.isreg():
            continue
        key = _sample_key(member.name)
        if key is not None and key != last:
            count, last = count + 1, key
    return count


def _read_store_index(directory: Path, names: Sequence[str]) -> tuple[list[int], np.ndarray | None, np.ndarray | None] | None:
    """(per-shard counts, per-sample offsets, per-sample sizes) from the shard store's index
    (``shards.index``); None when the directory has no manifest."""
    if not (directory / "manifest.json").exists():
        return None
    from shards.index import read_index, read_manifest

    counts = {Path(str(entry["name"])).name: int(entry["samples"]) for entry in read_manifest(directory)["shards"]}
    unindexed = [name for name in names if name not in counts]
    if unindexed:
        raise UserInputError(f"{directory}: shard {unindexed[0]} is not in manifest.json (an interrupted write?); "
                             "re-run precompute-masks or remove it")
    sizes = [counts[name] for name in names]
    if not (directory / "index.zarr").exists():
        return sizes, None, None
    index = read_index(directory)
    index_names = [Path(entry.name).name for entry in index.shards]
    offsets, nbytes = [], []
    for name in names:
        rows = index.rows_of_shard(index_names.index(name))
        order = np.argsort(index.offset[rows], kind="stable")
        offsets.append(index.offset[rows][order])
        nbytes.append(index.size[rows][order])
    offsets_all, nbytes_all = np.concatenate(offsets).astype(np.int64), np.concatenate(nbytes).astype(np.int64)
    if len(offsets_all) != sum(sizes):
        raise UserInputError(f"{directory}: index.zarr lists {len(offsets_all)} samples, manifest.json {sum(sizes)}")
    return sizes, offsets_all, nbytes_all


def resolve_shards(source: str | os.PathLike | Sequence[str], *, shard_sizes: Sequence[int] | None = None,
                   policy: ShardUrlPolicy = ShardUrlPolicy()) -> ShardSource:
    """The shard URLs of ``source`` (directory, brace pattern, fsspec URL or list) and their sample counts.

    ``policy``: ``pipe:`` and remote URLs are refused unless it allows them (checked before
    anything is expanded or opened; anaus_core/shard_urls.py).

    Counts come from ``shard_sizes`` when given, else from the index beside a shard directory,
    else from one header scan of every shard (done once, in the main process).
    """
    origin = str(source) if not isinstance(source, (list, tuple)) else f"{len(source)} shard URLs"
    check_shard_source(source, policy=policy, origin=origin)
    urls: list[str]
    sizes: list[int] | None = None
    offsets = nbytes = None
    if isinstance(source, (list, tuple)):
        urls = [str(u) for u in source]
    else:
        text = os.fspath(source)
        local = Path(text)
        if not _SCHEME.match(text) and not text.startswith("pipe:") and local.is_dir():
            names = sorted(p.name for p in local.glob("*.tar"))
            if not names:
                raise UserInputError(f"{local}: no *.tar shards in this directory")
            urls = [str(local / name) for name in names]
            stored = _read_store_index(local, names)
            if stored is not None:
                sizes, offsets, nbytes = stored
        elif "{" in text or text.startswith("pipe:"):
            import webdataset as wds

            urls = wds.shardlists.expand_urls(text)
        elif _SCHEME.match(text):
            import fsspec

            filesystem, path = fsspec.core.url_to_fs(text)
            protocol = text.split("://", 1)[0]
            if filesystem.isdir(path):
                found = sorted(p for p in filesystem.find(path, maxdepth=1) if p.endswith(".tar"))
                if not found:
                    raise UserInputError(f"{text}: no *.tar shards at this URL")
                urls = [f"{protocol}://{p}" if not p.startswith(f"{protocol}://") else p for p in found]
            else:
                urls = [text]
        elif local.is_file():
            urls = [str(local)]
        else:
            raise UserInputError(f"{text}: not a shard directory, shard file, brace pattern or URL")
    if not urls:
        raise UserInputError(f"{origin}: no shards")
    if shard_sizes is not None:
        sizes = [int(s) for s in shard_sizes]
        offsets = nbytes = None
        if len(sizes) != len(urls):
            raise UserInputError(f"{origin}: {len(urls)} shards but {len(sizes)} shard sizes given")
    if sizes is None:
        sizes = [count_samples(url) for url in urls]
    return ShardSource(urls=tuple(urls), sizes=tuple(sizes), origin=origin, offsets=offsets, nbytes=nbytes, policy=policy)


# ------------------------------------------------------------------------------------------------
# the epoch plan
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EpochPlan:
    """Who reads what in one epoch. Positions index the epoch's virtual sequence of samples."""

    shard_order: tuple[int, ...]        # canonical shard numbers in reading order
    shard_starts: tuple[int, ...]       # virtual position of the first sample of each shard in that order
    batches_per_epoch: int              # batches per rank
    streams_per_rank: int               # DataLoader workers per rank (1 without workers)
    stream_batches: tuple[int, ...]     # batches of each (rank, worker) stream, index rank*R + worker
    stream_starts: tuple[int, ...]      # first virtual position of each stream's run


def make_epoch_plan(sizes: Sequence[int], *, seed: int, epoch: int, world_size: int, batch_size: int,
                    streams_per_rank: int, shuffle_shards: bool = True) -> EpochPlan:
    """The epoch's plan (see module docstring). Raises ``UserInputError`` when one global batch does not fit."""
    if batch_size < 1 or world_size < 1 or streams_per_rank < 1:
        raise ValueError("batch_size, world_size and streams_per_rank must be >= 1")
    total = int(sum(sizes))
    batches_per_epoch = total // (world_size * batch_size)
    if batches_per_epoch < 1:
        raise UserInputError(f"{total} samples are fewer than one global batch ({world_size} ranks × {batch_size})")
    order = np.arange(len(sizes))
    if shuffle_shards:
        order = np.random.default_rng([seed, epoch, _PLAN_SALT]).permutation(len(sizes))
    ordered_sizes = np.asarray(sizes, dtype=np.int64)[order]
    starts = np.concatenate([[0], np.cumsum(ordered_sizes)[:-1]])
    per_stream = []
    for _rank in range(world_size):
        for worker in range(streams_per_rank):
            per_stream.append(batches_per_epoch // streams_per_rank + (worker < batches_per_epoch % streams_per_rank))
    stream_starts = np.concatenate([[0], np.cumsum(np.asarray(per_stream) * batch_size)[:-1]])
    return EpochPlan(tuple(int(i) for i in order), tuple(int(s) for s in starts), int(batches_per_epoch),
                     int(streams_per_rank), tuple(int(b) for b in per_stream), tuple(int(s) for s in stream_starts))


def batches_before(worker: int, streams_per_rank: int, rank_batches: int) -> int:
    """How many of the first ``rank_batches`` batches of a rank worker ``worker`` made (round robin)."""
    return len(range(worker, rank_batches, streams_per_rank))


def stream_batch_positions(plan: EpochPlan, stream: int, *, batch_size: int, window: int, seed: int,
                           epoch: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(window index, positions)`` for each batch of one stream, in the order it yields them."""
    start, num_batches = plan.stream_starts[stream], plan.stream_batches[stream]
    length = num_batches * batch_size
    for window_index, window_start in enumerate(range(0, length, window)):
        count = min(window, length - window_start)
        rng = np.random.default_rng([seed, epoch, stream, window_index, _PLAN_SALT])
        positions = start + window_start + rng.permutation(count)
        for offset in range(0, count, batch_size):
            yield window_index, positions[offset:offset + batch_size]


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------

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


# ------------------------------------------------------------------------------------------------
# pre-training samples and loaders
# ------------------------------------------------------------------------------------------------

@dataclass
class TrainingSample:
    """What pre-training needs of a stored sample, without expanding the masks.

    Attributes:
        key: the sample key.
        image: uint8 (H, W).
        mask_layers: the stored label layers (``anaus_core.augment.views.MaskLayers``): mask ``i``
            is the pixels equal to ``i + 1`` in layer ``layer_of_mask[i]``.
        mask_ids: int64 (M,) ids from the record.
        area_grid: uint8 (M, g, g), the finest stored pyramid level (area fraction × 255), or None.
    """

    key: str
    image: np.ndarray
    mask_layers: Any
    mask_ids: np.ndarray
    area_grid: np.ndarray | None


def decode_training_sample(raw: Mapping[str, Any], *, verify: bool = True, layers_out: np.ndarray | None = None) -> TrainingSample:
    """Raw webdataset sample -> ``TrainingSample``: PNG, label layers, finest pyramid level, ids.

    The pipeline's decode. Unlike ``shards.sample.decode_sample`` it never expands the label
    layers into M boolean planes (the view code gathers the K sampled masks from the layers)
    and reads only the id of each mask from the record. ``verify`` checks every member's crc32
    and the record against the headers (shape, mask count), as ``decode_sample``'s default does.

    ``layers_out``: a writable uint8 (L, H, W) array (a slot of the batch being built); when the
    stored layers are zstd-compressed 8-bit labels of exactly that shape they are decompressed
    straight into it (``result.mask_layers.layers is layers_out``), saving the copy into the
    batch. Otherwise it is left untouched and the layers come back in a fresh array.
    """
    import json
    import zlib

    from anaus_core.augment.views import MaskLayers
    from shards.sample import STORAGE_KEY, SampleFormatError, decode_image, decode_mask_layers, decode_pyramid

    key = str(raw.get("__key__", "?"))
    members = {}
    for name in ("json", "png", "masks.bin", "pyramid.bin"):
        value = raw.get(name)
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise SampleFormatError(f"{key}: member {name} is missing or already decoded")
        members[name] = value
    try:
        record = json.loads(members["json"])
        storage = record[STORAGE_KEY]
        ids = np.asarray([entry["id"] for entry in record["masks"]], np.int64)
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise SampleFormatError(f"{key}: json: not a shard-store record ({error})") from None
    if verify:
        crcs = storage.get("crc32", {})
        for name in ("png", "masks.bin", "pyramid.bin"):
            if crcs.get(name) != zlib.crc32(members[name]):
                raise SampleFormatError(f"{key}: {name}: crc32 mismatch (member altered)")
    try:
        image = decode_image(members["png"])
        decoded = _decode_layers_into(members["masks.bin"], layers_out) if layers_out is not None else None
        layers, layer_of_mask = decoded if decoded is not None else decode_mask_layers(members["masks.bin"])
        pyramid = decode_pyramid(members["pyramid.bin"])
    except SampleFormatError as error:
        raise SampleFormatError(f"{key}: {error}") from None
    if layers.shape[1:] != image.shape and len(layer_of_mask):
        raise SampleFormatError(f"{key}: masks are {layers.shape[1:]}, image is {image.shape}")
    if len(ids) != len(layer_of_mask) or (verify and storage.get("mask_count") != len(ids)):
        raise SampleFormatError(f"{key}: record lists {len(ids)} masks, masks.bin holds {len(layer_of_mask)}")
    area_grid = pyramid[max(pyramid)] if pyramid and len(ids) else None
    if area_grid is not None and area_grid.shape[0] != len(ids):
        raise SampleFormatError(f"{key}: pyramid holds {area_grid.shape[0]} masks, the record {len(ids)}")
    return TrainingSample(key=key, image=image, mask_layers=MaskLayers(layers, layer_of_mask),
                          mask_ids=ids, area_grid=area_grid)


def _masks_header(data: bytes | memoryview) -> tuple[int, int, int, int, int, int] | None:
    """(codec, bytes per label, M, H, W, layers) from a ``masks.bin`` header; None when it is not
    one this version reads (``shards.sample.decode_mask_layers`` then says why)."""
    from shards.sample import _MASKS_HEADER, FORMAT_VERSION, MASKS_MAGIC

    if len(data) < _MASKS_HEADER.size:
        return None
    magic, version, codec, label_bytes, count, height, width, layers = _MASKS_HEADER.unpack_from(data)
    if magic != MASKS_MAGIC or version != FORMAT_VERSION or label_bytes not in (1, 2):
        return None
    return codec, label_bytes, count, height, width, layers


def _zstd_content_size(frame: memoryview) -> int | None:
    """The decompressed size a zstd frame header declares (RFC 8878 §3.1.1.1), None if absent:
    decompressing into a buffer must not accept a frame shorter than the buffer."""
    if len(frame) < 6 or bytes(frame[:4]) != b"\x28\xb5\x2f\xfd":
        return None
    descriptor = frame[4]
    size_flag, single_segment, dict_flag = descriptor >> 6, (descriptor >> 5) & 1, descriptor & 3
    offset = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dict_flag]
    field = (1 if single_segment else 0, 2, 4, 8)[size_flag]
    if field == 0 or len(frame) < offset + field:
        return None
    value = int.from_bytes(frame[offset:offset + field], "little")
    return value + 256 if field == 2 else value


def _decode_layers_into(data: bytes | memoryview, out: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``decode_mask_layers`` decompressing into ``out`` (uint8 (L, H, W), C-contiguous); None
    (nothing written) unless the layers are zstd, 8-bit and exactly that shape."""
    from numcodecs import zstd

    from shards.sample import _MASKS_HEADER, CODEC_ZSTD, SampleFormatError

    header = _masks_header(data)
    if header is None or out.dtype != np.uint8 or not out.flags.c_contiguous:
        return None
    codec, label_bytes, count, height, width, layer_count = header
    if codec != CODEC_ZSTD or label_bytes != 1 or out.shape != (layer_count, height, width) or not out.size:
        return None
    offset = _MASKS_HEADER.size + 2 * count
    if len(data) < offset:
        return None
    payload = memoryview(data)[offset:]
    if _zstd_content_size(payload) != out.size:
        return None
    layer_of_mask = np.frombuffer(data, "<u2", count, _MASKS_HEADER.size).astype(np.int64)
    if count and layer_of_mask.max() >= layer_count:
        raise SampleFormatError("masks: a mask names a layer that does not exist")
    try:
        zstd.decompress(payload, dest=out.reshape(-1))
    except Exception as exc:  # the compressor's own error types vary
        raise SampleFormatError(f"masks: cannot decompress ({exc})") from None
    return out, layer_of_mask


def peek_training_shape(raw: Mapping[str, Any]) -> tuple[int, int, int, int] | None:
    """(H, W, label layers, bytes per label) of a raw sample from its PNG and ``masks.bin``
    headers, nothing decoded; None when the headers are not the expected ones (the caller then
    decodes first). Lets a batch be allocated before its samples are decoded into it."""
    import struct

    png, masks = raw.get("png"), raw.get("masks.bin")
    if not isinstance(png, (bytes, bytearray, memoryview)) or not isinstance(masks, (bytes, bytearray, memoryview)):
        return None
    if len(png) < 24 or bytes(png[:8]) != b"\x89PNG\r\n\x1a\n" or bytes(png[12:16]) != b"IHDR":
        return None
    width, height = struct.unpack_from(">II", png, 16)
    header = _masks_header(masks)
    if header is None:
        return None
    _, label_bytes, _, mask_h, mask_w, layers = header
    if layers and (mask_h, mask_w) != (height, width):
        return None  # the decode reports the mismatch
    return int(height), int(width), int(layers), int(label_bytes)


class PretrainBatchTransform:
    """Raw webdataset samples of one batch -> the collated pre-training batch (the loader's path).

    Every random draw of the batch (crops, flips, mask ids, core boxes) is made at once
    (``anaus_core.augment.draws``) from one generator seeded by (seed, epoch, batch number), so a
    batch is the same whichever worker makes it and after a resume, and the fields are written
    straight into the batch tensors (``anaus_core.augment.batch``). With device geometry the
    label layers are decompressed straight into the batch as well (``decode_training_sample``'s
    ``layers_out``).
    """

    def __init__(self, view_config=None, *, seed: int = 0, decode: Callable[[Mapping[str, bytes]], Any] | None = None) -> None:
        from anaus_core.augment.views import PairedViews, ViewConfig

        self.views = PairedViews(view_config or ViewConfig())
        self.seed = int(seed)
        self.decode = decode

    def generator(self, epoch: int, batch_number: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(epoch), _AUGMENT_SALT, int(batch_number)])

    def __call__(self, raws: Sequence[Mapping[str, Any]], numbers: np.ndarray, epoch: int, batch_number: int) -> dict[str, torch.Tensor]:
        from anaus_core.augment.batch import build_batch

        rng = self.generator(epoch, batch_number)
        if self.decode is None and self.views.config.geometry == "device":
            shapes = [peek_training_shape(raw) for raw in raws]
            if all(shape is not None for shape in shapes):
                return self._device_batch(raws, shapes, numbers, rng)
        samples = [self._decoded(raw) for raw in raws]
        return build_batch(self.views, samples, numbers, rng)

    def _decoded(self, raw: Mapping[str, Any]) -> tuple[np.ndarray, Any, np.ndarray, np.ndarray | None]:
        """(image, masks, ids, area grid) of one raw sample, with the default or a custom decode."""
        sample = self.decode(raw) if self.decode is not None else decode_training_sample(raw)
        if isinstance(sample, TrainingSample):
            return sample.image, sample.mask_layers, sample.mask_ids, sample.area_grid
        mask_set = sample.mask_set  # a ShardSample from a custom decode (e.g. shards.sample.decode_sample)
        pyramid = getattr(sample, "mask_pyramid", None)
        grid = pyramid[max(pyramid)] if pyramid and len(mask_set) else None
        return sample.image, mask_set.masks, mask_set.ids, None if grid is None else np.asarray(grid, np.uint8)

    def _device_batch(self, raws: Sequence[Mapping[str, Any]], shapes: list, numbers: np.ndarray,
                      rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """Device-geometry batch with every sample decoded into its slot of the canvas."""
        from anaus_core.augment.batch import device_batch_layout, fill_device_fields, place_layers_on_canvas, place_on_canvas
        from anaus_core.augment.collate import alloc_batch
        from anaus_core.augment.draws import draw_batch

        config = self.views.config
        height = max(shape[0] for shape in shapes)
        width = max(shape[1] for shape in shapes)
        wide = any(shape[3] != 1 for shape in shapes)
        out = alloc_batch(device_batch_layout(len(raws), config, height, width, max(shape[2] for shape in shapes), wide))
        images, layers = out["image"].numpy(), out["mask_layers"].numpy()
        decoded = []
        for row, (raw, (h, w, count, _)) in enumerate(zip(raws, shapes)):
            # in place only where the sample fills the canvas: a slot of a larger canvas is strided
            target = layers[row, :count] if not wide and (h, w) == (height, width) else None
            sample = decode_training_sample(raw, layers_out=target)
            in_place = target is not None and sample.mask_layers.layers is target
            place_on_canvas(images[row, 0], sample.image)
            place_layers_on_canvas(layers[row], None if in_place else sample.mask_layers.layers, count, h, w)
            decoded.append(sample)
        grids = [s.area_grid for s in decoded]
        draws = draw_batch(rng, [s.image.shape for s in decoded], config=config,
                           grids=None if any(g is None for g in grids) else grids,
                           masks=[s.mask_layers for s in decoded])
        fill_device_fields(out, draws, [s.mask_layers.layer_of_mask for s in decoded], [s.mask_ids for s in decoded],
                           numbers, config.size)
        return out


class PretrainLoader:
    """Iterable over one epoch's batches for one rank (a DataLoader over a ``ShardStream``)."""

    def __init__(self, dataset: ShardStream, *, num_workers: int, pin_memory: bool = False, prefetch_factor: int = 2) -> None:
        self.dataset = dataset
        kwargs: dict[str, Any] = {}
        if num_workers > 0:
            kwargs.update(prefetch_factor=prefetch_factor, persistent_workers=False)
        self.loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, **kwargs)

    @property
    def batches_per_epoch(self) -> int:
        return self.dataset.batches_per_epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self):
        return iter(self.loader)


def build_pretrain_loader(source: str | os.PathLike | Sequence[str] | ShardSource, *, batch_size: int, num_workers: int = 0,
                          rank: int = 0, world_size: int = 1, seed: int = 0, epoch: int = 0, start_batch: int = 0,
                          view_config=None, num_mask_samples: int | None = None, shuffle_buffer: int = 0,
                          pin_memory: bool = False, prefetch_factor: int = 2,
                          decode: Callable[[Mapping[str, bytes]], Any] | None = None) -> PretrainLoader:
    """A loader that yields CONTRACTS.md pre-training batches (dict of CPU tensors) for one rank and epoch.

    ``len(loader) == batches_per_epoch - start_batch``, identical on every rank. ``index`` in
    each batch is the canonical sample number (shards in name order, members in tar order; the
    row of the sample in the shard store's index). ``shuffle_buffer=0`` selects the global
    random-access shuffle when the source is a shard directory with its index.
    """
    from dataclasses import replace

    from anaus_core.augment.views import ViewConfig

    shards = source if isinstance(source, ShardSource) else resolve_shards(source)
    config = view_config or ViewConfig()
    if num_mask_samples is not None:
        config = replace(config, num_mask_samples=int(num_mask_samples))
    dataset = ShardStream(shards, batch_size=batch_size, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                          num_workers=num_workers, start_batch=start_batch, shuffle_buffer=shuffle_buffer,
                          batch_transform=PretrainBatchTransform(config, seed=seed, decode=decode))
    return PretrainLoader(dataset, num_workers=num_workers, pin_memory=pin_memory, prefetch_factor=prefetch_factor)


@dataclass
class ShardDataSource:
    """The trainer's ``PretrainDataSource`` over a shard store: sample count + per-epoch loaders."""

    source: ShardSource
    num_workers: int = 0
    seed: int = 0
    view_config: Any = None
    shuffle_buffer: int = 0
    pin_memory: bool = False
    prefetch_factor: int = 2
    decode: Callable[[Mapping[str, bytes]], Any] | None = field(default=None, repr=False)

    @classmethod
    def open(cls, source: str | os.PathLike | Sequence[str], *, policy: ShardUrlPolicy = ShardUrlPolicy(),
             **kwargs: Any) -> "ShardDataSource":
        return cls(resolve_shards(source, policy=policy), **kwargs)

    @property
    def num_samples(self) -> int:
        return self.source.num_samples

    def loader(self, *, epoch: int, skip_batches: int, batch_size: int, rank: int, world_size: int) -> PretrainLoader:
        return build_pretrain_loader(self.source, batch_size=batch_size, num_workers=self.num_workers, rank=rank,
                                     world_size=world_size, seed=self.seed, epoch=epoch, start_batch=skip_batches,
                                     view_config=self.view_config, shuffle_buffer=self.shuffle_buffer,
                                     pin_memory=self.pin_memory, prefetch_factor=self.prefetch_factor, decode=self.decode)
