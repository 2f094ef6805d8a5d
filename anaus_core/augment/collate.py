"""Collation of per-sample view dicts into the pre-training batch (dict of CPU tensors),
or into a device-geometry batch (``ViewConfig(geometry="device")``, images padded to a canvas)."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import get_worker_info

# Field -> dtype of the collated tensor (the pre-training batch).
BATCH_FIELDS: dict[str, torch.dtype] = {
    "view1": torch.uint8,
    "view2": torch.uint8,
    "masks1": torch.uint8,
    "masks2": torch.uint8,
    "mask_ids": torch.int64,
    "mask_valid1": torch.bool,
    "mask_valid2": torch.bool,
    "core": torch.uint8,
    "core_valid": torch.bool,
    "crop1": torch.float32,
    "crop2": torch.float32,
    "flip1": torch.bool,
    "flip2": torch.bool,
    "index": torch.int64,
    "core_region": torch.uint8,
    # device-geometry batches (ViewConfig(geometry="device"); "image" and "mask_layers" are padded below)
    "mask_layer": torch.int64,
    "mask_value": torch.int64,
    "core_box": torch.float32,
    "canvas_origin": torch.int64,
    "view_size": torch.int64,
    "sector": torch.float32,
    "convexity": torch.float32,
    "apex": torch.float32,
}


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor (in shared memory inside a DataLoader worker, see ``alloc_batch``)."""
    return alloc_batch({"x": (tuple(shape), dtype)})["x"]


_ALIGN = 64  # bytes; every field starts on a cache line (and on its dtype's alignment)


def alloc_batch(layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, torch.Tensor]:
    """Uninitialised tensors for every field of ``layout`` (name -> (shape, dtype)), all views
    of ONE flat byte buffer.

    Inside a DataLoader worker the buffer is a fresh shared-memory segment, as torch's
    ``default_collate`` allocates, so that sending the batch to the main process copies nothing;
    one segment instead of one per field saves a segment creation, an fd transfer and a mapping
    per field (~5 ms per batch of 16 here, docs/benchmarks.md). Every batch gets its own buffer:
    the worker never writes into memory the consumer may still hold. In the main process the
    buffer comes from numpy, whose allocator reuses freed heap memory instead of faulting in
    fresh pages for every batch.
    """
    offsets, total = {}, 0
    for name, (shape, dtype) in layout.items():
        offsets[name] = total
        nbytes = math.prod(shape) * dtype.itemsize
        total += (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN
    if get_worker_info() is None:
        flat = torch.from_numpy(np.empty(max(total, 1), np.uint8))
    else:
        template = torch.empty(0, dtype=torch.uint8)
        storage = template._typed_storage()._new_shared(max(total, 1), device=template.device)
        flat = template.new(storage)
    out = {}
    for name, (shape, dtype) in layout.items():
        start = offsets[name]
        out[name] = flat[start:start + math.prod(shape) * dtype.itemsize].view(dtype).view(tuple(shape))
    return out


def collate_views(samples: Sequence[Mapping[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack B per-sample dicts (numpy) into one dict of tensors with the contract dtypes."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    batch = {}
    with_region = [s for s in samples if "core_region" in s]
    if with_region and len(with_region) < len(samples):
        # a sample without a scan region counts whole: an all-ones core region (zeros without a core)
        ones = np.full_like(np.asarray(with_region[0]["core_region"]), 255)
        samples = [s if "core_region" in s else {**s, "core_region": ones * bool(s["core_valid"])} for s in samples]
    for name, dtype in BATCH_FIELDS.items():
        if name not in samples[0]:
            continue
        first = np.asarray(samples[0][name])
        out = _empty((len(samples),) + first.shape, dtype)
        # unsafe casting = the value conversion of Tensor.to(dtype)
        np.stack([np.asarray(sample[name]) for sample in samples], out=out.numpy(), casting="unsafe")
        batch[name] = out
    if "image" in samples[0]:
        batch.update(_collate_canvas(samples))
    return batch


def _collate_canvas(samples: Sequence[Mapping[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Device-geometry fields: images (1, H, W) and label layers (L, H, W) of different sizes,
    zero-padded at the bottom/right to the largest H, W (and L) of the batch.

    The padding is never read: the device resamples only inside each sample's crop boxes.
    Layers stay uint8 unless a sample needs 16-bit labels (then int32: torch's uint16 support
    is partial).
    """
    height = max(int(np.asarray(s["image"]).shape[-2]) for s in samples)
    width = max(int(np.asarray(s["image"]).shape[-1]) for s in samples)
    layers_max = max(1, max(int(np.asarray(s["mask_layers"]).shape[0]) for s in samples))
    wide = any(np.asarray(s["mask_layers"]).dtype != np.uint8 for s in samples)
    images_t = _empty((len(samples), 1, height, width), torch.uint8)
    layers_t = _empty((len(samples), layers_max, height, width), torch.int32 if wide else torch.uint8)
    images, layers = images_t.numpy(), layers_t.numpy()
    for index, sample in enumerate(samples):
        image = np.asarray(sample["image"])
        h, w = image.shape[-2:]
        images[index, :, :h, :w] = image
        images[index, :, h:, :] = 0
        images[index, :, :h, w:] = 0
        layer = np.asarray(sample["mask_layers"])
        layers[index, :layer.shape[0], :h, :w] = layer
        layers[index, layer.shape[0]:] = 0
        layers[index, :, h:, :] = 0
        layers[index, :, :h, w:] = 0
    out = {"image": images_t, "mask_layers": layers_t}
    if any("region" in s for s in samples):
        # samples without a scan region count whole (ones over their image)
        region_t = _empty((len(samples), 1, height, width), torch.uint8)
        regions = region_t.numpy()
        for index, sample in enumerate(samples):
            h, w = np.asarray(sample["image"]).shape[-2:]
            regions[index] = 0
            regions[index, :, :h, :w] = np.asarray(sample["region"]) if "region" in sample else 1
        out["region"] = region_t
    return out
