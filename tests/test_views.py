"""Paired views: masks follow the image, the core (overlap) box, mask sampling, device photometrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from anaus_core.augment.device import DeviceAugmentConfig, pool_masks, prepare_batch, unpack_masks
from anaus_core.augment.geometry import (
    CropBox,
    box_area_exact,
    box_area_from_grid,
    intersect_boxes,
    overlap_in_view,
    resize_region,
    sample_resized_crop,
    warp_image,
    warp_masks,
)
from anaus_core.augment.collate import collate_views
from anaus_core.augment.photometric import PhotometricConfig, apply_params, gaussian_blur, sample_params
from anaus_core.augment.sampling import sample_mask_indices
from anaus_core.augment.views import PairedViews, ViewConfig


def partition_masks(height: int, width: int, parts: int, seed: int) -> np.ndarray:
    """bool (parts, H, W): a random Voronoi partition (every pixel in exactly one mask)."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform([0, 0], [height, width], size=(parts, 2))
    yy, xx = np.mgrid[:height, :width]
    distance = (yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2
    labels = distance.argmin(axis=0)
    return np.stack([labels == i for i in range(parts)])


def torchvision_geometry(masks: np.ndarray, box: CropBox, flip: bool, size: int, interpolation) -> np.ndarray:
    """The independent reference: torchvision v2 on ``tv_tensors.Mask``."""
    mask = tv_tensors.Mask(torch.from_numpy(masks.astype(np.uint8)))
    # crop + resize, not TF.resized_crop: for Mask inputs resized_crop drops ``interpolation`` and
    # always uses legacy NEAREST (torchvision 0.29, _resized_crop_mask_dispatch).
    out = TF.resize(TF.crop(mask, box.top, box.left, box.height, box.width), [size, size], interpolation=interpolation)
    if flip:
        out = TF.horizontal_flip(out)
    return out.numpy().astype(bool)


def random_box(rng: np.random.Generator, height: int, width: int) -> CropBox:
    return sample_resized_crop(rng, height, width, scale=(0.05, 1.0), ratio=(0.5, 2.0))


# --------------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [224, 56, 32])
def test_mask_warp_equals_torchvision_nearest_exact(size):
    rng = np.random.default_rng(size)
    masks = partition_masks(90, 130, 6, seed=1)
    for _ in range(40):
        box, flip = random_box(rng, 90, 130), bool(rng.random() < 0.5)
        ours = warp_masks(masks, box, flip, size)
        reference = torchvision_geometry(masks, box, flip, size, InterpolationMode.NEAREST_EXACT)
        assert np.array_equal(ours, reference), (box, flip)


def test_masks_follow_image_through_views_and_pooling():
    """pool(transformed stored masks) == pool(original masks cut by the same crop, resized, flipped)."""
    height, width, size = 96, 120, 64
    masks = partition_masks(height, width, 7, seed=3)
    ids = np.arange(11, 18)
    image = np.random.default_rng(0).integers(0, 256, (height, width), dtype=np.uint8)
    views = PairedViews(ViewConfig(size=size, num_mask_samples=8, sampling_area="exact"))
    samples = []
    for seed in range(12):
        out = views(image, masks, ids, rng=np.random.default_rng(seed))
        out["index"] = np.int64(seed)
        samples.append(out)
    batch = collate_views(samples)
    prepared = prepare_batch(batch, device="cpu", generator=torch.Generator().manual_seed(0), config={"photometric": False})
    for which in (1, 2):
        pooled = pool_masks(prepared[f"masks{which}"])
        for b, sample in enumerate(samples):
            top, left, h, w = (int(v) for v in sample[f"crop{which}"])
            flip = bool(sample[f"flip{which}"])
            chosen = [int(np.flatnonzero(ids == i)[0]) for i in sample["mask_ids"]]
            reference = torchvision_geometry(masks[chosen], CropBox(top, left, h, w), flip, size, InterpolationMode.NEAREST_EXACT)
            reference_t = torch.from_numpy(reference).float()[None]
            assert torch.equal(prepared[f"masks{which}"][b], reference_t[0])
            for scale, value in pooled.items():
                assert torch.equal(value[b], F.adaptive_avg_pool2d(reference_t, scale)[0]), scale
            # the validity flags say which sampled masks are visible in the view
            assert np.array_equal(sample[f"mask_valid{which}"], reference.reshape(len(chosen), -1).any(axis=1))


def test_masks_align_with_the_image_content():
    """Stronger: an image whose intensities encode the mask ids, warped by the image path
    (bilinear), shows the id of the warped mask at every pixel away from region borders."""
    height, width, size = 60, 80, 224  # strong up-sampling makes half-pixel shifts visible
    masks = partition_masks(height, width, 5, seed=7)
    id_image = np.zeros((height, width), np.uint8)
    for i, mask in enumerate(masks):
        id_image[mask] = 40 * (i + 1)
    source_label = np.argmax(masks, axis=0)
    padded = np.pad(source_label, 1, mode="edge")
    source_interior = np.ones_like(source_label, bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            source_interior &= padded[1 + dy:1 + dy + height, 1 + dx:1 + dx + width] == source_label
    rng = np.random.default_rng(5)
    for _ in range(15):
        box, flip = random_box(rng, height, width), bool(rng.random() < 0.5)
        warped_masks = warp_masks(masks, box, flip, size)
        warped_image = warp_image(id_image, box, flip, size).astype(int)
        label = np.argmax(warped_masks, axis=0)
        # "away from borders": the output pixel's source pixel has a uniform 3×3 neighbourhood,
        # so both bilinear taps read the same region
        interior = warp_masks(source_interior[None], box, flip, size)[0]
        assert interior.mean() > 0.3
        assert np.array_equal(warped_image[interior], 40 * (label[interior] + 1))


def test_mask_edges_sit_where_the_image_edges_are():
    """Stripe masks (edges along one axis): the nearest-exact mask equals the bilinear-warped
    indicator image thresholded at 1/2 everywhere except exact ties, for both axes and flips.
    torchvision's legacy NEAREST (what ``resized_crop`` uses for masks) is off by half an output
    pixel and fails the same check — the test has teeth."""
    height, width, size = 60, 80, 224
    rng = np.random.default_rng(1)
    row_cuts = np.sort(rng.choice(np.arange(5, height - 5), 4, replace=False))
    col_cuts = np.sort(rng.choice(np.arange(5, width - 5), 4, replace=False))
    row_label = np.searchsorted(row_cuts, np.arange(height), side="right")
    col_label = np.searchsorted(col_cuts, np.arange(width), side="right")
    masks = np.concatenate([
        np.stack([np.broadcast_to((row_label == k)[:, None], (height, width)) for k in range(5)]),
        np.stack([np.broadcast_to((col_label == k)[None, :], (height, width)) for k in range(5)]),
    ])
    ours_wrong = legacy_wrong = 0
    for _ in range(12):
        box, flip = random_box(rng, height, width), bool(rng.random() < 0.5)
        warped = warp_masks(masks, box, flip, size)
        legacy = torchvision_geometry(masks, box, flip, size, InterpolationMode.NEAREST)
        for i in range(len(masks)):
            value = warp_image(masks[i].astype(np.uint8) * 255, box, flip, size).astype(float)
            decided = np.abs(value - 127.5) > 1  # exact ties round either way
            inside = value >= 127.5
            ours_wrong += int((inside != warped[i])[decided].sum())
            legacy_wrong += int((inside != legacy[i])[decided].sum())
    assert ours_wrong == 0
    assert legacy_wrong > 1000


@pytest.mark.parametrize("flip", [False, True])
def test_overlap_in_view_matches_brute_force(flip):
    height, width, size = 80, 100, 64
    rng = np.random.default_rng(int(flip))
    checked = 0
    for _ in range(200):
        crop1, crop2 = random_box(rng, height, width), random_box(rng, height, width)
        overlap = intersect_boxes(crop1, crop2)
        # brute force intersection on the pixel grid
        grid1 = np.zeros((height, width), bool)
        grid1[crop1.top:crop1.bottom, crop1.left:crop1.right] = True
        grid2 = np.zeros((height, width), bool)
        grid2[crop2.top:crop2.bottom, crop2.left:crop2.right] = True
        both = grid1 & grid2
        if overlap is None:
            assert not both.any()
            continue
        rows, cols = np.flatnonzero(both.any(axis=1)), np.flatnonzero(both.any(axis=0))
        assert (overlap.top, overlap.bottom - 1, overlap.left, overlap.right - 1) == (rows[0], rows[-1], cols[0], cols[-1])
        # brute force mapping into view 1: warp the overlap region with the view's geometry
        region = both[None]
        warped = torchvision_geometry(region, crop1, flip, size, InterpolationMode.NEAREST_EXACT)[0]
        top, left, h, w = overlap_in_view(overlap, crop1, flip, size)
        centres = np.arange(size) + 0.5
        expected_rows = (centres >= top) & (centres < top + h)
        expected_cols = (centres >= left) & (centres < left + w)
        assert np.array_equal(warped, expected_rows[:, None] & expected_cols[None, :]), (crop1, overlap, flip)
        checked += 1
    assert checked > 50


def test_overlap_flip_mirrors_the_box():
    crop, box, size = CropBox(10, 20, 40, 60), CropBox(20, 30, 10, 15), 60
    top, left, h, w = overlap_in_view(box, crop, False, size)
    ftop, fleft, fh, fw = overlap_in_view(box, crop, True, size)
    assert (top, h, w) == (ftop, fh, fw)
    assert left == pytest.approx(10.0) and fleft == pytest.approx(size - (left + w))


def test_core_crop_is_the_overlap_of_the_un_augmented_image():
    height, width, size = 64, 96, 32
    image = np.random.default_rng(1).integers(0, 256, (height, width), dtype=np.uint8)
    masks = partition_masks(height, width, 3, seed=0)
    views = PairedViews(ViewConfig(size=size, num_mask_samples=4, core_min_side=1))
    saw_valid = False
    for seed in range(30):
        out = views(image, masks, np.arange(1, 4), rng=np.random.default_rng(seed))
        box1 = CropBox(*(int(v) for v in out["crop1"]))
        box2 = CropBox(*(int(v) for v in out["crop2"]))
        overlap = intersect_boxes(box1, box2)
        assert bool(out["core_valid"]) == (overlap is not None)
        if overlap is not None:
            saw_valid = True
            assert np.array_equal(out["core"][0], resize_region(image, overlap, size))
    assert saw_valid
    # disjoint crops: no core
    tiny = PairedViews(ViewConfig(size=size, scale_min=0.02, scale_max=0.02, num_mask_samples=4))
    invalid = [tiny(image, masks, np.arange(1, 4), rng=np.random.default_rng(s)) for s in range(40)]
    disjoint = [o for o in invalid if not o["core_valid"]]
    assert disjoint and all(not o["core"].any() for o in disjoint)


def test_resized_crop_sampler_matches_torchvision_distribution():
    rng = np.random.default_rng(0)
    ours = [sample_resized_crop(rng, 200, 300, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)) for _ in range(1500)]
    torch.manual_seed(0)
    image = torch.zeros(1, 200, 300)
    theirs = [CropBox(*v2.RandomResizedCrop.get_params(image, [0.2, 1.0], [3 / 4, 4 / 3])) for _ in range(1500)]
    for feature in (lambda b: b.height * b.width, lambda b: b.width / b.height, lambda b: b.top, lambda b: b.left):
        a, b = [feature(x) for x in ours], [feature(x) for x in theirs]
        assert stats.ks_2samp(a, b).pvalue > 1e-3
    assert all(0 <= b.top and b.bottom <= 200 and 0 <= b.left and b.right <= 300 for b in ours)


# --------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------

def test_mask_sampling_is_proportional_to_area():
    weights = np.array([0.0, 1.0, 3.0, 0.0, 6.0])
    draws = sample_mask_indices(weights, 200_000, np.random.default_rng(0))
    counts = np.bincount(draws, minlength=5) / draws.size
    assert counts[0] == counts[3] == 0
    np.testing.assert_allclose(counts, weights / weights.sum(), atol=0.005)
    assert sample_mask_indices(np.zeros(3), 4, np.random.default_rng(0)).size == 0
    assert sample_mask_indices(np.zeros(0), 4, np.random.default_rng(0)).size == 0


def test_grid_area_estimate_is_close_to_exact():
    masks = partition_masks(112, 112, 6, seed=2)
    fractions = F.adaptive_avg_pool2d(torch.from_numpy(masks).float()[None], 56)[0].numpy()
    rng = np.random.default_rng(0)
    for _ in range(20):
        box = random_box(rng, 112, 112)
        exact = box_area_exact(masks, box)
        estimate = box_area_from_grid(fractions, box, 112, 112)
        # on a 2-px grid, only the cells cut by the box border can be off
        border = 2 * (box.height + box.width) * 2
        assert np.all(np.abs(estimate - exact) <= border)
        assert estimate.sum() == pytest.approx(box.height * box.width, rel=1e-6)


def test_paired_views_share_ids_and_skip_absent_masks():
    height, width = 64, 64
    masks = np.zeros((3, height, width), bool)
    masks[0, :32] = True                 # top half
    masks[1, 32:] = True                 # bottom half
    ids = np.array([5, 9, 13])           # mask 13 is empty: must never be sampled
    views = PairedViews(ViewConfig(size=32, num_mask_samples=16, sampling_area="exact"))
    image = np.zeros((height, width), np.uint8)
    for seed in range(10):
        out = views(image, masks, ids, rng=np.random.default_rng(seed))
        assert set(out["mask_ids"].tolist()) <= {5, 9}
        assert out["mask_valid1"].any() or out["mask_valid2"].any()
    empty = views(image, np.zeros((0, height, width), bool), np.zeros(0, int), rng=np.random.default_rng(0))
    assert not empty["mask_ids"].any() and not empty["mask_valid1"].any() and not empty["mask_valid2"].any()


def test_views_are_deterministic_per_generator():
    masks = partition_masks(50, 70, 4, seed=0)
    image = np.random.default_rng(2).integers(0, 256, (50, 70), dtype=np.uint8)
    views = PairedViews(ViewConfig(size=32, num_mask_samples=6))
    a = views(image, masks, np.arange(1, 5), rng=np.random.default_rng(42))
    b = views(image, masks, np.arange(1, 5), rng=np.random.default_rng(42))
    c = views(image, masks, np.arange(1, 5), rng=np.random.default_rng(43))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in ("crop1", "crop2", "mask_ids"))


