"""Damage function D = occlusion(gamma) o noise(beta) o shuffle(alpha) (paper eq. 6), batched on the device.

Applied to the normalised core crop (B, C, H, W) on the training device with no per-image
Python loops. Exact semantics (the paper gives only the names and alpha, beta, gamma):

1. **Local pixel shuffle** (alpha = 0.15): the image is cut into non-overlapping
   ``patch_size`` x ``patch_size`` patches (default 8; a border narrower than one patch is left
   as is). Each patch is independently selected with probability alpha; the pixels of a
   selected patch are randomly permuted (one permutation per patch, shared by the channels,
   which are a repeated grayscale image). Permutations are drawn for all selected patches of
   the batch at once as ``argsort`` of uniform keys.
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

    ``shuffle_patches`` long (N, 3): (image, patch row, patch column) of the N listed patches
    (``sample_damage`` lists all of them: static shapes);
    ``shuffle_order`` long (N, p*p): the new pixel order inside each of them (row-major; the
    identity for patches that were not selected);
    ``noise`` float (B, 1, H, W) already scaled by beta; ``occlusion_boxes`` long (B, 4) =
    (top, left, height, width); ``occlusion_bound`` host-side (max height, max width) of any box
    (None: the image size).
    """

    patch_size: int
    shuffle_patches: Tensor | None
    shuffle_order: Tensor | None
    noise: Tensor | None
    occlusion_boxes: Tensor | None
    occlusion_bound: tuple[int, int] | None = None


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
    selected_patches = shuffle_order = None
    if settings.shuffle and settings.shuffle_prob > 0 and rows > 0 and cols > 0:
        selected = _uniform((batch, rows, cols), generator, device) < settings.shuffle_prob
        # every patch is listed, the unselected ones with the identity order: static shapes and
        # no host-device synchronisation (listing only the selected ones needs ``nonzero``,
        # which waits for the device and gives a data-dependent shape that defeats CUDA graphs)
        keys = _uniform((batch * rows * cols, patch * patch), generator, device)
        identity = torch.arange(patch * patch, device=device, dtype=keys.dtype).add_(1.0)   # > every key
        shuffle_order = torch.where(selected.reshape(-1, 1), keys, identity).argsort(dim=-1)
        grid = torch.meshgrid(torch.arange(batch, device=device), torch.arange(rows, device=device),
                              torch.arange(cols, device=device), indexing="ij")
        selected_patches = torch.stack([axis.reshape(-1) for axis in grid], dim=1)
    noise = None
    if settings.noise and settings.noise_std > 0:
        noise = _normal((batch, 1, height, width), generator, device).mul_(settings.noise_std)
    boxes = bound = None
    if settings.occlusion and settings.occlusion_fraction > 0:
        area = settings.occlusion_fraction * height * width
        log_ratio = (_uniform((batch,), generator, device) * 2.0 - 1.0) * math.log(3.0)
        ratio = torch.exp(log_ratio)
        box_h = torch.sqrt(area * ratio).round().clamp(1, height).long()
        box_w = torch.sqrt(area / ratio).round().clamp(1, width).long()
        top = (_uniform((batch,), generator, device) * (height - box_h + 1)).floor().long()
        left = (_uniform((batch,), generator, device) * (width - box_w + 1)).floor().long()
        boxes = torch.stack([top, left, box_h, box_w], dim=1)
        # aspect ratio <= 3 bounds each side by sqrt(3 * area) (+1 for rounding)
        side = int(math.ceil(math.sqrt(3.0 * area))) + 1
        bound = (min(height, side), min(width, side))
    return DamageDraws(
        patch_size=patch,
        shuffle_patches=selected_patches,
        shuffle_order=shuffle_order,
        noise=noise,
        occlusion_boxes=boxes,
        occlusion_bound=bound if boxes is not None else None,
    )


