"""AnaUS model: scale keying, forward/loss keys per switch, EMA timing, export, init, determinism."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision

from anaus_core.config import ConfigError, load_config
from anaus_core.errors import UserInputError
from anaus_core.models import (
    AnaUSConfig,
    build_anaus_model,
    build_export_encoder,
    build_resnet_fpn,
    export_encoder_state_dict,
    export_fpn_state_dict,
)

SMALL_HEADS = {"projector_hidden_dim": 64, "projector_dim": 32, "predictor_hidden_dim": 64}


def make_batch(batch=4, masks=4, size=64, seed=0):
    """A prepared batch as ``anaus_core.augment.device.prepare_batch`` returns it."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.rand(batch, masks, size // 8, size // 8, generator=g) > 0.6).float()
    masks1 = torch.nn.functional.interpolate(base, size=(size, size), mode="nearest")
    masks2 = torch.roll(masks1, shifts=(3, 5), dims=(2, 3))
    return {
        "view1": torch.randn(batch, 3, size, size, generator=g),
        "view2": torch.randn(batch, 3, size, size, generator=g),
        "masks1": masks1,
        "masks2": masks2,
        "mask_ids": torch.arange(1, masks + 1).repeat(batch, 1),
        "mask_valid1": masks1.sum(dim=(2, 3)) > 0,
        "mask_valid2": masks2.sum(dim=(2, 3)) > 0,
        "core": torch.randn(batch, 3, size, size, generator=g),
        "core_valid": torch.tensor([True] * (batch - 1) + [False]),
    }


def small_model(**overrides):
    torch.manual_seed(0)
    return build_anaus_model({**SMALL_HEADS, **overrides})


