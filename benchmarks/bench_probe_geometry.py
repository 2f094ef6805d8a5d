"""Cost of the probe-geometry view changes (depth crop, sector angle + convexity) and of the
scan-region core field, on batches of fan-shaped images, side by side in one run.

    python3 benchmarks/bench_probe_geometry.py            # B = 16, 256 px stored, 96 px views
    python3 benchmarks/bench_probe_geometry.py --quick    # B = 8, 3 repeats

Rows (medians over repeats, torch at one thread, one process):

(a) worker geometry ``build_batch`` (draws + views + masks + core), samples without a region: the
    baseline every ratio divides by;
(b) the same samples with their scan region (adds the region's cut of the core, ``core_region``);
(c) (b) + depth crop on every view (``depth_crop_p=1``);
(d) (b) + sector angle and convexity change on every view (``sector_angle_p = convexity_p = 1``):
    the polar resampling of each view's crop window in the worker;
(e) device geometry: ``build_batch`` + ``prepare_batch`` on the CPU, (b)'s settings;
(f) (e) with the sector and convexity change on every view (the whole canvas warped per view).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anaus_core.augment.batch import build_batch  # noqa: E402
from anaus_core.augment.device import DeviceAugmentConfig, prepare_batch  # noqa: E402
from anaus_core.augment.views import MaskLayers, PairedViews, ViewConfig  # noqa: E402


def fan_samples(count: int, size: int) -> list[tuple]:
    """Curvilinear-probe-like fans (apex above the image, curved face) with 12 angular/radial
    masks in two label layers and a speckled image inside the fan."""
    rows, cols = np.mgrid[:size, :size] + 0.5
    apex_row, apex_col = -0.1 * size, size / 2
    angle = np.arctan2(cols - apex_col, rows - apex_row)
    radius = np.hypot(rows - apex_row, cols - apex_col)
    region = (np.abs(angle) < np.radians(35)) & (radius > 0.25 * size) & (radius < 1.05 * size)
    out = []
    for i in range(count):
        rng = np.random.default_rng(i)
        sector = np.digitize(angle, np.sort(rng.uniform(-0.6, 0.6, 3)))
        ring = np.digitize(radius, np.sort(rng.uniform(0.3, 1.0, 2)) * size)
        label = np.where(region, sector * 3 + ring + 1, 0)
        layers = np.stack([np.where(label <= 6, label, 0), np.where(label > 6, label - 6, 0)]).astype(np.uint8)
        layer_of_mask = np.array([0] * 6 + [1] * 6)
        ids = np.arange(1, 13)
        # MaskLayers numbering: mask i is label i + 1 of its layer
        masks = MaskLayers(np.stack([layers[0], np.where(layers[1] > 0, layers[1] + 6, 0)]).astype(np.uint8), layer_of_mask)
        image = np.where(region, np.clip(rng.rayleigh(60, (size, size)) + 10 * label, 0, 255), 0).astype(np.uint8)
        out.append((image, masks, ids, None, region))
    return out


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    batch, repeats, size = (8, 3, 256) if args.quick else (16, 7, 256)
    samples = fan_samples(batch, size)
    bare = [s[:4] for s in samples]
    indices = list(range(batch))
    base = dict(size=96, num_mask_samples=8, sampling_area="exact")
    geometry = dict(sector_angle_p=1.0, convexity_p=1.0)

    def worker(config, data):
        views = PairedViews(ViewConfig(geometry="worker", **base, **config))
        return lambda: build_batch(views, data, indices, np.random.default_rng(0))

    def device(config):
        views = PairedViews(ViewConfig(geometry="device", **base, **config))
        augment = DeviceAugmentConfig(policy="ultrasound")
        return lambda: prepare_batch(build_batch(views, samples, indices, np.random.default_rng(0)), device="cpu",
                                     generator=torch.Generator().manual_seed(0), config=augment)

    rows = [
        ("(a) worker, no region", worker({}, bare)),
        ("(b) worker, scan region (core_region)", worker({}, samples)),
        ("(c) (b) + depth crop p=1", worker({"depth_crop_p": 1.0}, samples)),
        ("(d) (b) + sector angle + convexity p=1", worker(geometry, samples)),
        ("(e) device geometry on CPU, scan region", device({})),
        ("(f) (e) + sector angle + convexity p=1", device(geometry)),
    ]
    print(f"batch {batch}, stored {size}x{size}, views 96 px, K 8, {repeats} repeats, torch threads 1, "
          f"CPUs {os.cpu_count()}")
    baseline = None
    for name, fn in rows:
        ms = median_ms(fn, repeats)
        baseline = baseline or ms
        print(f"{name:45s} {ms:8.1f} ms/batch  {ms / batch:6.2f} ms/sample  x{ms / baseline:5.2f}")


if __name__ == "__main__":
    main()
