"""Segmentation loss of both LP-SAM stages: L = (1 - alpha) * BCE + alpha * Dice (paper, Sec. 2.1)."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, *, weight: torch.Tensor | None = None, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice per mask, averaged over masks.

    logits, target: (N, H, W) (or (N, ...)); target in {0, 1}. ``weight`` (N,) selects/weights
    masks (0 = unsupervised). ``eps`` smooths empty masks (an empty prediction of an empty target
    scores Dice 1).
    """
    probs = torch.sigmoid(logits.float()).flatten(1)
    target = target.float().flatten(1)
    dice = (2 * (probs * target).sum(1) + eps) / (probs.sum(1) + target.sum(1) + eps)
    loss = 1 - dice
    return _weighted_mean(loss, weight)


def bce_loss(logits: torch.Tensor, target: torch.Tensor, *, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean binary cross-entropy with logits per mask, averaged over masks. Shapes as above."""
    per_pixel = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
    return _weighted_mean(per_pixel.flatten(1).mean(1), weight)


def bce_dice_loss(logits: torch.Tensor, target: torch.Tensor, *, alpha: float = 0.8, weight: torch.Tensor | None = None) -> torch.Tensor:
    """(1 - alpha) * BCE + alpha * Dice. alpha = 0.8 is the official code's value."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return (1 - alpha) * bce_loss(logits, target, weight=weight) + alpha * soft_dice_loss(logits, target, weight=weight)


def _weighted_mean(per_mask: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        return per_mask.mean()
    weight = weight.float().reshape(-1)
    return (per_mask * weight).sum() / weight.sum().clamp_min(1.0)


def dice_score(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Hard Dice per mask (N,) of boolean predictions; 1.0 where both are empty."""
    pred = pred.bool().flatten(1)
    target = target.bool().flatten(1)
    intersection = (pred & target).sum(1).float()
    total = pred.sum(1).float() + target.sum(1).float()
    return torch.where(total > 0, 2 * intersection / total.clamp_min(1), torch.ones_like(total))
