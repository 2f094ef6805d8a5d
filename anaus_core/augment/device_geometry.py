"""Batched view geometry on the training device (``ViewConfig(geometry="device")``).

In this mode the DataLoader workers only decode and draw the random numbers (crop boxes, flips,
mask ids); they ship the un-augmented image, the label layers that hold the sampled masks and
the boxes (``anaus_core.augment.collate`` pads them to a common canvas). Here the whole batch is
cut and resized at once, with the same rules as the worker path (``anaus_core.augment.geometry``):

* images: torchvision's antialiased bilinear ``resized_crop``. There is no batched per-sample-box
  version of it in torchvision (``roi_align`` averages bilinear taps over a bin instead of using
  the antialias triangle filter, and samples outside the crop), so it is written here as what
  torch computes: a separable resampling whose per-output-pixel weights follow ATen's
  ``_compute_indices_min_size_weights_aa`` (support = scale when down-sampling, taps restricted
  to the crop, weights normalised). One ``bmm`` per axis applies a different box to every image.
  ``tests/test_device_geometry.py`` holds it within one grey level of ``TF.resized_crop``
  (torch's uint8 kernel rounds through 16-bit fixed-point weights and a uint8 intermediate).
* masks: nearest-exact, the same float32 index arithmetic as ``geometry.nearest_exact_indices``,
  gathered from the label layers and compared with each slot's label: bit-identical to the
  worker path.

Hand-written because of the batching, not the maths: the per-sample Python loop over
``TF.resized_crop`` on a GPU would cost B kernel launches per view. On a CPU device the loop is
what runs (``method="auto"``): dense (S × H) weight matrices cost ~40× more there.
"""

from __future__ import annotations

from typing import Mapping

import torch


def antialias_bilinear_weights(start: torch.Tensor, length: torch.Tensor, size: int, extent: int,
                               flip: torch.Tensor | None = None) -> torch.Tensor:
    """Resampling matrix of torch's antialiased bilinear resize of ``[start, start+length)`` to ``size``.

    Args:
        start, length: (B,) crop start and length along one axis, in input pixels.
        size: output length.
        extent: input length along that axis (the padded canvas).
        flip: optional bool (B,): reverse the output order (a horizontal flip of the view).

    Returns:
        float32 (B, size, extent): row ``i`` holds the weights of output pixel ``i``; zero
        outside the crop, rows sum to 1.
    """
    device = start.device
    start = start.to(torch.float64)
    length = length.to(torch.float64)
    scale = length / size
    down = scale >= 1.0
    support = torch.where(down, scale, torch.ones_like(scale))
    invscale = torch.where(down, 1.0 / scale, torch.ones_like(scale))
    centre = scale[:, None] * (torch.arange(size, device=device, dtype=torch.float64) + 0.5)   # (B, S)
    first = torch.clamp(torch.floor(centre - support[:, None] + 0.5), min=0.0)
    stop = torch.minimum(torch.floor(centre + support[:, None] + 0.5), length[:, None])
    relative = torch.arange(extent, device=device, dtype=torch.float64)[None, :] - start[:, None]  # (B, E)
    relative = relative[:, None, :]
    weights = torch.clamp(1.0 - (relative - centre[..., None] + 0.5).abs() * invscale[:, None, None], min=0.0)
    weights = weights * ((relative >= first[..., None]) & (relative < stop[..., None]))
    weights = weights / weights.sum(dim=-1, keepdim=True)
    if flip is not None:
        weights = torch.where(flip.to(torch.bool)[:, None, None], weights.flip(1), weights)
    return weights.to(torch.float32)


def nearest_exact_index(start: torch.Tensor, length: torch.Tensor, size: int) -> torch.Tensor:
    """(B, size) int64 source index of each output pixel, nearest-exact: float32 arithmetic
    identical to ``geometry.nearest_exact_indices`` (and to torch's ``nearest-exact``)."""
    scale = length.to(torch.float32) / torch.tensor(float(size), dtype=torch.float32, device=length.device)
    centres = torch.arange(size, device=length.device, dtype=torch.float32) + 0.5
    index = torch.floor(centres[None, :] * scale[:, None]).to(torch.int64)
    return start.to(torch.int64)[:, None] + torch.minimum(index, length.to(torch.int64)[:, None] - 1)


