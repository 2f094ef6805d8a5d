"""The per-epoch global plan: which (rank, worker) stream reads which run of the virtual sample
sequence (see ``shards.stream``'s docstring).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from anaus_core.errors import UserInputError

_PLAN_SALT = 0x5EED_A7A5  # separates the shuffle streams from the per-sample augmentation streams




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
