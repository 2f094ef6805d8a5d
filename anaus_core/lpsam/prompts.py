"""Stage-1 prompts derived from ground-truth masks: a jittered box and/or foreground points."""

from __future__ import annotations

import torch


def boxes_from_masks(masks: torch.Tensor, *, jitter: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Tight xyxy boxes (N, 4) of non-empty masks (N, H, W), in pixel coordinates (x1, y1 exclusive
    edge at max index + 1). ``jitter`` moves each edge by up to ``jitter`` x the box side."""
    count, height, width = masks.shape
    rows = masks.any(dim=2)
    cols = masks.any(dim=1)
    arange_y = torch.arange(height, device=masks.device)
    arange_x = torch.arange(width, device=masks.device)
    y0 = torch.where(rows, arange_y, height).amin(1)
    y1 = torch.where(rows, arange_y, -1).amax(1) + 1
    x0 = torch.where(cols, arange_x, width).amin(1)
    x1 = torch.where(cols, arange_x, -1).amax(1) + 1
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    if jitter > 0:
        sides = torch.stack([x1 - x0, y1 - y0, x1 - x0, y1 - y0], dim=1).float()
        noise = (torch.rand(count, 4, generator=generator) * 2 - 1).to(boxes.device)
        boxes = boxes + noise * jitter * sides
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    return boxes


def sample_foreground_points(masks: torch.Tensor, *, count: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
    """``count`` random foreground pixel centres (x + 0.5, y + 0.5) per non-empty mask: (N, count, 2)."""
    flat = masks.flatten(1).float().cpu()
    if (flat.sum(1) == 0).any():
        raise ValueError("cannot sample points inside an empty mask")
    picks = torch.multinomial(flat, count, replacement=True, generator=generator)
    width = masks.shape[2]
    points = torch.stack([picks % width, picks // width], dim=-1).float() + 0.5
    return points.to(masks.device)


def choose_prompt_classes(masks: torch.Tensor, class_valid: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """For each image (masks (B, K, H, W), class_valid (B, K)), a random declared class whose mask
    is non-empty, or -1 when there is none (such images are skipped in stage 1)."""
    present = (masks.flatten(2).bool().any(2) & class_valid.bool()).cpu()
    scores = torch.rand(present.shape, generator=generator)
    scores[~present] = -1.0
    choice = scores.argmax(1)
    choice[~present.any(1)] = -1
    return choice
