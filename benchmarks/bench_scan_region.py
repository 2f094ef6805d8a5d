"""Scan-region accuracy on phantoms with burned-in overlays and on the real DDTI image, and how
much of every weight-free mask source's masks falls outside the region.

For each phantom (``make-phantoms --annotations``; truth from ``truth/<id>_fov.png`` and
``truth/<id>_overlay.png``) the image is ingested exactly as the pipeline does (RGB screen ->
gray + colour map), the region is detected and compared with the true field of view:
coverage (of the field of view minus overlay pixels), outside (share of the pixels outside the
field of view that the region takes), annotations (share of overlay pixels inside the region),
IoU. DDTI: the echo rectangle read off its intensity profiles (rows 8..510, cols 0..507) and
its burned-in marks (boxes found by eye, pixels >= 150), as in ``tests/test_scan_region.py``.
Mask sources: the largest share of one mask's pixels outside the region, before (raw masker
output) and after ``finalize(region=...)``.

Run:  python benchmarks/bench_scan_region.py --count 24 --size 256 [--out /tmp/bench-region]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main(argv=None) -> None:
    from PIL import Image

    from anaus_core.maskers import build_masker
    from anaus_core.maskers.base import ImageMeta
    from anaus_core.phantoms import make_phantom_corpus
    from anaus_core.scan_region import detect_scan_region, region_overlap
    from pipeline.ingest import SourceFile, ingest_source
    from tests.test_scan_region import ddti_truth

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=24)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-scan-region"))
    parser.add_argument("--ddti", type=Path, default=REPO.parent / "shared" / "fixtures" / "ddti")
    args = parser.parse_args(argv)

    rows = []
    cases = []
    for geometry in ("sector", "linear"):
        root = args.out / geometry
        ids = make_phantom_corpus(root, count=args.count, size=args.size, seed=args.seed, annotations=True, geometry=geometry)
        scores, times = [], []
        for key in ids:
            (sample,) = ingest_source(SourceFile(root / "img" / f"{key}.png", f"{key}.png"), stored_size=None)
            truth = np.asarray(Image.open(root / "truth" / f"{key}_fov.png")) > 0
            overlay = np.asarray(Image.open(root / "truth" / f"{key}_overlay.png")) > 0
            start = time.perf_counter()
            region = detect_scan_region(sample.image, colour=sample.colour).mask
            times.append(time.perf_counter() - start)
            scores.append(region_overlap(region, truth, overlay))
            if len(cases) < 4 and geometry == "sector" or (geometry == "linear" and len(cases) < 6):
                cases.append((f"{geometry}/{key}", sample.image, region, root / "label", f"{key}.png"))
        rows.append((f"{geometry} phantoms ×{len(ids)} ({args.size} px)", scores, times))

    image = np.asarray(Image.open(args.ddti / "20436_img.png"))
    echo, marks = ddti_truth(image)
    start = time.perf_counter()
    region = detect_scan_region(image).mask
    ddti_time = time.perf_counter() - start
    rows.append(("DDTI 20436 (512 px, real linear)", [region_overlap(region, echo, marks)], [ddti_time]))
    cases.append(("DDTI", image, region, None, "20436_img.png"))

    print("| images | coverage median (min) | outside median (max) | annotations median (max) | IoU median (min) | ms/image median |")
    print("|---|---|---|---|---|---|")
    for name, scores, times in rows:
        def column(field, worst):
            values = [s[field] for s in scores]
            return f"{statistics.median(values):.4f} ({worst(values):.4f})"
        print(f"| {name} | {column('coverage', min)} | {column('outside', max)} | {column('annotations', max)} | "
              f"{column('iou', min)} | {1000 * statistics.median(times):.0f} |")

    print("\n| mask source | images | max share of one mask outside the region: raw output | after finalize(region) |")
    print("|---|---|---|---|")
    for name in ("felzenszwalb", "kmeans", "labels"):
        worst_raw = worst_final = 0.0
        used = 0
        for label, image, region, label_dir, relpath in cases:
            if name == "labels":
                if label_dir is None:
                    continue
                masker = build_masker("labels", labels_dir=str(label_dir))
            else:
                masker = build_masker(name)
            raw = masker([image], [ImageMeta(key="k", relpath=relpath, extra={"scan_region": region})])[0]
            final = raw.finalize(region=region)
            for masks, slot in ((raw.masks, "raw"), (final.masks, "final")):
                if len(masks):
                    share = float(((masks & ~region).sum(axis=(1, 2)) / np.maximum(1, masks.sum(axis=(1, 2)))).max())
                    if slot == "raw":
                        worst_raw = max(worst_raw, share)
                    else:
                        worst_final = max(worst_final, share)
            used += 1
        print(f"| {name} | {used} | {worst_raw:.4f} | {worst_final:.4f} |")


if __name__ == "__main__":
    main()
