"""The ViT backbone: a stock timm ``VisionTransformer`` in four sizes.

The encoder is timm's own module, not a re-implementation, so the exported ``encoder.pt`` is a
timm state dict (``build_vit(...).load_state_dict(sd, strict=True)``; at 224 px / patch 16 the
``small`` and ``base`` sizes are exactly ``timm.create_model("vit_small_patch16_224"`` /
``"vit_base_patch16_224", num_classes=0)``). ``dynamic_img_size=True`` interpolates the
position embedding for the local crops (DINO does the same); it adds no parameters.

Inputs are 3-channel (the grayscale ultrasound image repeated and ImageNet-normalised, as for the
AnaUS ResNet), so an ImageNet ViT checkpoint or evaluation pipeline can be used unchanged.
"""

from __future__ import annotations

from typing import Any

from timm.models.vision_transformer import VisionTransformer

# (embed_dim, depth, num_heads): ViT-Ti/S/B as in DeiT/ViT; "micro" is a 4-block, 64-wide model
# for tests and CPU benchmarks (one head of the usual width 64).
VIT_DIMENSIONS: dict[str, tuple[int, int, int]] = {
    "micro": (64, 4, 1),
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
}


def vit_kwargs(*, size: str, img_size: int = 224, patch_size: int = 16) -> dict[str, Any]:
    """The timm ``VisionTransformer`` constructor arguments of a size (saved next to the export)."""
    if size not in VIT_DIMENSIONS:
        raise ValueError(f"ViT size must be one of {sorted(VIT_DIMENSIONS)}, got {size!r}")
    embed_dim, depth, heads = VIT_DIMENSIONS[size]
    return dict(img_size=img_size, patch_size=patch_size, in_chans=3, num_classes=0, embed_dim=embed_dim,
                depth=depth, num_heads=heads, dynamic_img_size=True)


def build_vit(*, size: str, img_size: int = 224, patch_size: int = 16) -> VisionTransformer:
    """A randomly initialised timm ViT without classifier (``num_classes=0``).

    Args:
        size: ``micro`` | ``tiny`` (ViT-Ti) | ``small`` (ViT-S) | ``base`` (ViT-B).
        img_size: side of the global crops S (the position embedding has (S/p)² + 1 entries).
        patch_size: p; S must be a multiple of it.

    Forward: (B, 3, H, W) -> (B, D) CLS features; ``forward_features`` -> (B, 1 + HW/p², D).
    """
    if img_size % patch_size:
        raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
    return VisionTransformer(**vit_kwargs(size=size, img_size=img_size, patch_size=patch_size))
