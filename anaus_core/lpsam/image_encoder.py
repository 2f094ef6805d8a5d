"""The adapted image encoder: input-channel handling + SAM normalisation + adapter-wrapped ViT."""

from __future__ import annotations

import torch
from segment_anything.modeling import ImageEncoderViT
from torch import nn

from anaus_core.lpsam.adapters import insert_adapters

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


class InputNormalizer(nn.Module):
    """Pixels (B, C, S, S) in 0..255 -> SAM-normalised RGB (B, 3, S, S).

    C == 1 (B-mode grayscale) is repeated to three channels and C == 3 is used as is, exactly what
    vanilla SAM sees for that image. Any other C goes through a learned 1x1 convolution C -> 3
    initialised to the channel mean (so it starts as "grayscale of the channels, repeated"); it
    trains in stage 1 with the adapters and is saved with them.
    """

    def __init__(self, *, in_chans: int = 1) -> None:
        super().__init__()
        if in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {in_chans}")
        self.in_chans = in_chans
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False)
        self.projection: nn.Conv2d | None = None
        if in_chans not in (1, 3):
            self.projection = nn.Conv2d(in_chans, 3, kernel_size=1, bias=True)
            nn.init.constant_(self.projection.weight, 1.0 / in_chans)
            nn.init.zeros_(self.projection.bias)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.ndim != 4 or pixels.shape[1] != self.in_chans:
            raise ValueError(f"expected pixels (B, {self.in_chans}, H, W), got {tuple(pixels.shape)}")
        if self.in_chans == 1:
            rgb = pixels.expand(-1, 3, -1, -1)
        elif self.in_chans == 3:
            rgb = pixels
        else:
            rgb = self.projection(pixels)
        return (rgb - self.pixel_mean) / self.pixel_std


class AdaptedImageEncoder(nn.Module):
    """SAM's ``ImageEncoderViT`` with bottleneck adapters inserted in its blocks.

    Args:
        vit: a segment_anything ``ImageEncoderViT`` (already holding the base SAM weights); its
            blocks are modified in place.
        in_chans: channels of the input pixels.
        adapter_placement: ``"all"`` blocks or ``"global"``-attention blocks only.
        bottleneck_ratio: d'/d of each adapter.
        attention_adapter / mlp_adapter: which adapters each adapted block gets.
    Shapes: pixels (B, in_chans, S, S) in 0..255 -> embeddings (B, prompt_dim, S/16, S/16).
    """

    def __init__(
        self,
        *,
        vit: ImageEncoderViT,
        in_chans: int = 1,
        adapter_placement: str = "all",
        bottleneck_ratio: float = 0.25,
        attention_adapter: bool = True,
        mlp_adapter: bool = True,
        mlp_adapter_scale: float = 0.5,
    ) -> None:
        super().__init__()
        self.normalizer = InputNormalizer(in_chans=in_chans)
        self.vit = vit
        self.adapted_blocks = insert_adapters(
            vit,
            placement=adapter_placement,
            bottleneck_ratio=bottleneck_ratio,
            attention_adapter=attention_adapter,
            mlp_adapter=mlp_adapter,
            mlp_adapter_scale=mlp_adapter_scale,
        )

    @property
    def img_size(self) -> int:
        return int(self.vit.img_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vit(self.normalizer(pixels))
