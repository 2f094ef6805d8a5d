"""Speckle formation on a beam grid: random scatterers, a depth-dependent point-spread function,
envelope detection and log compression.

The echo model is the linear convolution model of B-mode imaging. Scatterers with random
(Gaussian) amplitudes sit on the beam grid, scaled by the local echogenicity and by the
round-trip attenuation accumulated along the beam. Each depth row is blurred across the beam
lines by a Gaussian beam profile whose width depends on the scatterer's depth (narrow at the
focus, wider in the near and far field); each line is then convolved along depth with the RF
pulse, a Gaussian-modulated cosine. The envelope is the magnitude of the analytic signal of the
RF line. Both convolutions run as FFT products; the axial one multiplies by the pulse's
*one-sided* spectrum, which yields the analytic signal directly (the same construction as
``scipy.signal.hilbert`` applied to the RF line, without forming the real RF first).

All transfer functions are normalised to unit energy, so homogeneous tissue of echogenicity 1
with no attenuation has ``E[envelope**2] == 1`` whatever the beam width: a Rayleigh envelope
with mean ``sqrt(pi)/2`` and mean/std ``sqrt(pi / (4 - pi)) = 1.913``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.fft

from anaus_core.phantoms.geometry import DEPTH_STEP_REF

#: mean/std of a Rayleigh-distributed envelope (fully developed speckle).
RAYLEIGH_MEAN_OVER_STD = math.sqrt(math.pi / (4.0 - math.pi))

#: The lateral beam is never narrower than this many lines: a narrower sampled Gaussian aliases.
MIN_LATERAL_SIGMA_LINES = 0.6


@dataclass(frozen=True)
class Pulse:
    """The transmitted pulse as seen in the echo along depth: a cosine of period
    ``carrier_period_px`` (half the acoustic wavelength, because the echo travels both ways)
    under a Gaussian envelope of standard deviation ``sigma_px``."""

    carrier_period_px: float = 2.0
    sigma_px: float = 1.3

    def kernel(self, step_px: float = DEPTH_STEP_REF) -> np.ndarray:
        """The real RF pulse sampled every ``step_px`` along depth, centred, odd length
        (+-4 sigma), unit energy."""
        half = int(math.ceil(4.0 * self.sigma_px / step_px))
        t = step_px * np.arange(-half, half + 1)
        pulse = np.exp(-0.5 * (t / self.sigma_px) ** 2) * np.cos(2.0 * math.pi * t / self.carrier_period_px)
        return pulse / np.sqrt(np.sum(pulse**2))


@dataclass(frozen=True)
class Beam:
    """A focused Gaussian beam: lateral standard deviation ``sigma_focus_px`` at depth
    ``focus_depth_px``, growing as ``sqrt(1 + ((z - focus) / rayleigh_range)**2)`` away from it."""

    sigma_focus_px: float = 1.1
    focus_depth_px: float = 64.0
    rayleigh_range_px: float = 40.0

    def sigma_px(self, depth_px: np.ndarray) -> np.ndarray:
        offset = (np.asarray(depth_px, dtype=np.float64) - self.focus_depth_px) / self.rayleigh_range_px
        return self.sigma_focus_px * np.sqrt(1.0 + offset**2)


def analytic_pulse_transfer(pulse: Pulse, n_depth: int, *, step_px: float = DEPTH_STEP_REF) -> np.ndarray:
    """complex ``(n_depth // 2 + 1,)``: the non-negative-frequency half of the analytic pulse's
    DFT on an ``n_depth``-sample line (positive frequencies doubled, as in the Hilbert
    transform; the negative ones are zero), scaled so white unit-variance scatterers give
    ``E|analytic|**2 == 1``."""
    kernel = pulse.kernel(step_px)
    half = kernel.size // 2
    if kernel.size > n_depth:
        raise ValueError(f"a line of {n_depth} samples is shorter than the pulse ({kernel.size} samples)")
    circular = np.zeros(n_depth)
    circular[: half + 1] = kernel[half:]
    circular[n_depth - half :] = kernel[:half]
    spectrum = np.fft.rfft(circular)
    spectrum[1:] *= 2.0
    if n_depth % 2 == 0:
        spectrum[-1] *= 0.5  # the Nyquist bin is its own negative frequency
    energy = np.sum(np.abs(spectrum) ** 2) / n_depth
    return (spectrum / np.sqrt(energy)).astype(np.complex64)


def lateral_transfer(sigma_lines: np.ndarray, n_lines: int) -> np.ndarray:
    """float32 ``(n_depth, n_lines // 2 + 1)``: per depth row, the rfft-domain transfer of a
    Gaussian beam of standard deviation ``sigma_lines[row]`` (in lines), unit energy."""
    sigma = np.maximum(np.asarray(sigma_lines, dtype=np.float32), np.float32(MIN_LATERAL_SIGMA_LINES))
    freq = np.fft.rfftfreq(n_lines).astype(np.float32)
    transfer = np.exp(np.float32(-2.0 * math.pi**2) * np.square(sigma[:, None] * freq[None, :]))
    weight = np.full(freq.size, 2.0, dtype=np.float32)
    weight[0] = 1.0
    if n_lines % 2 == 0:
        weight[-1] = 1.0
    energy = (transfer**2 @ weight) / n_lines
    transfer /= np.sqrt(energy)[:, None]
    return transfer


def beamform(scatterers: np.ndarray, *, lateral_sigma_lines: np.ndarray, pulse: Pulse, step_px: float = DEPTH_STEP_REF) -> np.ndarray:
    """Scatterer amplitudes ``(n_depth, n_lines)`` -> complex64 analytic RF signal, same shape.

    Row ``k`` is blurred across lines by a Gaussian of ``lateral_sigma_lines[k]`` lines (the
    beam width at the scatterer's depth), then each line is convolved with ``pulse`` along
    depth. Both convolutions are circular: callers keep margins around the region they use.
    """
    n_depth, n_lines = scatterers.shape
    spectrum = scipy.fft.rfft(np.asarray(scatterers, dtype=np.float32), axis=1)
    spectrum *= lateral_transfer(lateral_sigma_lines, n_lines)
    blurred = scipy.fft.irfft(spectrum, n=n_lines, axis=1)
    axial = scipy.fft.rfft(blurred, axis=0)
    axial *= analytic_pulse_transfer(pulse, n_depth, step_px=step_px)[:, None]
    # The analytic signal has no negative frequencies: zero-padding the one-sided spectrum to
    # n_depth bins and inverting gives it directly.
    return scipy.fft.ifft(axial, n=n_depth, axis=0).astype(np.complex64, copy=False)


def scatterer_field(
    echogenicity: np.ndarray,
    *,
    rng: np.random.Generator,
    density: float = 1.0,
    round_trip_loss: np.ndarray | None = None,
    noise_rms: float = 0.0,
) -> np.ndarray:
    """float32 scatterer amplitudes on the beam grid.

    A scatterer sits on each sample with probability ``density``, with a standard-normal
    amplitude (random strength, and through its sign and the sub-sample position it stands
    for, random phase), scaled so the mean backscattered intensity equals ``echogenicity``
    (linear, relative to tissue) times ``round_trip_loss**2`` (amplitude factor of the path to
    it and back). Receiver noise of rms ``noise_rms`` is added as an independent white term,
    so it passes the same band-limiting filters as the echo (noise looks like fine speckle on
    a real scanner too); both share one Gaussian draw per sample.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"scatterer density must be in (0, 1], got {density}")
    intensity = np.array(echogenicity, dtype=np.float32)
    if round_trip_loss is not None:
        intensity *= np.square(round_trip_loss, dtype=np.float32)
    if density < 1.0:
        intensity *= (rng.random(intensity.shape, dtype=np.float32) < density) / np.float32(density)
    if noise_rms > 0.0:
        intensity += np.float32(noise_rms**2)
    amplitude = rng.standard_normal(intensity.shape, dtype=np.float32)
    amplitude *= np.sqrt(intensity, out=intensity)
    return amplitude


def simulate_envelope(
    echogenicity: np.ndarray,
    *,
    lateral_sigma_lines: np.ndarray,
    pulse: Pulse,
    rng: np.random.Generator,
    density: float = 1.0,
    attenuation: np.ndarray | None = None,
    noise_rms: float = 0.0,
    gain: np.ndarray | None = None,
    step_px: float = DEPTH_STEP_REF,
) -> np.ndarray:
    """The pre-log B-mode envelope on a beam grid, float32 ``(n_depth, n_lines)``.

    ``echogenicity``: mean backscattered intensity per sample (tissue = 1, anechoic = 0).
    ``lateral_sigma_lines``: ``(n_depth,)`` beam standard deviation in lines at each depth.
    ``attenuation``: optional ``(n_depth, n_lines)`` round-trip amplitude loss per sample in
    nepers; a scatterer's echo is scaled by ``exp(-sum of attenuation above it)``, so what lies
    above a structure shapes the echo below it (shadows, posterior enhancement).
    ``noise_rms``: receiver noise, white before the receive filters, added before the gain.
    ``gain``: optional ``(n_depth,)`` time-gain-compensation amplitude factor.

    With ``echogenicity = 1``, no attenuation, noise or gain, the result is fully developed
    speckle with ``E[envelope**2] = 1`` (Rayleigh: mean/std = 1.913); the Rayleigh test runs
    this function on a homogeneous region.
    """
    loss = None
    if attenuation is not None:
        loss = np.exp(-np.cumsum(attenuation, axis=0, dtype=np.float32))
    scatterers = scatterer_field(echogenicity, rng=rng, density=density, round_trip_loss=loss, noise_rms=noise_rms)
    analytic = beamform(scatterers, lateral_sigma_lines=lateral_sigma_lines, pulse=pulse, step_px=step_px)
    envelope = np.abs(analytic)
    if gain is not None:
        envelope *= np.asarray(gain, dtype=np.float32)[:, None]
    return envelope


def log_compress(envelope: np.ndarray, *, dynamic_range_db: float, white_db: float) -> np.ndarray:
    """Envelope -> float32 gray levels in [0, 255]: ``20 log10(envelope)`` mapped linearly so
    that ``white_db`` is 255 and ``white_db - dynamic_range_db`` is 0 (clipped)."""
    level_db = 20.0 * np.log10(np.maximum(envelope, np.float32(1e-12)))
    gray = (level_db - np.float32(white_db - dynamic_range_db)) * np.float32(255.0 / dynamic_range_db)
    return np.clip(gray, 0.0, 255.0, out=gray).astype(np.float32, copy=False)


def rayleigh_ratio(envelope: np.ndarray) -> float:
    """mean/std of envelope samples: 1.913 for fully developed speckle, lower for sparse or
    strongly varying scattering."""
    values = np.asarray(envelope, dtype=np.float64).ravel()
    return float(values.mean() / values.std())
