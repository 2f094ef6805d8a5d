"""Shared plumbing of the protocols: device choice, uint8 images -> normalised network input,
seeded mini-batches, bf16 autocast on CUDA."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import Tensor

from anaus_core.augment.device import IMAGENET_MEAN, IMAGENET_STD, normalize_gray
from anaus_core.errors import UserInputError


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserInputError(f"--device {name}: no CUDA device is available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserInputError(f"--device {name!r}: not a torch device (cpu, cuda, cuda:1, auto)") from None


def network_input(images: np.ndarray | Tensor, device: torch.device) -> Tensor:
    """uint8 (B, H, W) -> float (B, 3, H, W) on ``device``, normalised like pre-training (gray
    repeated to RGB, ImageNet mean/std)."""
    batch = torch.as_tensor(images).to(device=device, non_blocking=True)
    return normalize_gray(batch[:, None].float().div_(255.0), IMAGENET_MEAN, IMAGENET_STD)


def autocast(device: torch.device):
    """bf16 autocast on CUDA, nothing elsewhere (CPU bf16 is slower than fp32 on most CPUs)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def batches(count: int, batch_size: int, *, generator: torch.Generator | None = None) -> list[Tensor]:
    """Positions 0..count-1 in mini-batches; shuffled with ``generator`` when given."""
    order = torch.randperm(count, generator=generator) if generator is not None else torch.arange(count)
    return list(order.split(batch_size))


def seeded_generator(seed: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return generator
