"""Phantom generation throughput: images per second per core at 256 x 256.

One process, one thread (BLAS/OpenMP pinned to 1 before numpy loads; scipy.fft runs
single-threaded by default). Prints the median of several repeats, both wall-clock and CPU
time (the CPU figure is the per-core cost even when the machine is shared), and two ratios
measured side by side in the same run: sector vs linear probes, and the full corpus writer
(generation + PNG/JSON files) vs generation alone. A stage breakdown shows where the time goes.

    python3 benchmarks/bench_phantoms.py            # full run
    python3 benchmarks/bench_phantoms.py --quick    # a few seconds
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_name] = "1"

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from anaus_core.phantoms import (  # noqa: E402
    Pulse,
    build_beam_grid,
    generate_phantom,
    make_phantom_corpus,
    sample_geometry,
    simulate_envelope,
)


def _timed(function, repeats: int) -> tuple[float, float]:
    """(median wall seconds, median CPU seconds) of ``function()`` over ``repeats`` runs."""
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        function()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and repeats")
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    images, repeats = (8, 3) if args.quick else (24, 5)
    size = args.size

    generate_phantom(size=size, seed=0, index=0)  # warm caches and imports

    def batch(geometry: str | None):
        return lambda: [generate_phantom(size=size, seed=1, index=i, geometry=geometry) for i in range(images)]

    rows = {}
    # Interleave the variants so that load from other processes hits them alike.
    results = {name: ([], []) for name in ("linear", "sector", "mixed", "corpus")}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            for name, function in (
                ("linear", batch("linear")),
                ("sector", batch("sector")),
                ("mixed", batch(None)),
                ("corpus", lambda: make_phantom_corpus(Path(tmp) / "c", count=images, size=size, seed=1)),
            ):
                wall, cpu = _timed(function, 1)
                results[name][0].append(wall)
                results[name][1].append(cpu)
    for name, (walls, cpus) in results.items():
        rows[name] = (images / statistics.median(walls), images / statistics.median(cpus))

    print(f"phantoms at {size}x{size}, one thread, {images} images x {repeats} repeats (median)")
    print(f"{'variant':<34}{'img/s (wall)':>14}{'img/s (CPU)':>14}")
    labels = {
        "linear": "generate, linear probe",
        "sector": "generate, sector probe",
        "mixed": "generate, corpus mix (1:1)",
        "corpus": "make_phantom_corpus (+PNG, JSON)",
    }
    for name, (wall_rate, cpu_rate) in rows.items():
        print(f"{labels[name]:<34}{wall_rate:>14.1f}{cpu_rate:>14.1f}")
    print(f"ratio sector / linear time (CPU): {rows['linear'][1] / rows['sector'][1]:.2f}")
    print(f"ratio corpus writer / generation time (CPU): {rows['mixed'][1] / rows['corpus'][1]:.2f}")

    # Stage breakdown: the speckle simulation alone on a linear grid of this size.
    rng = np.random.default_rng(0)
    grid = build_beam_grid(sample_geometry("linear", size, rng))
    echogenicity = np.ones(grid.shape, dtype=np.float32)
    sigma = np.full(grid.shape[0], 1.9)
    wall, cpu = _timed(
        lambda: simulate_envelope(echogenicity, lateral_sigma_lines=sigma, pulse=Pulse(), rng=rng, attenuation=echogenicity * 1e-3),
        repeats * 4,
    )
    print(f"simulate_envelope on the {grid.shape[0]}x{grid.shape[1]} beam grid: {1e3 * wall:.1f} ms wall, {1e3 * cpu:.1f} ms CPU")


if __name__ == "__main__":
    main()
