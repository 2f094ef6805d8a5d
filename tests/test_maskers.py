"""Mask sources: labels (on the real DDTI pair), k-means and Felzenszwalb (on phantoms and a
synthetic speckle image), the SAM masker's structure, and ``build_masker``'s errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anaus_core.errors import UserInputError
from anaus_core.maskers import build_masker
from anaus_core.maskers.base import ImageMeta, Masker, SampleError
from anaus_core.maskset import MaskSet
from pipeline.ingest import discover_sources, ingest_source


def meta_for(sample) -> ImageMeta:
    return ImageMeta(key=sample.key, relpath=sample.relpath, frame=sample.frame, extra={"original_size": sample.original_size})


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def assert_valid_mask_set(mask_set: MaskSet, shape: tuple[int, int]) -> None:
    assert isinstance(mask_set, MaskSet)
    assert mask_set.shape == shape
    assert mask_set.masks.dtype == bool
    assert np.all((mask_set.scores >= 0) & (mask_set.scores <= 1))
    assert len(np.unique(mask_set.ids)) == len(mask_set)


# -- labels -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ddti_sample(ddti_dir):
    (sample,) = ingest_source(discover_sources(ddti_dir / "20436_img.png")[0])
    return sample


@pytest.fixture(scope="module")
def ddti_label(ddti_dir) -> np.ndarray:
    return np.asarray(Image.open(ddti_dir / "20436_label.png"))


def labels_dir_with(tmp_path: Path, name: str, label: np.ndarray) -> Path:
    folder = tmp_path / "labels"
    folder.mkdir(exist_ok=True)
    Image.fromarray(label).save(folder / name)
    return folder


def test_ddti_label_01_comes_through_as_the_nodule(ddti_dir, ddti_sample, ddti_label, tmp_path):
    assert set(np.unique(ddti_label)) == {0, 1}
    labels = tmp_path / "labels"
    labels.mkdir()
    shutil.copy(ddti_dir / "20436_label.png", labels / "20436_img.png")
    masker = build_masker("labels", labels_dir=labels)
    assert isinstance(masker, Masker)
    (mask_set,) = masker([ddti_sample.image], [meta_for(ddti_sample)])
    assert_valid_mask_set(mask_set, (256, 256))
    assert len(mask_set) == 1 and mask_set.sources == ["labels"]
    nodule = mask_set.masks[0]
    assert 0.50 < nodule.mean() < 0.60  # the nodule covers ~55% of the image
    # Nearest-neighbour downscale of the original label, pixel for pixel.
    np.testing.assert_array_equal(nodule, ddti_label[1::2, 1::2] == 1)
    final = mask_set.finalize(min_area=16, max_masks=32)
    assert final.sources == ["labels", "residual"]
    assert final.areas.sum() == 256 * 256


def test_label_0_255_and_other_extension_and_replace(ddti_sample, ddti_label, tmp_path):
    labels = labels_dir_with(tmp_path, "20436_img.tif", (ddti_label * 255).astype(np.uint8))
    (mask_set,) = build_masker("labels", labels_dir=labels)([ddti_sample.image], [meta_for(ddti_sample)])
    assert len(mask_set) == 1
    np.testing.assert_array_equal(mask_set.masks[0], ddti_label[1::2, 1::2] == 1)

    renamed = tmp_path / "renamed"
    renamed.mkdir()
    Image.fromarray(ddti_label).save(renamed / "20436_label.png")
    masker = build_masker("labels", labels_dir=renamed, replace=("_img", "_label"))
    (mask_set,) = masker([ddti_sample.image], [meta_for(ddti_sample)])
    np.testing.assert_array_equal(mask_set.masks[0], ddti_label[1::2, 1::2] == 1)


@pytest.mark.parametrize("mode", ["L", "P", "I;16"])
def test_multi_id_label_map_gives_one_mask_per_id(ddti_sample, ddti_label, tmp_path, mode):
    multi = np.zeros((512, 512), np.uint16)
    multi[ddti_label == 1] = 7
    multi[:100, :200] = 2
    multi[450:, 300:] = 300 if mode == "I;16" else 3
    image = Image.fromarray(multi.astype(np.uint8) if mode != "I;16" else multi)
    if mode == "P":
        image = image.convert("P")
        image.putpalette([value for index in range(256) for value in (index * 3 % 256, 255 - index, 40)])
    folder = tmp_path / "labels"
    folder.mkdir()
    image.save(folder / "20436_img.png")
    (mask_set,) = build_masker("labels", labels_dir=folder)([ddti_sample.image], [meta_for(ddti_sample)])
    assert len(mask_set) == 3
    expected_ids = [2, 7, 300] if mode == "I;16" else [2, 3, 7]
    assert sorted(mask_set.ids.tolist()) == expected_ids
    for mask_id in expected_ids:
        mask = mask_set.masks[mask_set.ids.tolist().index(mask_id)]
        np.testing.assert_array_equal(mask, multi[1::2, 1::2] == mask_id)


def test_rgb_colour_label_map(ddti_sample, tmp_path):
    rgb = np.zeros((512, 512, 3), np.uint8)
    rgb[:100, :100] = (255, 0, 0)
    rgb[200:300, 200:300] = (0, 255, 0)
    folder = labels_dir_with(tmp_path, "20436_img.png", rgb)
    (mask_set,) = build_masker("labels", labels_dir=folder)([ddti_sample.image], [meta_for(ddti_sample)])
    assert len(mask_set) == 2 and sorted(mask_set.areas.tolist()) == [2500, 2500]


def test_label_size_mismatch_and_missing_label_are_sample_errors(ddti_sample, tmp_path):
    folder = labels_dir_with(tmp_path, "20436_img.png", np.ones((200, 300), np.uint8))
    masker = build_masker("labels", labels_dir=folder)
    with pytest.raises(SampleError, match="label 300x200 does not match image 512x512"):
        masker([ddti_sample.image], [meta_for(ddti_sample)])
    other = ImageMeta(key="other_png", relpath="sub/other.png", extra={"original_size": (512, 512)})
    with pytest.raises(SampleError, match="no label file for sub/other.png"):
        masker([ddti_sample.image], [other])
    (folder / "jpeg_only.jpg").write_bytes(b"x")
    jpeg = ImageMeta(key="jpeg_only_png", relpath="jpeg_only.png", extra={"original_size": (512, 512)})
    with pytest.raises(SampleError, match="JPEG"):
        masker([ddti_sample.image], [jpeg])
    (folder / "broken.png").write_text("not a png")
    broken = ImageMeta(key="broken_png", relpath="broken.png", extra={"original_size": (512, 512)})
    with pytest.raises(SampleError, match="cannot read label"):
        masker([ddti_sample.image], [broken])


def test_frame_labels_and_label_fingerprint(tmp_path):
    folder = tmp_path / "labels"
    (folder / "cines").mkdir(parents=True)
    label = np.zeros((40, 60), np.uint8)
    label[10:20, 10:30] = 1
    Image.fromarray(label).save(folder / "cines" / "heart_f00003.png")
    masker = build_masker("labels", labels_dir=folder)
    meta = ImageMeta(key="cines/heart_mp4_f00003", relpath="cines/heart.mp4", frame=3, extra={"original_size": (40, 60)})
    (mask_set,) = masker([np.zeros((20, 30), np.uint8)], [meta])
    assert mask_set.areas.tolist() == [50]
    first = masker.sample_fingerprint(meta)
    label[0, 0] = 2
    Image.fromarray(label).save(folder / "cines" / "heart_f00003.png")
    assert masker.sample_fingerprint(meta) != first  # an edited label re-runs that sample


# -- synthetic speckle image with known structures -------------------------------------------------
def speckle_scene(size: int = 128, seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A Rayleigh-speckled image: a dark ellipse (cyst), a bright band (fascia), mid background."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:size, 0:size] / size
    cyst = ((rows - 0.6) / 0.2) ** 2 + ((cols - 0.45) / 0.25) ** 2 < 1
    band = (rows > 0.15) & (rows < 0.27)
    echo = np.full((size, size), 0.45)
    echo[band] = 0.9
    echo[cyst] = 0.08
    speckle = rng.rayleigh(1.0, (size, size)) / np.sqrt(np.pi / 2)
    image = np.clip(echo * speckle * 200, 0, 255).astype(np.uint8)
    return image, {"cyst": cyst, "band": band}


@pytest.mark.parametrize("name", ["kmeans", "felzenszwalb"])
def test_weight_free_maskers_find_structures_and_are_deterministic(name):
    image, truth = speckle_scene()
    masker = build_masker(name, device="cpu", batch_size=8)  # runtime options are accepted
    first = masker([image], [None])[0]
    assert_valid_mask_set(first, image.shape)
    again = build_masker(name)([image.copy()], [None])[0]
    assert first == again
    final = first.finalize(min_area=16, max_masks=32)
    assert 2 <= len(final) <= 32
    for structure, mask in truth.items():
        best = max(iou(candidate, mask) for candidate in final.masks)
        assert best > 0.6, f"{name}: best IoU with the {structure} is {best:.2f}"


@pytest.mark.parametrize("name", ["kmeans", "felzenszwalb"])
def test_weight_free_maskers_on_ddti_find_the_nodule(name, ddti_sample, ddti_label):
    (proposals,) = build_masker(name)([ddti_sample.image], [meta_for(ddti_sample)])
    final = proposals.finalize(min_area=64, max_masks=32)
    nodule = ddti_label[1::2, 1::2] == 1
    # The anechoic core of the nodule is a single proposal; the label also includes the rim.
    core = max(float((candidate & nodule).sum() / candidate.sum()) for candidate in final.masks if candidate.sum() > 0.1 * nodule.sum())
    assert core > 0.9


def test_weight_free_maskers_handle_flat_and_tiny_images():
    for name in ("kmeans", "felzenszwalb"):
        masker = build_masker(name)
        flat, tiny = np.full((32, 48), 90, np.uint8), np.random.default_rng(0).integers(0, 255, (6, 5), dtype=np.uint8)
        flat_set, tiny_set = masker([flat, tiny], [None, None])
        assert_valid_mask_set(flat_set, (32, 48))
        assert_valid_mask_set(tiny_set, (6, 5))
        assert flat_set.finalize().areas.sum() == 32 * 48


def test_options_change_the_fingerprint():
    base = build_masker("kmeans").fingerprint()
    assert base["name"] == "kmeans" and "code_version" in base
    assert build_masker("kmeans", clusters=4).fingerprint() != base
    assert build_masker("kmeans", device="cuda").fingerprint() == base  # CPU maskers ignore device
    assert build_masker("felzenszwalb", scale=50).fingerprint() != build_masker("felzenszwalb").fingerprint()


# -- build_masker errors --------------------------------------------------------------------------
def test_build_masker_reports_user_errors(tmp_path):
    with pytest.raises(UserInputError, match="unknown masker 'mcg'"):
        build_masker("mcg")
    with pytest.raises(UserInputError, match="--labels DIR"):
        build_masker("labels")
    with pytest.raises(UserInputError, match="labels folder not found"):
        build_masker("labels", labels_dir=tmp_path / "nope")
    with pytest.raises(UserInputError, match="does not take option"):
        build_masker("kmeans", clusterz=3)
    with pytest.raises(UserInputError, match="--masker kmeans: clusters must be >= 2"):
        build_masker("kmeans", clusters=1)
    with pytest.raises(UserInputError, match="needs an LP-SAM checkpoint"):
        build_masker("lpsam")
    with pytest.raises(UserInputError, match="needs a SAM checkpoint"):
        build_masker("sam")


# -- SAM (random tiny checkpoint: structure, not quality) -------------------------------------------
@pytest.fixture(scope="module")
def tiny_sam_checkpoint(tmp_path_factory) -> Path:
    from anaus_core.sam import save_random_sam_checkpoint

    return save_random_sam_checkpoint(tmp_path_factory.mktemp("sam") / "tiny_sam.pth", "tiny", seed=0)


SAM_TEST_OPTIONS = dict(image_size=64, points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.0)


def sam_test_images(ddti_sample) -> list[np.ndarray]:
    image, _ = speckle_scene(96, seed=3)
    return [ddti_sample.image, image[:, :72], np.ascontiguousarray(ddti_sample.image[::4, ::3])]


def assert_same_up_to_rounding(first: MaskSet, second: MaskSet) -> None:
    """Batched and one-by-one encoding differ only by float rounding (~1e-6 in the features)."""
    assert len(first) == len(second) and first.sources == second.sources
    np.testing.assert_allclose(first.scores, second.scores, atol=1e-4)
    for a, b in zip(first.masks, second.masks):
        assert iou(a, b) > 0.99


def test_sam_masker_structure_determinism_and_batching(tiny_sam_checkpoint, ddti_sample):
    images = sam_test_images(ddti_sample)
    masker = build_masker("sam", checkpoint=tiny_sam_checkpoint, batch_size=3, device="cpu", **SAM_TEST_OPTIONS)
    batched = masker(images, [None] * len(images))
    assert len(batched) == len(images)
    for image, mask_set in zip(images, batched):
        assert_valid_mask_set(mask_set, image.shape)
        assert len(mask_set) >= 1 and set(mask_set.sources) == {"sam"}
        assert mask_set.areas.min() > 0
        final = mask_set.finalize(min_area=4, max_masks=32)
        assert len(final) <= 32 and final.sources[-1] in ("residual", "sam")
    again = build_masker("sam", checkpoint=tiny_sam_checkpoint, batch_size=3, **SAM_TEST_OPTIONS)(images, [None] * len(images))
    assert all(a == b for a, b in zip(batched, again))  # same inputs, same batch: bit-identical
    one_by_one = [masker([image], [None])[0] for image in images]
    for a, b in zip(batched, one_by_one):
        assert_same_up_to_rounding(a, b)


def test_sam_masker_matches_stock_generator(tiny_sam_checkpoint, ddti_sample):
    """Cached batch features + the stock generator == SamAutomaticMaskGenerator on the image."""
    from segment_anything import SamAutomaticMaskGenerator

    masker = build_masker("sam", checkpoint=tiny_sam_checkpoint, batch_size=2, **SAM_TEST_OPTIONS)
    image = ddti_sample.image
    (ours,) = masker([image], [None])
    stock = SamAutomaticMaskGenerator(
        masker.sam, points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.0
    ).generate(np.repeat(image[..., None], 3, axis=2))
    assert len(stock) == len(ours)
    for annotation, mask, score in zip(stock, ours.masks, ours.scores):
        np.testing.assert_array_equal(annotation["segmentation"], mask)
        assert abs(min(max(annotation["predicted_iou"], 0.0), 1.0) - score) < 1e-6


def test_sam_masker_fingerprint_and_errors(tiny_sam_checkpoint, tmp_path):
    from anaus_core.sam import file_sha256, save_random_sam_checkpoint

    masker = build_masker("sam", checkpoint=tiny_sam_checkpoint, **SAM_TEST_OPTIONS)
    fingerprint = masker.fingerprint()
    assert fingerprint["name"] == "sam" and fingerprint["checkpoint_sha256"] == file_sha256(tiny_sam_checkpoint)
    assert fingerprint["options"]["points_per_side"] == 6 and fingerprint["options"]["model_type"] == "tiny"
    other = save_random_sam_checkpoint(tmp_path / "other.pth", "tiny", seed=1)
    assert build_masker("sam", checkpoint=other, **SAM_TEST_OPTIONS).fingerprint() != fingerprint
    assert build_masker("sam", checkpoint=tiny_sam_checkpoint, batch_size=7, **SAM_TEST_OPTIONS).fingerprint() == fingerprint
    with pytest.raises(UserInputError, match="checkpoint not found"):
        build_masker("sam", checkpoint=tmp_path / "missing.pth")
    with pytest.raises(UserInputError, match="does not take option"):
        build_masker("sam", checkpoint=tiny_sam_checkpoint, crop_n_layers=1)


@pytest.mark.gpu
def test_sam_masker_on_cuda_with_bf16_autocast(tiny_sam_checkpoint, ddti_sample):
    images = sam_test_images(ddti_sample)
    masker = build_masker("sam", checkpoint=tiny_sam_checkpoint, device="cuda", batch_size=3, **SAM_TEST_OPTIONS)
    assert masker.fingerprint()["options"]["precision"] == "bf16"
    results = masker(images, [None] * len(images))
    for image, mask_set in zip(images, results):
        assert_valid_mask_set(mask_set, image.shape)
        assert len(mask_set) >= 1


# -- the phantom corpus ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def phantom_samples(phantom_corpus):
    """Ingested phantoms (128 px -> stored 256) with their structure maps at the stored size."""
    from anaus_core.maskers.labels import read_label_map, resize_nearest

    samples = []
    for source in discover_sources(phantom_corpus / "img"):
        (sample,) = ingest_source(source)
        label = read_label_map(phantom_corpus / "label" / source.relpath)
        samples.append((sample, resize_nearest(label, *sample.image.shape)))
    return samples


def test_phantom_corpus_ingests_and_labels_come_through(phantom_corpus, phantom_samples):
    assert len(phantom_samples) == 12
    masker = build_masker("labels", labels_dir=phantom_corpus / "label")
    for sample, structures in phantom_samples:
        assert sample.image.shape == (256, 256) and sample.original_size == (128, 128)
        (mask_set,) = masker([sample.image], [meta_for(sample)])
        ids = [int(v) for v in np.unique(structures) if v]
        assert sorted(mask_set.ids.tolist()) == ids
        for mask_id, mask in zip(mask_set.ids, mask_set.masks):
            np.testing.assert_array_equal(mask, structures == mask_id)


def best_ious(masks: np.ndarray, structures: np.ndarray) -> list[float]:
    return [max(iou(candidate, structures == value) for candidate in masks) for value in np.unique(structures) if value]


@pytest.mark.parametrize("name", ["kmeans", "felzenszwalb"])
def test_weight_free_maskers_on_phantoms(name, phantom_samples):
    """Several masks per phantom, some of them on the structures, better than a blind grid."""
    masker = build_masker(name)
    ours, grid = [], []
    height, width = 256, 256
    grid_masks = np.zeros((16, height, width), bool)
    for index in range(16):
        row, col = divmod(index, 4)
        grid_masks[index, row * 64 : (row + 1) * 64, col * 64 : (col + 1) * 64] = True
    for index, (sample, structures) in enumerate(phantom_samples):
        (proposals,) = masker([sample.image], [meta_for(sample)])
        if index < 2:
            assert proposals == masker([sample.image.copy()], [meta_for(sample)])[0]
        final = proposals.finalize(min_area=32, max_masks=32)
        assert 2 <= len(final) <= 32
        ours += best_ious(final.masks, structures)
        grid += best_ious(grid_masks, structures)
    ours, grid = np.array(ours), np.array(grid)
    assert ours.mean() > grid.mean() + 0.03, (ours.mean(), grid.mean())
    assert (ours > 0.5).sum() >= 3
