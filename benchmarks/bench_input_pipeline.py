"""Input-pipeline throughput: full pre-training sample pipeline vs the raw decode limit of the same shards.

    python3 benchmarks/bench_input_pipeline.py            # 240 samples at 256×320, 16 masks each
    python3 benchmarks/bench_input_pipeline.py --quick    # 60 samples, 2 repeats

Measured side by side in one run, one process, torch at one thread (medians of repeats):

(a) raw decode limit: plain ``wds.WebDataset`` over the shards + the decode the pipeline uses,
    ``shards.stream.decode_training_sample`` (PNG image + label layers + pyramid + ids, crc
    checks) — the denominator of the first ratio column; (a2) the same with the store's general
    decode, ``shards.sample.decode_sample`` (also expands every mask into a boolean plane), for
    reference; (a3) the store's own tar scanner (``shards.reader.iter_raw_samples``, faster than
    webdataset's) + ``decode_training_sample``: the stricter denominator of the second column;
    (a4)/(aw) the (a3) read + decode delivered as collated batches (image, all label layers,
    ids, finest pyramid level; one buffer per batch, layers decompressed into it) with 0 / 1
    DataLoader worker: what handing over decoded batches costs by itself; (aw) is the
    denominator of the third column, for the 1-worker variants (both sides pay the same
    shared-memory hand-off);
(b) the full pipeline, ``build_pretrain_loader`` with ``num_workers=0`` (read + decode + views +
    mask sampling + collate), stream and indexed modes, with the view geometry in the worker
    (``ViewConfig(geometry="worker")``: resized crops, mask warping/packing, core crop) and on
    the device (``geometry="device"``: the worker only draws boxes/ids and ships the image and
    label layers);
(c) the same, indexed mode, with ``num_workers=1``: steady state from the first batch on (adds
    batch IPC through shared memory; worker start-up is excluded); also stream mode for device
    geometry (the trainer's default ``shuffle_buffer`` is 1024: stream mode);
(d) device side on the CPU: ``prepare_batch`` (batched BYOL photometrics, unpack, normalise) vs
    torchvision v2 per-image photometric transforms on the same images; and ``prepare_batch``
    on a device-geometry batch (adds the batched crops/resizes there).
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
    from shards.synthetic import write_synthetic_store

    return write_synthetic_store(out, count=count, samples_per_shard=per_shard, key_digits=5, height=height, width=width, partition=12, overlapping=4)


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def raw_decode(urls: list[str], decode) -> tuple[int, float]:
    """(samples, seconds) of reading + decoding every sample."""
    import webdataset as wds

    start = time.perf_counter()
    count = 0
    for raw in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        decode(raw)
        count += 1
    return count, time.perf_counter() - start


def raw_decode_fast_reader(urls: list[str], decode) -> tuple[int, float]:
    """(samples, seconds) of reading every sample with the shard store's own tar scanner
    (``shards.reader.iter_raw_samples``, faster than webdataset's) + decoding it."""
    from shards.reader import iter_raw_samples

    start = time.perf_counter()
    count = 0
    for url in urls:
        for raw in iter_raw_samples(url):
            decode(raw.as_webdataset_dict(url))
            count += 1
    return count, time.perf_counter() - start


def collate_decoded(raws: list, numbers) -> dict[str, torch.Tensor]:
    """Decoded samples (image, all label layers, layer of each mask, ids, finest pyramid level)
    as one batch, built as the pipeline builds its device-geometry batches: one buffer per batch
    (shared memory in a worker), layers decompressed straight into it."""
    from anaus_core.augment.batch import padded_ids, place_layers_on_canvas, place_on_canvas
    from anaus_core.augment.collate import alloc_batch
    from shards.stream import decode_training_sample, peek_training_shape

    shapes = [peek_training_shape(raw) for raw in raws]
    batch, height, width = len(raws), max(s[0] for s in shapes), max(s[1] for s in shapes)
    layers_max = max(s[2] for s in shapes)
    out = alloc_batch({"image": ((batch, 1, height, width), torch.uint8),
                       "mask_layers": ((batch, layers_max, height, width), torch.uint8)})
    images, layers = out["image"].numpy(), out["mask_layers"].numpy()
    decoded = []
    for row, (raw, (h, w, count, _)) in enumerate(zip(raws, shapes)):
        target = layers[row, :count] if (h, w) == (height, width) else None
        sample = decode_training_sample(raw, layers_out=target)
        place_on_canvas(images[row, 0], sample.image)
        in_place = target is not None and sample.mask_layers.layers is target
        place_layers_on_canvas(layers[row], None if in_place else sample.mask_layers.layers, count, h, w)
        decoded.append(sample)
    most = max(len(s.mask_ids) for s in decoded)
    grid = decoded[0].area_grid.shape[1:]
    extra = alloc_batch({"mask_ids": ((batch, most), torch.int64), "layer_of_mask": ((batch, most), torch.int64),
                         "area_grid": ((batch, most) + grid, torch.uint8), "index": ((batch,), torch.int64)})
    extra["mask_ids"].numpy()[:] = padded_ids([s.mask_ids for s in decoded], most)
    extra["layer_of_mask"].numpy()[:] = padded_ids([s.mask_layers.layer_of_mask for s in decoded], most)
    grids = extra["area_grid"].numpy()
    for row, sample in enumerate(decoded):
        grids[row, :len(sample.area_grid)] = sample.area_grid
        grids[row, len(sample.area_grid):] = 0
    extra["index"].numpy()[:] = numbers
    out.update(extra)
    return out


class RawDecodeBatches(torch.utils.data.IterableDataset):
    """The (a3) raw decode delivered as batches: the store's tar reader + ``decode_training_sample``,
    collated by ``collate_decoded``; the denominator of the DataLoader-worker variants (c)."""

    def __init__(self, urls: list[str], batch: int) -> None:
        super().__init__()
        self.urls, self.batch = urls, batch

    def __iter__(self):
        from shards.reader import iter_raw_samples

        raws, numbers = [], []
        every = (raw.as_webdataset_dict(url) for url in self.urls for raw in iter_raw_samples(url))
        for number, raw in enumerate(every):
            raws.append(raw)
            numbers.append(number)
            if len(raws) == self.batch:
                yield collate_decoded(raws, numbers)
                raws, numbers = [], []


def raw_decode_batches(urls: list[str], *, batch: int, workers: int) -> tuple[int, float]:
    """(samples, seconds) of ``RawDecodeBatches`` through a DataLoader; with workers, steady
    state from the first batch on, as ``full_pipeline``."""
    return timed_epoch(torch.utils.data.DataLoader(RawDecodeBatches(urls, batch), batch_size=None, num_workers=workers), workers=workers)


def timed_epoch(loader, *, workers: int) -> tuple[int, float]:
    """(samples, seconds) of one pass over ``loader``; with workers the clock starts at the
    first batch, which is not counted (worker start-up is a once-per-epoch cost)."""
    start = time.perf_counter()
    count = 0
    for index, item in enumerate(loader):
        if workers and index == 0:
            start = time.perf_counter()
            continue
        count += int(item["index"].shape[0])
    return count, time.perf_counter() - start


def full_pipeline(store, *, batch: int, workers: int, shuffle_buffer: int, geometry: str = "worker") -> tuple[int, float]:
    """(samples, seconds) of one epoch through the loader. With workers, the clock starts when the
    first batch arrives (steady state: worker start-up, ~0.5 s here, is a once-per-epoch cost
    that would dominate these small stores) and that batch is not counted."""
    from anaus_core.augment.views import ViewConfig
    from shards.stream import build_pretrain_loader

    loader = build_pretrain_loader(store, batch_size=batch, num_workers=workers, seed=0, shuffle_buffer=shuffle_buffer,
                                   view_config=ViewConfig(geometry=geometry))
    return timed_epoch(loader, workers=workers)


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
    parser.add_argument("--no-workers", action="store_true", help="skip the 1-worker variants (c)")
    parser.add_argument("--geometries", default="worker,device", help="view geometries of (b)/(c), comma-separated")
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
        # resolved once, as the trainer's ShardDataSource does (reading index.zarr per epoch
        # would otherwise be charged to every timed pass of these small stores)
        source = resolve_shards(store)
        urls = list(source.urls)
        used = (samples // args.batch) * args.batch
        rows = []

        from shards.sample import decode_sample
        from shards.stream import decode_training_sample

        variants = [
            ("(a) raw decode limit (wds + decode_training_sample)", samples, lambda: raw_decode(urls, decode_training_sample)),
            ("(a2) raw decode, store's decode_sample", samples, lambda: raw_decode(urls, decode_sample)),
            ("(a3) raw decode, store's tar reader", samples, lambda: raw_decode_fast_reader(urls, decode_training_sample)),
            ("(a4) (a3) as collated batches, 0 workers", used, lambda: raw_decode_batches(urls, batch=args.batch, workers=0)),
        ]
        if not args.no_workers:
            variants.append(("(aw) (a3) as collated batches, 1 worker", used,
                             lambda: raw_decode_batches(urls, batch=args.batch, workers=1)))
        for geometry in args.geometries.split(","):
            variants += [
                (f"(b) {geometry} geometry, stream, 0 workers", used,
                 lambda g=geometry: full_pipeline(source, batch=args.batch, workers=0, shuffle_buffer=256, geometry=g)),
                (f"(b) {geometry} geometry, indexed, 0 workers", used,
                 lambda g=geometry: full_pipeline(source, batch=args.batch, workers=0, shuffle_buffer=0, geometry=g)),
            ]
            if not args.no_workers:
                variants.append((f"(c) {geometry} geometry, indexed, 1 worker", used,
                                 lambda g=geometry: full_pipeline(source, batch=args.batch, workers=1, shuffle_buffer=0, geometry=g)))
                if geometry == "device":
                    variants.append((f"(c) {geometry} geometry, stream, 1 worker", used,
                                     lambda g=geometry: full_pipeline(source, batch=args.batch, workers=1, shuffle_buffer=256,
                                                                      geometry=g)))
        # Repeats are interleaved (a, b, b, c, a, b, ...) so that load drift on a shared machine
        # hits every variant alike.
        rates: dict[str, list[float]] = {label: [] for label, _, _ in variants}
        for _ in range(repeats):
            for label, _, run in variants:
                count, seconds = run()
                rates[label].append(count / seconds)
        # The ratio is the median over repeats of (variant rate / decode rate of the same repeat):
        # the two ran seconds apart, so load swings on a shared machine mostly cancel.
        # Two more columns: against (a3), the fastest sequential read + decode of this machine,
        # and, for the 1-worker variants, against (aw): the raw decode delivered through one
        # DataLoader worker as collated batches (the same shared-memory hand-off).
        def ratio_to(label: str, reference: str) -> float:
            return statistics.median(r / a for r, a in zip(rates[label], rates[reference]))

        references = [label for label, _, _ in variants]
        to_a, to_a3 = references[0], references[2]
        to_worker = next((label for label in references if label.startswith("(aw)")), None)
        for label, _, _ in variants:
            by_worker = ratio_to(label, to_worker) if to_worker and "1 worker" in label else float("nan")
            rows.append((label, statistics.median(rates[label]), ratio_to(label, to_a), ratio_to(label, to_a3), by_worker))

        print(f"input pipeline: {samples} samples 256×320, 16 masks, S=224, K=16, batch {args.batch}, "
              f"median of {repeats}, torch threads 1; ratios = median over repeats of per-repeat ratios")
        print(f"  {'variant':<52s} {'samples/s':>9s}   {'/(a)':>5s} {'/(a3)':>5s} {'/(aw)':>5s}")
        for label, rate, ratio, ratio_a3, ratio_w in rows:
            worker = f"{ratio_w:5.2f}" if ratio_w == ratio_w else "    -"
            print(f"  {label:<52s} {rate:9.1f}   {ratio:5.2f} {ratio_a3:5.2f} {worker}")

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
        from anaus_core.augment.views import ViewConfig

        device_batch = next(iter(build_pretrain_loader(store, batch_size=size, num_workers=0, seed=0,
                                                       view_config=ViewConfig(geometry="device"))))

        def device_geometry_step():
            prepare_batch(device_batch, device=device, generator=generator, config=None)
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        device_geometry_step()
        geometry_time, _ = timed(device_geometry_step, repeats)
        print(f"  (d) prepare_batch on {device.type} (both views, B={size})          {2 * size / device_time:8.1f} views/s")
        print(f"      torchvision v2 per image (view-1 chain)               {size / cpu_time:8.1f} views/s   "
              f"ratio batched/per-image {(2 * size / device_time) / (size / cpu_time):5.2f}")
        print(f"      prepare_batch + device geometry (B={size})            {2 * size / geometry_time:8.1f} views/s   "
              f"({1e3 * (geometry_time - device_time) / size:.2f} ms per sample more than worker geometry)")


if __name__ == "__main__":
    main()
