"""Probe-geometry view changes (issue 14 part 3): depth crop and sector-angle change move the
masks exactly with the image, are deterministic per batch generator, agree between the worker
and device geometry paths, and keep a cyst darker than its surroundings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anaus_core.augment.batch import build_batch
from anaus_core.augment.device import DeviceAugmentConfig, prepare_batch
from anaus_core.augment.draws import draw_batch
from anaus_core.augment.geometry import CropBox, warp_image, warp_masks
from anaus_core.augment.probe_geometry import depth_rows, estimate_fan_apex, face_radius, kept_rows, sector_warp_numpy
from anaus_core.augment.views import PairedViews, ViewConfig


def fan(height: int, width: int, apex=(-6.0, None), half_angle_deg: float = 35.0, depth: float | None = None,
        face: float = 0.0) -> np.ndarray:
    """bool (H, W) sector region: points within ``half_angle`` of the downward axis from ``apex``,
    farther than ``face`` (a curvilinear probe's face) and closer than ``depth``."""
    apex_row, apex_col = apex[0], width / 2 if apex[1] is None else apex[1]
    rows, cols = np.mgrid[:height, :width] + 0.5
    angle = np.degrees(np.arctan2(cols - apex_col, rows - apex_row))
    radius = np.hypot(rows - apex_row, cols - apex_col)
    return (np.abs(angle) < half_angle_deg) & (radius < (depth or height - 2 - apex_row)) & (radius > face) & (rows > 0)


def test_apex_of_a_fan_is_found_and_a_linear_scan_has_none():
    for apex in ((-10.0, 40.0), (3.0, 37.5), (-25.0, 44.0)):
        found = estimate_fan_apex(fan(96, 80, apex=apex))
        assert found is not None
        assert abs(found[0] - apex[0]) < 1.5 and abs(found[1] - apex[1]) < 1.0, (apex, found)
    linear = np.zeros((96, 80), bool)
    linear[5:90, 10:70] = True
    assert estimate_fan_apex(linear) is None
    assert estimate_fan_apex(np.zeros((96, 80), bool)) is None


def _label_fan(height: int, width: int, seed: int):
    """A fan split into angular/radial sectors: masks (M, H, W), label image, id image."""
    region = fan(height, width, face=14.0)
    rows, cols = np.mgrid[:height, :width] + 0.5
    angle = np.arctan2(cols - width / 2, rows + 6.0)
    radius = np.hypot(rows + 6.0, cols - width / 2)
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.uniform(-0.5, 0.5, 2))
    label = (np.digitize(angle, cuts) * 2 + (radius > rng.uniform(0.4, 0.7) * height)).astype(np.int64)
    label = np.where(region, label + 1, 0)
    masks = np.stack([label == value for value in range(1, label.max() + 1)])
    masks = masks[masks.reshape(len(masks), -1).any(axis=1)]
    label = np.where(region, np.argmax(masks, axis=0) + 1, 0)
    return region, masks, label


