"""Issue 10: the L_ctx core never uses pixels outside the scan region.

The stored region reaches the batch on both geometry paths, cut exactly like the core; L_ctx
weighs every cell by its region coverage; a core mostly outside the region is invalid; samples
without a region (older stores) give the batch and the loss they gave before.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anaus_core.augment.batch import build_batch
from anaus_core.augment.device import prepare_batch
from anaus_core.augment.views import PairedViews, ViewConfig
from anaus_core.losses.context import context_prediction_loss


def _reference_loss(online: np.ndarray, target: np.ndarray, weights: np.ndarray) -> float:
    """Independent: per image, the weighted mean over cells of 2 - 2 cos; images with no weight
    dropped; images averaged."""
    terms = []
    for b in range(online.shape[0]):
        total = mass = 0.0
        for i in range(online.shape[2]):
            for j in range(online.shape[3]):
                if weights[b, i, j] == 0:
                    continue
                u, v = online[b, :, i, j], target[b, :, i, j]
                cos = float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))
                total += weights[b, i, j] * (2.0 - 2.0 * cos)
                mass += weights[b, i, j]
        if mass > 0:
            terms.append(total / mass)
    return float(np.mean(terms)) if terms else 0.0


@pytest.mark.parametrize("binary", [True, False])
def test_context_loss_with_cell_weights_matches_reference(binary):
    gen = torch.Generator().manual_seed(0)
    online = torch.randn(3, 8, 5, 6, generator=gen, dtype=torch.float64)
    target = torch.randn(3, 8, 5, 6, generator=gen, dtype=torch.float64)
    weights = torch.zeros(3, 5, 6, dtype=torch.float64)
    weights[0, :, 3:] = 1.0                     # right half of image 0 inside
    weights[1] = 1.0                            # image 1 wholly inside
    # image 2 wholly outside: it must not count at all
    if not binary:
        weights[0, :, 3] = 0.25                 # a fan edge column, a quarter covered
        weights[1, 0] = 0.5
    got = context_prediction_loss(online, target, None, weights[:, None])
    expected = _reference_loss(online.numpy(), target.numpy(), weights.numpy())
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # all-ones weights are the unweighted loss
    ones = context_prediction_loss(online, target, None, torch.ones(3, 1, 5, 6))
    assert ones.item() == pytest.approx(context_prediction_loss(online, target).item(), rel=1e-6)


def _model_and_batch(region_left_out: bool):
    from anaus_core.models.anaus_model import build_anaus_model

    torch.manual_seed(0)
    model = build_anaus_model({"arch": "resnet18", "fpn_channels": 16, "scales": (7, 14, 28, 56),
                               "projector_hidden_dim": 32, "projector_dim": 16, "predictor_hidden_dim": 32}).train()
    gen = torch.Generator().manual_seed(1)
    core = torch.randn(2, 3, 64, 64, generator=gen)
    region = torch.ones(2, 1, 64, 64)
    if region_left_out:
        region[0, :, :, :32] = 0                # sample 0: left half of its core in the black frame
    batch = {"core": core, "core_valid": torch.ones(2, dtype=torch.bool), "core_region": region}
    return model, batch


def test_model_context_loss_on_a_half_outside_core_is_the_loss_on_the_inside_cells():
    from anaus_core.augment.damage import damage

    model, batch = _model_and_batch(region_left_out=True)
    terms = model._context_terms(batch, torch.Generator().manual_seed(7))
    # independent reference: the same damaged core and encoders, loss over the inside cells only
    damaged = damage(batch["core"], settings=model.damage_settings, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        online_maps = model.online_encoder(damaged)
        target_maps = model.target_encoder(batch["core"])
    for scale, term in terms.items():
        online, target = online_maps[scale].double().numpy(), target_maps[scale].double().numpy()
        cells = online.shape[-1]
        inside = np.ones((2, cells, cells))
        inside[0, :, :cells // 2] = 0          # the left half of a grid of even side is wholly outside
        assert term.item() == pytest.approx(_reference_loss(online, target, inside), rel=1e-5), scale
    # and it differs from the loss that counts the black frame
    _, full = _model_and_batch(region_left_out=False)
    whole = model._context_terms({**batch, "core_region": full["core_region"]}, torch.Generator().manual_seed(7))
    assert any(abs(whole[s].item() - terms[s].item()) > 1e-4 for s in terms)


def _fan_samples(count: int, size: int = 64, with_region: bool = True):
    from shards.synthetic import synthetic_sample

    rows, cols = np.mgrid[:size, :size]
    out = []
    for i in range(count):
        sample = synthetic_sample(f"s{i}", height=size, width=size, partition=6, overlapping=2, seed=i)
        # a fan: inside a cone from the top centre
        region = (np.abs(cols - size / 2) < 0.1 * size + 0.6 * rows) & (rows < size - 4)
        image = np.where(region, sample.image, 0).astype(np.uint8)
        masks = sample.mask_set.masks & region[None]
        keep = masks.reshape(len(masks), -1).any(axis=1)
        entry = (image, masks[keep], np.asarray(sample.mask_set.ids)[keep], None)
        out.append(entry + ((region,) if with_region else ()))
    return out


def _independent_core_region(region: np.ndarray, core: np.ndarray, size: int) -> np.ndarray:
    top, left, height, width = (int(v) for v in core)
    cut = torch.from_numpy(region[top:top + height, left:left + width].astype(np.float32))[None, None]
    return F.interpolate(cut, size=(size, size), mode="nearest-exact")[0, 0].numpy()


def test_core_region_reaches_the_batch_cut_like_the_core_on_both_geometry_paths():
    samples = _fan_samples(6)
    size = 32
    prepared = {}
    for geometry in ("worker", "device"):
        views = PairedViews(ViewConfig(size=size, num_mask_samples=4, geometry=geometry, sampling_area="exact",
                                       core_min_region=0.0))
        batch = build_batch(views, samples, list(range(6)), np.random.default_rng(3))
        prepared[geometry] = prepare_batch(batch, device="cpu", generator=torch.Generator().manual_seed(0))
        core_box = batch["core_box"] if geometry == "device" else None
    worker, device = prepared["worker"], prepared["device"]
    torch.testing.assert_close(worker["core_region"], device["core_region"], rtol=0, atol=0)
    assert worker["core_region"].shape == (6, 1, size, size)
    valid = worker["core_valid"].numpy()
    assert valid.any()
    for b in range(6):
        region = worker["core_region"][b, 0].numpy()
        if not valid[b]:
            assert not region.any()
            continue
        expected = _independent_core_region(samples[b][4], core_box[b].numpy(), size)
        np.testing.assert_array_equal(region, expected)


def test_core_mostly_outside_the_region_is_invalid():
    from anaus_core.augment.draws import draw_batch

    size = 64
    image = np.full((size, size), 100, np.uint8)
    masks = np.ones((1, size, size), bool)
    region = np.zeros((size, size), bool)
    region[:8, :8] = True                       # a tiny region in one corner
    config = ViewConfig(size=32, num_mask_samples=2, sampling_area="exact", core_min_region=0.25)
    rng_args = dict(config=config, masks=[masks] * 16)
    without = draw_batch(np.random.default_rng(0), [(size, size)] * 16, **rng_args)
    within = draw_batch(np.random.default_rng(0), [(size, size)] * 16, regions=[region] * 16, **rng_args)
    np.testing.assert_array_equal(without.crops, within.crops)      # the region draws no random numbers
    coverage = np.array([region[t:t + h, l:l + w].mean() if v else 0
                         for (t, l, h, w), v in zip(without.core, without.core_valid)])
    np.testing.assert_array_equal(within.core_valid, without.core_valid & (coverage >= 0.25))
    assert without.core_valid.sum() > within.core_valid.sum()


@pytest.mark.parametrize("geometry", ["worker", "device"])
def test_samples_without_a_region_give_the_batch_they_gave_before(geometry):
    views = PairedViews(ViewConfig(size=32, num_mask_samples=4, geometry=geometry, sampling_area="exact"))
    old = build_batch(views, _fan_samples(4, with_region=False), list(range(4)), np.random.default_rng(5))
    assert "core_region" not in old and "region" not in old
    # a mixed batch: the sample without a region counts whole, the others are cut
    samples = _fan_samples(4)
    samples[1] = samples[1][:4]
    mixed = prepare_batch(build_batch(views, samples, list(range(4)), np.random.default_rng(5)), device="cpu",
                          generator=torch.Generator().manual_seed(0))
    if mixed["core_valid"][1]:
        assert bool(mixed["core_region"][1].all())
    assert not bool(mixed["core_region"][mixed["core_valid"]].all())


def test_region_from_a_store_reaches_the_loader_batch(tmp_path):
    from anaus_core.maskset import MaskSet
    from shards.loader import build_pretrain_loader
    from shards.sample import ShardSample
    from shards.writer import ShardWriter

    samples = _fan_samples(4)
    with ShardWriter(tmp_path / "store", samples_per_shard=4) as writer:
        for i, (image, masks, ids, _, region) in enumerate(samples):
            mask_set = MaskSet(masks=masks, ids=list(ids), sources=["x"] * len(ids), scores=[1.0] * len(ids))
            writer.write(ShardSample.build(key=f"k{i}", image=image, mask_set=mask_set, scan_region=region))
    for geometry in ("worker", "device"):
        config = ViewConfig(size=32, num_mask_samples=4, geometry=geometry)
        batch = next(iter(build_pretrain_loader(tmp_path / "store", batch_size=4, view_config=config)))
        assert ("core_region" if geometry == "worker" else "region") in batch
        prepared = prepare_batch(batch, device="cpu", generator=torch.Generator().manual_seed(0))
        assert prepared["core_region"].shape == (4, 1, 32, 32)
        assert not bool(prepared["core_region"][prepared["core_valid"]].all())  # the fan's black corners are cut


def test_per_sample_views_with_a_region_collate_to_the_same_core_region_on_both_paths():
    from anaus_core.augment.collate import collate_views

    samples = _fan_samples(4)
    prepared = {}
    for geometry in ("worker", "device"):
        views = PairedViews(ViewConfig(size=32, num_mask_samples=4, geometry=geometry, sampling_area="exact",
                                       core_min_region=0.0))
        rows = [views(image, masks, ids, rng=np.random.default_rng(i), region=region if i != 2 else None)
                for i, (image, masks, ids, _, region) in enumerate(samples)]
        prepared[geometry] = prepare_batch(collate_views(rows), device="cpu", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(prepared["worker"]["core_region"], prepared["device"]["core_region"], rtol=0, atol=0)
    valid = prepared["worker"]["core_valid"]
    assert bool(prepared["worker"]["core_region"][2].all()) == bool(valid[2])     # no region: the whole core counts