@pytest.mark.parametrize("size", [64, 96])
def test_scales_keyed_by_level_not_size(size):
    encoder = build_resnet_fpn(arch="resnet18", scales=(7, 14, 28, 56))
    with torch.no_grad():
        maps = encoder(torch.randn(2, 3, size, size))
    assert list(maps) == [7, 14, 28, 56]
    assert {s: tuple(m.shape[1:]) for s, m in maps.items()} == {
        7: (512, size // 32, size // 32),
        14: (256, size // 16, size // 16),
        28: (256, size // 8, size // 8),
        56: (256, size // 4, size // 4),
    }


def test_forward_loss_keys_and_gradients():
    model = small_model(lambda_ctx=0.5)
    model.train()
    losses = model(make_batch(), generator=torch.Generator().manual_seed(0))
    expected = {"loss", "loss_ana", "loss_ctx"} | {f"loss_ana_s{s}" for s in (7, 14, 28, 56)} | {
        f"loss_ctx_s{s}" for s in (7, 14, 28, 56)
    }
    assert {k for k in losses if k.startswith("loss")} == expected
    assert set(losses) - expected == {"health_empty_slots"}   # a monitor, not a loss term
    assert all(v.dim() == 0 and math.isfinite(v.item()) for v in losses.values())
    assert torch.allclose(losses["loss_ana"], sum(losses[f"loss_ana_s{s}"] for s in (7, 14, 28, 56)))
    assert torch.allclose(losses["loss"], losses["loss_ana"] + 0.5 * losses["loss_ctx"])
    losses["loss"].backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert not [n for n, p in trainable if p.grad is None], "every trainable parameter needs a gradient (DDP)"
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("target_"))
    assert not any(p.requires_grad for p in model.target_encoder.parameters())
    assert model.has_unused_parameters() is False


@pytest.mark.parametrize(
    "overrides, keys",
    [
        ({"multi_scale": False, "context": False}, {"loss", "loss_ana", "loss_ana_s7"}),
        ({"multi_scale": False, "single_scale": 28, "context": False}, {"loss", "loss_ana", "loss_ana_s28"}),
        ({"objective": "byol", "context": False, "scales": [7, 56]}, {"loss", "loss_byol", "loss_byol_s7", "loss_byol_s56"}),
        ({"scales": [7, 14], "multi_scale": False}, {"loss", "loss_ana", "loss_ana_s7", "loss_ctx", "loss_ctx_s7", "loss_ctx_s14"}),
    ],
)
def test_ablation_switches_select_terms(overrides, keys):
    model = small_model(**overrides)
    losses = model(make_batch(size=32), generator=torch.Generator().manual_seed(0))
    assert {k for k in losses if k.startswith("loss")} == keys
    losses["loss"].backward()
    assert not [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    if not overrides.get("context", True) and overrides.get("multi_scale") is False and overrides.get("single_scale", 7) == 7:
        assert model.fpn is None  # scale 7 alone needs no FPN


def test_symmetric_switch_keeps_one_direction():
    batch = make_batch(size=32)
    full = small_model(context=False, scales=[7])(batch)["loss"]
    one_way = small_model(context=False, scales=[7], symmetric=False)(batch)["loss"]
    assert 0 < one_way.item() < full.item()


def test_invalid_config_is_rejected():
    with pytest.raises(ConfigError, match="scales"):
        build_anaus_model({"scales": [7, 9]})
    with pytest.raises(ConfigError, match="single_scale"):
        build_anaus_model({"scales": [7, 14], "multi_scale": False, "single_scale": 56})
    with pytest.raises(ConfigError, match="objective"):
        build_anaus_model({"objective": "simclr"})


def test_config_loads_from_yaml(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text("scales: [7, 28]\nsymmetric: false\ndamage_noise: false\n")
    config = load_config(AnaUSConfig, path)
    assert config.scales == (7, 28) and config.symmetric is False
    assert config.damage_settings().noise is False


def test_empty_masks_give_zero_anatomy_loss_not_nan():
    batch = make_batch(size=32)
    batch["masks2"] = torch.zeros_like(batch["masks2"])
    batch["mask_valid2"] = torch.zeros_like(batch["mask_valid2"])
    losses = small_model(context=False, scales=[7, 28])(batch)
    assert losses["loss_ana"].item() == 0.0
    losses["loss"].backward()  # still differentiable


def test_masks_flagged_invalid_do_not_influence_the_loss():
    model = small_model(context=False, scales=[7, 28])
    batch = make_batch(size=32)
    batch["mask_valid2"][0, 1] = False
    batch["mask_valid1"][2, 3] = False
    reference = model(batch)["loss"]
    changed = dict(batch)
    changed["masks2"] = batch["masks2"].clone()
    changed["masks2"][0, 1] = 1.0 - changed["masks2"][0, 1]
    changed["masks1"] = batch["masks1"].clone()
    changed["masks1"][2, 3] = torch.rand(32, 32).round()
    assert torch.allclose(model(changed)["loss"], reference, atol=1e-6)


def test_one_training_step_updates_target_once_by_ema_formula():
    from anaus_core.optim import build_lars, param_groups_excluding_norm_and_bias

    model = small_model(scales=[7, 14], context=True)
    model.train()
    optimizer = build_lars(param_groups_excluding_norm_and_bias(model), lr=0.5)
    target_before = [p.detach().clone() for p in model.target_encoder.parameters()]
    target_before += [p.detach().clone() for p in model.target_projectors.parameters()]
    online_before = [p.detach().clone() for p in model.online_encoder.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(target_before, online_before))  # target starts as a copy

    losses = model(make_batch(size=32), generator=torch.Generator().manual_seed(0))
    optimizer.zero_grad()
    losses["loss"].backward()
    optimizer.step()
    target_now = list(model.target_encoder.parameters()) + list(model.target_projectors.parameters())
    # forward, backward and optimiser step leave the target untouched ...
    assert all(torch.equal(a, b) for a, b in zip(target_before, target_now))
    online_now = [p.detach().clone() for p in model.online_encoder.parameters()]
    online_now += [p.detach().clone() for p in model.projectors.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(online_before, online_now))
    # ... and update_target applies exactly one EMA step
    momentum = 0.9
    model.update_target(momentum)
    for before, online, after in zip(target_before, online_now, target_now):
        assert torch.allclose(after, momentum * before + (1 - momentum) * online, atol=1e-6, rtol=0)
    model.update_target(1.0)  # tau = 1 is a no-op
    for before, online, after in zip(target_before, online_now, target_now):
        assert torch.allclose(after, momentum * before + (1 - momentum) * online, atol=1e-6, rtol=0)


def test_export_loads_into_stock_torchvision_resnet18():
    model = small_model()
    with torch.no_grad():
        for p in model.online_encoder.parameters():
            p.add_(0.01)  # differ from a fresh init
    state = export_encoder_state_dict(model)
    resnet = torchvision.models.resnet18()
    result = resnet.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    resnet.fc = torch.nn.Identity()
    resnet.load_state_dict(state, strict=True)
    # same features as the online branch
    model.eval()
    resnet.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        c5 = model.online_encoder(x)[7]
        pooled = resnet(x)
    assert torch.allclose(c5.mean(dim=(2, 3)), pooled, atol=1e-5)
    # FPN export reloads into the same layout
    rebuilt = build_export_encoder("resnet18", scales=(7, 14, 28, 56))
    rebuilt.backbone.load_state_dict(state, strict=True)
    rebuilt.fpn.load_state_dict(export_fpn_state_dict(model), strict=True)
    rebuilt.eval()
    with torch.no_grad():
        assert torch.allclose(rebuilt(x)[56], model.online_encoder(x)[56], atol=1e-5)


def test_resnet50_option_exports_torchvision_layout():
    encoder = build_resnet_fpn(arch="resnet50", scales=(7, 56))
    with torch.no_grad():
        maps = encoder(torch.randn(1, 3, 64, 64))
    assert maps[7].shape[1] == 2048 and maps[56].shape[1] == 256
    result = torchvision.models.resnet50().load_state_dict(export_encoder_state_dict(encoder), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys


def test_pretrained_weights_from_local_file(tmp_path):
    torch.manual_seed(123)
    reference = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)  # torchvision format, fc included
    model = build_anaus_model({**SMALL_HEADS, "pretrained_weights": str(path)})
    for key, value in reference.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(model.online_backbone.state_dict()[key], value)
            assert torch.equal(model.target_encoder.backbone.state_dict()[key], value)
    with pytest.raises(UserInputError, match="not found"):
        build_anaus_model({"pretrained_weights": str(tmp_path / "missing.pth")})
    bad = tmp_path / "bad.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, bad)
    with pytest.raises(UserInputError, match="bad.pth"):
        build_anaus_model({"pretrained_weights": str(bad)})


def test_forward_is_deterministic_given_generator():
    batch = make_batch(size=32)
    model = small_model(scales=[7, 14])
    first = model(batch, generator=torch.Generator().manual_seed(5))
    second = model(batch, generator=torch.Generator().manual_seed(5))
    other = model(batch, generator=torch.Generator().manual_seed(6))
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["loss_ctx"], other["loss_ctx"])


def test_forward_under_bf16_autocast():
    model = small_model(scales=[7, 14])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(make_batch(batch=2, size=32), generator=torch.Generator().manual_seed(0))
    assert losses["loss"].dtype == torch.float32 and math.isfinite(losses["loss"].item())


@pytest.mark.gpu
def test_cuda_forward_matches_cpu_and_runs_under_bf16_channels_last():
    model = small_model(scales=[7, 14, 28, 56])
    batch = make_batch(size=64)
    cpu = model(batch, generator=torch.Generator().manual_seed(0))
    model = model.to("cuda")
    on_device = {k: v.to("cuda") for k, v in batch.items()}
    cuda = model(on_device, generator=torch.Generator().manual_seed(0))  # CPU generator: same damage
    for key in cpu:
        assert torch.allclose(cpu[key], cuda[key].cpu(), rtol=2e-2, atol=2e-3), key
    model = model.to(memory_format=torch.channels_last)
    for key in ("view1", "view2", "core"):
        on_device[key] = on_device[key].contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        losses = model(on_device, generator=torch.Generator(device="cuda").manual_seed(0))
    assert losses["loss"].dtype == torch.float32 and math.isfinite(losses["loss"].item())
    losses["loss"].backward()
    model.update_target(0.99)
