"""The ``ultrasound`` view policy: intensity changes a scanner's controls make, batched on the device.

BYOL's photometric recipe (``anaus_core.augment.photometric``, the paper's A.1) jitters brightness
and contrast by ±40 % and solarises view 2. On B-mode images that teaches invariance to absolute
echogenicity, which is what tells an anechoic cyst from a hypo- or hyperechoic lesion. This policy
changes intensity only the ways an operator or a machine does, by bounded amounts:

* **overall gain**: one factor per image, ``10^(g/20)`` with ``g ~ U(-gain_db, gain_db)`` dB;
* **time-gain compensation (TGC)**: a smooth gain curve along depth (image rows), the piecewise
  linear interpolation of ``tgc_knots`` random knot values in ``[-tgc_db, tgc_db]`` dB — what the
  TGC sliders of a console do;
* **dynamic range / log-compression**: ``x -> x^gamma`` with ``gamma`` in ``[gamma_min, gamma_max]``;
* **blur** below the speckle size (σ ≤ ``blur_sigma_max`` px, small kernel), so the speckle texture
  survives, with probability ``blur_p``.

Every op is a positive, monotone, row-wise map: within an image, a pixel darker than another on the
same row stays darker, and two regions at similar depth keep the order of their mean intensities (a
cyst stays darker than the tissue around it); ``tests/test_ultrasound_policy.py`` checks this.
No solarisation, no contrast blend with the image mean.

"Depth" is the row axis of the view. Crops keep the orientation of the stored image and flips are
horizontal, so rows of a view are depths of the scan (offset by the crop), as TGC assumes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from anaus_core.augment.photometric import gaussian_blur


@dataclass
class UltrasoundIntensityConfig:
    """Bounds of the ``ultrasound`` policy's intensity changes (applied to each view independently)."""

    gain_p: float = 0.8
    gain_db: float = 1.5             # overall gain ±1.5 dB: factor in [0.84, 1.19]
    tgc_p: float = 0.8
    tgc_db: float = 2.0              # depth gain curve within ±2 dB of the overall gain
    tgc_knots: int = 4               # knots along depth; more knots = a wigglier curve
    gamma_p: float = 0.5
    gamma_min: float = 0.9
    gamma_max: float = 1.1
    blur_p: float = 0.2
    blur_kernel: int = 5
    blur_sigma_min: float = 0.1
    blur_sigma_max: float = 0.6      # well below the speckle size of a 224 px view: texture survives

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field when a bound is out of range."""
        for name in ("gain_p", "tgc_p", "gamma_p", "blur_p"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"augment.ultrasound.{name}: a probability in [0, 1], got {value}")
        for name in ("gain_db", "tgc_db"):
            if not 0.0 <= getattr(self, name) <= 20.0:
                raise ValueError(f"augment.ultrasound.{name}: must be in [0, 20] dB, got {getattr(self, name)}")
        if self.tgc_knots < 2:
            raise ValueError(f"augment.ultrasound.tgc_knots: must be >= 2, got {self.tgc_knots}")
        if not 0.0 < self.gamma_min <= self.gamma_max:
            raise ValueError(f"augment.ultrasound.gamma_min/gamma_max: need 0 < min <= max, got "
                             f"{self.gamma_min}, {self.gamma_max}")
        if self.blur_kernel < 1 or self.blur_kernel % 2 == 0:
            raise ValueError(f"augment.ultrasound.blur_kernel: an odd size >= 1, got {self.blur_kernel}")
        if not 0.0 < self.blur_sigma_min <= self.blur_sigma_max:
            raise ValueError("augment.ultrasound.blur_sigma_min/max: need 0 < min <= max")


@dataclass
class UltrasoundParams:
    """Per-image parameters of one batch; ``row_gain`` is (B, H), the rest (B,)."""

    row_gain: torch.Tensor     # float > 0: overall gain × TGC curve, per row
    gamma: torch.Tensor        # float > 0 (1 where not drawn)
    blur: torch.Tensor         # bool
    sigma: torch.Tensor        # float


def _db_to_factor(db: torch.Tensor) -> torch.Tensor:
    return torch.pow(torch.tensor(10.0, device=db.device, dtype=db.dtype), db / 20.0)


def sample_params(batch_size: int, height: int, config: UltrasoundIntensityConfig, *, generator: torch.Generator,
                  device: torch.device | str) -> UltrasoundParams:
    """Draw every image's parameters with ``generator`` (which must live on ``device``)."""
    draws = torch.rand((7, batch_size), generator=generator, device=device)
    knots = torch.rand((batch_size, config.tgc_knots), generator=generator, device=device)
    gain_db = (2.0 * draws[1] - 1.0) * config.gain_db * (draws[0] < config.gain_p)
    tgc_on = (draws[2] < config.tgc_p).to(knots.dtype)[:, None]
    knot_db = (2.0 * knots - 1.0) * config.tgc_db * tgc_on                                 # (B, n)
    curve_db = F.interpolate(knot_db[:, None, :], size=height, mode="linear", align_corners=True)[:, 0]  # (B, H)
    row_gain = _db_to_factor(gain_db[:, None] + curve_db)
    gamma = config.gamma_min + (config.gamma_max - config.gamma_min) * draws[4]
    gamma = torch.where(draws[3] < config.gamma_p, gamma, torch.ones_like(gamma))
    sigma = config.blur_sigma_min + (config.blur_sigma_max - config.blur_sigma_min) * draws[6]
    return UltrasoundParams(row_gain=row_gain, gamma=gamma, blur=draws[5] < config.blur_p, sigma=sigma)


def apply_params(images: torch.Tensor, params: UltrasoundParams, config: UltrasoundIntensityConfig,
                 static: bool | None = None) -> torch.Tensor:
    """Apply the sampled changes to float (B, 1, H, W) images in [0, 1]; returns a new tensor.

    Order: log-compression change, then gain × TGC (the console applies gain to the compressed
    image it shows), clamped to [0, 1], then the sub-speckle blur.

    ``static``: blur the whole batch and select per image with ``torch.where`` (no host-device
    sync from ``torch.nonzero``, shapes independent of the draws; same result); None = on
    accelerators only, as ``photometric.apply_params``. On the CPU blurring only the drawn
    subset is cheaper.
    """
    out = images.clamp(0.0, 1.0).pow(params.gamma.view(-1, 1, 1, 1).to(images.dtype))
    out = (out * params.row_gain[:, None, :, None].to(images.dtype)).clamp_(0.0, 1.0)
    static = images.device.type != "cpu" if static is None else static
    if static:
        blurred = gaussian_blur(out, params.sigma, config.blur_kernel)
        return torch.where(params.blur.view(-1, 1, 1, 1), blurred, out)
    blur_index = torch.nonzero(params.blur, as_tuple=False).flatten()
    if blur_index.numel():
        out[blur_index] = gaussian_blur(out[blur_index], params.sigma[blur_index], config.blur_kernel)
    return out
