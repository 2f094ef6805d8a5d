"""Pre-training loaders: the batch transform (raw samples -> collated batch), the DataLoader
wrapper and the trainer's ``PretrainDataSource`` over a shard store.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from shards.shard_stream import ShardStream
from anaus_core.shard_urls import ShardUrlPolicy
from shards.source import ShardSource, resolve_shards
from shards.training_sample import TrainingSample, decode_training_sample, peek_training_shape

_AUGMENT_SALT = 0xA06_BA7C  # separates the per-batch augmentation streams from both



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

    def _decoded(self, raw: Mapping[str, Any]) -> tuple[np.ndarray, Any, np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(image, masks, ids, area grid, scan region) of one raw sample, with the default or a custom decode."""
        sample = self.decode(raw) if self.decode is not None else decode_training_sample(raw)
        if isinstance(sample, TrainingSample):
            return sample.image, sample.mask_layers, sample.mask_ids, sample.area_grid, sample.scan_region
        mask_set = sample.mask_set  # a ShardSample from a custom decode (e.g. shards.sample.decode_sample)
        pyramid = getattr(sample, "mask_pyramid", None)
        grid = pyramid[max(pyramid)] if pyramid and len(mask_set) else None
        return (sample.image, mask_set.masks, mask_set.ids, None if grid is None else np.asarray(grid, np.uint8),
                getattr(sample, "scan_region", None))

    def _device_batch(self, raws: Sequence[Mapping[str, Any]], shapes: list, numbers: np.ndarray,
                      rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """Device-geometry batch with every sample decoded into its slot of the canvas."""
        from anaus_core.augment.batch import (device_batch_layout, fill_device_fields, place_layers_on_canvas,
                                              place_on_canvas, place_region_on_canvas)
        from anaus_core.augment.collate import alloc_batch
        from anaus_core.augment.draws import draw_batch
        from shards.sample import REGION_FIELD

        config = self.views.config
        height = max(shape[0] for shape in shapes)
        width = max(shape[1] for shape in shapes)
        wide = any(shape[3] != 1 for shape in shapes)
        has_region = any(raw.get(REGION_FIELD) is not None for raw in raws)
        out = alloc_batch(device_batch_layout(len(raws), config, height, width, max(shape[2] for shape in shapes), wide,
                                              region=has_region))
        images, layers = out["image"].numpy(), out["mask_layers"].numpy()
        decoded = []
        for row, (raw, (h, w, count, _)) in enumerate(zip(raws, shapes)):
            # in place only where the sample fills the canvas: a slot of a larger canvas is strided
            target = layers[row, :count] if not wide and (h, w) == (height, width) else None
            sample = decode_training_sample(raw, layers_out=target)
            in_place = target is not None and sample.mask_layers.layers is target
            place_on_canvas(images[row, 0], sample.image)
            place_layers_on_canvas(layers[row], None if in_place else sample.mask_layers.layers, count, h, w)
            if has_region:
                place_region_on_canvas(out["region"].numpy()[row, 0], sample.scan_region, sample.image.shape)
            decoded.append(sample)
        grids = [s.area_grid for s in decoded]
        draws = draw_batch(rng, [s.image.shape for s in decoded], config=config,
                           grids=None if any(g is None for g in grids) else grids,
                           masks=[s.mask_layers for s in decoded],
                           regions=[s.scan_region for s in decoded] if has_region else None)
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
                          decode: Callable[[Mapping[str, bytes]], Any] | None = None,
                          batch_transform: Callable[[list, np.ndarray, int, int], Any] | None = None) -> PretrainLoader:
    """A loader that yields pre-training batches (dict of CPU tensors) for one rank and epoch.

    ``len(loader) == batches_per_epoch - start_batch``, identical on every rank. ``index`` in
    each batch is the canonical sample number (shards in name order, members in tar order; the
    row of the sample in the shard store's index). ``shuffle_buffer=0`` selects the global
    random-access shuffle when the source is a shard directory with its index.
    ``batch_transform``: a method's own batch transform (e.g. A-ViT's multi-crop), used instead of
    ``PretrainBatchTransform`` (same call signature; ``view_config``/``decode`` then unused).
    """
    from dataclasses import replace

    from anaus_core.augment.views import ViewConfig

    shards = source if isinstance(source, ShardSource) else resolve_shards(source)
    config = view_config or ViewConfig()
    if num_mask_samples is not None:
        config = replace(config, num_mask_samples=int(num_mask_samples))
    dataset = ShardStream(shards, batch_size=batch_size, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                          num_workers=num_workers, start_batch=start_batch, shuffle_buffer=shuffle_buffer,
                          batch_transform=batch_transform or PretrainBatchTransform(config, seed=seed, decode=decode))
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
    batch_transform: Any = field(default=None, repr=False)   # a method's own (picklable) batch transform

    @classmethod
    def open(cls, source: str | os.PathLike | Sequence[str], *, policy: ShardUrlPolicy = ShardUrlPolicy(),
             **kwargs: Any) -> "ShardDataSource":
        """``policy``: pipe:/remote URLs are refused unless it allows them (anaus_core/shard_urls.py)."""
        return cls(resolve_shards(source, policy=policy), **kwargs)

    @property
    def num_samples(self) -> int:
        return self.source.num_samples

    def loader(self, *, epoch: int, skip_batches: int, batch_size: int, rank: int, world_size: int) -> PretrainLoader:
        return build_pretrain_loader(self.source, batch_size=batch_size, num_workers=self.num_workers, rank=rank,
                                     world_size=world_size, seed=self.seed, epoch=epoch, start_batch=skip_batches,
                                     view_config=self.view_config, shuffle_buffer=self.shuffle_buffer,
                                     pin_memory=self.pin_memory, prefetch_factor=self.prefetch_factor, decode=self.decode,
                                     batch_transform=self.batch_transform)
