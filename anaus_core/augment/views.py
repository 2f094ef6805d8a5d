"""Two geometric views of one image with the sampled masks following them, plus the core crop.

Runs on the CPU (DataLoader workers); the random draws are made for a whole batch at once
(``anaus_core.augment.draws``; ``PairedViews.__call__`` is the batch of one, the loader uses
``anaus_core.augment.batch``) and the warps per sample. Only geometry happens here — random resized crop
(scale 0.2–1.0, ratio 3/4–4/3, BYOL/paper A.1) and horizontal flip, plus the optional
probe-geometry changes (depth crop, sector angle, convexity: ``anaus_core.augment.probe_geometry``,
off by default); the photometric part of the
BYOL recipe is batched on the training device (``anaus_core.augment.device``), where it is
~20–50× cheaper than torchvision's per-image CPU ops (SPEC §9).

Per sample this produces the pre-training batch fields (``anaus_core.augment.collate``) (numpy, un-batched):

    view1, view2        uint8 (1, S, S)
    masks1, masks2      uint8 (K, S, S // 8)   bit-packed along width (np.packbits, big-endian bits)
    mask_ids            int64 (K,)             0 where the image has no mask at all
    mask_valid1/2       bool  (K,)             the sampled mask is non-empty in that view
    core                uint8 (1, S, S)        the overlap of both crops, from the un-augmented image
    core_valid          bool  ()
    crop1, crop2        float32 (4,)           (top, left, height, width), original pixels
    flip1, flip2        bool  ()
    core_region         uint8 (1, S, S // 8)   only for a sample with a scan region: the region
                                               cut exactly like the core (nearest-exact, as the
                                               masks), bit-packed like them; L_ctx weights each
                                               cell by its region coverage

Only the K sampled masks (at most K distinct ones) are warped and packed, never the whole set.
Masks may come as boolean planes or as the shard store's label layers (``MaskLayers``: the
gather then runs once per layer, not once per mask).

With ``ViewConfig(geometry="device")`` the worker stops after the random draws and ships the
un-augmented image and the label layers of the sampled masks instead of the warped views
(this per-sample path cuts them to the crops' bounding box; the loader's batch path,
``anaus_core.augment.batch``, ships whole images and layers without ``canvas_origin``);
``anaus_core.augment.device.prepare_batch`` cuts and resizes the whole batch on the device
(``anaus_core.augment.device_geometry``) and returns the same tensors. Per-sample fields then:

    image               uint8 (1, h, w)         the stored image inside the bounding box of both
                                                crops (collate pads to a canvas)
    mask_layers         uint8/uint16 (L, h, w)  label layers holding the sampled masks, same region
    canvas_origin       int64 (2,)              (top, left) of that region in the stored image
    mask_layer          int64 (K,)              layer of each slot
    mask_value          int64 (K,)              label of each slot in that layer, 0 = empty slot
    core_box            float32 (4,)            the overlap box (zeros when core_valid is False)
    region              uint8 (1, h, w)         only with a scan region: the region, same cut
    sector, convexity   float32 (2,)            only with sector_angle_p or convexity_p > 0: each
                                                view's factors (1 = none; probe_geometry)
    apex                float32 (3,)            with them: fan apex (row, column, face radius)
    view_size           int64 ()                S
    mask_ids, core_valid, crop1, crop2, flip1, flip2   as above
"""

from __future__ import annotations

from dataclasses import replace, dataclass

import numpy as np