# --------------------------------------------------------------------------------------------
# device side
# --------------------------------------------------------------------------------------------

def test_unpack_masks_inverts_numpy_packbits():
    bits = np.random.default_rng(0).random((2, 3, 16, 40)) < 0.5
    packed = torch.from_numpy(np.packbits(bits, axis=-1, bitorder="big"))
    assert torch.equal(unpack_masks(packed, 40), torch.from_numpy(bits.astype(np.uint8)))


def test_batched_photometric_matches_torchvision_per_image():
    generator = torch.Generator().manual_seed(3)
    images = torch.rand((12, 1, 40, 48), generator=generator)
    config = PhotometricConfig(blur_p=0.5, solarize_p=0.5, blur_kernel=23)
    params = sample_params(12, config, generator=generator, device="cpu")
    batched = apply_params(images, params, config)
    for i in range(12):
        x = images[i]
        if params.jitter[i]:
            b, c = float(params.brightness[i]), float(params.contrast[i])
            if params.brightness_first[i]:
                x = TF.adjust_contrast(TF.adjust_brightness(x, b), c)
            else:
                x = TF.adjust_brightness(TF.adjust_contrast(x, c), b)
            # saturation and hue are identities on one channel in torchvision too
            assert torch.equal(TF.adjust_saturation(x, 1.2), x) and torch.equal(TF.adjust_hue(x, 0.05), x)
        if params.blur[i]:
            x = TF.gaussian_blur(x, [23, 23], [float(params.sigma[i])] * 2)
        if params.solarize[i]:
            x = TF.solarize(x, 0.5)
        torch.testing.assert_close(batched[i], x, atol=2e-6, rtol=0)
    assert params.blur.any() and (~params.blur).any() and params.solarize.any() and params.jitter.any()


