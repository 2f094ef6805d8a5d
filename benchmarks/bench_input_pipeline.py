"""Input-pipeline throughput: full pre-training sample pipeline vs the raw decode limit of the same shards.

    python3 benchmarks/bench_input_pipeline.py            # 240 samples at 256×320, 16 masks each
    python3 benchmarks/bench_input_pipeline.py --quick    # 60 samples, 2 repeats

Measured side by side in one run, one process, torch at one thread (medians of repeats):

(a) raw decode limit: plain ``wds.WebDataset`` over the shards + ``shards.sample.decode_sample``
    (PNG image + all masks + pyramid, crc checks) — what any consumer of the shards must pay;
(b) the full worker pipeline, ``build_pretrain_loader`` with ``num_workers=0`` (decode + two views
    + mask sampling + mask warping/packing + core crop + collate), stream and indexed modes;
(c) the same with ``num_workers=1`` (adds worker start-up and batch IPC);
(d) device side on the CPU: ``prepare_batch`` (batched BYOL photometrics, unpack, normalise) vs
    torchvision v2 per-image photometric transforms on the same images.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def make_store(out: Path, *, count: int, height: int, width: int, per_shard: int) -> Path:
    from shards.synthetic import synthetic_sample
    from shards.writer import ShardWriter

    with ShardWriter(out, samples_per_shard=per_shard) as writer:
        for i in range(count):
            writer.write(synthetic_sample(f"img{i:05d}", height=height, width=width, partition=12, overlapping=4, seed=i))
    return out


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def raw_decode(urls: list[str]) -> int:
    import webdataset as wds

    from shards.sample import decode_sample

    count = 0
    for raw in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        decode_sample(raw)
        count += 1
    return count


def full_pipeline(store: Path, *, batch: int, workers: int, shuffle_buffer: int) -> int:
    from shards.stream import build_pretrain_loader

    loader = build_pretrain_loader(store, batch_size=batch, num_workers=workers, seed=0, shuffle_buffer=shuffle_buffer)
    return sum(int(b["index"].shape[0]) for b in loader)


def per_image_photometric(images: torch.Tensor) -> torch.Tensor:
    """torchvision v2 BYOL chain, one image at a time (the CPU-worker alternative)."""
    from torchvision.transforms import v2

    view1 = v2.Compose([
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.GaussianBlur(23, sigma=(0.1, 2.0)),
    ])
    return torch.stack([view1(image) for image in images])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="60 samples, 2 repeats")
    parser.add_argument("--samples", type=int, default=240)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="device for (d) prepare_batch, e.g. cuda")
    args = parser.parse_args()
    samples, repeats = (60, 2) if args.quick else (args.samples, args.repeats)
    torch.set_num_threads(1)

    from shards.stream import resolve_shards
    # Import everything the variants use before timing (torchvision.transforms.v2 alone takes
    # seconds to import on a loaded machine and would land in the first timed repeat).
    import anaus_core.augment.device  # noqa: F401
    import anaus_core.augment.views  # noqa: F401
    import shards.sample  # noqa: F401
    import webdataset  # noqa: F401

    with tempfile.TemporaryDirectory(prefix="bench_input_") as tmp:
        store = make_store(Path(tmp) / "shards", count=samples, height=256, width=320, per_shard=max(8, samples // 4))
        urls = list(resolve_shards(store).urls)
        used = (samples // args.batch) * args.batch
        rows = []

        variants = [
            ("(a) raw decode limit (wds + decode_sample)", samples, lambda: raw_decode(urls)),
            ("(b) full pipeline, stream mode, 0 workers", used,
             lambda: full_pipeline(store, batch=args.batch, workers=0, shuffle_buffer=256)),
            ("(b) full pipeline, indexed mode, 0 workers", used,
             lambda: full_pipeline(store, batch=args.batch, workers=0, shuffle_buffer=0)),
            ("(c) full pipeline, indexed mode, 1 worker", used,
             lambda: full_pipeline(store, batch=args.batch, workers=1, shuffle_buffer=0)),
        ]
        # Repeats are interleaved (a, b, b, c, a, b, ...) so that load drift on a shared machine
        # hits every variant alike; the ratio is taken between medians.
        times: dict[str, list[float]] = {label: [] for label, _, _ in variants}
        for _ in range(repeats):
            for label, _, run in variants:
                start = time.perf_counter()
                run()
                times[label].append(time.perf_counter() - start)
        raw_rate = samples / statistics.median(times[variants[0][0]])
        for label, count, _ in variants:
            rate = count / statistics.median(times[label])
            rows.append((label, rate, rate / raw_rate))

        print(f"input pipeline: {samples} samples 256×320, 16 masks, S=224, K=16, batch {args.batch}, "
              f"median of {repeats}, torch threads 1")
        for label, rate, ratio in rows:
            print(f"  {label:<48s} {rate:8.1f} samples/s   ratio to (a) {ratio:5.2f}")

        # (d) device side on the CPU
        from anaus_core.augment.device import prepare_batch
        from shards.stream import build_pretrain_loader

        batch = next(iter(build_pretrain_loader(store, batch_size=32 if samples >= 32 else samples // 2, num_workers=0, seed=0)))
        device = torch.device(args.device)
        generator = torch.Generator(device=device).manual_seed(0)
        size = batch["view1"].shape[0]

        def device_step():
            prepare_batch(batch, device=device, generator=generator, config=None)
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        device_step()  # warm-up (CUDA context, kernels)
        device_time, _ = timed(device_step, repeats)
        images = batch["view1"].float() / 255
        cpu_time, _ = timed(lambda: per_image_photometric(images), repeats)
        print(f"  (d) prepare_batch on {device.type} (both views, B={size})      {2 * size / device_time:8.1f} views/s")
        print(f"      torchvision v2 per image (view-1 chain)           {size / cpu_time:8.1f} views/s   "
              f"ratio batched/per-image {(2 * size / device_time) / (size / cpu_time):5.2f}")


if __name__ == "__main__":
    main()