def _interior(label: np.ndarray) -> np.ndarray:
    """Pixels whose 3×3 neighbourhood has one label (every bilinear tap reads it); not the
    image's border pixels (a tap there reads the zero padding outside the image)."""
    padded = np.pad(label, 1, mode="constant", constant_values=-1)
    height, width = label.shape
    inside = np.ones_like(label, bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            inside &= padded[1 + dy:1 + dy + height, 1 + dx:1 + dx + width] == label
    return inside


@pytest.mark.parametrize("factor, convexity", [(0.8, 1.0), (1.2, 1.0), (1.0, 0.6), (1.15, 1.6)])
def test_sector_warp_moves_masks_exactly_with_the_image(factor, convexity):
    """As tests/test_views.py's alignment test: an image whose intensities encode the mask ids,
    warped (sector angle, then crop + resize + flip) by the image path, shows the id of the
    warped mask at every pixel away from borders."""
    height, width, size = 72, 80, 160
    region, masks, label = _label_fan(height, width, seed=1)
    id_image = (40 * label).astype(np.uint8)
    apex = estimate_fan_apex(region)
    apex = apex + (face_radius(region, apex),)
    assert abs(apex[2] - 14.0) < 1.5
    warped_image, warped_layers, warped_region = sector_warp_numpy(id_image, label[None].astype(np.uint8), region,
                                                                   apex, factor, convexity)
    warped_label = warped_layers[0].astype(np.int64)
    # the region follows: the warped region is exactly where the warped labels are non-zero
    np.testing.assert_array_equal(warped_region, warped_label > 0)
    # interior after the warp: source pixel interior (all 4 bilinear taps share its label) ...
    source_inside = sector_warp_numpy(id_image, _interior(label)[None].astype(np.uint8), None, apex, factor,
                                      convexity)[1][0] > 0
    assert np.array_equal(warped_image[source_inside], 40 * warped_label[source_inside])
    # ... and through the view's crop as well
    view_inside = source_inside & _interior(np.where(source_inside, warped_label, -1))
    rng = np.random.default_rng(3)
    for _ in range(10):
        box_h, box_w = int(rng.integers(30, height)), int(rng.integers(30, width))
        box = CropBox(int(rng.integers(0, height - box_h + 1)), int(rng.integers(0, width - box_w + 1)), box_h, box_w)
        flip = bool(rng.random() < 0.5)
        view = warp_image(warped_image, box, flip, size).astype(int)
        view_label = warp_masks(warped_label[None], box, flip, size)[0]
        inside = warp_masks(view_inside[None], box, flip, size)[0]
        assert inside.mean() > 0.1
        assert np.array_equal(view[inside], 40 * view_label[inside])
    # the fan really changed: its apex moved by (1 - c) R and its face radius became c R
    # (independent: re-estimated from the warped region), and it is wider for a > 1 alone
    new_apex = estimate_fan_apex(warped_region)
    assert new_apex is not None
    assert abs(new_apex[0] - (apex[0] + (1 - convexity) * apex[2])) < 2.0, (new_apex, apex)
    assert abs(face_radius(warped_region, new_apex) - convexity * apex[2]) < 2.0
    if convexity == 1.0:
        assert (warped_region.sum() > region.sum()) == (factor > 1)


def _fan_samples(count: int, size: int = 64):
    out = []
    for i in range(count):
        region, masks, label = _label_fan(size, size, seed=i)
        rng = np.random.default_rng(i)
        image = np.where(region, np.clip(30 * label + rng.normal(0, 8, label.shape), 0, 255), 0).astype(np.uint8)
        out.append((image, masks, np.arange(1, len(masks) + 1), None, region))
    return out


GEOMETRY = dict(depth_crop_p=1.0, depth_crop_min=0.5, sector_angle_p=1.0, sector_angle_range=(0.7, 1.3),
                convexity_p=1.0, convexity_range=(0.5, 2.0))


def test_off_by_default_and_draws_unchanged_when_off():
    config = ViewConfig(size=32, sampling_area="exact")
    assert config.depth_crop_p == 0 and config.sector_angle_p == 0
    samples = _fan_samples(4)
    shapes = [s[0].shape for s in samples]
    draws = draw_batch(np.random.default_rng(0), shapes, config=config, masks=[s[1] for s in samples],
                       regions=[s[4] for s in samples])
    assert draws.depth is None and draws.sector is None


def test_depth_crop_keeps_the_top_of_the_scan_and_sector_draws_are_deterministic():
    config = ViewConfig(size=32, sampling_area="exact", **GEOMETRY)
    samples = _fan_samples(8)
    shapes = [s[0].shape for s in samples]
    kwargs = dict(config=config, masks=[s[1] for s in samples], regions=[s[4] for s in samples])
    draws = draw_batch(np.random.default_rng(4), shapes, **kwargs)
    again = draw_batch(np.random.default_rng(4), shapes, **kwargs)
    for name in ("crops", "flips", "chosen", "core", "depth", "sector", "convexity", "apex"):
        np.testing.assert_array_equal(getattr(draws, name), getattr(again, name))
    assert ((draws.depth >= 0.5) & (draws.depth < 1)).all()
    assert (draws.sector != 1).all() and (draws.convexity != 1).all() and np.isfinite(draws.apex).all()
    for b, (_, _, _, _, region) in enumerate(samples):
        first, stop = depth_rows(region, 64)
        for view in range(2):
            top, _, box_h, _ = draws.crops[b, view]
            assert top + box_h <= kept_rows(first, stop, draws.depth[b, view])
    # without a region: the image's rows, and no sector change (no apex to warp about)
    bare = draw_batch(np.random.default_rng(4), shapes, config=config, masks=[s[1] for s in samples])
    assert (bare.sector == 1).all() and (bare.convexity == 1).all()
    assert (bare.crops[..., 0] + bare.crops[..., 2] <= np.ceil(bare.depth * 64)).all()


def test_worker_and_device_paths_agree_with_the_probe_geometry_on():
    samples = _fan_samples(6)
    prepared = {}
    for geometry in ("worker", "device"):
        views = PairedViews(ViewConfig(size=32, num_mask_samples=6, geometry=geometry, sampling_area="exact", **GEOMETRY))
        batch = build_batch(views, samples, list(range(6)), np.random.default_rng(9))
        prepared[geometry] = prepare_batch(batch, device="cpu", generator=torch.Generator().manual_seed(0),
                                           config=DeviceAugmentConfig(photometric=False))
    worker, device = prepared["worker"], prepared["device"]
    for name in ("masks1", "masks2", "mask_valid1", "mask_valid2", "core_region", "core_valid"):
        torch.testing.assert_close(worker[name], device[name], rtol=0, atol=0, msg=name)
    for name in ("view1", "view2", "core"):
        torch.testing.assert_close(worker[name], device[name], rtol=0, atol=1.01 / 255 / 0.224, msg=name)
    # and a sample's views moved: the same draws without the sector change give other views
    plain = PairedViews(ViewConfig(size=32, num_mask_samples=6, geometry="worker", sampling_area="exact",
                                   **{**GEOMETRY, "sector_angle_range": (1.0, 1.0), "convexity_range": (1.0, 1.0)}))
    unwarped = prepare_batch(build_batch(plain, samples, list(range(6)), np.random.default_rng(9)), device="cpu",
                             generator=torch.Generator().manual_seed(0), config=DeviceAugmentConfig(photometric=False))
    torch.testing.assert_close(unwarped["crop1"], worker["crop1"], rtol=0, atol=0)   # same draws, factors 1
    assert not torch.equal(unwarped["masks1"], worker["masks1"])
    assert not torch.equal(unwarped["view1"], worker["view1"])


def test_cyst_stays_darker_than_its_surroundings_after_the_geometry_changes():
    size = 64
    region = fan(size, size, face=12.0)
    rows, cols = np.mgrid[:size, :size] + 0.5
    distance = np.hypot(rows - 34, cols - size / 2)
    cyst = (distance < 7) & region
    ring = (distance >= 9) & (distance < 15) & region
    samples = []
    for i in range(8):
        rng = np.random.default_rng(i)
        tissue = np.clip(rng.rayleigh(0.45, (size, size)), 0, 1) * 200
        image = np.where(region, np.where(cyst, tissue * 0.15, tissue), 0).astype(np.uint8)
        samples.append((image, np.stack([cyst, ring]), np.array([1, 2]), None, region))
    views = PairedViews(ViewConfig(size=32, num_mask_samples=8, geometry="worker", sampling_area="exact",
                                   scale_min=0.5, **GEOMETRY))
    augment = DeviceAugmentConfig(policy="ultrasound")
    checked = 0
    for seed in range(3):
        batch = build_batch(views, samples, list(range(8)), np.random.default_rng(seed))
        out = prepare_batch(batch, device="cpu", generator=torch.Generator().manual_seed(seed), config=augment)
        for which in (1, 2):
            image, masks, ids = out[f"view{which}"][:, 0], out[f"masks{which}"], out["mask_ids"]
            for b in range(8):
                means = {}
                for mask_id in (1, 2):
                    slots = (ids[b] == mask_id).nonzero().flatten()
                    if len(slots) and masks[b, slots[0]].sum() >= 12:
                        means[mask_id] = float(image[b][masks[b, slots[0]] > 0].mean())
                if len(means) == 2:
                    assert means[1] < means[2]
                    checked += 1
    assert checked >= 10


def test_probe_geometry_settings_are_config_fields():
    from anaus_core.config import ConfigError, load_config
    from anaus_core.train.config import PretrainConfig

    config = load_config(PretrainConfig, overrides={"views.depth_crop_p": "0.5", "views.depth_crop_min": "0.7",
                                                    "views.sector_angle_p": "0.5", "views.sector_angle_range": [0.8, 1.2],
                                                    "views.core_min_region": "0.3"})
    views = config.views
    assert (views.depth_crop_p, views.depth_crop_min, views.sector_angle_p) == (0.5, 0.7, 0.5)
    assert tuple(views.sector_angle_range) == (0.8, 1.2) and views.core_min_region == 0.3
    for bad in ({"views.depth_crop_min": "0"}, {"views.sector_angle_range": [1.2, 0.8]}, {"views.sector_angle_p": "2"}):
        with pytest.raises((ConfigError, ValueError)):
            load_config(PretrainConfig, overrides=bad)


@pytest.mark.parametrize("geometry", ["worker", "device"])
def test_pretrain_step_on_a_store_with_regions_and_every_geometry_change(tmp_path, geometry):
    """End to end through the shard store, the loader, the method's prepare_batch and the loss:
    a store with scan regions, the ultrasound policy and all three probe-geometry changes on."""
    from anaus_core.maskset import MaskSet
    from anaus_core.train.trainer import build_model, make_generator
    from shards.sample import ShardSample
    from shards.writer import ShardWriter
    from tests.test_pretrain import data_source, tiny_config

    with ShardWriter(tmp_path / "store", samples_per_shard=8) as writer:
        for i, (image, masks, ids, _, region) in enumerate(_fan_samples(8)):
            mask_set = MaskSet(masks=masks, ids=list(ids), sources=["x"] * len(ids), scores=[1.0] * len(ids))
            writer.write(ShardSample.build(key=f"k{i}", image=image, mask_set=mask_set, scan_region=region))
    config = tiny_config(tmp_path / "store", **{"views.geometry": geometry, "augment.policy": "ultrasound",
                                                 **{f"views.{k}": v for k, v in GEOMETRY.items()}})
    method = build_model(config).train()
    batch = next(iter(data_source(config).loader(epoch=0, skip_batches=0, batch_size=4, rank=0, world_size=1)))
    prepared = method.prepare_batch(batch, device=torch.device("cpu"), generator=make_generator(torch.device("cpu"), 0))
    assert prepared["core_region"].shape == (4, 1, 32, 32)
    out = method(prepared, generator=make_generator(torch.device("cpu"), 1))
    assert torch.isfinite(out["loss"]) and torch.isfinite(out["loss_ctx"])
    out["loss"].backward()


def test_a_window_of_the_warp_is_that_window_of_the_whole_warp():
    region, masks, label = _label_fan(64, 72, seed=2)
    image = (30 * label).astype(np.uint8)
    apex = estimate_fan_apex(region)
    apex = apex + (face_radius(region, apex),)
    whole = sector_warp_numpy(image, label[None].astype(np.uint8), region, apex, 1.2, 0.8)
    part = sector_warp_numpy(image, label[None].astype(np.uint8), region, apex, 1.2, 0.8, window=(5, 9, 40, 50))
    np.testing.assert_array_equal(part[0], whole[0][5:45, 9:59])
    np.testing.assert_array_equal(part[1], whole[1][:, 5:45, 9:59])
    np.testing.assert_array_equal(part[2], whole[2][5:45, 9:59])
