"""Exponential moving average of parameters (BYOL target network).

Convention (lightly, DetCon, BYOL, official AnaUS): ``momentum`` is the *decay* tau, so
``target <- tau * target + (1 - tau) * online``; tau = 1 leaves the target unchanged.
Buffers (BatchNorm running statistics) are not averaged: the target runs in train mode and keeps
its own running statistics, as in BYOL.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """In place: every target parameter becomes ``momentum * target + (1 - momentum) * online``.

    The two modules must have the same parameter structure (the target is a deep copy).
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
    target_params = list(target.parameters())
    online_params = list(online.parameters())
    if len(target_params) != len(online_params):
        raise ValueError("target and online modules have different parameter lists")
    if not target_params or momentum == 1.0:
        return
    # lerp_(online, w) = target + w * (online - target) = (1 - w) * target + w * online
    torch._foreach_lerp_(target_params, [p.detach() for p in online_params], 1.0 - momentum)
