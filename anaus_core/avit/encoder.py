"""A-ViT encoder: timm ViT + anatomy embedding + conditioning blocks (ACDT or an ablation).

``forward`` runs timm's own pieces in timm's order (patch embed -> [mask token] -> CLS + position
embedding -> blocks -> final norm) and adds two things: the anatomy vector on every patch token
right after the position embedding, and a conditioning block after each block index in
``acdt_after``. ``vit`` is an unmodified ``timm`` ``VisionTransformer``; its state dict is the
exported ``encoder.pt``; everything else (``anatomy``, ``conditioning``, ``mask_token``) is
``acdt.pt``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from anaus_core.avit.anatomy import build_anatomy_embedding
from anaus_core.avit.backbone import build_vit
from anaus_core.avit.conditioning import build_conditioning_block


class AnatomyViT(nn.Module):
    """Anatomy-aware ViT.

    Args:
        size, img_size, patch_size: see ``backbone.build_vit``.
        num_categories: rows of the anatomy embedding (``unknown`` included).
        conditioning: ``acdt`` | ``none`` | ``cross_attention`` | ``film`` | ``lora``.
        conditioning_after: indices of the ViT blocks followed by a conditioning block (default:
            the last block).
        add_anatomy_embedding: add the anatomy vector to the patch tokens.
        kernel_size, offset_groups, lora_rank: conditioning block settings.

    Forward: images (B, 3, H, W), anatomy int64 (B,), optional mask bool (B, H/p, W/p) (True =
    replaced by the mask token) -> dict ``tokens`` (B, 1 + HW/p², D) after the final norm,
    ``cls`` (B, D), ``patches`` (B, HW/p², D), ``offsets`` list of (B, 2·G·k², H/p, W/p).
    """

    def __init__(self, *, size: str, img_size: int, patch_size: int, num_categories: int,
                 conditioning: str = "acdt", conditioning_after: Sequence[int] | None = None,
                 add_anatomy_embedding: bool = True, kernel_size: int = 3, offset_groups: int = 4,
                 lora_rank: int = 8) -> None:
        super().__init__()
        self.vit = build_vit(size=size, img_size=img_size, patch_size=patch_size)
        self.patch_size = patch_size
        dim = self.vit.embed_dim
        depth = len(self.vit.blocks)
        self.embed_dim = dim
        self.add_anatomy_embedding = add_anatomy_embedding
        self.anatomy = build_anatomy_embedding(num_categories=num_categories, dim=dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        after = [depth - 1] if conditioning_after is None else [int(i) % depth for i in conditioning_after]
        self.conditioning_after = sorted(set(after)) if conditioning != "none" else []
        heads = self.vit.blocks[0].attn.num_heads
        self.conditioning = nn.ModuleDict({
            str(index): build_conditioning_block(variant=conditioning, dim=dim, num_heads=heads, kernel_size=kernel_size,
                                                 offset_groups=offset_groups, lora_rank=lora_rank)
            for index in self.conditioning_after})

    def forward(self, images: torch.Tensor, anatomy: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        vit = self.vit
        x = vit.patch_embed(images)                           # (B, h, w, D): dynamic_img_size keeps the grid
        grid = (x.shape[1], x.shape[2])
        if mask is not None:
            if mask.shape != x.shape[:3]:
                raise ValueError(f"mask {tuple(mask.shape)} does not match the patch grid {tuple(x.shape[:3])}")
            x = torch.where(mask[..., None], self.mask_token.to(x.dtype).reshape(1, 1, 1, -1), x)
        x = vit._pos_embed(x)                                 # (B, 1 + h·w, D)
        vector = self.anatomy(anatomy).to(x.dtype)           # (B, D)
        if self.add_anatomy_embedding:
            prefix = vit.num_prefix_tokens
            x = torch.cat([x[:, :prefix], x[:, prefix:] + vector[:, None]], dim=1)
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        offsets = []
        for index, block in enumerate(vit.blocks):
            x = block(x)
            if str(index) in self.conditioning:
                x, block_offsets = self.conditioning[str(index)](x, vector, grid)
                if block_offsets is not None:
                    offsets.append(block_offsets)
        x = vit.norm(x)
        return {"tokens": x, "cls": x[:, 0], "patches": x[:, vit.num_prefix_tokens:], "offsets": offsets, "grid": grid}

    def side_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything that is not the timm ViT (anatomy table, mask token, conditioning blocks)."""
        return {key: value for key, value in self.state_dict().items() if not key.startswith("vit.")}


def build_anatomy_vit(*, size: str, img_size: int, patch_size: int, num_categories: int, conditioning: str = "acdt",
                      conditioning_after: Sequence[int] | None = None, add_anatomy_embedding: bool = True,
                      kernel_size: int = 3, offset_groups: int = 4, lora_rank: int = 8) -> AnatomyViT:
    return AnatomyViT(size=size, img_size=img_size, patch_size=patch_size, num_categories=num_categories,
                      conditioning=conditioning, conditioning_after=conditioning_after,
                      add_anatomy_embedding=add_anatomy_embedding, kernel_size=kernel_size,
                      offset_groups=offset_groups, lora_rank=lora_rank)
