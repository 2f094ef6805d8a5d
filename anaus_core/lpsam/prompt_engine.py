"""The latent prompt engine (paper eqs. 1-3): prompt-free sparse prompts for SAM's mask decoder.

Reading of the equations, followed literally:

* F_c (eq. 1's key/value) comes from a small CNN on the normalised image, downsampled to the
  image-embedding grid with ``c`` channels. It is computed once and the *original* F_c is
  re-used in every round (the official code re-convolves it each round instead).
* Each round r takes (F_v, T) and the original F_c:
    F_vc = LN(MHCA(F_v, F_c, F_c) + F_v)                    (1, cross-perception attention)
    F_v' = MLP(LN(MHCA(F_vc, T, T) + F_vc))                 (2)
    T'   = MLP(LN(MHCA(T, F_vc, F_vc) + T))                 (3)
  with MLP = Linear-GELU-Linear and no residual around the MLP (as written). Eqs. 2 and 3 both
  read the same F_vc. Round 1 starts from F_v = SAM's image embedding and T = the learnable
  query tokens. Each round has its own weights (N = 4 rounds by default).
* Positional information: SAM's dense positional encoding is added to the spatial queries and
  keys (never to values), as SAM's own two-way transformer does; it is not accumulated.
* T holds one group of ``tokens_per_class`` tokens per anatomy class; all groups are refined
  together. The final group k is the sparse prompt of class k (``class_prompts``).

Attention layers are segment_anything's ``Attention``; MLPs its ``MLPBlock``.
"""

from __future__ import annotations

import math

import torch
from segment_anything.modeling.common import LayerNorm2d, MLPBlock
from segment_anything.modeling.transformer import Attention
from torch import nn
from torch.nn import functional as F


class LocalCNN(nn.Module):
    """Local CNN branch: image (B, 3, S, S) -> F_c (B, out_dim, S/f, S/f), f = 2**len(channels).

    Each stage is Conv3x3(stride 2) - LayerNorm2d - GELU; a final 1x1 conv maps to ``out_dim``.
    """

    def __init__(self, *, in_chans: int = 3, channels: tuple[int, ...] = (32, 64, 128, 256), out_dim: int = 256) -> None:
        super().__init__()
        stages: list[nn.Module] = []
        previous = in_chans
        for width in channels:
            stages += [nn.Conv2d(previous, width, kernel_size=3, stride=2, padding=1), LayerNorm2d(width), nn.GELU()]
            previous = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Conv2d(previous, out_dim, kernel_size=1)
        self.downsample_factor = 2 ** len(channels)

    def forward(self, image: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        features = self.head(self.stages(image))
        if features.shape[-2:] != grid:  # non-multiple input sizes: match the ViT grid exactly
            features = F.interpolate(features, size=grid, mode="bilinear", align_corners=False)
        return features


class BidirectionalRound(nn.Module):
    """One round of eqs. 1-3. Shapes: f_v, f_c, pos (B, HW, c); tokens (B, T, c) -> (f_v', T')."""

    def __init__(self, *, dim: int, num_heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.cpa_attn = Attention(dim, num_heads)
        self.cpa_norm = nn.LayerNorm(dim)
        self.image_attn = Attention(dim, num_heads)
        self.image_norm = nn.LayerNorm(dim)
        self.image_mlp = MLPBlock(dim, mlp_dim, act=nn.GELU)
        self.token_attn = Attention(dim, num_heads)
        self.token_norm = nn.LayerNorm(dim)
        self.token_mlp = MLPBlock(dim, mlp_dim, act=nn.GELU)

    def forward(self, f_v: torch.Tensor, tokens: torch.Tensor, f_c: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f_vc = self.cpa_norm(self.cpa_attn(q=f_v + pos, k=f_c + pos, v=f_c) + f_v)  # eq. 1
        f_v_next = self.image_mlp(self.image_norm(self.image_attn(q=f_vc + pos, k=tokens, v=tokens) + f_vc))  # eq. 2
        tokens_next = self.token_mlp(self.token_norm(self.token_attn(q=tokens, k=f_vc + pos, v=f_vc) + tokens))  # eq. 3
        return f_v_next, tokens_next


class LatentPromptEngine(nn.Module):
    """Learnable query tokens refined against the image into per-class sparse prompts.

    Args:
        dim: c, SAM's prompt embedding width (256 for the official models).
        num_classes: K anatomy classes; one token group each.
        tokens_per_class: n tokens per group (the sparse prompt length per class).
        num_rounds: N rounds of eqs. 1-3.
        num_heads: attention heads (must divide ``dim``).
        mlp_dim: hidden width of each Linear-GELU-Linear MLP.
        cnn_channels: widths of the local CNN's stride-2 stages; their count must give the ViT
            patch size (4 stages for patch 16).
    Shapes: image (B, 3, S, S), image_embedding (B, c, h, w), image_pe (1, c, h, w)
        -> tokens (B, K * n, c).
    """

    def __init__(
        self,
        *,
        dim: int = 256,
        num_classes: int = 1,
        tokens_per_class: int = 2,
        num_rounds: int = 4,
        num_heads: int = 8,
        mlp_dim: int = 1024,
        cnn_channels: tuple[int, ...] = (32, 64, 128, 256),
    ) -> None:
        super().__init__()
        if num_classes < 1 or tokens_per_class < 1 or num_rounds < 1:
            raise ValueError("num_classes, tokens_per_class and num_rounds must be >= 1")
        self.dim = dim
        self.num_classes = num_classes
        self.tokens_per_class = tokens_per_class
        self.local_cnn = LocalCNN(in_chans=3, channels=tuple(cnn_channels), out_dim=dim)
        self.query_tokens = nn.Embedding(num_classes * tokens_per_class, dim)
        nn.init.normal_(self.query_tokens.weight, std=1.0 / math.sqrt(dim))
        self.rounds = nn.ModuleList(BidirectionalRound(dim=dim, num_heads=num_heads, mlp_dim=mlp_dim) for _ in range(num_rounds))

    def forward(self, image: torch.Tensor, image_embedding: torch.Tensor, image_pe: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = image_embedding.shape
        f_c = self.local_cnn(image, (height, width)).flatten(2).transpose(1, 2)  # (B, HW, c), original F_c
        f_v = image_embedding.flatten(2).transpose(1, 2)
        pos = image_pe.flatten(2).transpose(1, 2).to(f_v.dtype)
        tokens = self.query_tokens.weight.unsqueeze(0).expand(batch, -1, -1)
        for round_module in self.rounds:
            f_v, tokens = round_module(f_v, tokens, f_c, pos)
        return tokens

    def class_prompts(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, K * n, c) -> (B, K, n, c): the sparse prompt of each class."""
        return tokens.view(tokens.shape[0], self.num_classes, self.tokens_per_class, self.dim)