def shuffle_patches(images: Tensor, patches: Tensor, order: Tensor, patch_size: int) -> Tensor:
    """Copy of ``images`` with the pixels of the listed patches reordered (see ``DamageDraws``).

    The patch grid is laid out patch-major (one copy), the selected patches are gathered as whole
    rows, permuted, written back, and the grid is laid out as an image again (one copy): row
    operations on the alpha fraction instead of pixel-level advanced indexing.
    """
    batch, channels, height, width = images.shape
    rows, cols = height // patch_size, width // patch_size
    inner = images[:, :, : rows * patch_size, : cols * patch_size]
    grid = inner.reshape(batch, channels, rows, patch_size, cols, patch_size).permute(0, 2, 4, 1, 3, 5)
    grid = grid.reshape(batch * rows * cols, channels, patch_size * patch_size)
    if grid._is_view():  # reshape may return a view (e.g. one channel, one patch column)
        grid = grid.clone()
    if patches.shape[0]:
        image_index, row_index, col_index = patches.unbind(dim=1)
        flat_index = (image_index * rows + row_index) * cols + col_index
        selected = grid.index_select(0, flat_index)
        selected = selected.gather(2, order[:, None, :].expand(-1, channels, -1))
        grid.index_copy_(0, flat_index, selected)
    back = grid.reshape(batch, rows, cols, channels, patch_size, patch_size).permute(0, 3, 1, 4, 2, 5)
    back = back.reshape(batch, channels, rows * patch_size, cols * patch_size)
    if rows * patch_size == height and cols * patch_size == width:
        return back.contiguous()
    out = images.clone(memory_format=torch.contiguous_format)
    out[:, :, : rows * patch_size, : cols * patch_size] = back
    return out


def occlude_(images: Tensor, boxes: Tensor, max_h: int | None = None, max_w: int | None = None) -> Tensor:
    """In place: set each image's box (top, left, height, width) to that image's per-channel
    minimum; returns ``images`` (contiguous). Writes only the box pixels (boxes padded to the
    largest one by repeating their last row/column, which rewrites the same value). ``max_h``/
    ``max_w``: host-side bounds on the box sides (default: the image size)."""
    if not images.is_contiguous():
        raise ValueError("occlude_: images must be contiguous")
    batch, channels, height, width = images.shape
    fill = images.amin(dim=(2, 3))  # (B, C)
    top, left, box_h, box_w = boxes.unbind(dim=1)
    # a static bound on the box sides instead of ``int(box_h.max())`` (a host-device sync):
    # padding repeats the last row/column, so a larger bound rewrites the same pixels
    max_h, max_w = max_h or height, max_w or width
    steps_h = torch.arange(max_h, device=images.device)
    steps_w = torch.arange(max_w, device=images.device)
    row = top[:, None] + torch.minimum(steps_h[None, :], box_h[:, None] - 1)  # (B, max_h)
    col = left[:, None] + torch.minimum(steps_w[None, :], box_w[:, None] - 1)  # (B, max_w)
    pixel = row[:, :, None] * width + col[:, None, :]  # (B, max_h, max_w)
    base = (torch.arange(batch, device=images.device)[:, None] * channels
            + torch.arange(channels, device=images.device)[None, :]) * (height * width)  # (B, C)
    index = base[:, :, None, None] + pixel[:, None]  # (B, C, max_h, max_w)
    images.view(-1)[index.reshape(-1)] = fill[:, :, None, None].expand_as(index).reshape(-1).to(images.dtype)
    return images


def _is_channels_last(images: Tensor) -> bool:
    return images.dim() == 4 and not images.is_contiguous() and images.is_contiguous(memory_format=torch.channels_last)


def apply_damage(images: Tensor, draws: DamageDraws) -> Tensor:
    """D(x) for the given draws: shuffle, then noise, then occlusion. Never modifies ``images``."""
    if draws.shuffle_patches is not None and draws.shuffle_order is not None:
        out = shuffle_patches(images, draws.shuffle_patches, draws.shuffle_order, draws.patch_size)
    else:
        out = images.clone(memory_format=torch.contiguous_format)
    if draws.noise is not None:
        out.add_(draws.noise.to(out.dtype))
    if draws.occlusion_boxes is not None:
        occlude_(out, draws.occlusion_boxes, *(draws.occlusion_bound or (None, None)))
    return out.contiguous(memory_format=torch.channels_last) if _is_channels_last(images) else out


@torch.no_grad()
def damage(
    images: Tensor, *, settings: DamageSettings | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """Damaged copy of ``images`` (B, C, H, W): ``apply_damage(images, sample_damage(...))``."""
    settings = settings or DamageSettings()
    draws = sample_damage(tuple(images.shape), settings=settings, generator=generator, device=images.device)
    return apply_damage(images, draws)