def resized_crop_batch(images: torch.Tensor, boxes: torch.Tensor, size: int,
                       flips: torch.Tensor | None = None, *, method: str = "auto") -> torch.Tensor:
    """Per-image resized crop (+ optional horizontal flip) of a batch, rounded like uint8 output.

    Args:
        images: (B, C, H, W) uint8 or float in [0, 255].
        boxes: (B, 4) (top, left, height, width) in pixels, each inside its image.
        flips: optional bool (B,).
        method: ``"matmul"`` (two batched matrix products, for accelerators), ``"per_image"``
            (torchvision's uint8 ``resized_crop`` image by image: the worker path itself, and
            ~40x cheaper than dense matrices on a CPU) or ``"auto"`` (per_image on CPU).

    Returns:
        float32 (B, C, size, size) holding whole numbers in [0, 255].
    """
    batch, channels, height, width = images.shape
    if method == "auto":
        method = "per_image" if images.device.type == "cpu" else "matmul"
    if method == "per_image":
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        pixels = images if images.dtype == torch.uint8 else images.round().clamp(0, 255).to(torch.uint8)
        corners = boxes.to(torch.int64).tolist()
        flipped = flips.tolist() if flips is not None else [False] * batch
        out = []
        for image, (top, left, box_h, box_w), flip in zip(pixels, corners, flipped):
            view = TF.resized_crop(image, top, left, box_h, box_w, [size, size],
                                   interpolation=InterpolationMode.BILINEAR, antialias=True)
            out.append(TF.horizontal_flip(view) if flip else view)
        return torch.stack(out).to(torch.float32)
    if method != "matmul":
        raise ValueError(f"method must be 'auto', 'matmul' or 'per_image', got {method!r}")
    boxes = boxes.to(images.device)
    rows = antialias_bilinear_weights(boxes[:, 0], boxes[:, 2], size, height)                 # (B, S, H)
    cols = antialias_bilinear_weights(boxes[:, 1], boxes[:, 3], size, width, flips)           # (B, S, W)
    pixels = images.to(torch.float32).reshape(batch * channels, height, width)
    rows = rows.repeat_interleave(channels, dim=0)
    cols = cols.repeat_interleave(channels, dim=0)
    out = torch.bmm(torch.bmm(rows, pixels), cols.transpose(1, 2))
    return out.round_().clamp_(0, 255).reshape(batch, channels, size, size)


