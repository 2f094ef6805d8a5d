"""The scan region: measured on sector phantoms with burned-in overlays (true field of view and
overlay pixels from the phantom's metadata) and on the real DDTI image; every mask source
inside it; bad input named; the region as a pipeline stage of its own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from anaus_core.maskers import build_masker
from anaus_core.maskers.base import ImageMeta
from anaus_core.scan_region import ScanRegionConfig, ScanRegionError, detect_scan_region, region_overlap


@pytest.fixture(scope="module")
def annotated_sectors(tmp_path_factory) -> Path:
    """Three sector phantoms (256 px: the overlays' fonts and rulers need room) with overlays."""
    from anaus_core.phantoms import make_phantom_corpus

    out = tmp_path_factory.mktemp("annotated")
    make_phantom_corpus(out, count=3, size=256, seed=3, annotations=True, geometry="sector")
    return out


def load_annotated(root: Path, key: str):
    from pipeline.ingest import SourceFile, ingest_source

    (sample,) = ingest_source(SourceFile(root / "img" / f"{key}.png", f"{key}.png"), stored_size=None)
    truth = np.asarray(Image.open(root / "truth" / f"{key}_fov.png")) > 0
    overlay = np.asarray(Image.open(root / "truth" / f"{key}_overlay.png")) > 0
    return sample, truth, overlay


DDTI_MARKS = [  # (rows, cols) boxes of the burned-in marks on the DDTI image, found by eye
    (26, 42, 441, 461), (0, 16, 484, 512), (5, 12, 96, 103), (5, 12, 253, 259), (5, 12, 410, 416),
    (132, 138, 504, 511), (259, 265, 505, 511), (384, 395, 492, 511),
]


def ddti_truth(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The DDTI echo rectangle (rows 8..510, cols 0..507, read off the intensity profiles) and
    its mark pixels (>= 150 inside the boxes)."""
    echo = np.zeros(image.shape, bool)
    echo[8:511, 0:508] = True
    marks = np.zeros(image.shape, bool)
    for top, bottom, left, right in DDTI_MARKS:
        marks[top:bottom, left:right] = image[top:bottom, left:right] >= 150
    return echo, marks


def test_sector_phantoms_with_overlays(annotated_sectors):
    for key in ("phantom_00000", "phantom_00001", "phantom_00002"):
        sample, truth, overlay = load_annotated(annotated_sectors, key)
        assert sample.colour is not None and sample.colour.any()  # calipers and bar are coloured
        found = detect_scan_region(sample.image, colour=sample.colour)
        scores = region_overlap(found.mask, truth, overlay)
        assert scores["coverage"] >= 0.98, (key, scores)
        assert scores["outside"] <= 0.01, (key, scores)
        assert scores["annotations"] <= 0.01, (key, scores)
        assert scores["iou"] >= 0.97, (key, scores)


def test_ddti_linear_scan_with_marks(ddti_dir):
    image = np.asarray(Image.open(ddti_dir / "20436_img.png"))
    echo, marks = ddti_truth(image)
    found = detect_scan_region(image)
    scores = region_overlap(found.mask, echo, marks)
    assert scores["coverage"] >= 0.98 and scores["annotations"] <= 0.01, scores
    # column 508 is the blur ramp of the echo's right edge (~1/3 of the echo beside it): not echo
    assert scores["outside"] <= 0.01, scores
    beyond = found.mask & ~ndimage.binary_dilation(echo)
    assert not beyond.any(), beyond.sum()
    assert found.annotations[26:42, 441:461].any()  # the "T" written on the tissue


@pytest.mark.parametrize("masker_name", ["felzenszwalb", "kmeans", "labels"])
def test_every_mask_source_stays_inside_the_region(masker_name, annotated_sectors, ddti_dir, tmp_path):
    sample, truth, overlay = load_annotated(annotated_sectors, "phantom_00001")
    ddti = np.asarray(Image.open(ddti_dir / "20436_img.png"))
    cases = [(sample.image, sample.colour, annotated_sectors / "label", "phantom_00001.png"),
             (ddti, None, None, "20436_img.png")]
    for image, colour, label_dir, relpath in cases:
        region = detect_scan_region(image, colour=colour).mask
        options = {}
        if masker_name == "labels":
            if label_dir is None:  # the DDTI label sits beside its image under another name
                label_dir = tmp_path / "label"
                label_dir.mkdir(exist_ok=True)
                Image.open(ddti_dir / "20436_label.png").save(label_dir / relpath)
            options = {"labels_dir": str(label_dir)}
        masker = build_masker(masker_name, **options)
        meta = ImageMeta(key="k", relpath=relpath, extra={"scan_region": region})
        raw = masker([image], [meta])[0]
        final = raw.finalize(min_area=16, max_masks=32, region=region)
        assert len(final) >= 2
        for masks in (final.masks,) + ((raw.masks,) if masker_name != "labels" else ()):
            outside = (masks & ~region).sum(axis=(1, 2)) / np.maximum(1, masks.sum(axis=(1, 2)))
            assert outside.max() <= 0.01, (masker_name, relpath, outside.max())
        # the residual (when the masks leave enough uncovered) is "scan region minus anatomy masks"
        if "residual" in final.sources:
            residual = final.masks[final.sources.index("residual")]
            anatomy = final.masks[[s != "residual" for s in final.sources]].any(axis=0)
            assert np.array_equal(residual, region & ~anatomy)


def blurred_rectangle(size: int = 64, edge: int = 48, ramp: float = 0.3, seed: int = 0) -> np.ndarray:
    """A linear scan's echo rectangle (cols < ``edge``, speckle 40..160) filling the screen's
    left, whose right edge is smeared into one column at ``ramp`` of the echo beside it (what a
    scan converter's interpolation leaves), black beyond."""
    rng = np.random.default_rng(seed)
    image = np.zeros((size, size), np.uint8)
    image[:, :edge] = rng.integers(40, 160, (size, edge))
    image[:, edge] = (ramp * image[:, edge - 1]).astype(np.uint8) + 1
    return image


def test_region_border_is_at_the_half_maximum_of_a_blurred_edge():
    image = blurred_rectangle()
    found = detect_scan_region(image).mask
    assert found[:, :48].mean() >= 0.99  # the echo, including its last column and the image edge
    assert not found[:, 48:].any()  # the ramp column is above the black level, but not echo
    # a brighter ramp (above half the echo beside it) is the echo's edge and stays
    assert detect_scan_region(blurred_rectangle(ramp=0.8)).mask[:, 48].mean() >= 0.9
    # without the peel the ramp column is taken (what this test guards against)
    assert detect_scan_region(image, config=ScanRegionConfig(edge_ramp=0)).mask[:, 48].mean() >= 0.5


def test_black_and_regionless_images_are_refused():
    with pytest.raises(ScanRegionError, match="black"):
        detect_scan_region(np.full((64, 64), 3, np.uint8))
    dot = np.zeros((64, 64), np.uint8)
    dot[30:33, 30:33] = 120
    with pytest.raises(ScanRegionError, match="no scan region"):
        detect_scan_region(dot)


def sector_clip(frames: int, *, shift_from: int | None = None, size: int = 96) -> np.ndarray:
    """A live clip of a fan (fresh speckle each frame); from ``shift_from`` on the fan is
    narrower and deeper (a depth change mid-clip)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    clip = np.zeros((frames, size, size), np.uint8)
    for index in range(frames):
        changed = shift_from is not None and index >= shift_from
        half, reach = (0.35, 0.95) if changed else (0.7, 0.7)
        angle = np.abs(np.arctan2(xx - size / 2, yy + 2.0))
        fan = (angle <= half) & (np.hypot(xx - size / 2, yy + 2.0) <= reach * size)
        clip[index][fan] = rng.integers(40, 220, fan.sum())
    clip[:, 2:6, 2:30] = 240  # static burned-in text
    return clip


def test_clip_region_uses_all_frames_and_static_text_is_an_annotation():
    clip = sector_clip(8)
    found = detect_scan_region(clip)
    assert found.info["live"] and found.annotations[2:6, 2:30].mean() > 0.9
    assert not found.mask[2:6, 2:30].any()


def test_clip_whose_geometry_changes_is_refused():
    with pytest.raises(ScanRegionError, match="geometry changes mid-clip"):
        detect_scan_region(sector_clip(8, shift_from=4))


def test_disabled_region_is_the_whole_image():
    found = detect_scan_region(np.zeros((8, 8), np.uint8), config=ScanRegionConfig(enabled=False))
    assert found.mask.all()