def test_grouped_blur_uses_each_images_sigma():
    images = torch.zeros((2, 1, 31, 31))
    images[:, :, 15, 15] = 1.0
    blurred = gaussian_blur(images, torch.tensor([0.5, 2.0]), 23)
    assert blurred[0, 0, 15, 15] > blurred[1, 0, 15, 15]
    torch.testing.assert_close(blurred.sum(dim=(1, 2, 3)), torch.ones(2))


def test_prepare_batch_shapes_dtypes_and_determinism():
    masks = partition_masks(48, 64, 4, seed=0)
    image = np.random.default_rng(2).integers(0, 256, (48, 64), dtype=np.uint8)
    views = PairedViews(ViewConfig(size=32, num_mask_samples=5))
    samples = [views(image, masks, np.arange(1, 5), rng=np.random.default_rng(s)) | {"index": np.int64(s)} for s in range(6)]
    batch = collate_views(samples)
    assert batch["view1"].dtype == torch.uint8 and batch["view1"].shape == (6, 1, 32, 32)
    assert batch["masks1"].shape == (6, 5, 32, 4) and batch["mask_ids"].dtype == torch.int64
    assert batch["crop1"].dtype == torch.float32 and batch["core_valid"].dtype == torch.bool
    first = prepare_batch(batch, device="cpu", generator=torch.Generator().manual_seed(1), config=None)
    again = prepare_batch(batch, device="cpu", generator=torch.Generator().manual_seed(1), config=DeviceAugmentConfig())
    assert first["view1"].shape == (6, 3, 32, 32) and first["masks1"].shape == (6, 5, 32, 32)
    assert first["core"].shape == (6, 3, 32, 32) and first["view1"].dtype == torch.float32
    for key in first:
        assert torch.equal(first[key], again[key]), key
    other = prepare_batch(batch, device="cpu", generator=torch.Generator().manual_seed(2), config=None)
    assert not torch.equal(first["view1"], other["view1"])
    # the core is intact: just normalised
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(first["core"], (batch["core"].float() / 255 - mean) / std)


@pytest.mark.gpu
def test_prepare_batch_on_cuda_matches_cpu_shapes():
    masks = partition_masks(48, 64, 4, seed=0)
    image = np.random.default_rng(2).integers(0, 256, (48, 64), dtype=np.uint8)
    views = PairedViews(ViewConfig(size=32, num_mask_samples=5))
    batch = collate_views([views(image, masks, np.arange(1, 5), rng=np.random.default_rng(s)) | {"index": np.int64(s)} for s in range(4)])
    out = prepare_batch(batch, device="cuda", generator=torch.Generator(device="cuda").manual_seed(0), config=None)
    assert out["view1"].is_cuda and out["view1"].shape == (4, 3, 32, 32)
    assert torch.equal(out["masks1"].cpu(), unpack_masks(batch["masks1"], 32).float())
