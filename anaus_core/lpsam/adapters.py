"""Bottleneck adapters inserted into segment_anything's ViT ``Block`` without copying its code.

A ``Block`` computes ``x = x + attn(norm1(x)); x = x + mlp(norm2(x))``. We replace two of its
sub-modules in place:

* ``block.attn`` by ``AttentionWithAdapter``: ``adapter(attn(x))`` where the adapter is a
  residual bottleneck ``y + up(GELU(down(y)))`` applied to the attention output (serial adapter,
  as in Medical-SAM-Adapter / SAMUS). The adapter works token-wise, so windowed attention and
  its partition/unpartition inside ``Block.forward`` are untouched.
* ``block.mlp`` by ``MLPWithParallelAdapter``: ``mlp(y) + scale * up(GELU(down(y)))`` (parallel
  adapter next to the MLP, the official code's ``MLP_Adapter`` with scale 0.5).

Both up-projections start at zero, so an adapted block computes exactly what the plain block
computes until the adapters are trained.
"""

from __future__ import annotations

import torch
from torch import nn


class Bottleneck(nn.Module):
    """``up(GELU(down(x)))``: Linear(d -> d') - GELU - Linear(d' -> d), up-projection zero-initialised.

    Args:
        dim: token width d.
        bottleneck_dim: d' (much smaller than d).
    Shapes: (..., d) -> (..., d).
    """

    def __init__(self, *, dim: int, bottleneck_dim: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck_dim)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck_dim, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))


class AttentionWithAdapter(nn.Module):
    """Wraps a block's attention: ``y = attn(x); return y + adapter(y)``. Shapes as ``attn``."""

    def __init__(self, *, attn: nn.Module, dim: int, bottleneck_dim: int) -> None:
        super().__init__()
        self.attn = attn
        self.adapter = Bottleneck(dim=dim, bottleneck_dim=bottleneck_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.attn(x)
        return y + self.adapter(y)


class MLPWithParallelAdapter(nn.Module):
    """Wraps a block's MLP: ``mlp(x) + scale * adapter(x)``. Shapes (..., d) -> (..., d)."""

    def __init__(self, *, mlp: nn.Module, dim: int, bottleneck_dim: int, scale: float = 0.5) -> None:
        super().__init__()
        self.mlp = mlp
        self.adapter = Bottleneck(dim=dim, bottleneck_dim=bottleneck_dim)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x) + self.scale * self.adapter(x)


ADAPTER_PLACEMENTS = ("all", "global")


def insert_adapters(
    encoder: nn.Module,
    *,
    placement: str = "all",
    bottleneck_ratio: float = 0.25,
    attention_adapter: bool = True,
    mlp_adapter: bool = True,
    mlp_adapter_scale: float = 0.5,
) -> list[int]:
    """Insert adapters into the blocks of a segment_anything ``ImageEncoderViT`` in place.

    ``placement="all"`` adapts every block (the paper); ``"global"`` only the global-attention
    blocks (the official code). Returns the indexes of the adapted blocks.
    """
    if placement not in ADAPTER_PLACEMENTS:
        raise ValueError(f"adapter placement must be one of {ADAPTER_PLACEMENTS}, got {placement!r}")
    if not (attention_adapter or mlp_adapter):
        raise ValueError("at least one of attention_adapter / mlp_adapter must be enabled")
    adapted = []
    for index, block in enumerate(encoder.blocks):
        if placement == "global" and block.window_size != 0:
            continue
        dim = block.norm1.normalized_shape[0]
        bottleneck_dim = max(1, int(round(dim * bottleneck_ratio)))
        if attention_adapter:
            block.attn = AttentionWithAdapter(attn=block.attn, dim=dim, bottleneck_dim=bottleneck_dim)
        if mlp_adapter:
            block.mlp = MLPWithParallelAdapter(mlp=block.mlp, dim=dim, bottleneck_dim=bottleneck_dim, scale=mlp_adapter_scale)
        adapted.append(index)
    return adapted
