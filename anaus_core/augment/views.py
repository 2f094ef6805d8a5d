"""Two geometric views of one image with the sampled masks following them, plus the core crop.

Runs per sample on the CPU (DataLoader workers). Only geometry happens here — random resized crop
(scale 0.2–1.0, ratio 3/4–4/3, BYOL/paper A.1) and horizontal flip; the photometric part of the
BYOL recipe is batched on the training device (``anaus_core.augment.device``), where it is
~20–50× cheaper than torchvision's per-image CPU ops (SPEC §9).

Per sample this produces the CONTRACTS.md "pre-training batch" fields (numpy, un-batched):

    view1, view2        uint8 (1, S, S)
    masks1, masks2      uint8 (K, S, S // 8)   bit-packed along width (np.packbits, big-endian bits)
    mask_ids            int64 (K,)             0 where the image has no mask at all
    mask_valid1/2       bool  (K,)             the sampled mask is non-empty in that view
    core                uint8 (1, S, S)        the overlap of both crops, from the un-augmented image
    core_valid          bool  ()
    crop1, crop2        float32 (4,)           (top, left, height, width), original pixels
    flip1, flip2        bool  ()

Only the K sampled masks (at most K distinct ones) are warped and packed, never the whole set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from anaus_core.augment.geometry import (
    CropBox,
    box_area_exact,
    box_area_from_grid,
    intersect_boxes,
    resize_region,
    sample_resized_crop,
    warp_image,
    warp_masks,
)
from anaus_core.augment.sampling import area_weights, sample_mask_indices


@dataclass
class ViewConfig:
    """Geometry and mask-sampling settings of the paired views (defaults: BYOL / paper A.1).

    ``sampling_area``: how the per-view mask areas that weight the id sampling are measured —
    ``"grid"`` from the stored area-fraction pyramid (SPEC §4: "the stored pyramid serves
    sampling weights"; exact except on the crop border cells) when the caller passes one, else
    ``"exact"`` pixel counts. ``core_min_side``: an overlap thinner than this (original pixels)
    counts as no overlap (``core_valid=False``): stretching a sliver to S×S would feed the
    contextual loss mostly interpolation.
    """

    size: int = 224
    scale_min: float = 0.2
    scale_max: float = 1.0
    ratio_min: float = 3 / 4
    ratio_max: float = 4 / 3
    flip_p: float = 0.5
    num_mask_samples: int = 16
    core_min_side: int = 8
    sampling_area: str = "grid"

    def __post_init__(self) -> None:
        if self.size < 8 or self.size % 8:
            raise ValueError(f"view size must be a positive multiple of 8 (masks are bit-packed), got {self.size}")
        if not 0 < self.scale_min <= self.scale_max <= 1:
            raise ValueError(f"crop scale range must satisfy 0 < min <= max <= 1, got ({self.scale_min}, {self.scale_max})")
        if not 0 < self.ratio_min <= self.ratio_max:
            raise ValueError(f"crop ratio range is invalid: ({self.ratio_min}, {self.ratio_max})")
        if not 0 <= self.flip_p <= 1:
            raise ValueError(f"flip_p must be in [0, 1], got {self.flip_p}")
        if self.num_mask_samples < 1:
            raise ValueError(f"num_mask_samples must be >= 1, got {self.num_mask_samples}")
        if self.sampling_area not in ("grid", "exact"):
            raise ValueError(f"sampling_area must be 'grid' or 'exact', got {self.sampling_area!r}")


class PairedViews:
    """Picklable callable: ``(image, masks, ids, rng, area_grid=None) -> dict`` of one sample's fields.

    Args (of ``__call__``):
        image: uint8 (H, W) grayscale at stored size.
        masks: bool (M, H, W) full-size masks (may overlap, M may be 0).
        ids: int (M,) mask ids (>= 1).
        rng: the sample's own generator (the stream seeds it from (seed, epoch, position)).
        area_grid: optional float (M, g, g) area fraction of each grid cell per mask (the stored
            pyramid / 255) used for the sampling weights when ``config.sampling_area == "grid"``.
    """

    def __init__(self, config: ViewConfig | None = None) -> None:
        self.config = config or ViewConfig()

    def sample_geometry(self, rng: np.random.Generator, height: int, width: int) -> tuple[CropBox, bool]:
        config = self.config
        box = sample_resized_crop(rng, height, width, scale=(config.scale_min, config.scale_max),
                                  ratio=(config.ratio_min, config.ratio_max))
        flip = bool(rng.random() < config.flip_p)
        return box, flip

    def _view_areas(self, masks: np.ndarray, box: CropBox, area_grid: np.ndarray | None) -> np.ndarray:
        height, width = masks.shape[1], masks.shape[2]
        if self.config.sampling_area == "grid" and area_grid is not None:
            areas = box_area_from_grid(area_grid, box, height, width)
        else:
            areas = box_area_exact(masks, box).astype(np.float64)
        # Weights are in view pixels: what the loss sees after the crop is resized to S×S.
        return areas * (self.config.size ** 2 / (box.height * box.width))

    def __call__(self, image: np.ndarray, masks: np.ndarray, ids: np.ndarray, *, rng: np.random.Generator,
                 area_grid: np.ndarray | None = None) -> dict[str, np.ndarray]:
        config = self.config
        size, num = config.size, config.num_mask_samples
        image = np.asarray(image)
        if image.ndim != 2 or image.dtype != np.uint8:
            raise ValueError(f"image must be uint8 (H, W), got {image.dtype} {image.shape}")
        height, width = image.shape
        masks = np.asarray(masks, dtype=bool)
        if masks.ndim != 3 or masks.shape[1:] != (height, width):
            raise ValueError(f"masks must be (M, {height}, {width}), got {masks.shape}")
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)

        box1, flip1 = self.sample_geometry(rng, height, width)
        box2, flip2 = self.sample_geometry(rng, height, width)

        packed_width = size // 8
        masks1 = np.zeros((num, size, packed_width), np.uint8)
        masks2 = np.zeros((num, size, packed_width), np.uint8)
        mask_ids = np.zeros(num, np.int64)
        valid1 = np.zeros(num, bool)
        valid2 = np.zeros(num, bool)
        if len(masks):
            weights = area_weights(self._view_areas(masks, box1, area_grid), self._view_areas(masks, box2, area_grid))
            chosen = sample_mask_indices(weights, num, rng)
            if chosen.size:
                unique, slot_to_unique = np.unique(chosen, return_inverse=True)
                selected = masks[unique]
                for box, flip, packed_out, valid_out in ((box1, flip1, masks1, valid1), (box2, flip2, masks2, valid2)):
                    warped = np.ascontiguousarray(warp_masks(selected, box, flip, size))
                    # size % 8 == 0, so packing the flat array is packing each row (and ~20x faster
                    # than packbits(axis=-1) on numpy's strided fancy-index output)
                    packed = np.packbits(warped.reshape(-1), bitorder="big").reshape(len(unique), size, packed_width)
                    packed_out[:] = packed[slot_to_unique]
                    valid_out[:] = packed.reshape(len(unique), -1).any(axis=1)[slot_to_unique]
                mask_ids[:] = ids[chosen]

        overlap = intersect_boxes(box1, box2)
        core_valid = overlap is not None and min(overlap.height, overlap.width) >= config.core_min_side
        core = resize_region(image, overlap, size) if core_valid else np.zeros((size, size), np.uint8)

        return {
            "view1": warp_image(image, box1, flip1, size)[None],
            "view2": warp_image(image, box2, flip2, size)[None],
            "masks1": masks1,
            "masks2": masks2,
            "mask_ids": mask_ids,
            "mask_valid1": valid1,
            "mask_valid2": valid2,
            "core": core[None],
            "core_valid": np.bool_(core_valid),
            "crop1": box1.as_array(),
            "crop2": box2.as_array(),
            "flip1": np.bool_(flip1),
            "flip2": np.bool_(flip2),
        }