def warp_layers_batch(layers: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """Nearest-exact crop + resize (+ flip) of label layers (B, L, H, W) -> (B, L, size, size)."""
    batch, count = layers.shape[:2]
    boxes = boxes.to(layers.device)
    rows = nearest_exact_index(boxes[:, 0], boxes[:, 2], size)
    cols = nearest_exact_index(boxes[:, 1], boxes[:, 3], size)
    cols = torch.where(flips.to(torch.bool)[:, None], cols.flip(1), cols)
    sample = torch.arange(batch, device=layers.device)[:, None, None, None]
    layer = torch.arange(count, device=layers.device)[None, :, None, None]
    return layers[sample, layer, rows[:, None, :, None], cols[:, None, None, :]]


def select_masks(warped_layers: torch.Tensor, mask_layer: torch.Tensor, mask_value: torch.Tensor) -> torch.Tensor:
    """uint8 (B, K, S, S) in {0, 1}: slot k is ``warped_layers[b, mask_layer[b, k]] == mask_value[b, k]``
    (an empty slot, value 0, is all zero)."""
    batch, _, size, _ = warped_layers.shape
    slots = mask_layer.shape[1]
    chosen = torch.gather(warped_layers, 1, mask_layer[:, :, None, None].expand(batch, slots, size, size))
    value = mask_value.to(warped_layers.dtype)[:, :, None, None]
    return ((chosen == value) & (mask_value > 0)[:, :, None, None]).to(torch.uint8)


def apply_device_geometry(batch: Mapping[str, torch.Tensor], size: int, *, method: str = "auto") -> dict[str, torch.Tensor]:
    """Both views, their masks and the core from a device-geometry batch already on the device.

    Returns ``view1, view2, core`` float (B, 1, S, S) in [0, 1] (multiples of 1/255, as the
    worker path's uint8 views divided by 255), ``masks1, masks2`` uint8 (B, K, S, S) and
    ``mask_valid1/2`` bool (B, K); with a ``region`` canvas also ``core_region`` uint8 (B, 1, S, S)
    in {0, 1} (zeros for an invalid core). ``method``: see ``resized_crop_batch``.
    """
    image = batch["image"]
    layers = batch["mask_layers"]
    if layers.dtype not in (torch.uint8, torch.int16, torch.int32, torch.int64):
        raise ValueError(f"mask_layers must be an integer tensor, got {layers.dtype}")
    out: dict[str, torch.Tensor] = {}
    # boxes are in stored-image pixels; the canvas starts at canvas_origin of each image
    origin = torch.zeros((image.shape[0], 4), dtype=torch.float32, device=image.device)
    if "canvas_origin" in batch:
        origin[:, :2] = batch["canvas_origin"].to(device=image.device, dtype=torch.float32)
    for which in (1, 2):
        boxes, flips = batch[f"crop{which}"].to(image.device) - origin, batch[f"flip{which}"]
        view_image, view_layers = image, layers
        if "sector" in batch:
            apex = batch["apex"].to(device=image.device, dtype=torch.float32).clone()
            apex[:, :2] -= origin[:, :2]
            view_image, view_layers = _sector_warped(image, layers, batch["sector"][:, which - 1],
                                                     batch["convexity"][:, which - 1], apex)
        out[f"view{which}"] = resized_crop_batch(view_image, boxes, size, flips, method=method).div_(255.0)
        masks = select_masks(warp_layers_batch(view_layers, boxes, flips, size), batch["mask_layer"], batch["mask_value"])
        out[f"masks{which}"] = masks
        out[f"mask_valid{which}"] = masks.flatten(2).any(dim=-1).to(torch.bool)  # any() of uint8 is uint8
    valid = batch["core_valid"].to(torch.bool)
    # an invalid core has no box; resample a 1-pixel stand-in and zero it, as the worker path does
    stand_in = torch.tensor([0.0, 0.0, 1.0, 1.0], device=image.device)
    core_boxes = torch.where(valid[:, None], batch["core_box"].to(image.device) - origin, stand_in)
    core = resized_crop_batch(image, core_boxes, size, method=method)
    out["core"] = core.mul_(valid[:, None, None, None].to(core.dtype)).div_(255.0)
    if "region" in batch:
        # the scan region cut exactly like the core, with the masks' nearest-exact rule (never flipped)
        no_flip = torch.zeros_like(valid)
        region = warp_layers_batch(batch["region"], core_boxes, no_flip, size)
        out["core_region"] = region.to(torch.uint8) * valid[:, None, None, None].to(torch.uint8)
    return out


def _sector_warped(image: torch.Tensor, layers: torch.Tensor, factor: torch.Tensor, convexity: torch.Tensor,
                   apex: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One view's sector-angle / convexity change (``probe_geometry``) of the whole canvas: the
    image bilinearly (rounded, as the worker path's uint8 warp), the label layers nearest-exact.
    Computed for every sample and selected per sample (no data-dependent shapes or syncs);
    factors 1 keep a sample as it is."""
    from anaus_core.augment.probe_geometry import source_points, warp_images, warp_labels

    height, width = image.shape[-2:]
    factor, convexity = factor.to(image.device), convexity.to(image.device)
    warp = ((factor != 1.0) | (convexity != 1.0))[:, None, None, None]
    rows, cols = source_points(height, width, apex, factor, convexity)
    warped = warp_images(image.to(torch.float32), rows, cols).round_().clamp_(0, 255)
    warped_layers = warp_labels(layers, rows, cols)
    return (torch.where(warp, warped, image.to(torch.float32)),
            torch.where(warp, warped_layers, layers))
