"""Shard store benchmark: write and sequential read throughput, bytes per sample.

Measured side by side in one run, on the same synthetic 256×256 samples with 16 masks
(12-region warped-Voronoi partition + 4 overlapping blobs, speckled image):

- write: ShardWriter (encode image/masks/pyramid/json + tar + fsync + index), samples/s;
- read, project reader: ``iter(ShardReader)`` decoding every field with checks, samples/s;
- read, stock webdataset: ``wds.WebDataset(urls, shardshuffle=False)`` + ``decode_sample``;
- denominator: the same PNG bytes as loose files, open + read + PIL decode, images/s;
- bytes per sample: png / masks.bin / pyramid.bin / json / tar headers and padding, also for
  the harder "fragmented" masks (k-means-like scattered regions).

Each measurement is the median of several repeats; the repeats interleave the contenders so
that load from other processes hits them alike.

    python3 benchmarks/bench_shards.py            # 300 samples, 5 repeats
    python3 benchmarks/bench_shards.py --quick    # 60 samples, 3 repeats
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

from shards.reader import ShardReader  # noqa: E402
from shards.sample import DEFAULT_COMPRESSION_LEVEL, decode_sample, encode_sample  # noqa: E402
from shards.synthetic import synthetic_sample  # noqa: E402
from shards.writer import ShardWriter  # noqa: E402


def make_samples(count: int, *, fragmented: bool = False, size: int = 256, masks: int = 16):
    samples = []
    for i in range(count):
        # 12 + 4 = 16 masks; blobs almost never come out empty at 256 px, but keep exactly 16.
        sample = synthetic_sample(f"bench/{i:06d}", height=size, width=size, partition=masks - 4, overlapping=4, fragmented=fragmented, seed=i)
        samples.append(sample)
    return samples


def timed(func) -> float:
    start = time.perf_counter()
    func()
    return time.perf_counter() - start


def bytes_per_sample(samples, level: int) -> dict[str, float]:
    encoded = [encode_sample(s, level=level) for s in samples]
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
        encoded_png = encode_sample(sample)["png"]
        (loose / (sample.key.replace("/", "_") + ".png")).write_bytes(encoded_png)
    loose_files = sorted(loose.glob("*.png"))

    write_rates, reader_rates, wds_rates, png_rates = [], [], [], []
    out = work / "shards"
    import webdataset as wds

    for repeat in range(repeats):
        if out.exists():
            shutil.rmtree(out)

        def write():
            with ShardWriter(out, samples_per_shard=100) as writer:
                for sample in samples:
                    writer.write(sample)

        write_rates.append(count / timed(write))

        def read_loose_png():
            for path in loose_files:
                with open(path, "rb") as handle:
                    data = handle.read()
                with Image.open(__import__("io").BytesIO(data)) as image:
                    np.asarray(image)

        def read_reader():
            delivered = sum(1 for _ in ShardReader(out))
            assert delivered == count

        urls = [str(p) for p in sorted(out.glob("*.tar"))]

        def read_webdataset():
            delivered = sum(1 for raw in wds.WebDataset(urls, shardshuffle=False) if decode_sample(raw) is not None)
            assert delivered == count

        # Interleave the contenders (and rotate who goes first) so load spikes hit them alike.
        order = [("png", read_loose_png, png_rates), ("reader", read_reader, reader_rates), ("wds", read_webdataset, wds_rates)]
        order = order[repeat % 3 :] + order[: repeat % 3]
        for _, func, rates in order:
            rates.append(count / timed(func))
        print(f"repeat {repeat + 1}/{repeats}: write {write_rates[-1]:.0f}/s, reader {reader_rates[-1]:.0f}/s, "
              f"webdataset {wds_rates[-1]:.0f}/s, loose PNG decode {png_rates[-1]:.0f}/s", flush=True)

    # A sanity check that the figures describe a faithful store.
    reader = ShardReader(out)
    assert reader[samples[count // 2].key] == samples[count // 2]

    sizes = {"blobs": bytes_per_sample(samples[: min(count, 100)], DEFAULT_COMPRESSION_LEVEL)}
    fragmented = make_samples(min(count, 40), fragmented=True)
    sizes["fragmented"] = bytes_per_sample(fragmented, DEFAULT_COMPRESSION_LEVEL)
    levels = {level: bytes_per_sample(samples[:40], level)["masks_plus_pyramid_payload"] for level in (3, 9, DEFAULT_COMPRESSION_LEVEL, 19)}
    shard_bytes = sum(p.stat().st_size for p in out.glob("*.tar"))

    median = statistics.median
    figures = {
        "samples": count,
        "repeats": repeats,
        "write_samples_per_s": median(write_rates),
        "read_reader_samples_per_s": median(reader_rates),
        "read_webdataset_samples_per_s": median(wds_rates),
        "loose_png_decode_per_s": median(png_rates),
        "ratio_reader_over_png": median(reader_rates) / median(png_rates),
        "ratio_webdataset_over_png": median(wds_rates) / median(png_rates),
        "shard_bytes_per_sample": shard_bytes / count,
        "bytes_per_sample": sizes,
        "masks_plus_pyramid_payload_by_zstd_level": levels,
        "all_rates": {"write": write_rates, "reader": reader_rates, "webdataset": wds_rates, "png": png_rates},
    }
    print()
    print(f"write (encode + tar + fsync + index)      {figures['write_samples_per_s']:8.0f} samples/s")
    print(f"sequential read, ShardReader (all fields) {figures['read_reader_samples_per_s']:8.0f} samples/s")
    print(f"sequential read, webdataset + decode      {figures['read_webdataset_samples_per_s']:8.0f} samples/s")
    print(f"loose PNG open + decode (denominator)     {figures['loose_png_decode_per_s']:8.0f} images/s")
    print(f"ratio reader / loose PNG                  {figures['ratio_reader_over_png']:8.2f}")
    print(f"ratio webdataset / loose PNG              {figures['ratio_webdataset_over_png']:8.2f}")
    print(f"shard bytes per sample (incl. tar)        {figures['shard_bytes_per_sample']:8.0f} B")
    for name, size in sizes.items():
        print(f"bytes per sample, {name:10s}: png {size['png']:.0f}, masks {size['masks.bin']:.0f}, pyramid {size['pyramid.bin']:.0f}, "
              f"json {size['json']:.0f}, tar overhead {size['tar_headers_and_padding']:.0f}; masks+pyramid {size['masks_plus_pyramid_payload']:.0f} B "
              f"({size['masks_plus_pyramid_in_tar']:.0f} B with their tar headers), {size['mask_count_mean']:.1f} masks")
    print("masks+pyramid payload by zstd level: " + ", ".join(f"{k}: {v:.0f} B" for k, v in levels.items()))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
