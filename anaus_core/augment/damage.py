"""Damage function D = occlusion(gamma) o noise(beta) o shuffle(alpha) (paper eq. 6), batched on the device.

Applied to the normalised core crop (B, C, H, W) on the training device with no per-image
Python loops. Exact semantics (the paper gives only the names and alpha, beta, gamma):

1. **Local pixel shuffle** (alpha = 0.15): the image is cut into non-overlapping
   ``patch_size`` x ``patch_size`` patches (default 8; a border narrower than one patch is left
   as is). Each patch is independently selected with probability alpha; the pixels of a
   selected patch are randomly permuted (one permutation per patch, shared by the channels,
   which are a repeated grayscale image). Permutations are drawn for the whole batch at once as
   ``argsort`` of uniform keys.
2. **Gaussian noise** (beta = 0.2): ``x + beta * N(0, 1)`` added to every pixel, in
   *normalised* units (the crop is already normalised, so beta = 0.2 is about 0.045 of the
   [0, 1] intensity range with ImageNet statistics); one noise map per image shared by the
   channels.
3. **Occlusion** (gamma = 0.05): one axis-aligned rectangle per image of area
   ``round(gamma * H * W)`` (aspect ratio log-uniform in [1/3, 3], clipped to the image,
   position uniform) is set to the image's per-channel minimum after step 2: a dark region,
   like an acoustic shadow.

Each component has an on/off switch (paper Table 2, right). All randomness comes from one
``torch.Generator``; the draws are made on the generator's device and moved to the images'
device, so a CPU generator gives identical damage on CPU and CUDA. The official code
(Models-Genesis ``AppearanceTransform2D``: shuffle p 0.8 of ~414 random 11 px blocks per
channel, a Bezier intensity curve instead of noise, in-place in-painting) is *not* reproduced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class DamageSettings:
    """Parameters of D. alpha = ``shuffle_prob``, beta = ``noise_std``, gamma = ``occlusion_fraction``."""

    shuffle_prob: float = 0.15
    noise_std: float = 0.2
    occlusion_fraction: float = 0.05
    patch_size: int = 8
    shuffle: bool = True
    noise: bool = True
    occlusion: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.shuffle_prob <= 1.0:
            raise ValueError(f"shuffle_prob must be in [0, 1], got {self.shuffle_prob}")
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")
        if not 0.0 <= self.occlusion_fraction <= 1.0:
            raise ValueError(f"occlusion_fraction must be in [0, 1], got {self.occlusion_fraction}")
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {self.patch_size}")


@dataclass
class DamageDraws:
    """Random draws for one batch. ``None`` = component off.

    ``shuffle_order`` long (B, H//p, W//p, p*p): pixel order inside each patch (identity for
    unselected patches); ``noise`` float (B, 1, H, W) already scaled by beta; ``occlusion_boxes``
    long (B, 4) = (top, left, height, width).
    """

    shuffle_order: Tensor | None
    noise: Tensor | None
    occlusion_boxes: Tensor | None


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    source = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=source).to(device)


def _normal(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    source = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=source).to(device)


def sample_damage(
    shape: tuple[int, int, int, int],
    *,
    settings: DamageSettings,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> DamageDraws:
    """Draw the randomness of D for images of ``shape`` = (B, C, H, W), in a fixed order."""
    device = torch.device(device)
    batch, _, height, width = shape
    patch = settings.patch_size
    rows, cols = height // patch, width // patch
    shuffle_order = None
    if settings.shuffle and settings.shuffle_prob > 0 and rows > 0 and cols > 0:
        keys = _uniform((batch, rows, cols, patch * patch), generator, device)
        selected = _uniform((batch, rows, cols, 1), generator, device) < settings.shuffle_prob
        # unselected patches get strictly increasing keys, so argsort returns the identity
        identity_keys = torch.arange(patch * patch, device=device, dtype=keys.dtype).expand_as(keys)
        shuffle_order = torch.where(selected, keys, identity_keys).argsort(dim=-1)
    noise = None
    if settings.noise and settings.noise_std > 0:
        noise = _normal((batch, 1, height, width), generator, device) * settings.noise_std
    boxes = None
    if settings.occlusion and settings.occlusion_fraction > 0:
        area = settings.occlusion_fraction * height * width
        log_ratio = (_uniform((batch,), generator, device) * 2.0 - 1.0) * math.log(3.0)
        ratio = torch.exp(log_ratio)
        box_h = torch.sqrt(area * ratio).round().clamp(1, height).long()
        box_w = torch.sqrt(area / ratio).round().clamp(1, width).long()
        top = (_uniform((batch,), generator, device) * (height - box_h + 1)).floor().long()
        left = (_uniform((batch,), generator, device) * (width - box_w + 1)).floor().long()
        boxes = torch.stack([top, left, box_h, box_w], dim=1)
    return DamageDraws(shuffle_order=shuffle_order, noise=noise, occlusion_boxes=boxes)


def shuffle_patches(images: Tensor, order: Tensor) -> Tensor:
    """Reorder pixels inside each patch: ``order`` (B, H//p, W//p, p*p) as from ``sample_damage``."""
    batch, channels, height, width = images.shape
    _, rows, cols, patch_area = order.shape
    patch = math.isqrt(patch_area)
    inner = images[:, :, : rows * patch, : cols * patch]
    patches = inner.reshape(batch, channels, rows, patch, cols, patch).permute(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(batch, rows, cols, channels, patch_area)
    index = order[:, :, :, None, :].expand(batch, rows, cols, channels, patch_area)
    shuffled = patches.gather(-1, index)
    shuffled = shuffled.reshape(batch, rows, cols, channels, patch, patch).permute(0, 3, 1, 4, 2, 5)
    out = images.clone()
    out[:, :, : rows * patch, : cols * patch] = shuffled.reshape(batch, channels, rows * patch, cols * patch)
    return out


def occlude(images: Tensor, boxes: Tensor) -> Tensor:
    """Set each image's box (top, left, height, width) to that image's per-channel minimum."""
    _, _, height, width = images.shape
    top, left, box_h, box_w = boxes.unbind(dim=1)
    row = torch.arange(height, device=images.device)
    col = torch.arange(width, device=images.device)
    in_rows = (row[None, :] >= top[:, None]) & (row[None, :] < (top + box_h)[:, None])
    in_cols = (col[None, :] >= left[:, None]) & (col[None, :] < (left + box_w)[:, None])
    inside = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # (B, 1, H, W)
    fill = images.amin(dim=(2, 3), keepdim=True)
    return torch.where(inside, fill, images)


def apply_damage(images: Tensor, draws: DamageDraws) -> Tensor:
    """D(x) for the given draws: shuffle, then noise, then occlusion. Never modifies ``images``."""
    out = images
    if draws.shuffle_order is not None:
        out = shuffle_patches(out, draws.shuffle_order)
    if draws.noise is not None:
        out = out + draws.noise.to(out.dtype)
    if draws.occlusion_boxes is not None:
        out = occlude(out, draws.occlusion_boxes)
    return out if out is not images else images.clone()


@torch.no_grad()
def damage(images: Tensor, *, settings: DamageSettings | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Damaged copy of ``images`` (B, C, H, W): ``apply_damage(images, sample_damage(...))``."""
    settings = settings or DamageSettings()
    draws = sample_damage(tuple(images.shape), settings=settings, generator=generator, device=images.device)
    return apply_damage(images, draws)