from anaus_core.augment.draws import BatchDraws, draw_batch
from anaus_core.augment.probe_geometry import sector_warp_numpy
from anaus_core.augment.geometry import (
    CropBox,
    resize_region,
    sample_resized_crop,
    warp_image,
    warp_label_layers,
    warp_masks,
)


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
    # Where crop/resize/flip run: "worker" (DataLoader workers, CPU) or "device" (batched on the
    # training device; workers only decode and draw). "auto" = device on CUDA, worker otherwise:
    # on a CPU-only run the main process would do the resizing, which is slower.
    geometry: str = "auto"
    # Which masks the K slots are drawn from: "both" = masks present in both views (each slot then
    # has a positive in the other view), "either" = present in at least one view (DetCon's draw;
    # a mask in one view only has no positive and wastes its slot). Present = at least
    # ``min_view_area`` view pixels (area inside the crop x S^2 / crop area).
    mask_presence: str = "both"
    min_view_area: float = 1.0
    # A core box with less than this fraction of its stored pixels inside the sample's scan
    # region is no core (core_valid=False); cells outside the region never count in L_ctx anyway.
    core_min_region: float = 0.25
    # Probe-geometry changes (anaus_core.augment.probe_geometry; the ``ultrasound`` policy's
    # geometric half, off by default). Depth crop: with probability depth_crop_p a view keeps
    # only the top U(depth_crop_min, 1) of the scan's depth range before its resized crop.
    # Sector angle: with probability sector_angle_p a sector image's fan angle is scaled by
    # U(sector_angle_range) about its apex (needs the scan region; linear images are left alone).
    depth_crop_p: float = 0.0
    depth_crop_min: float = 0.6
    sector_angle_p: float = 0.0
    sector_angle_range: tuple[float, float] = (0.8, 1.25)
    # Convexity: with probability convexity_p a curvilinear image's probe-face radius is scaled
    # by a log-uniform factor in convexity_range (> 1 flatter, < 1 more curved), depth and
    # position along the face kept (needs the scan region; phased arrays and linear images are
    # left alone).
    convexity_p: float = 0.0
    convexity_range: tuple[float, float] = (0.67, 1.5)

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
        if self.mask_presence not in ("both", "either"):
            raise ValueError(f"mask_presence must be 'both' or 'either', got {self.mask_presence!r}")
        self.convexity_range = tuple(float(v) for v in self.convexity_range)
        if len(self.convexity_range) != 2 or not 0.25 <= self.convexity_range[0] <= self.convexity_range[1] <= 4:
            raise ValueError(f"convexity_range must be (low, high) with 0.25 <= low <= high <= 4, got {self.convexity_range}")
        for name in ("depth_crop_p", "sector_angle_p", "convexity_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0 < self.depth_crop_min <= 1:
            raise ValueError(f"depth_crop_min must be in (0, 1], got {self.depth_crop_min}")
        self.sector_angle_range = tuple(float(v) for v in self.sector_angle_range)
        if len(self.sector_angle_range) != 2 or not 0.25 <= self.sector_angle_range[0] <= self.sector_angle_range[1] <= 4:
            raise ValueError(f"sector_angle_range must be (low, high) with 0.25 <= low <= high <= 4, got {self.sector_angle_range}")
        if not 0 <= self.core_min_region <= 1:
            raise ValueError(f"core_min_region must be in [0, 1], got {self.core_min_region}")
        if self.min_view_area < 0:
            raise ValueError(f"min_view_area must be >= 0, got {self.min_view_area}")
        if self.geometry not in ("auto", "worker", "device"):
            raise ValueError(f"geometry must be 'auto', 'worker' or 'device', got {self.geometry!r}")

    def resolved(self, *, on_cuda: bool) -> "ViewConfig":
        """This config with ``geometry`` "auto" made concrete for the training device."""
        if self.geometry != "auto":
            return self
        return replace(self, geometry="device" if on_cuda else "worker")


@dataclass(frozen=True)
class MaskLayers:
    """Masks as label layers (the shard store's ``masks.bin`` layout, ``shards.sample``): mask
    ``i`` is the set of pixels equal to ``i + 1`` in ``layers[layer_of_mask[i]]``.

    Attributes:
        layers: uint8 or uint16 (L, H, W).
        layer_of_mask: int (M,).
    """

    layers: np.ndarray
    layer_of_mask: np.ndarray

    def __len__(self) -> int:
        return len(self.layer_of_mask)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.layers.shape[1]), int(self.layers.shape[2]))

    def masks(self, indices: np.ndarray | None = None) -> np.ndarray:
        """bool (U, H, W) of the masks at ``indices`` (all when None)."""
        indices = np.arange(len(self)) if indices is None else np.asarray(indices, dtype=np.int64)
        values = (indices + 1).astype(self.layers.dtype)[:, None, None]
        return self.layers[np.asarray(self.layer_of_mask, dtype=np.int64)[indices]] == values

    def areas_in_box(self, box: CropBox) -> np.ndarray:
        """Exact pixel count of every mask inside ``box`` (int64 (M,)), one histogram per layer."""
        count = len(self)
        areas = np.zeros(count, np.int64)
        layer_of_mask = np.asarray(self.layer_of_mask, dtype=np.int64)
        for index, layer in enumerate(self.layers):
            region = layer[box.top:box.bottom, box.left:box.right]
            histogram = np.bincount(region.reshape(-1), minlength=count + 1)
            mine = np.flatnonzero(layer_of_mask == index)
            areas[mine] = histogram[mine + 1]
        return areas


