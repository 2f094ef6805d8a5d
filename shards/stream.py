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

# The implementation lives in one module per idea; every public name stays importable from here.
from shards.epoch_plan import EpochPlan, batches_before, make_epoch_plan, stream_batch_positions
from shards.loader import PretrainBatchTransform, PretrainLoader, ShardDataSource, build_pretrain_loader
from shards.shard_stream import RawSample, ShardStream, read_shard
from shards.source import ShardReadError, ShardSource, count_samples, open_url, resolve_shards
from shards.training_sample import TrainingSample, decode_training_sample, peek_training_shape

__all__ = [
    "EpochPlan", "PretrainBatchTransform", "PretrainLoader", "RawSample", "ShardDataSource", "ShardReadError",
    "ShardSource", "ShardStream", "TrainingSample", "batches_before", "build_pretrain_loader", "count_samples",
    "decode_training_sample", "make_epoch_plan", "open_url", "peek_training_shape", "read_shard",
    "resolve_shards", "stream_batch_positions",
]
