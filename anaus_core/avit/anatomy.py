"""Anatomy category -> learned embedding added to every patch token.

The poster embeds a one-hot category vector; a linear map of a one-hot vector is a row lookup,
so this is ``nn.Embedding`` (row 0 = ``unknown``). Its vector is added to the patch tokens only
(after the position embedding), not to the CLS token: the CLS token is what DINO distils and
what a downstream probe reads, and it then sees anatomy only through attention.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

UNKNOWN = "unknown"


class AnatomyEmbedding(nn.Module):
    """Category index -> vector.

    Args:
        num_categories: C, including ``unknown`` at index 0.
        dim: D, the token width.

    Forward: int64 (B,) in [0, C) -> float (B, D).
    """

    def __init__(self, *, num_categories: int, dim: int) -> None:
        super().__init__()
        self.table = nn.Embedding(num_categories, dim)
        # ViT-style small init: the embedding starts as a slight perturbation of the patch tokens
        nn.init.trunc_normal_(self.table.weight, std=0.02)

    def forward(self, categories: torch.Tensor) -> torch.Tensor:
        return self.table(categories.long())


def category_indices(names: Sequence[str | None], vocabulary: Sequence[str]) -> list[int]:
    """Names -> embedding rows: ``vocabulary[i]`` is ``i + 1``; absent or unlisted names are 0 (``unknown``)."""
    lookup = {name: index + 1 for index, name in enumerate(vocabulary)}
    return [lookup.get(name, 0) if name else 0 for name in names]


def build_anatomy_embedding(*, num_categories: int, dim: int) -> AnatomyEmbedding:
    return AnatomyEmbedding(num_categories=num_categories, dim=dim)
