"""Frozen-encoder features, computed once per image per encoder and kept for every fold, head
and label fraction of the linear protocol."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from anaus_core.evaluate.tensors import autocast, batches, network_input


@torch.no_grad()
def extract_features(backbone: nn.Module, images: np.ndarray, *, device: torch.device, batch_size: int = 64,
                     progress: Callable | None = None) -> Tensor:
    """uint8 (N, H, W) -> float32 (N, D) pooled features on the CPU (backbone in eval mode)."""
    backbone.eval().to(device)
    chunks = []
    groups = batches(len(images), batch_size)
    for positions in (progress(groups) if progress else groups):
        with autocast(device):
            chunks.append(backbone.features(network_input(images[positions.numpy()], device)).float().cpu())
    return torch.cat(chunks)


class FeatureCache:
    """``get(name, compute)`` returns the cached (N, D) features of encoder ``name``, computing
    them with ``compute()`` the first time only."""

    def __init__(self) -> None:
        self._features: dict[str, Tensor] = {}

    def get(self, name: str, compute: Callable[[], Tensor]) -> Tensor:
        if name not in self._features:
            self._features[name] = compute()
        return self._features[name]
