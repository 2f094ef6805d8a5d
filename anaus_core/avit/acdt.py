"""ACDT: the anatomy-conditioned deformable transformer block.

What the poster states: a deformable convolution whose offsets depend on the anatomy embedding,
and an attention with the patch tokens as queries and the deformable features as keys/values.
What this module chooses where it is silent (docs/avit.md):

* the patch tokens are laid out as their (h, w) grid and layer-normed; a two-layer conv offset
  predictor (3×3 conv -> GELU -> 3×3 conv, as DCN's offset branches) gives 2·G·k² offsets per
  position (G offset groups);
* the anatomy conditions the offset predictor by FiLM on its hidden layer,
  ``h <- h · (1 + γ(a)) + β(a)``: offsets become a non-linear function of both the local image
  content and the anatomy, and with γ = β = 0 the block IS the plain deformable block
  (``anatomy_dim=None``), which the tests hold;
* the deformable conv is ``torchvision.ops.deform_conv2d`` (D -> D, k×k); the final offset conv
  is zero-initialised (DCN practice), so training starts from a regular k×k conv;
* attention: every token (CLS included, so the distilled CLS feature sees the deformable
  features) queries the layer-normed deformable features, residual. No MLP by default
  (``mlp_ratio=0``): one such block at ViT-B/16 adds 9.4 M parameters, the poster's 86 M -> 95 M;
  with a ViT MLP it would add 14.1 M.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn
from torchvision.ops import deform_conv2d


def tokens_to_grid(patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, h·w, D) -> (B, D, h, w)."""
    batch, count, dim = patches.shape
    height, width = grid
    if height * width != count:
        raise ValueError(f"{count} patch tokens do not form a {height}×{width} grid")
    return patches.transpose(1, 2).reshape(batch, dim, height, width)


class DeformableTokenBlock(nn.Module):
    """Deformable-conv keys/values, token queries; anatomy-conditioned offsets when ``anatomy_dim`` is set.

    Args:
        dim: D, token width.
        num_heads: attention heads (D divisible by it).
        kernel_size: k of the deformable conv.
        offset_groups: G, offset fields (D divisible by it).
        anatomy_dim: width of the anatomy vector; None = a plain (unconditioned) deformable block.
        mlp_ratio: hidden width of a residual MLP after the attention relative to D; 0 = none.

    Forward: tokens (B, 1 + h·w, D), anatomy (B, anatomy_dim) or None, grid (h, w) ->
    (tokens (B, 1 + h·w, D), offsets (B, 2·G·k², h, w)).
    """

    def __init__(self, *, dim: int, num_heads: int, kernel_size: int = 3, offset_groups: int = 4,
                 anatomy_dim: int | None = None, mlp_ratio: float = 0.0) -> None:
        super().__init__()
        if dim % offset_groups:
            raise ValueError(f"dim {dim} is not divisible by offset_groups {offset_groups}")
        self.kernel_size = kernel_size
        self.offset_groups = offset_groups
        hidden = max(16, dim // 4)
        self.norm_features = nn.LayerNorm(dim)
        self.offset_hidden = nn.Conv2d(dim, hidden, 3, padding=1)
        self.offset_out = nn.Conv2d(hidden, 2 * offset_groups * kernel_size ** 2, 3, padding=1)
        nn.init.zeros_(self.offset_out.weight)
        nn.init.zeros_(self.offset_out.bias)
        self.film = nn.Linear(anatomy_dim, 2 * hidden) if anatomy_dim is not None else None
        self.deform_weight = nn.Parameter(torch.empty(dim, dim, kernel_size, kernel_size))
        self.deform_bias = nn.Parameter(torch.zeros(dim))
        nn.init.kaiming_uniform_(self.deform_weight, a=math.sqrt(5))   # nn.Conv2d's default
        self.norm_query = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim) if mlp_ratio > 0 else None
        self.mlp = Mlp(dim, int(dim * mlp_ratio)) if mlp_ratio > 0 else None

    def offsets(self, features: torch.Tensor, anatomy: torch.Tensor | None) -> torch.Tensor:
        """(B, D, h, w) normed features -> (B, 2·G·k², h, w) sampling offsets."""
        hidden = F.gelu(self.offset_hidden(features))
        if self.film is not None:
            if anatomy is None:
                raise ValueError("this ACDT block is anatomy-conditioned: pass the anatomy embedding")
            gamma, beta = self.film(anatomy).to(hidden.dtype).chunk(2, dim=-1)
            hidden = hidden * (1 + gamma[:, :, None, None]) + beta[:, :, None, None]
        return self.offset_out(hidden)

    def deformable_features(self, features: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        # deform_conv2d has no bf16 kernel in every build: run it in float32; contiguous because
        # the trainer may have put the 4-D weight in channels_last on CUDA
        return deform_conv2d(features.float().contiguous(), offsets.float().contiguous(),
                             self.deform_weight.float().contiguous(), self.deform_bias.float(),
                             padding=self.kernel_size // 2).to(features.dtype)

    def forward(self, tokens: torch.Tensor, anatomy: torch.Tensor | None, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        features = tokens_to_grid(self.norm_features(tokens[:, 1:]), grid)
        offsets = self.offsets(features, anatomy)
        deformed = self.deformable_features(features, offsets).flatten(2).transpose(1, 2)   # (B, h·w, D)
        keys = self.norm_kv(deformed)
        attended, _ = self.attn(self.norm_query(tokens), keys, keys, need_weights=False)
        tokens = tokens + attended
        if self.mlp is not None:
            tokens = tokens + self.mlp(self.norm_mlp(tokens))
        return tokens, offsets


def build_acdt_block(*, dim: int, num_heads: int, kernel_size: int = 3, offset_groups: int = 4,
                     conditioned: bool = True, mlp_ratio: float = 0.0) -> DeformableTokenBlock:
    """An ACDT block (``conditioned``) or the plain deformable block of the same shape."""
    return DeformableTokenBlock(dim=dim, num_heads=num_heads, kernel_size=kernel_size, offset_groups=offset_groups,
                                anatomy_dim=dim if conditioned else None, mlp_ratio=mlp_ratio)
