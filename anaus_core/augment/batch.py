"""Whole pre-training batches straight from decoded samples: one draw call, no per-sample dicts.

The loader's fast path (``shards.stream``): ``draws.draw_batch`` makes every random choice of the
batch at once, and the fields are written directly into the batch tensors (``collate.alloc_batch``:
one buffer, shared memory inside a DataLoader worker) — no per-sample dicts, no collate copy.

* worker geometry (``ViewConfig(geometry="worker")``): the views, packed masks and core are
  rendered per sample (``PairedViews.render``) into the batch rows; same fields as
  ``collate.collate_views`` of per-sample dicts (the pre-training batch, fields in ``anaus_core.augment.collate``).
* device geometry (``geometry="device"``): the batch holds the whole stored images and ALL their
  label layers on a canvas of the batch's largest (H, W) and layer count, plus the draws
  (boxes, flips, core box, and each slot's layer and label); ``device.prepare_batch`` cuts the
  views there. Shipping whole images (instead of the crops' bounding box, ~70 % of the pixels)
  lets the decoder write the label layers straight into the batch (``shards.stream``), which
  saves a copy of every layer; fields as listed in ``views`` minus ``canvas_origin``
  (the canvas starts at the stored image's corner).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from anaus_core.augment.collate import alloc_batch
from anaus_core.augment.draws import BatchDraws, draw_batch
from anaus_core.augment.views import MaskLayers, PairedViews, ViewConfig


def worker_batch_layout(batch: int, config: ViewConfig, region: bool = False) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Fields of a worker-geometry batch; ``region``: with ``core_region`` (some sample of the
    batch has a scan region)."""
    size, num = config.size, config.num_mask_samples
    extra = {"core_region": ((batch, 1, size, size // 8), torch.uint8)} if region else {}
    return extra | {
        "view1": ((batch, 1, size, size), torch.uint8), "view2": ((batch, 1, size, size), torch.uint8),
        "masks1": ((batch, num, size, size // 8), torch.uint8), "masks2": ((batch, num, size, size // 8), torch.uint8),
        "mask_ids": ((batch, num), torch.int64),
        "mask_valid1": ((batch, num), torch.bool), "mask_valid2": ((batch, num), torch.bool),
        "core": ((batch, 1, size, size), torch.uint8), "core_valid": ((batch,), torch.bool),
        "crop1": ((batch, 4), torch.float32), "crop2": ((batch, 4), torch.float32),
        "flip1": ((batch,), torch.bool), "flip2": ((batch,), torch.bool),
        "index": ((batch,), torch.int64),
    }


def device_batch_layout(batch: int, config: ViewConfig, height: int, width: int, layers: int,
                        wide: bool = False, region: bool = False) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Fields of a device-geometry batch on a (height, width) canvas with ``layers`` label layers
    (int32 when a sample has 16-bit labels: torch's uint16 support is partial); ``region``: with
    the scan-region canvas ``region`` (uint8 {0, 1}; all ones for a sample without a region)."""
    num = config.num_mask_samples
    extra = {"region": ((batch, 1, height, width), torch.uint8)} if region else {}
    if getattr(config, "sector_angle_p", 0.0) > 0 or getattr(config, "convexity_p", 0.0) > 0:
        # per view: the sector-angle and convexity factors (1 = none); per sample: the fan apex
        # (row, column, face radius)
        extra |= {"sector": ((batch, 2), torch.float32), "convexity": ((batch, 2), torch.float32),
                  "apex": ((batch, 3), torch.float32)}
    return extra | {
        "image": ((batch, 1, height, width), torch.uint8),
        "mask_layers": ((batch, max(1, layers), height, width), torch.int32 if wide else torch.uint8),
        "mask_layer": ((batch, num), torch.int64), "mask_value": ((batch, num), torch.int64),
        "mask_ids": ((batch, num), torch.int64),
        "core_box": ((batch, 4), torch.float32), "core_valid": ((batch,), torch.bool),
        "crop1": ((batch, 4), torch.float32), "crop2": ((batch, 4), torch.float32),
        "flip1": ((batch,), torch.bool), "flip2": ((batch,), torch.bool),
        "view_size": ((batch,), torch.int64), "index": ((batch,), torch.int64),
    }


def padded_ids(ids: Sequence[np.ndarray], width: int) -> np.ndarray:
    """int64 (B, width): each sample's ids, zero-padded."""
    out = np.zeros((len(ids), max(1, width)), np.int64)
    for row, sample_ids in enumerate(ids):
        out[row, :len(sample_ids)] = sample_ids
    return out


def fill_draw_fields(out: Mapping[str, torch.Tensor], draws: BatchDraws, ids: Sequence[np.ndarray],
                     indices: Sequence[int]) -> None:
    """The fields both geometries share: mask_ids, core_valid, crops, flips, index."""
    chosen = draws.chosen
    most = max([len(i) for i in ids] + [1])
    table = padded_ids(ids, most)
    picked = np.take_along_axis(table, np.maximum(chosen, 0), axis=1)
    out["mask_ids"].numpy()[:] = np.where(chosen >= 0, picked, 0)
    out["core_valid"].numpy()[:] = draws.core_valid
    out["crop1"].numpy()[:] = draws.crops[:, 0]
    out["crop2"].numpy()[:] = draws.crops[:, 1]
    out["flip1"].numpy()[:] = draws.flips[:, 0]
    out["flip2"].numpy()[:] = draws.flips[:, 1]
    out["index"].numpy()[:] = np.asarray(indices, np.int64)


def fill_device_fields(out: Mapping[str, torch.Tensor], draws: BatchDraws, layer_of_mask: Sequence[np.ndarray],
                       ids: Sequence[np.ndarray], indices: Sequence[int], size: int) -> None:
    """Everything of a device-geometry batch except ``image`` and ``mask_layers`` (the caller
    decodes those into the batch): slot k of sample b is label ``chosen + 1`` of layer
    ``layer_of_mask[chosen]`` (``MaskLayers``' numbering), value 0 = empty slot."""
    fill_draw_fields(out, draws, ids, indices)
    chosen = draws.chosen
    table = padded_ids(layer_of_mask, max([len(i) for i in layer_of_mask] + [1]))
    out["mask_layer"].numpy()[:] = np.where(chosen >= 0, np.take_along_axis(table, np.maximum(chosen, 0), axis=1), 0)
    out["mask_value"].numpy()[:] = chosen + 1
    out["core_box"].numpy()[:] = draws.core
    out["view_size"].numpy()[:] = size
    if "sector" in out:
        out["sector"].numpy()[:] = draws.sector
        out["convexity"].numpy()[:] = draws.convexity
        out["apex"].numpy()[:] = np.nan_to_num(draws.apex)


def build_batch(views: PairedViews, samples: Sequence[tuple], indices: Sequence[int],
                rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """The collated batch of ``samples`` — each ``(image (H, W) uint8, masks (bool (M, H, W) or
    MaskLayers), ids (M,), area grid (M, g, g) or None[, scan region bool (H, W) or None])`` —
    with every draw from ``rng``. When some sample has a scan region the batch carries
    ``core_region`` (device geometry: ``region``), all ones for the samples without.

    For callers that hold decoded samples; ``shards.stream`` does the same with the decode
    writing into the batch itself.
    """
    config = views.config
    checked, regions = [], []
    for sample in samples:
        image, masks, ids, grid = sample[:4]
        checked.append(views._checked(image, masks, ids) + (grid,))
        regions.append(views._checked_region(sample[4] if len(sample) > 4 else None, checked[-1][0].shape))
    has_region = any(region is not None for region in regions)
    shapes = [image.shape for image, _, _, _ in checked]
    grids = [None if grid is None else np.asarray(grid) for _, _, _, grid in checked]
    draws = draw_batch(rng, shapes, config=config, grids=grids, masks=[m for _, m, _, _ in checked],
                       regions=regions if has_region else None)
    batch = len(checked)
    ids = [i for _, _, i, _ in checked]
    if config.geometry != "device":
        out = alloc_batch(worker_batch_layout(batch, config, region=has_region))
        arrays = {name: value.numpy() for name, value in out.items()}
        for row, (image, masks, sample_ids, _) in enumerate(checked):
            views.render(image, masks, sample_ids, draws, row, out=arrays, region=regions[row])
        out["index"].numpy()[:] = np.asarray(indices, np.int64)
        return out
    layer_sets = [m if isinstance(m, MaskLayers) else as_mask_layers(m) for _, m, _, _ in checked]
    height = max(s[0] for s in shapes)
    width = max(s[1] for s in shapes)
    wide = any(m.layers.dtype != np.uint8 for m in layer_sets)
    out = alloc_batch(device_batch_layout(batch, config, height, width, max(len(m.layers) for m in layer_sets), wide,
                                          region=has_region))
    images, layers = out["image"].numpy(), out["mask_layers"].numpy()
    for row, ((image, _, _, _), masks) in enumerate(zip(checked, layer_sets)):
        place_on_canvas(images[row, 0], image)
        place_layers_on_canvas(layers[row], masks.layers)
        if has_region:
            place_region_on_canvas(out["region"].numpy()[row, 0], regions[row], image.shape)
    fill_device_fields(out, draws, [m.layer_of_mask for m in layer_sets], ids, indices, config.size)
    return out


def as_mask_layers(masks: np.ndarray) -> MaskLayers:
    """Boolean planes (M, H, W), which may overlap, as ``MaskLayers`` with one layer per mask
    (layer i holds label i + 1 where mask i is set)."""
    masks = np.asarray(masks, dtype=bool)
    count = len(masks)
    dtype = np.uint8 if count < 255 else np.uint16
    labels = np.arange(1, count + 1, dtype=dtype)[:, None, None]
    return MaskLayers(np.where(masks, labels, 0).astype(dtype), np.arange(count, dtype=np.int64))


def place_on_canvas(canvas: np.ndarray, image: np.ndarray | None, height: int | None = None, width: int | None = None) -> None:
    """Copy ``image`` (..., H, W) into the top-left corner of ``canvas`` and zero the rest. The
    padding is never read by the device geometry; it is zeroed so that batches are deterministic.
    ``image=None``: the data is already in place (decoded there), with the given height and width."""
    if image is not None:
        height, width = image.shape[-2:]
        canvas[..., :height, :width] = image
    canvas[..., height:, :] = 0
    canvas[..., :height, width:] = 0


def place_region_on_canvas(canvas: np.ndarray, region: np.ndarray | None, shape: tuple[int, int]) -> None:
    """A sample's scan region (bool (H, W)) as {0, 1} in the top-left of ``canvas``; a sample
    without one gets ones over its image (all of it counts), zeros in the padding."""
    height, width = shape
    if region is None:
        canvas[:height, :width] = 1
    else:
        canvas[:height, :width] = region
    place_on_canvas(canvas, None, height, width)


def place_layers_on_canvas(canvas: np.ndarray, layers: np.ndarray | None, count: int | None = None,
                           height: int | None = None, width: int | None = None) -> None:
    """``place_on_canvas`` for (L, H, W) layers in an (L_max, H_max, W_max) canvas; layers past
    L are zeroed. ``layers=None``: already decoded into ``canvas[:count]``."""
    if layers is not None:
        count = len(layers)
        height, width = layers.shape[-2:]
    place_on_canvas(canvas[:count], layers, height, width)
    canvas[count:] = 0
