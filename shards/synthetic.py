"""Synthetic samples for tests and benchmarks: speckled images and blob-shaped, overlapping masks.

The masks mimic what the maskers produce: a partition of the image into smooth irregular
regions (the argmax of smoothed noise, like superpixel / k-means regions), plus a few
larger irregular blobs that overlap them (like SAM proposals or class masks).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from anaus_core.maskset import MaskSet
from shards.sample import DEFAULT_SCALES, ShardSample


def blob_masks(
    *,
    height: int,
    width: int,
    partition: int,
    overlapping: int = 0,
    smoothness: float = 12.0,
    fragmented: bool = False,
    generator: np.random.Generator,
) -> np.ndarray:
    """bool (partition + overlapping, H, W): a partition of the image plus overlapping blobs.

    The partition is a Voronoi diagram of random seeds on coordinates warped by smooth noise
    (connected regions with irregular boundaries, like superpixels or SAM proposals); with
    ``fragmented`` it is the argmax of smoothed noise fields instead (scattered pieces, like
    k-means on intensities), a harder case for compression.
    """
    masks = []
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    if partition and fragmented:
        noise = ndimage.gaussian_filter(generator.standard_normal((partition, height, width)), sigma=(0, smoothness, smoothness))
        labels = noise.argmax(axis=0)
        masks.extend(labels == i for i in range(partition))
    elif partition:
        amplitude = 4.0 * smoothness
        warp = ndimage.gaussian_filter(generator.standard_normal((2, height, width)), sigma=(0, smoothness, smoothness))
        warp *= amplitude / max(float(np.abs(warp).max()), 1e-6)
        seeds = generator.uniform(0, 1, (partition, 2)) * [height, width]
        wy, wx = yy + warp[0], xx + warp[1]
        distance = (wy[None] - seeds[:, 0, None, None]) ** 2 + (wx[None] - seeds[:, 1, None, None]) ** 2
        labels = distance.argmin(axis=0)
        masks.extend(labels == i for i in range(partition))
    for _ in range(overlapping):
        cy, cx = generator.uniform(0.2, 0.8) * height, generator.uniform(0.2, 0.8) * width
        radius = generator.uniform(0.08, 0.25) * min(height, width)
        angle = np.arctan2(yy - cy, xx - cx)
        wobble = 1 + 0.25 * np.sin(angle * generator.integers(2, 7) + generator.uniform(0, 6.3))
        masks.append((yy - cy) ** 2 + (xx - cx) ** 2 < (radius * wobble) ** 2)
    if not masks:
        return np.zeros((0, height, width), bool)
    return np.stack(masks)


def speckle_image(*, height: int, width: int, generator: np.random.Generator) -> np.ndarray:
    """uint8 (H, W) ultrasound-like texture: smooth tissue times multiplicative speckle."""
    tissue = ndimage.gaussian_filter(generator.random((height, width)), 8)
    tissue = (tissue - tissue.min()) / max(float(np.ptp(tissue)), 1e-6)
    speckle = generator.rayleigh(0.6, (height, width))
    return np.clip(255 * tissue * speckle, 0, 255).astype(np.uint8)


def synthetic_sample(
    key: str,
    *,
    height: int = 64,
    width: int = 64,
    partition: int = 5,
    overlapping: int = 2,
    scales=DEFAULT_SCALES,
    fragmented: bool = False,
    seed: int = 0,
) -> ShardSample:
    """A complete ShardSample with a realistic record (source hash, sizes, fingerprints)."""
    generator = np.random.default_rng(seed)
    masks = blob_masks(height=height, width=width, partition=partition, overlapping=overlapping, smoothness=max(2.0, min(height, width) / 20), fragmented=fragmented, generator=generator)
    # Empty masks carry no information; drop them like MaskSet.finalize would.
    masks = masks[masks.any(axis=(1, 2))]
    count = len(masks)
    mask_set = MaskSet(
        masks=masks,
        ids=np.arange(1, count + 1),
        sources=["felzenszwalb"] * min(count, partition) + ["sam"] * max(0, count - partition),
        scores=np.round(generator.uniform(0.5, 1.0, count), 3),
    )
    record = {
        "source_path": f"corpus/{key}.png",
        "source_sha256": f"{seed:064x}",
        "original_size": [height * 2, width * 2],
        "frame": 0,
        "fingerprints": {"ingest": "a" * 16, "mask": "b" * 16},
    }
    return ShardSample.build(key=key, image=speckle_image(height=height, width=width, generator=generator), mask_set=mask_set, record=record, scales=scales)


def write_synthetic_store(out, *, count: int, samples_per_shard: int, key_digits: int = 3, **sample_options):
    """Write ``count`` :func:`synthetic_sample` s (keys ``img000``…, seed = sample number) into
    shards of ``samples_per_shard`` under ``out``; returns ``out`` as a ``Path``.
    ``sample_options`` go to :func:`synthetic_sample` (height, width, partition, ...)."""
    from pathlib import Path

    from shards.writer import ShardWriter

    out = Path(out)
    with ShardWriter(out, samples_per_shard=samples_per_shard) as writer:
        for number in range(count):
            writer.write(synthetic_sample(f"img{number:0{key_digits}d}", seed=number, **sample_options))
    return out
