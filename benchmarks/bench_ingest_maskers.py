"""Ingest and mask-source timings on the development machine.

    python3 benchmarks/bench_ingest_maskers.py [--quick]

Prints medians of several repeats for:
  * ingest of the real 512x512 DDTI PNG (verify + decode + Lanczos to 256 + sha256) against a
    bare ``Image.open(...).convert("L").resize(...)`` (the cost of the safety checks and hashing);
  * ingest of a 16-bit TIFF and of video frames;
  * the weight-free maskers (k-means, Felzenszwalb) and the labels masker per 256x256 image;
  * the SAM masker on the CPU-sized random ``tiny`` SAM, and SAM's ViT-B image encoder (random
    weights, 256 input) on a batch of 4 at once against one image at a time (side by side).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import os
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

DDTI = Path(os.environ.get("ANAUS_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared")) / "fixtures" / "ddti"


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer repeats and images")
    parser.add_argument("--device", default="cpu", help="device of the SAM parts (cuda: bf16 autocast)")
    parser.add_argument("--batch", type=int, default=4, help="images per SAM encoder batch")
    args = parser.parse_args()
    repeats = 3 if args.quick else 7
    import torch

    torch.set_num_threads(1)
    from anaus_core.maskers import build_masker
    from anaus_core.maskers.base import ImageMeta
    from anaus_core.sam import save_random_sam_checkpoint
    from pipeline.ingest import SourceFile, ingest_source

    work = Path(tempfile.mkdtemp(prefix="bench_ingest_"))
    png = SourceFile(path=DDTI / "20436_img.png", relpath="20436_img.png")
    ours = median_time(lambda: ingest_source(png, stored_size=256), repeats)
    bare = median_time(lambda: np.asarray(Image.open(png.path).convert("L").resize((256, 256), Image.Resampling.LANCZOS)), repeats)
    print(f"ingest DDTI PNG 512->256: {ours * 1e3:.1f} ms (bare Pillow {bare * 1e3:.1f} ms, ratio {ours / bare:.2f}x)")

    ramp = (np.add.outer(np.arange(512), np.arange(768)) * 40).astype(np.uint16)
    Image.fromarray(ramp).save(work / "wide.tif")
    tif = SourceFile(path=work / "wide.tif", relpath="wide.tif")
    print(f"ingest 16-bit TIFF 512x768->256: {median_time(lambda: ingest_source(tif), repeats) * 1e3:.1f} ms")

    import av

    frames = 10 if args.quick else 40
    with av.open(str(work / "clip.mp4"), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 640, 480, "yuv420p"
        rng = np.random.default_rng(0)
        for _ in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    video = SourceFile(path=work / "clip.mp4", relpath="clip.mp4")
    per_frame = median_time(lambda: ingest_source(video), repeats) / frames
    print(f"ingest mp4 640x480 -> 256: {per_frame * 1e3:.1f} ms/frame ({frames} frames)")

    (sample,) = ingest_source(png)
    meta = ImageMeta(key=sample.key, relpath=sample.relpath, extra={"original_size": sample.original_size})
    labels = work / "labels"
    labels.mkdir()
    Image.open(DDTI / "20436_label.png").save(labels / "20436_img.png")
    for name, options in (("labels", {"labels_dir": labels}), ("kmeans", {}), ("felzenszwalb", {})):
        masker = build_masker(name, **options)
        seconds = median_time(lambda: masker([sample.image], [meta]), repeats)
        print(f"masker {name}: {seconds * 1e3:.1f} ms per 256x256 image")

    checkpoint = save_random_sam_checkpoint(work / "tiny.pth", "tiny", seed=0)
    batch = args.batch
    variants = [sample.image, np.fliplr(sample.image), np.flipud(sample.image), sample.image.T]
    images = [np.ascontiguousarray(variants[index % 4]) for index in range(batch)]
    device = torch.device(args.device)

    def synced(fn):
        def run():
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()

        return run

    # segment_anything's default filters; a random model passes few masks.
    masker = build_masker("sam", checkpoint=checkpoint, image_size=256, points_per_side=8, batch_size=batch, device=args.device)
    total = median_time(synced(lambda: masker(images, [None] * batch)), repeats)
    print(f"masker sam (tiny, 256 input, 8x8 points): {total * 1e3 / batch:.1f} ms/image (the point-grid decoder dominates at this size)")

    # What batching changes is the image encoder: time it alone on a ViT-B (random weights).
    from anaus_core.maskers.sam import encode_images
    from anaus_core.sam import build_sam

    size = 256 if device.type == "cpu" else 1024
    vit_b = build_sam("vit_b", image_size=size).to(device)
    t_batched = median_time(synced(lambda: encode_images(vit_b, images)), repeats)
    t_single = median_time(synced(lambda: [encode_images(vit_b, [image]) for image in images]), repeats)
    print(
        f"SAM ViT-B encoder at {size} input on {device}, {batch} images: batched {t_batched * 1e3 / batch:.1f} ms/image, "
        f"one-by-one {t_single * 1e3 / batch:.1f} ms/image, ratio {t_single / t_batched:.2f}x"
    )

if __name__ == "__main__":
    main()
