"""LARS (hand calculation, lightly cross-check), norm/bias exclusion by type, schedules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from anaus_core.optim import (
    LARS,
    build_lars,
    cosine_momentum,
    cosine_schedule_with_warmup,
    param_groups_excluding_norm_and_bias,
    scaled_lr,
)


def test_param_groups_exclude_norm_layers_by_type_and_biases():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False),
        nn.BatchNorm2d(4),           # named "1": a name filter for "bn" would miss it
        nn.Conv2d(4, 4, 1),          # weight decayed, bias excluded
        nn.SyncBatchNorm(4),
        nn.GroupNorm(2, 4),
        nn.Flatten(),
        nn.LayerNorm(4 * 8 * 8),
        nn.Linear(4 * 8 * 8, 2),
    )
    frozen = nn.Linear(2, 2)
    frozen.requires_grad_(False)
    model.append(frozen)
    decayed, excluded = param_groups_excluding_norm_and_bias(model, weight_decay=1e-6)
    assert decayed["weight_decay"] == 1e-6 and decayed["lars_adaptation"] is True
    assert excluded["weight_decay"] == 0.0 and excluded["lars_adaptation"] is False
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    assert ids(decayed["params"]) == ids([model[0].weight, model[2].weight, model[7].weight])
    assert ids(excluded["params"]) == ids(
        [model[1].weight, model[1].bias, model[2].bias, model[3].weight, model[3].bias, model[4].weight,
         model[4].bias, model[6].weight, model[6].bias, model[7].bias]
    )


def test_resnet_stem_and_downsample_bn_are_excluded():
    from anaus_core.models import build_resnet_fpn

    encoder = build_resnet_fpn(arch="resnet18", scales=(7,))
    _, excluded = param_groups_excluding_norm_and_bias(encoder)
    excluded_ids = {id(p) for p in excluded["params"]}
    backbone = encoder.backbone
    for p in (backbone.bn1.weight, backbone.layer2[0].downsample[1].weight, backbone.layer2[0].downsample[1].bias):
        assert id(p) in excluded_ids


def test_lars_one_and_two_steps_by_hand():
    weight = nn.Parameter(torch.tensor([3.0, 4.0]))   # ||w|| = 5
    bias = nn.Parameter(torch.tensor([1.0]))
    optimizer = build_lars(
        [{"params": [weight], "weight_decay": 0.1, "lars_adaptation": True},
         {"params": [bias], "weight_decay": 0.0, "lars_adaptation": False}],
        lr=0.5, momentum=0.9, weight_decay=0.1, eta=0.01,
    )
    weight.grad = torch.tensor([0.6, 0.8])             # ||g|| = 1
    bias.grad = torch.tensor([2.0])
    optimizer.step()
    # d = g + wd*w = [0.9, 1.2]; trust = 0.01*5 / (1 + 0.1*5) = 1/30; v = lr*trust*d
    v_weight = 0.5 / 30 * torch.tensor([0.9, 1.2])
    assert torch.allclose(weight.detach(), torch.tensor([3.0, 4.0]) - v_weight, atol=1e-7)
    assert torch.allclose(bias.detach(), torch.tensor([1.0 - 0.5 * 2.0]))  # plain SGD
    w1 = weight.detach().clone()
    weight.grad = torch.tensor([0.0, 1.0])
    bias.grad = torch.tensor([1.0])
    optimizer.step()
    norm = w1.norm()
    d = torch.tensor([0.0, 1.0]) + 0.1 * w1
    trust = 0.01 * norm / (1.0 + 0.1 * norm)
    v2 = 0.9 * v_weight + 0.5 * trust * d
    assert torch.allclose(weight.detach(), w1 - v2, atol=1e-7)
    assert torch.allclose(bias.detach(), torch.tensor([0.0 - (0.9 * 1.0 + 0.5 * 1.0)]))
    # zero gradient norm: trust falls back to 1
    zero = nn.Parameter(torch.tensor([1.0, 0.0]))
    zero.grad = torch.zeros(2)
    LARS([zero], lr=1.0, momentum=0.0, weight_decay=0.5).step()
    assert torch.allclose(zero.detach(), torch.tensor([0.5, 0.0]))


def test_lars_matches_lightly_for_constant_lr():
    from lightly.utils.lars import LARS as LightlyLARS

    torch.manual_seed(0)
    ours_model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3))
    theirs_model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3))
    theirs_model.load_state_dict(ours_model.state_dict())
    ours = build_lars(param_groups_excluding_norm_and_bias(ours_model, weight_decay=1e-3), lr=0.2, weight_decay=1e-3)
    groups = param_groups_excluding_norm_and_bias(theirs_model, weight_decay=1e-3)
    # lightly excludes groups with weight_decay == 0 from LARS scaling, the same split
    theirs = LightlyLARS([{k: v for k, v in g.items() if k != "lars_adaptation"} for g in groups], lr=0.2,
                         momentum=0.9, weight_decay=1e-3, trust_coefficient=1e-3, eps=0.0)
    data = torch.randn(5, 16, 5, generator=torch.Generator().manual_seed(1))
    for x in data:
        for model, optimizer in ((ours_model, ours), (theirs_model, theirs)):
            optimizer.zero_grad()
            model(x).pow(2).mean().backward()
            optimizer.step()
    for a, b in zip(ours_model.parameters(), theirs_model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_cosine_schedule_with_warmup():
    base = scaled_lr(0.3, 192)
    assert base == pytest.approx(0.225)
    lrs = [cosine_schedule_with_warmup(s, 100, 10, base, 0.0) for s in range(101)]
    assert lrs[0] == pytest.approx(base / 10) and lrs[0] > 0
    assert lrs[9] == pytest.approx(base) and lrs[10] == pytest.approx(base)
    assert lrs[55] == pytest.approx(base / 2)
    assert lrs[100] == pytest.approx(0.0, abs=1e-12)
    assert all(a <= b + 1e-12 for a, b in zip(lrs[:10], lrs[1:11]))
    assert all(a >= b - 1e-12 for a, b in zip(lrs[10:], lrs[11:]))
    assert cosine_schedule_with_warmup(100, 100, 0, 1.0, 0.1) == pytest.approx(0.1)


def test_cosine_momentum():
    assert cosine_momentum(0, 100) == pytest.approx(0.99)
    assert cosine_momentum(50, 100) == pytest.approx(0.995)
    assert cosine_momentum(100, 100) == pytest.approx(1.0)
    assert cosine_momentum(25, 100, base=0.996) == pytest.approx(1 - 0.004 * (math.cos(math.pi / 4) + 1) / 2)
