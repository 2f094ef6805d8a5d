"""BYOL photometric augmentation, batched on the device with per-sample random parameters.

The images are single-channel B-mode frames in [0, 1], shape (B, 1, H, W). BYOL's recipe
(Grill et al. 2020, Table 6; paper A.1) per view:

    colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1) with p = 0.8,
        the four in a random order per image (as torchvision's ColorJitter)
    grayscale with p = 0.2
    Gaussian blur, kernel 23, σ ~ U(0.1, 2.0), with p = 1.0 (view 1) / 0.1 (view 2)
    solarisation (x >= 0.5 -> 1 - x) with p = 0.0 (view 1) / 0.2 (view 2)

On a grayscale image saturation, hue and grayscale are identities (torchvision returns
1-channel inputs unchanged), so only brightness and contrast are applied — in the sampled order,
since clamping makes them non-commuting. Each operation matches torchvision's functional op on
that image (``tests/test_views.py`` holds the batched path against ``torchvision.transforms.v2``
per image with the same parameters).

Why hand-written: torchvision's transforms draw one parameter set per call, so a batch would
get one colour jitter and one blur for all its images; per-image calls cost ~36 images/s for two
views on the CPU (SPEC §9). Here every op is a handful of tensor ops over the whole batch, with
blur as one grouped convolution carrying a different kernel per image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PhotometricConfig:
    """One view's photometric settings (defaults: BYOL view 1)."""

    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2      # no effect on 1-channel images (kept for the record)
    hue: float = 0.1             # no effect on 1-channel images
    grayscale_p: float = 0.2     # no effect on 1-channel images
    blur_p: float = 1.0
    blur_kernel: int = 23
    blur_sigma_min: float = 0.1
    blur_sigma_max: float = 2.0
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5


def byol_view_configs() -> tuple[PhotometricConfig, PhotometricConfig]:
    """BYOL's asymmetric pair: view 1 always blurred, never solarised; view 2 blur 0.1, solarise 0.2."""
    return PhotometricConfig(blur_p=1.0, solarize_p=0.0), PhotometricConfig(blur_p=0.1, solarize_p=0.2)


@dataclass
class PhotometricParams:
    """Per-image parameters of one batch (all shape (B,) on the device)."""

    jitter: torch.Tensor           # bool: colour jitter applied
    brightness: torch.Tensor       # float factor in [1-b, 1+b]
    contrast: torch.Tensor         # float factor in [1-c, 1+c]
    brightness_first: torch.Tensor  # bool: brightness before contrast
    blur: torch.Tensor             # bool
    sigma: torch.Tensor            # float
    solarize: torch.Tensor         # bool


def sample_params(batch_size: int, config: PhotometricConfig, *, generator: torch.Generator,
                  device: torch.device | str) -> PhotometricParams:
    """Draw every image's parameters with ``generator`` (which must live on ``device``)."""
    draws = torch.rand((7, batch_size), generator=generator, device=device)

    def span(u: torch.Tensor, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * u

    return PhotometricParams(
        jitter=draws[0] < config.jitter_p,
        brightness=span(draws[1], max(0.0, 1 - config.brightness), 1 + config.brightness),
        contrast=span(draws[2], max(0.0, 1 - config.contrast), 1 + config.contrast),
        brightness_first=draws[3] < 0.5,
        blur=draws[4] < config.blur_p,
        sigma=span(draws[5], config.blur_sigma_min, config.blur_sigma_max),
        solarize=draws[6] < config.solarize_p,
    )


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision ``adjust_brightness`` per image: ``clamp(x · f, 0, 1)``; ``factor`` (B,)."""
    return (images * factor.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision ``adjust_contrast`` per image on 1-channel input: blend with the image mean."""
    mean = images.mean(dim=(-3, -2, -1), keepdim=True)
    factor = factor.view(-1, 1, 1, 1)
    return (factor * images + (1.0 - factor) * mean).clamp_(0.0, 1.0)


def gaussian_kernels(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(B, kernel_size) normalised 1-D Gaussians, the same sampling as torchvision's ``gaussian_blur``."""
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, steps=kernel_size, device=sigma.device, dtype=torch.float32)
    pdf = torch.exp(-0.5 * (x[None, :] / sigma[:, None].float()) ** 2)
    return pdf / pdf.sum(dim=1, keepdim=True)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with one σ per image, reflect padding (torchvision's), as grouped convs.

    images: (B, C, H, W) float; sigma: (B,). The batch is folded into the channel axis so that one
    ``conv2d(groups=B·C)`` applies every image's own kernel.
    """
    batch, channels, height, width = images.shape
    kernels = gaussian_kernels(sigma, kernel_size).to(images.dtype)
    kernels = kernels.repeat_interleave(channels, dim=0)  # (B·C, k)
    pad = kernel_size // 2
    folded = images.reshape(1, batch * channels, height, width)
    folded = F.pad(folded, (pad, pad, pad, pad), mode="reflect")
    folded = F.conv2d(folded, kernels[:, None, None, :], groups=batch * channels)
    folded = F.conv2d(folded, kernels[:, None, :, None], groups=batch * channels)
    return folded.reshape(batch, channels, height, width)


def solarize(images: torch.Tensor, threshold: float) -> torch.Tensor:
    """torchvision ``solarize`` on [0, 1] floats: invert the pixels at or above ``threshold``."""
    return torch.where(images >= threshold, 1.0 - images, images)


def apply_params(images: torch.Tensor, params: PhotometricParams, config: PhotometricConfig,
                 static: bool | None = None) -> torch.Tensor:
    """Apply the sampled photometric ops to float (B, 1, H, W) images in [0, 1]; returns a new tensor.

    ``static``: run every op on the whole batch and select per image (no host-device sync, same
    result); None = on accelerators only."""
    out = images.clone()
    jitter = params.jitter
    # on an accelerator, no data-dependent branches or shapes (each would wait for the device):
    # every op runs on the whole batch and is selected per image; on the CPU the subsets are cheaper
    static = images.device.type != "cpu" if static is None else static
    if static or bool(jitter.any()):
        brightness = torch.where(jitter, params.brightness, torch.ones_like(params.brightness))
        contrast = torch.where(jitter, params.contrast, torch.ones_like(params.contrast))
        # Both orders are computed and selected per image: clamping makes the order matter.
        b_then_c = adjust_contrast(adjust_brightness(out, brightness), contrast)
        c_then_b = adjust_brightness(adjust_contrast(out, contrast), brightness)
        out = torch.where(params.brightness_first.view(-1, 1, 1, 1), b_then_c, c_then_b)
    if static:
        blurred = gaussian_blur(out, params.sigma, config.blur_kernel)
        out = torch.where(params.blur.view(-1, 1, 1, 1), blurred, out)
    else:
        blur_index = torch.nonzero(params.blur, as_tuple=False).flatten()
        if blur_index.numel():
            out[blur_index] = gaussian_blur(out[blur_index], params.sigma[blur_index], config.blur_kernel)
    if config.solarize_p > 0:
        out = torch.where(params.solarize.view(-1, 1, 1, 1), solarize(out, config.solarize_threshold), out)
    return out
