"""Vectorised damage D (``anaus_core.augment.damage``) vs a per-image Python loop like the official code.

The loop implements the same D (shuffle alpha per 8x8 patch, Gaussian noise beta, one
occlusion rectangle of gamma area filled with the per-channel minimum) the way the official
Models-Genesis ``AppearanceTransform2D`` does it: a Python loop over the images of the batch and,
inside, over the patches, drawing random numbers patch by patch, on the same device.

    python3 benchmarks/bench_damage.py              # CPU, batch 32, 3x224x224
    python3 benchmarks/bench_damage.py --quick      # fewer repeats
    python3 benchmarks/bench_damage.py --device cuda

Prints the median seconds per batch of each, images/s, and the speed-up ratio.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anaus_core.augment.damage import DamageSettings, damage  # noqa: E402


def loop_damage(images: torch.Tensor, settings: DamageSettings) -> torch.Tensor:
    """Per-image, per-patch Python loop (official style); same D as the vectorised version."""
    out = images.clone()
    batch, channels, height, width = images.shape
    patch = settings.patch_size
    for b in range(batch):
        image = out[b]
        if settings.shuffle:
            for top in range(0, height - patch + 1, patch):
                for left in range(0, width - patch + 1, patch):
                    if torch.rand(1).item() < settings.shuffle_prob:
                        window = image[:, top:top + patch, left:left + patch].reshape(channels, -1)
                        order = torch.randperm(patch * patch, device=images.device)
                        image[:, top:top + patch, left:left + patch] = window[:, order].reshape(channels, patch, patch)
        if settings.noise:
            image += settings.noise_std * torch.randn(1, height, width, device=images.device)
        if settings.occlusion:
            area = settings.occlusion_fraction * height * width
            ratio = math.exp((torch.rand(1).item() * 2 - 1) * math.log(3.0))
            box_h = min(max(round(math.sqrt(area * ratio)), 1), height)
            box_w = min(max(round(math.sqrt(area / ratio)), 1), width)
            top = int(torch.rand(1).item() * (height - box_h + 1))
            left = int(torch.rand(1).item() * (width - box_w + 1))
            darkest = image.amin(dim=(1, 2), keepdim=True)
            image[:, top:top + box_h, left:left + box_w] = darkest.expand(channels, box_h, box_w)
    return out


def _time(fn, repeats: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=None, help="repeats of the vectorised version")
    parser.add_argument("--loop-repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 = fair to a shared machine)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    repeats = args.repeats or (5 if args.quick else 20)
    loop_repeats = args.loop_repeats or (2 if args.quick else 5)
    settings = DamageSettings()
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    generator = torch.Generator(device=device).manual_seed(0)

    damage(images, settings=settings, generator=generator)  # warm-up (allocations, CUDA kernels)
    loop_damage(images[:1], settings)
    vectorised = _time(lambda: damage(images, settings=settings, generator=generator), repeats, device)
    looped = _time(lambda: loop_damage(images, settings), loop_repeats, device)
    t_vec, t_loop = statistics.median(vectorised), statistics.median(looped)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} thread)"
    print(f"device: {name}; batch {args.batch} x 3 x {args.size} x {args.size}; "
          f"alpha/beta/gamma = {settings.shuffle_prob}/{settings.noise_std}/{settings.occlusion_fraction}, "
          f"patch {settings.patch_size}")
    print(f"vectorised : median {t_vec * 1e3:9.2f} ms/batch  {args.batch / t_vec:10.1f} img/s  ({repeats} repeats)")
    print(f"python loop: median {t_loop * 1e3:9.2f} ms/batch  {args.batch / t_loop:10.1f} img/s  ({loop_repeats} repeats)")
    print(f"speed-up   : {t_loop / t_vec:.1f}x")


if __name__ == "__main__":
    main()
