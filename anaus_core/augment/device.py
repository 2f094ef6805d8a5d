"""Device side of the pre-training input: collated uint8 batch -> normalised float tensors.

``prepare_batch`` moves the pre-training batch (``anaus_core.augment.collate``) to the device, unpacks the bit-packed masks,
runs the BYOL photometric ops batched per view (``anaus_core.augment.photometric``), normalises
and repeats the grayscale channel to 3. The core crop gets no photometric op (the damage of
L_ctx is applied to it later, by the model) — only the same normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

import torch
import torch.nn.functional as F

from anaus_core.augment import ultrasound
from anaus_core.augment.photometric import PhotometricConfig, apply_params, byol_view_configs, sample_params

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MASK_POOL_SCALES = (7, 14, 28, 56)
POLICIES = ("paper", "ultrasound")


def _default_view1() -> PhotometricConfig:
    return byol_view_configs()[0]


def _default_view2() -> PhotometricConfig:
    return byol_view_configs()[1]


@dataclass
class DeviceAugmentConfig:
    """Photometric settings of both views and the normalisation (ImageNet statistics by default,
    so an ImageNet-initialised backbone sees inputs in its usual range).

    ``policy``: ``"paper"`` — BYOL's colour jitter, blur and solarisation (``view1``/``view2``, the
    paper's A.1); ``"ultrasound"`` — bounded gain, time-gain compensation, log-compression and
    sub-speckle blur (``ultrasound``, ``anaus_core.augment.ultrasound``), which keep the intensity
    relations an echogenicity judgement rests on. ``docs/objectives.md`` compares them.
    """

    view1: PhotometricConfig = field(default_factory=_default_view1)
    view2: PhotometricConfig = field(default_factory=_default_view2)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    photometric: bool = True        # False: geometry only (ablations, debugging)
    policy: Literal["paper", "ultrasound"] = "paper"
    ultrasound: ultrasound.UltrasoundIntensityConfig = field(default_factory=ultrasound.UltrasoundIntensityConfig)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field for an unknown policy or out-of-range bounds."""
        if self.policy not in POLICIES:
            raise ValueError(f"augment.policy: one of {', '.join(POLICIES)}, got {self.policy!r}")
        self.ultrasound.validate()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "DeviceAugmentConfig":
        """Build from a plain (YAML) dict; ``view1``/``view2`` may be dicts of ``PhotometricConfig`` fields."""
        if data is None:
            return cls()
        if isinstance(data, cls):
            return data
        data = dict(data)
        unknown = set(data) - {"view1", "view2", "mean", "std", "photometric", "policy", "ultrasound"}
        if unknown:
            raise ValueError(f"unknown augment settings: {sorted(unknown)}")
        base = cls()
        view1 = base.view1.__class__(**{**base.view1.__dict__, **dict(data.pop("view1", {}) or {})})
        view2 = base.view2.__class__(**{**base.view2.__dict__, **dict(data.pop("view2", {}) or {})})
        us = data.pop("ultrasound", None)
        us = us if isinstance(us, ultrasound.UltrasoundIntensityConfig) else \
            ultrasound.UltrasoundIntensityConfig(**{**base.ultrasound.__dict__, **dict(us or {})})
        out = cls(view1=view1, view2=view2, ultrasound=us,
                  **{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
        out.validate()
        return out


def unpack_masks(packed: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """Inverse of ``np.packbits(..., axis=-1, bitorder="big")`` with torch bit ops.

    packed: uint8 (..., W // 8) -> uint8 (..., W) in {0, 1}.
    """
    shifts = torch.arange(7, -1, -1, device=packed.device, dtype=torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    bits = bits.reshape(*packed.shape[:-1], packed.shape[-1] * 8)
    return bits if width is None else bits[..., :width]


def normalize_gray(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(B, 1, H, W) in [0, 1] -> (B, 3, H, W) normalised with per-channel mean/std."""
    mean_t = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return (images.expand(-1, 3, -1, -1) - mean_t) / std_t


def pool_masks(masks: torch.Tensor, scales=MASK_POOL_SCALES) -> dict[int, torch.Tensor]:
    """Area fraction of each mask per cell at each scale: ``adaptive_avg_pool2d`` of (B, K, S, S) floats."""
    return {scale: F.adaptive_avg_pool2d(masks, scale) for scale in scales}


def prepare_batch(batch: Mapping[str, torch.Tensor], *, device: torch.device | str, generator: torch.Generator,
                  config: DeviceAugmentConfig | Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The model's input from a collated CPU batch.

    Returns ``view1, view2`` float (B, 3, S, S) after the batched BYOL photometric ops and
    normalisation; ``masks1, masks2`` float (B, K, S, S) in {0, 1}; ``core`` float (B, 3, S, S)
    normalised (intact); ``core_region`` float (B, 1, S, S) in {0, 1} when the batch has scan
    regions (the region cut like the core); ``mask_ids``, ``mask_valid1/2``, ``core_valid`` (and ``crop1/2``,
    ``flip1/2``, ``index`` when present) moved to the device. ``generator`` must live on
    ``device``; it alone decides the photometric draws.

    A device-geometry batch (``ViewConfig(geometry="device")``: ``image``, ``mask_layers``, boxes)
    is first cut and resized here; the result equals the worker path's (masks exactly, images
    within one grey level) and the photometric draws are the same for the same generator.
    """
    config = DeviceAugmentConfig.from_dict(config) if not isinstance(config, DeviceAugmentConfig) else config
    device = torch.device(device)
    non_blocking = device.type == "cuda"
    moved = {name: value.to(device, non_blocking=non_blocking) for name, value in batch.items()
             if isinstance(value, torch.Tensor)}
    out: dict[str, torch.Tensor] = {}
    if "image" in moved:
        # device-geometry batch: cut, resize and flip here (anaus_core.augment.device_geometry)
        from anaus_core.augment.device_geometry import apply_device_geometry

        size = int(batch["view_size"].reshape(-1)[0])  # read on the CPU copy: no device sync
        geometry = apply_device_geometry(moved, size)
        views = {name: geometry[name] for name in ("view1", "view2", "core")}
        for name in ("masks1", "masks2"):
            out[name] = geometry[name].float()
        for name in ("mask_valid1", "mask_valid2"):
            moved[name] = geometry[name]
        if "core_region" in geometry:
            out["core_region"] = geometry["core_region"].float()
    else:
        size = moved["view1"].shape[-1]
        views = {name: moved[name].float().div_(255.0) for name in ("view1", "view2", "core")}
        for name in ("masks1", "masks2"):
            out[name] = unpack_masks(moved[name], size).float()
        if "core_region" in moved:
            out["core_region"] = unpack_masks(moved["core_region"], size).float()
    for name, view_config in (("view1", config.view1), ("view2", config.view2)):
        images = views[name]
        if config.photometric and config.policy == "ultrasound":
            us_params = ultrasound.sample_params(images.shape[0], images.shape[-2], config.ultrasound,
                                                 generator=generator, device=device)
            images = ultrasound.apply_params(images, us_params, config.ultrasound)
        elif config.photometric:
            params = sample_params(images.shape[0], view_config, generator=generator, device=device)
            images = apply_params(images, params, view_config)
        out[name] = normalize_gray(images, config.mean, config.std)
    out["core"] = normalize_gray(views["core"], config.mean, config.std)
    for name in ("mask_ids", "mask_valid1", "mask_valid2", "core_valid", "crop1", "crop2", "flip1", "flip2", "index"):
        if name in moved:
            out[name] = moved[name]
    return out
