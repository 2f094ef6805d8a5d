"""Device-side view geometry (ViewConfig(geometry="device")) against the worker path and torchvision."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from anaus_core.augment.collate import collate_views
from anaus_core.augment.device import prepare_batch
from anaus_core.augment.device_geometry import apply_device_geometry, nearest_exact_index, resized_crop_batch
from anaus_core.augment.geometry import CropBox, nearest_exact_indices, sample_resized_crop, warp_masks
from anaus_core.augment.views import MaskLayers, PairedViews, ViewConfig


def partition_masks(height: int, width: int, parts: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.uniform([0, 0], [height, width], size=(parts, 2))
    yy, xx = np.mgrid[:height, :width]
    distance = (yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2
    labels = distance.argmin(axis=0)
    return np.stack([labels == i for i in range(parts)])


def as_layers(masks: np.ndarray, overlapping: np.ndarray) -> MaskLayers:
    """A partition in layer 0 (labels 1..P) plus overlapping masks one per extra layer."""
    parts = len(masks)
    layers = np.zeros((1 + len(overlapping),) + masks.shape[1:], np.uint8)
    for i, mask in enumerate(masks):
        layers[0][mask] = i + 1
    for j, mask in enumerate(overlapping):
        layers[1 + j][mask] = parts + j + 1
    return MaskLayers(layers, np.array([0] * parts + list(range(1, 1 + len(overlapping)))))


def smooth_image(height: int, width: int, seed: int) -> np.ndarray:
    from scipy import ndimage

    noise = np.random.default_rng(seed).random((height, width)) * 255
    return np.clip(ndimage.gaussian_filter(noise, 1.5) * 3 - 255, 0, 255).astype(np.uint8)


def test_matmul_resized_crop_matches_torchvision_within_one_level():
    rng = np.random.default_rng(0)
    height, width, size = 90, 130, 48
    images = torch.from_numpy(np.stack([smooth_image(height, width, s) for s in range(12)]))[:, None]
    boxes, flips = [], []
    for i in range(12):  # both up- (small boxes) and down-sampling (large boxes), both flips
        box = sample_resized_crop(rng, height, width, scale=(0.02, 1.0), ratio=(0.5, 2.0))
        boxes.append([box.top, box.left, box.height, box.width])
        flips.append(i % 2 == 1)
    boxes_t, flips_t = torch.tensor(boxes, dtype=torch.float32), torch.tensor(flips)
    assert min(b[2] for b in boxes) < size < max(b[2] for b in boxes)
    ours = resized_crop_batch(images, boxes_t, size, flips_t, method="matmul")
    reference = resized_crop_batch(images, boxes_t, size, flips_t, method="per_image")
    for i, (top, left, h, w) in enumerate(boxes):
        expected = TF.resized_crop(images[i], top, left, h, w, [size, size], interpolation=InterpolationMode.BILINEAR,
                                   antialias=True)
        if flips[i]:
            expected = TF.horizontal_flip(expected)
        assert torch.equal(reference[i], expected.float())
    difference = (ours - reference).abs()
    assert difference.max() <= 1 and difference.mean() < 0.2
    # a box shifted by one pixel is far off: the tolerance still catches misalignment
    shifted = boxes_t.clone()
    shifted[:, 1] = torch.clamp(shifted[:, 1] + 1, max=width - shifted[:, 3])
    moved = resized_crop_batch(images, shifted, size, flips_t, method="matmul")
    assert (moved - reference).abs().max() > 5


def test_nearest_exact_index_matches_numpy():
    rng = np.random.default_rng(1)
    for size in (224, 56, 33):
        boxes = [sample_resized_crop(rng, 300, 400, scale=(0.01, 1.0), ratio=(0.3, 3.0)) for _ in range(60)]
        starts = torch.tensor([b.top for b in boxes])
        lengths = torch.tensor([b.height for b in boxes])
        ours = nearest_exact_index(starts, lengths, size).numpy()
        expected = np.stack([nearest_exact_indices(b.top, b.height, size) for b in boxes])
        assert np.array_equal(ours, expected)


def make_samples(geometry: str, *, layered: bool, size: int = 64, count: int = 6):
    """Samples of two image sizes (the device batch is padded), same seeds in both modes."""
    views = PairedViews(ViewConfig(size=size, num_mask_samples=7, geometry=geometry, sampling_area="exact"))
    samples = []
    for s in range(count):
        height, width = (80, 112) if s % 2 else (96, 90)
        image = smooth_image(height, width, s)
        partition = partition_masks(height, width, 6, seed=s)
        blobs = partition_masks(height, width, 3, seed=100 + s)[:2]
        masks = as_layers(partition, blobs) if layered else np.concatenate([partition, blobs])
        out = views(image, masks, np.arange(11, 19), rng=np.random.default_rng(s))
        out["index"] = np.int64(s)
        samples.append(out)
    return samples


@pytest.mark.parametrize("layered", [False, True])
def test_device_geometry_equals_worker_geometry(layered):
    worker = collate_views(make_samples("worker", layered=layered))
    device = collate_views(make_samples("device", layered=layered))
    assert "view1" not in device and device["image"].shape[:2] == (6, 1)
    # only the bounding box of both crops travels; the canvas fits the largest of them
    assert device["image"].shape[2] <= 96 and device["image"].shape[3] <= 112
    assert (device["canvas_origin"] >= 0).all() and (device["canvas_origin"] > 0).any()
    for photometric in (False, True):
        config = {"photometric": photometric}
        a = prepare_batch(worker, device="cpu", generator=torch.Generator().manual_seed(5), config=config)
        b = prepare_batch(device, device="cpu", generator=torch.Generator().manual_seed(5), config=config)
        assert set(a) == set(b)
        for key in a:  # on a CPU the device path resamples with the worker's own function: exact
            assert torch.equal(a[key], b[key]), key
    # the accelerator path (batched matmul) is within one grey level; masks stay exact
    geometry = apply_device_geometry(device, 64, method="matmul")
    for which in (1, 2):
        assert torch.equal(geometry[f"masks{which}"].float(), a[f"masks{which}"])
        assert torch.equal(geometry[f"mask_valid{which}"], a[f"mask_valid{which}"])
        assert (geometry[f"view{which}"] * 255 - worker[f"view{which}"].float()).abs().max() <= 1
    assert (geometry["core"] * 255 - worker["core"].float()).abs().max() <= 1
    assert worker["core_valid"].any()


def test_layers_and_boolean_masks_give_the_same_worker_views():
    a, b = make_samples("worker", layered=True), make_samples("worker", layered=False)
    for x, y in zip(a, b):
        for key in x:
            assert np.array_equal(x[key], y[key]), key


def test_masks_follow_the_image_on_the_device():
    """An image whose intensities encode the mask ids: after the batched device geometry
    (matmul path), every pixel away from region borders shows the id of its mask."""
    height, width, size = 60, 80, 224
    masks = partition_masks(height, width, 5, seed=7)
    id_image = np.zeros((height, width), np.uint8)
    for i, mask in enumerate(masks):
        id_image[mask] = 40 * (i + 1)
    source_label = np.argmax(masks, axis=0)
    padded = np.pad(source_label, 1, mode="edge")
    interior_source = np.ones_like(source_label, bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            interior_source &= padded[1 + dy:1 + dy + height, 1 + dx:1 + dx + width] == source_label
    views = PairedViews(ViewConfig(size=size, num_mask_samples=5, geometry="device", scale_min=0.05, ratio_min=0.5, ratio_max=2))
    samples = [views(id_image, masks, np.arange(1, 6), rng=np.random.default_rng(s)) | {"index": np.int64(s)} for s in range(6)]
    batch = collate_views(samples)
    geometry = apply_device_geometry(batch, size, method="matmul")
    checked = 0
    for b, sample in enumerate(samples):
        for which in (1, 2):
            box = CropBox(*(int(v) for v in sample[f"crop{which}"]))
            flip = bool(sample[f"flip{which}"])
            image = (geometry[f"view{which}"][b, 0] * 255).round().numpy().astype(int)
            slot_masks = geometry[f"masks{which}"][b].numpy().astype(bool)
            interior = warp_masks(interior_source[None], box, flip, size)[0]
            for k, mask_id in enumerate(sample["mask_ids"]):
                inside = slot_masks[k] & interior
                assert np.all(image[inside] == 40 * int(mask_id))
                checked += int(inside.sum())
    assert checked > 10_000


def test_pretrain_loader_device_geometry_matches_worker_geometry(tmp_path):
    from shards.stream import build_pretrain_loader
    from shards.synthetic import synthetic_sample
    from shards.writer import ShardWriter

    with ShardWriter(tmp_path, samples_per_shard=4) as writer:
        for i in range(8):
            writer.write(synthetic_sample(f"img{i:03d}", height=48 + 8 * (i % 2), width=64, seed=i))
    batches = {}
    for geometry in ("worker", "device"):
        loader = build_pretrain_loader(tmp_path, batch_size=4, seed=2, view_config=ViewConfig(size=32, geometry=geometry),
                                       num_mask_samples=5)
        batches[geometry] = [prepare_batch(b, device="cpu", generator=torch.Generator().manual_seed(0), config=None)
                             for b in loader]
    assert len(batches["worker"]) == len(batches["device"]) == 2
    for a, b in zip(batches["worker"], batches["device"]):
        for key in a:
            assert torch.equal(a[key], b[key]), key


@pytest.mark.gpu
def test_device_geometry_on_cuda_matches_the_worker_batch():
    worker = collate_views(make_samples("worker", layered=True))
    device = collate_views(make_samples("device", layered=True))
    a = prepare_batch(worker, device="cuda", generator=torch.Generator(device="cuda").manual_seed(5), config={"photometric": False})
    b = prepare_batch(device, device="cuda", generator=torch.Generator(device="cuda").manual_seed(5), config={"photometric": False})
    for key in ("masks1", "masks2", "mask_valid1", "mask_valid2", "mask_ids", "core_valid"):
        assert torch.equal(a[key], b[key]), key
    std = torch.tensor([0.229, 0.224, 0.225], device="cuda").view(1, 3, 1, 1)
    for key in ("view1", "view2", "core"):  # one grey level, in normalised units (TF32 matmul included)
        assert ((a[key] - b[key]).abs() * std).max() <= 1.01 / 255, key
