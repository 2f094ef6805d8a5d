"""Issue 10 part 3 training fixes: both-view mask draw, clean BatchNorm statistics, global
negatives under gradient accumulation, ImageNet-style initialisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anaus_core.augment.batch import build_batch
from anaus_core.augment.views import PairedViews, ViewConfig


def _samples(count: int, size: int = 64):
    from shards.synthetic import synthetic_sample

    out = []
    for i in range(count):
        sample = synthetic_sample(f"s{i}", height=size, width=size, partition=8, overlapping=4, seed=i)
        out.append((sample.image, sample.mask_set.masks, sample.mask_set.ids, None))
    return out


def _slots_without_positive(presence: str, batches: int = 12) -> tuple[int, int]:
    views = PairedViews(ViewConfig(size=32, num_mask_samples=16, sampling_area="exact", geometry="worker",
                                   mask_presence=presence, scale_min=0.08))
    samples = _samples(8)
    empty = total = 0
    for b in range(batches):
        batch = build_batch(views, samples, list(range(8)), np.random.default_rng(b))
        used = batch["mask_ids"] != 0
        positive = batch["mask_valid1"] & batch["mask_valid2"]
        empty += int((used & ~positive).sum())
        total += int(used.sum())
    return empty, total


def test_both_view_draw_never_yields_a_slot_without_a_positive():
    empty, total = _slots_without_positive("both")
    assert total > 1000 and empty == 0
    # DetCon's either-view draw (kept as an option) does waste slots on the same data
    empty_either, total_either = _slots_without_positive("either")
    assert total_either > 1000 and empty_either > 0


def test_mask_presence_is_validated():
    with pytest.raises(ValueError, match="mask_presence"):
        ViewConfig(mask_presence="any")


# ---------------------------------------------------------------------------------------------
# BatchNorm statistics and accumulation
# ---------------------------------------------------------------------------------------------

from tests.test_pretrain import TINY, data_source, tiny_config, tiny_shards  # noqa: E402,F401 (fixture)


def _prepared(config, method, batch_size: int, seed: int = 0):
    from anaus_core.train.trainer import make_generator

    loader = data_source(config).loader(epoch=0, skip_batches=0, batch_size=batch_size, rank=0, world_size=1)
    batch = next(iter(loader))
    device = torch.device("cpu")
    return method.prepare_batch(batch, device=device, generator=make_generator(device, seed))


def _bn_buffers(module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in module.named_buffers() if "running" in name or "num_batches" in name}


def test_damaged_core_forward_leaves_batchnorm_statistics_to_the_clean_views(tiny_shards):
    import copy

    from anaus_core.train.trainer import build_model, make_generator

    config = tiny_config(tiny_shards)
    method = build_model(config).train()
    prepared = _prepared(config, method, 4)
    clean_only = copy.deepcopy(method.online_encoder).train()
    before = _bn_buffers(method.online_encoder)
    method(prepared, generator=make_generator(torch.device("cpu"), 1))["loss"].backward()
    with torch.no_grad():
        clean_only(torch.cat([prepared["view1"], prepared["view2"]]))
    exported, expected = _bn_buffers(method.online_encoder), _bn_buffers(clean_only)
    assert exported.keys() == expected.keys()
    for name in exported:
        torch.testing.assert_close(exported[name], expected[name], rtol=0, atol=0, msg=name)
    # the statistics did move (from the clean views), and the core would have moved them further
    assert any(not torch.equal(before[n], exported[n]) for n in exported if "running_mean" in n)
    with torch.no_grad():
        clean_only(prepared["core"])
    assert any(not torch.equal(_bn_buffers(clean_only)[n], exported[n]) for n in exported if "running_mean" in n)


def test_accumulation_contrasts_against_the_global_batch(tiny_shards):
    from anaus_core.train.trainer import build_model

    config = tiny_config(tiny_shards)
    method = build_model(config).eval()   # eval BN: per-image maths, so the batch split is the only difference
    prepared = _prepared(config, method, 8)
    halves = [{k: v[i * 4:(i + 1) * 4] for k, v in prepared.items()} for i in range(2)]
    with torch.no_grad():
        whole = method(prepared)["loss_ana"]
        method.begin_step(halves, generators=[None, None])
        accumulated = sum(method(half)["loss_ana"] for half in halves) / 2
        per_micro_batch = sum(method(half)["loss_ana"] for half in halves) / 2   # no begin_step: local negatives
    torch.testing.assert_close(accumulated, whole, rtol=1e-5, atol=1e-5)
    assert abs(float(per_micro_batch) - float(whole)) > 1e-3


def test_imagenet_init_loads_a_torchvision_state_dict(tiny_shards, tmp_path):
    import torchvision
    from typer.testing import CliRunner

    from anaus_core.config import load_config
    from anaus_core.train import PretrainConfig
    from anaus_core.train.trainer import build_model
    from cli import app

    reference = torchvision.models.resnet18()
    with torch.no_grad():
        reference.conv1.weight.normal_()
    weights = tmp_path / "resnet18-imagenet.pth"
    torch.save(reference.state_dict(), weights)   # fc.* included, as torchvision ships it
    run = tmp_path / "run"
    args = ["pretrain", "--shards", str(tiny_shards), "--out", str(run), "--steps", "1", "--no-progress",
            "--device", "cpu"] + [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
    result = CliRunner().invoke(app, args + ["--init", "imagenet", "--weights", str(weights)])
    assert result.exit_code == 0, result.output
    config = load_config(PretrainConfig, run / "config.yaml")
    assert config.model.pretrained_weights == str(weights)
    method = build_model(config)
    torch.testing.assert_close(method.online_encoder.backbone.conv1.weight, reference.conv1.weight)
    torch.testing.assert_close(method.target_encoder.backbone.layer4[1].bn2.running_var,
                               reference.layer4[1].bn2.running_var)
    result = CliRunner().invoke(app, args[:3] + ["--out", str(tmp_path / "r2"), "--init", "imagenet"])
    assert result.exit_code == 2 and "--weights" in result.output
