"""Batch-level draws and batch building (anaus_core.augment.draws / batch) and the loader's batch path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from torch.utils.data import DataLoader, IterableDataset
from torchvision.transforms import v2

from anaus_core.augment.batch import build_batch
from anaus_core.augment.collate import alloc_batch
from anaus_core.augment.device import unpack_masks
from anaus_core.augment.device_geometry import apply_device_geometry
from anaus_core.augment.draws import draw_batch, grid_view_areas, sample_mask_slots, sample_resized_crops
from anaus_core.augment.geometry import CropBox, box_areas_from_grid
from anaus_core.augment.views import PairedViews, ViewConfig
from shards.stream import build_pretrain_loader, decode_training_sample, resolve_shards


def test_vectorised_crops_match_torchvision_distribution():
    rng = np.random.default_rng(0)
    count = 1500
    ours = sample_resized_crops(rng, np.full(count, 200), np.full(count, 300), scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3))
    torch.manual_seed(0)
    image = torch.zeros(1, 200, 300)
    theirs = np.array([v2.RandomResizedCrop.get_params(image, [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(count)])
    for feature in (lambda b: b[:, 2] * b[:, 3], lambda b: b[:, 3] / b[:, 2], lambda b: b[:, 0], lambda b: b[:, 1]):
        assert stats.ks_2samp(feature(ours), feature(theirs)).pvalue > 1e-3
    assert (ours[:, 0] >= 0).all() and (ours[:, 0] + ours[:, 2] <= 200).all()
    assert (ours[:, 1] >= 0).all() and (ours[:, 1] + ours[:, 3] <= 300).all()


def test_vectorised_crops_fall_back_to_the_clamped_centre_crop():
    # a 4×400 strip: no attempt at scale >= 0.9 with ratio ~1 fits, as in torchvision
    boxes = sample_resized_crops(np.random.default_rng(0), np.array([4, 400]), np.array([400, 4]), scale=(0.9, 1.0))
    assert boxes.tolist() == [[0, (400 - 5) // 2, 4, 5], [(400 - 5) // 2, 0, 5, 4]]


def test_mask_slots_are_proportional_to_weights_per_row():
    weights = np.array([[1.0, 0.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 2.0, 2.0, 4.0]])
    draws = sample_mask_slots(weights, 100_000, np.random.default_rng(0))
    assert (draws[1] == -1).all()
    for row in (0, 2):
        frequency = np.bincount(draws[row], minlength=4) / draws.shape[1]
        np.testing.assert_allclose(frequency, weights[row] / weights[row].sum(), atol=0.01)
    assert sample_mask_slots(np.zeros((2, 0)), 3, np.random.default_rng(0)).tolist() == [[-1] * 3] * 2


def test_grid_areas_match_the_per_box_reference_with_ragged_mask_counts():
    rng = np.random.default_rng(1)
    grids = [rng.integers(0, 256, (count, 8, 8)).astype(np.uint8) for count in (3, 5, 1)]
    crops = sample_resized_crops(rng, np.full(6, 40), np.full(6, 56)).reshape(3, 2, 4)
    areas = grid_view_areas(grids, crops, np.full(3, 40), np.full(3, 56))
    for b, grid in enumerate(grids):
        boxes = [CropBox(*(int(v) for v in crops[b, view])) for view in range(2)]
        expected = box_areas_from_grid(grid, boxes, 40, 56, 1 / 255).T
        np.testing.assert_allclose(areas[b, :len(grid)], expected, rtol=1e-5)
        assert not areas[b, len(grid):].any()


def blob_sample(seed: int, height: int = 40, width: int = 48):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width), dtype=np.uint8)
    yy, xx = np.mgrid[:height, :width]
    centres = rng.uniform([0, 0], [height, width], (4, 2))
    masks = np.stack([(yy - y) ** 2 + (xx - x) ** 2 < rng.uniform(40, 200) for y, x in centres])
    return image, masks, np.arange(11, 15)


def test_paired_views_are_a_batch_of_one():
    views = PairedViews(ViewConfig(size=24, num_mask_samples=6, sampling_area="exact", geometry="worker"))
    image, masks, ids = blob_sample(0)
    single = views(image, masks, ids, rng=np.random.default_rng(5))
    batch = build_batch(views, [(image, masks, ids, None)], [7], np.random.default_rng(5))
    for name, value in single.items():
        assert np.array_equal(batch[name][0].numpy(), np.asarray(value)), name
    assert batch["index"].tolist() == [7]


def test_device_batch_gives_the_worker_batch_exactly_for_masks():
    samples = [blob_sample(seed) for seed in range(5)]
    batches = {}
    for geometry in ("worker", "device"):
        views = PairedViews(ViewConfig(size=24, num_mask_samples=6, sampling_area="exact", geometry=geometry))
        batches[geometry] = build_batch(views, [(i, m, d, None) for i, m, d in samples], range(5), np.random.default_rng(3))
    worker, device = batches["worker"], batches["device"]
    for name in ("mask_ids", "crop1", "crop2", "flip1", "flip2", "core_valid", "index"):
        assert torch.equal(worker[name], device[name]), name
    geometry = apply_device_geometry(device, 24)
    for which in (1, 2):
        assert torch.equal(geometry[f"masks{which}"], unpack_masks(worker[f"masks{which}"], 24)), which
        assert torch.equal(geometry[f"mask_valid{which}"], worker[f"mask_valid{which}"])
        difference = (geometry[f"view{which}"] * 255).round() - worker[f"view{which}"].float()
        assert difference.abs().max() <= 1
    core = (geometry["core"] * 255).round() - worker["core"].float()
    assert core.abs().max() <= 1


def test_draws_need_masks_without_grids_and_treat_empty_samples():
    config = ViewConfig(size=16, num_mask_samples=3)
    image, masks, _ = blob_sample(1)
    draws = draw_batch(np.random.default_rng(0), [image.shape, image.shape], config=config,
                       grids=[None, None], masks=[masks, masks[:0]])
    assert (draws.chosen[0] >= 0).all() and (draws.chosen[1] == -1).all()
    with pytest.raises(ValueError):
        draw_batch(np.random.default_rng(0), [image.shape], config=config, grids=[None], masks=None)


class _Batches(IterableDataset):
    def __iter__(self):
        for _ in range(2):
            yield alloc_batch({"a": ((4, 3), torch.float32), "b": ((4,), torch.bool), "c": ((2, 5, 5), torch.uint8)})


def test_alloc_batch_uses_one_buffer_in_and_out_of_workers():
    in_process = alloc_batch({"a": ((4, 3), torch.float32), "b": ((4,), torch.bool)})
    assert in_process["a"].untyped_storage().data_ptr() == in_process["b"].untyped_storage().data_ptr()
    for batch in DataLoader(_Batches(), batch_size=None, num_workers=1):
        assert batch["a"].shape == (4, 3) and batch["b"].dtype == torch.bool and batch["c"].shape == (2, 5, 5)
        pointers = {value.untyped_storage().data_ptr() for value in batch.values()}
        assert len(pointers) == 1                       # one segment crossed the process boundary
        assert batch["a"].is_shared()


# --------------------------------------------------------------------------------------------
# through the loader, with the shard store's format
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    from shards.synthetic import write_synthetic_store

    return write_synthetic_store(tmp_path_factory.mktemp("store"), count=12, samples_per_shard=5, height=48, width=64, partition=6, overlapping=3)


def test_decode_into_the_batch_equals_the_plain_decode(store):
    from shards.reader import iter_raw_samples

    source = resolve_shards(store)
    raw = next(iter_raw_samples(source.urls[0])).as_webdataset_dict(source.urls[0])
    plain = decode_training_sample(raw)
    target = np.full(plain.mask_layers.layers.shape, 7, np.uint8)
    into = decode_training_sample(raw, layers_out=target)
    assert into.mask_layers.layers is target and np.array_equal(target, plain.mask_layers.layers)
    assert np.array_equal(into.mask_layers.layer_of_mask, plain.mask_layers.layer_of_mask)
    wrong = np.full((1,) + plain.mask_layers.layers.shape[1:], 7, np.uint8)  # not the stored shape: untouched
    fallback = decode_training_sample(raw, layers_out=wrong)
    assert (wrong == 7).all() and np.array_equal(fallback.mask_layers.layers, plain.mask_layers.layers)


@pytest.mark.parametrize("shuffle_buffer", [0, 4])
def test_loader_device_batches_match_worker_batches(store, shuffle_buffer):
    batches = {}
    for geometry in ("worker", "device"):
        config = ViewConfig(size=32, num_mask_samples=5, geometry=geometry)
        batches[geometry] = list(build_pretrain_loader(store, batch_size=4, seed=2, epoch=1, view_config=config,
                                                       shuffle_buffer=shuffle_buffer))
    assert len(batches["device"]) == 3
    for worker, device in zip(batches["worker"], batches["device"]):
        assert "canvas_origin" not in device and device["image"].shape == (4, 1, 48, 64)
        for name in ("mask_ids", "crop1", "crop2", "flip1", "flip2", "core_valid", "index"):
            assert torch.equal(worker[name], device[name]), name
        assert (worker["mask_ids"] > 0).all()
        geometry = apply_device_geometry(device, 32)
        for which in (1, 2):
            assert torch.equal(geometry[f"masks{which}"], unpack_masks(worker[f"masks{which}"], 32))


def test_loader_device_batches_resume_and_ignore_the_worker_count(store):
    config = ViewConfig(size=32, num_mask_samples=4, geometry="device")

    def run(workers: int, start: int = 0, shuffle_buffer: int = 0):
        return list(build_pretrain_loader(store, batch_size=2, num_workers=workers, seed=3, epoch=1, start_batch=start,
                                          view_config=config, shuffle_buffer=shuffle_buffer))

    def same(a, b):
        return len(a) == len(b) and all(all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))

    full = run(0)
    assert len(full) == 6
    assert same(run(2), full)                  # indexed mode: batches do not depend on the workers
    assert same(run(2, start=3), full[3:])     # resume mid-epoch
    streamed = run(2, shuffle_buffer=4)
    assert same(run(2, start=1, shuffle_buffer=4), streamed[1:])
    assert not torch.equal(full[0]["crop1"], full[1]["crop1"])


def test_loader_device_batches_with_images_of_different_sizes(tmp_path):
    from shards.synthetic import synthetic_sample
    from shards.writer import ShardWriter

    with ShardWriter(tmp_path, samples_per_shard=4) as writer:
        for i in range(8):
            height, width = ((40, 56), (48, 40))[i % 2]
            writer.write(synthetic_sample(f"img{i:03d}", height=height, width=width, partition=5, overlapping=i % 3, seed=i))
    batches = {}
    for geometry in ("worker", "device"):
        config = ViewConfig(size=16, num_mask_samples=4, geometry=geometry)
        batches[geometry] = list(build_pretrain_loader(tmp_path, batch_size=4, seed=1, view_config=config))
    for worker, device in zip(batches["worker"], batches["device"]):
        assert device["image"].shape[-2:] == (48, 56)           # the canvas: largest height and width
        assert torch.equal(worker["mask_ids"], device["mask_ids"])
        geometry = apply_device_geometry(device, 16)
        for which in (1, 2):
            assert torch.equal(geometry[f"masks{which}"], unpack_masks(worker[f"masks{which}"], 16))
            assert ((geometry[f"view{which}"] * 255).round() - worker[f"view{which}"].float()).abs().max() <= 1
