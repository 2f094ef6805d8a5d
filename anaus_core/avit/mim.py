"""Masked image modelling: random patch masks, a light pixel decoder, MSE on masked patches only.

Choices where the poster is silent (docs/avit.md): the student sees the global crops with a
fraction ``mask_ratio`` of their patches replaced by a learned mask token (iBOT/SimMIM: the
encoder keeps the full grid, which the ACDT's convolution needs, unlike MAE's dropped tokens);
the decoder is MAE's light one (linear -> a few transformer blocks -> linear to p²·C pixels per
patch), reading the encoder's patch tokens; the target is the normalised input image's patch
pixels (optionally MAE's per-patch normalisation); the loss is the mean squared error over the
masked patches only.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import nn


def random_patch_mask(batch: int, grid: tuple[int, int], ratio: float, *, generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """bool (B, h, w): exactly ``round(ratio·h·w)`` True (masked) patches per image, uniformly at random."""
    height, width = grid
    count = height * width
    masked = int(round(ratio * count))
    noise = torch.rand((batch, count), generator=generator, device=device)
    ranks = noise.argsort(dim=1).argsort(dim=1)
    return (ranks < masked).reshape(batch, height, width)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p·W/p, p²·C), patches in row-major order, pixels (p, p, C) as MAE."""
    batch, channels, height, width = images.shape
    p = patch_size
    x = images.reshape(batch, channels, height // p, p, width // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(batch, (height // p) * (width // p), p * p * channels)


def unpatchify(patches: torch.Tensor, patch_size: int, grid: tuple[int, int], channels: int) -> torch.Tensor:
    """Inverse of ``patchify``: (B, h·w, p²·C) -> (B, C, h·p, w·p)."""
    batch = patches.shape[0]
    height, width = grid
    p = patch_size
    x = patches.reshape(batch, height, width, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, height * p, width * p)


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *, norm_pix: bool = False) -> torch.Tensor:
    """Mean over masked patches of the per-patch mean squared error.

    Args:
        prediction, target: (B, N, P) patch pixels.
        mask: bool (B, N) or (B, h, w), True = masked (the only patches that count).
        norm_pix: normalise each target patch to zero mean / unit variance (MAE).
    Returns a scalar; 0 (with a gradient path) when no patch is masked.
    """
    mask = mask.reshape(mask.shape[0], -1).to(prediction.dtype)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = (prediction - target).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


class PixelDecoder(nn.Module):
    """MAE-style light decoder from encoder patch tokens to pixels.

    Args:
        input_dim: D of the encoder tokens.
        dim, depth, num_heads: decoder width, blocks, heads.
        patch_size: p; channels: C. The last layer ``to_pixels`` (dim -> p²·C) is the one the
            adaptive λ of the adversarial loss is measured at.
        num_patches: position embedding length (h·w of the global crop).

    Forward: patches (B, h·w, D) -> (B, h·w, p²·C).
    """

    def __init__(self, *, input_dim: int, dim: int, depth: int, num_heads: int, patch_size: int, channels: int,
                 num_patches: int) -> None:
        super().__init__()
        self.embed = nn.Linear(input_dim, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.Sequential(*[Block(dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.to_pixels = nn.Linear(dim, patch_size * patch_size * channels)

    @property
    def last_layer(self) -> torch.Tensor:
        return self.to_pixels.weight

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = self.embed(patches)
        if x.shape[1] != self.pos_embed.shape[1]:
            raise ValueError(f"decoder built for {self.pos_embed.shape[1]} patches, got {x.shape[1]}")
        x = self.blocks(x + self.pos_embed.to(x.dtype))
        return self.to_pixels(self.norm(x))


def build_pixel_decoder(*, input_dim: int, dim: int = 256, depth: int = 2, num_heads: int = 8, patch_size: int = 16,
                        channels: int = 3, num_patches: int = 196) -> PixelDecoder:
    return PixelDecoder(input_dim=input_dim, dim=dim, depth=depth, num_heads=num_heads, patch_size=patch_size,
                        channels=channels, num_patches=num_patches)
