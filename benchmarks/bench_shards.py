"""Shard store benchmark: write and sequential read throughput, bytes per sample.

Measured side by side in one run, on the same 256×256 samples with 16 masks (12-region
warped-Voronoi partition + 4 overlapping blobs). Images are random crops of the real DDTI
B-mode image in ../shared/fixtures (so PNG sizes and decode costs are those of real
ultrasound), resized to 256×256; a synthetic speckle image is used if the fixture is absent.

- write: ShardWriter (encode image/masks/pyramid/json + tar + fsync + index), samples/s;
- read, project reader: ``iter(ShardReader)`` decoding every field with the default checks
  (member crc32s), samples/s;
- read, stock webdataset: ``wds.WebDataset(urls, shardshuffle=False)`` + ``decode_sample``;
- read, image only: ``iter_raw_samples`` + ``decode_image`` of the png member (what the loose
  files give; SPEC §9 compared this);
- denominator: the images as loose PNG files written by Pillow at zlib level 6 (what a corpus
  of PNGs looks like), open + read + PIL decode, images/s;
- each for the default store (PNG rows Sub-filtered + Huffman-only deflate, zstd level 7) and
  for the previous defaults (Pillow PNG level 6 with adaptive filters, zstd level 12);
- bytes per sample: png / masks.bin / pyramid.bin / json / tar headers and padding, also for
  the harder "fragmented" masks (k-means-like scattered regions).

Each measurement is the median of several repeats; the repeats interleave the contenders so
that load from other processes hits them alike.

    python3 benchmarks/bench_shards.py            # 300 samples, 5 repeats
    python3 benchmarks/bench_shards.py --quick    # 60 samples, 3 repeats
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import sys
import tempfile
import time
import os
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

from shards.reader import ShardReader, iter_raw_samples  # noqa: E402
from shards.sample import DEFAULT_COMPRESSION_LEVEL, decode_image, decode_sample, encode_image, encode_sample  # noqa: E402
from shards.synthetic import synthetic_sample  # noqa: E402
from shards.writer import ShardWriter  # noqa: E402


FIXTURE = Path(os.environ.get("ANAUS_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared")) / "fixtures" / "ddti" / "20436_img.png"


def real_image_crop(generator: np.random.Generator, size: int) -> np.ndarray | None:
    if not FIXTURE.exists():
        return None
    with Image.open(FIXTURE) as source:
        source = source.convert("L")
        width, height = source.size
        side = int(generator.integers(min(width, height) // 2, min(width, height) + 1))
        top = int(generator.integers(0, height - side + 1))
        left = int(generator.integers(0, width - side + 1))
        crop = source.crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR)
        if generator.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        return np.asarray(crop)


def make_samples(count: int, *, fragmented: bool = False, size: int = 256, masks: int = 16):
    from shards.sample import ShardSample

    samples = []
    seed = 0
    for i in range(count):
        # 12 + 4 = 16 masks; a seed that leaves a region empty is skipped so every sample has 16.
        while True:
            sample = synthetic_sample(f"bench/{i:06d}", height=size, width=size, partition=masks - 4, overlapping=4, fragmented=fragmented, seed=seed)
            seed += 1
            if len(sample.mask_set) == masks:
                break
        image = real_image_crop(np.random.default_rng(10_000 + i), size)
        if image is not None:
            sample = ShardSample(key=sample.key, image=image, mask_set=sample.mask_set, mask_pyramid=sample.mask_pyramid, record=sample.record)
        samples.append(sample)
    return samples


def timed(func) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process). CPU time is steadier on a shared machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    func()
    return time.perf_counter() - wall, time.process_time() - cpu


def bytes_per_sample(samples, level: int, png_compress_level: int = 6, png_filter: str = "sub") -> dict[str, float]:
    encoded = [encode_sample(s, level=level, png_compress_level=png_compress_level, png_filter=png_filter) for s in samples]
    result = {name: float(np.mean([len(e[name]) for e in encoded])) for name in ("png", "masks.bin", "pyramid.bin", "json")}
    # Each tar member costs a 512-byte header plus padding of its data to 512 bytes.
    padding = {name: float(np.mean([(-len(e[name])) % 512 for e in encoded])) for name in result}
    result["tar_headers_and_padding"] = 4 * 512 + sum(padding.values())
    result["masks_plus_pyramid_payload"] = result["masks.bin"] + result["pyramid.bin"]
    result["masks_plus_pyramid_in_tar"] = result["masks_plus_pyramid_payload"] + 2 * 512 + padding["masks.bin"] + padding["pyramid.bin"]
    result["mask_count_mean"] = float(np.mean([len(s.mask_set) for s in samples]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="60 samples, 3 repeats")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    count = args.samples or (60 if args.quick else 300)
    repeats = args.repeats or (3 if args.quick else 5)

    print(f"building {count} samples (256×256, 16 masks) ...", flush=True)
    samples = make_samples(count)
    assert all(len(s.mask_set) == 16 for s in samples), "synthetic samples should carry 16 masks"
    work = Path(tempfile.mkdtemp(prefix="bench_shards_"))
    loose = work / "loose"
    loose.mkdir()
    for sample in samples:
        encoded_png = encode_image(sample.image, compress_level=6, png_filter="adaptive")  # Pillow, as a PNG corpus would be
        (loose / (sample.key.replace("/", "_") + ".png")).write_bytes(encoded_png)
    loose_files = sorted(loose.glob("*.png"))

    import webdataset as wds

    # name -> (PNG filter, PNG zlib level, zstd level) of the store
    modes = {"default": ("sub", 6, DEFAULT_COMPRESSION_LEVEL), "old_defaults": ("adaptive", 6, 12)}
    rates: dict[str, dict[str, list[float]]] = {}
    cpu_rates: dict[str, dict[str, list[float]]] = {}

    def record(name: str, measured: tuple[float, float]) -> None:
        rates.setdefault(name, []).append(count / measured[0])
        cpu_rates.setdefault(name, []).append(count / measured[1])

    def read_loose_png():
        for path in loose_files:
            with open(path, "rb") as handle:
                data = handle.read()
            with Image.open(io.BytesIO(data)) as image:
                np.asarray(image)

    for repeat in range(repeats):
        contenders = [("loose_png", read_loose_png)]
        for mode, (png_filter, png_level, zstd_level) in modes.items():
            out = work / f"shards_{mode}"
            if out.exists():
                shutil.rmtree(out)

            def write(out=out, png_filter=png_filter, png_level=png_level, zstd_level=zstd_level):
                with ShardWriter(out, samples_per_shard=100, png_compress_level=png_level, png_filter=png_filter, level=zstd_level) as writer:
                    for sample in samples:
                        writer.write(sample)

            record(f"write_{mode}", timed(write))

            # Opening the store (manifest + zarr index, ~50-100 ms) is a once-per-process cost,
            # not a per-sample one: it stays out of the timed loop.
            def read_reader(reader=ShardReader(out)):
                assert sum(1 for _ in reader) == count

            def read_webdataset(out=out):
                urls = [str(p) for p in sorted(out.glob("*.tar"))]
                assert sum(1 for raw in wds.WebDataset(urls, shardshuffle=False) if decode_sample(raw) is not None) == count

            def read_images_only(out=out):
                assert sum(1 for p in sorted(out.glob("*.tar")) for raw in iter_raw_samples(p) if decode_image(raw.fields["png"]) is not None) == count

            contenders += [(f"reader_{mode}", read_reader), (f"webdataset_{mode}", read_webdataset), (f"images_only_{mode}", read_images_only)]
        # Interleave the contenders and rotate who goes first, so load spikes hit them alike.
        shift = repeat % len(contenders)
        for name, func in contenders[shift:] + contenders[:shift]:
            record(name, timed(func))
        print(f"repeat {repeat + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.0f}/s" for k, v in rates.items()), flush=True)

    # A sanity check that the figures describe a faithful store.
    reader = ShardReader(work / "shards_default")
    assert reader[samples[count // 2].key] == samples[count // 2]
    shard_bytes = {mode: sum(p.stat().st_size for p in (work / f"shards_{mode}").glob("*.tar")) / count for mode in modes}

    sizes = {"blobs": bytes_per_sample(samples[: min(count, 100)], DEFAULT_COMPRESSION_LEVEL)}
    sizes["blobs_old_defaults"] = bytes_per_sample(samples[: min(count, 100)], 12, png_filter="adaptive")
    sizes["blobs_png_stored"] = bytes_per_sample(samples[: min(count, 100)], DEFAULT_COMPRESSION_LEVEL, png_compress_level=0)
    fragmented = make_samples(min(count, 40), fragmented=True)
    sizes["fragmented"] = bytes_per_sample(fragmented, DEFAULT_COMPRESSION_LEVEL)
    levels = {
        name: {level: bytes_per_sample(group[:40], level)["masks_plus_pyramid_payload"] for level in (3, 5, DEFAULT_COMPRESSION_LEVEL, 9, 12, 19)}
        for name, group in (("blobs", samples), ("fragmented", fragmented))
    }

    median = statistics.median
    wall = {name: median(values) for name, values in rates.items()}
    cpu = {name: median(values) for name, values in cpu_rates.items()}
    figures = {
        "samples": count,
        "repeats": repeats,
        "wall_samples_per_s": wall,
        "cpu_samples_per_s": cpu,
        "ratio_over_loose_png_wall": {k: v / wall["loose_png"] for k, v in wall.items() if k.startswith(("reader", "webdataset", "images_only"))},
        "ratio_over_loose_png_cpu": {k: v / cpu["loose_png"] for k, v in cpu.items() if k.startswith(("reader", "webdataset", "images_only"))},
        "ratio_over_loose_png_per_repeat_wall": {
            k: [v / base for v, base in zip(values, rates["loose_png"])] for k, values in rates.items() if k.startswith(("reader", "webdataset", "images_only"))
        },
        "shard_bytes_per_sample": shard_bytes,
        "bytes_per_sample": sizes,
        "masks_plus_pyramid_payload_by_zstd_level": levels,
        "all_wall_rates": rates,
    }
    print()
    per_repeat = figures["ratio_over_loose_png_per_repeat_wall"]
    print(f"{'samples/s (median of ' + str(repeats) + ')':42s} {'wall':>8s} {'cpu':>8s} {'ratio wall':>11s} {'ratio cpu':>10s}")
    for name in wall:
        ratio_wall = figures["ratio_over_loose_png_wall"].get(name)
        ratio_cpu = figures["ratio_over_loose_png_cpu"].get(name)
        print(f"{name:42s} {wall[name]:8.0f} {cpu[name]:8.0f} {'' if ratio_wall is None else f'{ratio_wall:11.2f}'} {'' if ratio_cpu is None else f'{ratio_cpu:10.2f}'}")
    print("per-repeat wall ratios over loose PNG: " + "; ".join(f"{k} " + "/".join(f"{r:.2f}" for r in v) for k, v in per_repeat.items()))
    print("shard bytes per sample (incl. tar): " + ", ".join(f"{k} {v:.0f} B" for k, v in shard_bytes.items()))
    for name, size in sizes.items():
        print(f"bytes per sample, {name:10s}: png {size['png']:.0f}, masks {size['masks.bin']:.0f}, pyramid {size['pyramid.bin']:.0f}, "
              f"json {size['json']:.0f}, tar overhead {size['tar_headers_and_padding']:.0f}; masks+pyramid {size['masks_plus_pyramid_payload']:.0f} B "
              f"({size['masks_plus_pyramid_in_tar']:.0f} B with their tar headers), {size['mask_count_mean']:.1f} masks")
    for name, by_level in levels.items():
        print(f"masks+pyramid payload by zstd level, {name}: " + ", ".join(f"{k}: {v:.0f} B" for k, v in by_level.items()))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