class PairedViews:
    """Picklable callable: ``(image, masks, ids, rng, area_grid=None) -> dict`` of one sample's fields.

    Args (of ``__call__``):
        image: uint8 (H, W) grayscale at stored size.
        masks: bool (M, H, W) full-size masks (may overlap, M may be 0).
        ids: int (M,) mask ids (>= 1).
        rng: the sample's own generator (the stream seeds it from (seed, epoch, position)).
        area_grid: optional (M, g, g) area fraction of each grid cell per mask — float fractions,
            or the stored uint8 pyramid level (fraction × 255) — used for the sampling weights
            when ``config.sampling_area == "grid"``.
    """

    def __init__(self, config: ViewConfig | None = None) -> None:
        self.config = config or ViewConfig()

    def sample_geometry(self, rng: np.random.Generator, height: int, width: int) -> tuple[CropBox, bool]:
        """One crop box and flip with this config's ranges (the per-sample reference draw)."""
        config = self.config
        box = sample_resized_crop(rng, height, width, scale=(config.scale_min, config.scale_max),
                                  ratio=(config.ratio_min, config.ratio_max))
        flip = bool(rng.random() < config.flip_p)
        return box, flip

    def __call__(self, image: np.ndarray, masks: np.ndarray | MaskLayers, ids: np.ndarray, *, rng: np.random.Generator,
                 area_grid: np.ndarray | None = None, region: np.ndarray | None = None) -> dict[str, np.ndarray]:
        image, masks, ids = self._checked(image, masks, ids)
        region = self._checked_region(region, image.shape)
        grids = None if area_grid is None else [np.asarray(area_grid)]
        # a batch of one: the draws are exactly those the batched loader path makes (draws.py)
        draws = draw_batch(rng, [image.shape], config=self.config, grids=grids, masks=[masks],
                           regions=None if region is None else [region])
        return self.render(image, masks, ids, draws, 0, region=region)

    @staticmethod
    def _checked_region(region: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray | None:
        if region is None:
            return None
        region = np.asarray(region, dtype=bool)
        if region.shape != tuple(shape):
            raise ValueError(f"scan region must be {tuple(shape)} like the image, got {region.shape}")
        return region

    def _checked(self, image: np.ndarray, masks: np.ndarray | MaskLayers,
                 ids: np.ndarray) -> tuple[np.ndarray, np.ndarray | MaskLayers, np.ndarray]:
        image = np.asarray(image)
        if image.ndim != 2 or image.dtype != np.uint8:
            raise ValueError(f"image must be uint8 (H, W), got {image.dtype} {image.shape}")
        height, width = image.shape
        if isinstance(masks, MaskLayers):
            if masks.shape != (height, width):
                raise ValueError(f"mask layers must be (L, {height}, {width}), got {masks.layers.shape}")
        else:
            masks = np.asarray(masks, dtype=bool)
            if masks.ndim != 3 or masks.shape[1:] != (height, width):
                raise ValueError(f"masks must be (M, {height}, {width}), got {masks.shape}")
        return image, masks, np.asarray(ids, dtype=np.int64).reshape(-1)

    def render(self, image: np.ndarray, masks: np.ndarray | MaskLayers, ids: np.ndarray, draws: BatchDraws,
               sample: int, out: dict[str, np.ndarray] | None = None, region: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Sample ``sample`` of ``draws`` as pre-training batch fields (see the module docstring).

        ``out``: optional batch arrays (B, ...) of the worker-geometry fields; the sample is
        written into row ``sample`` of each (no per-sample arrays, no collate copy) and ``out``
        is returned. Without it a dict of per-sample arrays is returned.

        ``region``: the sample's scan region (bool (H, W)) or None. With it the sample gets
        ``core_region`` (device geometry: ``region``); into an ``out`` that has a
        ``core_region`` field, a sample without a region writes all ones (the whole core counts).
        """
        config = self.config
        size, num = config.size, config.num_mask_samples
        box1, box2 = draws.box(sample, 0), draws.box(sample, 1)
        flip1, flip2 = bool(draws.flips[sample, 0]), bool(draws.flips[sample, 1])
        slots = draws.chosen[sample]
        chosen = slots[slots >= 0]
        core_box = draws.core_box(sample)
        fields = {
            "mask_ids": np.where(slots >= 0, ids[np.maximum(slots, 0)] if len(ids) else 0, 0).astype(np.int64),
            "core_valid": np.bool_(core_box is not None),
            "crop1": box1.as_array(),
            "crop2": box2.as_array(),
            "flip1": np.bool_(flip1),
            "flip2": np.bool_(flip2),
        }
        if config.geometry == "device":
            if out is not None:
                raise ValueError("render(out=...) writes worker-geometry fields only")
            fields.update(self._device_fields(image, masks, chosen, (box1, box2), core_box, region))
            if config.sector_angle_p > 0 or config.convexity_p > 0:
                fields["sector"] = draws.sector[sample].astype(np.float32)
                fields["convexity"] = draws.convexity[sample].astype(np.float32)
                fields["apex"] = np.nan_to_num(draws.apex[sample]).astype(np.float32)
                if (fields["sector"] != 1).any() or (fields["convexity"] != 1).any():
                    # the warp reads outside the crops: ship the whole image (the canvas starts at 0, 0)
                    fields.update(self._device_fields(image, masks, chosen, (CropBox(0, 0, *image.shape),) * 2,
                                                      core_box, region))
            return fields

        packed_width = size // 8
        if out is None:
            row = {
                "view1": np.empty((1, size, size), np.uint8), "view2": np.empty((1, size, size), np.uint8),
                "masks1": np.empty((num, size, packed_width), np.uint8), "masks2": np.empty((num, size, packed_width), np.uint8),
                "mask_valid1": np.empty(num, bool), "mask_valid2": np.empty(num, bool),
                "core": np.empty((1, size, size), np.uint8),
            }
            if region is not None:
                row["core_region"] = np.empty((1, size, packed_width), np.uint8)
            row.update(fields)
        else:
            for name, value in fields.items():
                out[name][sample] = value
            row = {name: out[name][sample] for name in ("view1", "view2", "masks1", "masks2", "mask_valid1", "mask_valid2", "core")}
            if "core_region" in out:
                row["core_region"] = out["core_region"][sample]
        for which, box, flip in ((1, box1, flip1), (2, box2, flip2)):
            packed_out, valid_out = row[f"masks{which}"], row[f"mask_valid{which}"]
            view_image, view_masks = image, masks
            sector = draws.sector_warp(sample, which - 1)
            if sector is not None:
                # the sector-angle / convexity change before the crop (probe_geometry), computed
                # only inside the crop box (the crop reads nothing else), which then starts at 0, 0
                view_image, view_masks = _sector_warped(image, masks, *sector, window=box)
                box = CropBox(0, 0, box.height, box.width)
            if chosen.size:
                unique, slot_to_unique = np.unique(chosen, return_inverse=True)
                warped = self._warp_selected(view_masks, unique, box, flip)
                # size % 8 == 0, so packing the flat array is packing each row
                packed = np.packbits(warped.reshape(-1), bitorder="big").reshape(len(unique), size, packed_width)
                packed_out[:len(chosen)] = packed[slot_to_unique]
                valid_out[:len(chosen)] = packed.reshape(len(unique), -1).any(axis=1)[slot_to_unique]
            # slots are filled in order, so the empty ones (-1) are the tail
            packed_out[len(chosen):] = 0
            valid_out[len(chosen):] = False
            row[f"view{which}"][0] = warp_image(view_image, box, flip, size)
        row["core"][0] = resize_region(image, core_box, size) if core_box is not None else 0
        if "core_region" in row:
            row["core_region"][0] = _packed_core_region(region, core_box, size)
        return out if out is not None else row

    def _warp_selected(self, masks: np.ndarray | MaskLayers, unique: np.ndarray, box: CropBox, flip: bool) -> np.ndarray:
        """bool (U, S, S), contiguous: the masks ``unique`` after the view geometry."""
        size = self.config.size
        if isinstance(masks, MaskLayers):
            layer_of_mask = np.asarray(masks.layer_of_mask, dtype=np.int64)[unique]
            used, layer_slot = np.unique(layer_of_mask, return_inverse=True)
            warped_layers = warp_label_layers(masks.layers[used], box, flip, size)
            return warped_layers[layer_slot] == (unique + 1).astype(masks.layers.dtype)[:, None, None]
        return np.ascontiguousarray(warp_masks(masks[unique], box, flip, size))

    def _device_fields(self, image: np.ndarray, masks: np.ndarray | MaskLayers, chosen: np.ndarray,
                       boxes: tuple[CropBox, CropBox], core_box: CropBox | None,
                       region: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """What the device needs to make the views itself: the image and the sampled masks' layers,
        cut to the bounding box of both crops (the device never reads outside a crop; on average
        this ships ~70% of the pixels). ``canvas_origin`` is that box's top-left corner."""
        num = self.config.num_mask_samples
        top, left = min(b.top for b in boxes), min(b.left for b in boxes)
        bottom, right = max(b.bottom for b in boxes), max(b.right for b in boxes)
        image = image[top:bottom, left:right]
        height, width = image.shape
        mask_layer = np.zeros(num, np.int64)
        mask_value = np.zeros(num, np.int64)
        if not chosen.size:
            layers = np.zeros((0, height, width), np.uint8)
        elif isinstance(masks, MaskLayers):
            layer_of_mask = np.asarray(masks.layer_of_mask, dtype=np.int64)[chosen]
            present = np.bincount(layer_of_mask, minlength=len(masks.layers)) > 0
            if 2 * int(present.sum()) > len(present):
                # most layers hold a sampled mask: ship them all, uncopied (collate copies once)
                mask_layer[:] = layer_of_mask
                layers = masks.layers[:, top:bottom, left:right]
            else:  # ship only the layers that hold a sampled mask, renumbered densely
                mask_layer[:] = (np.cumsum(present) - 1)[layer_of_mask]
                layers = masks.layers[present, top:bottom, left:right]
            mask_value[:] = chosen + 1
        else:
            unique, mask_layer[:] = np.unique(chosen, return_inverse=True)
            layers = masks[unique, top:bottom, left:right].view(np.uint8)
            mask_value[:] = 1
        fields = {} if region is None else {"region": region[None, top:bottom, left:right].view(np.uint8)}
        return fields | {
            "image": image[None],
            "mask_layers": layers,
            "mask_layer": mask_layer,
            "mask_value": mask_value,
            "core_box": core_box.as_array() if core_box is not None else np.zeros(4, np.float32),
            "canvas_origin": np.array([top, left], np.int64),
            "view_size": np.int64(self.config.size),
        }


def _packed_core_region(region: np.ndarray | None, core_box: CropBox | None, size: int) -> np.ndarray:
    """uint8 (S, S // 8): the scan region inside ``core_box`` resized like a mask (nearest-exact,
    no flip: the core is never flipped), bit-packed; all ones without a region, zeros without a core."""
    packed_width = size // 8
    if core_box is None:
        return np.zeros((size, packed_width), np.uint8)
    if region is None:
        return np.full((size, packed_width), 255, np.uint8)
    cut = warp_masks(region[None], core_box, False, size)[0]
    return np.packbits(cut.reshape(-1), bitorder="big").reshape(size, packed_width)


def _sector_warped(image: np.ndarray, masks: np.ndarray | MaskLayers, apex: tuple[float, float, float],
                   factor: float, convexity: float, *, window: CropBox) -> tuple[np.ndarray, np.ndarray | MaskLayers]:
    """The ``window`` of the image and masks after a view's sector-angle / convexity change
    (``probe_geometry``): the image bilinearly, the masks nearest-exact at the same source points."""
    box = (window.top, window.left, window.height, window.width)
    if isinstance(masks, MaskLayers):
        warped, layers, _ = sector_warp_numpy(image, masks.layers, None, apex, factor, convexity, window=box)
        return warped, MaskLayers(layers, masks.layer_of_mask)
    warped, layers, _ = sector_warp_numpy(image, masks.view(np.uint8), None, apex, factor, convexity, window=box)
    return warped, layers.astype(bool)
