"""Segmentation networks on an evaluated encoder: a light FPN decoder on our ResNet-FPN (both
``encoder.pt`` and ``fpn.pt`` load), and a light upsampling decoder on a ViT's patch tokens.
Each returns per-pixel class logits (B, K + 1, H, W) at the input size (class 0 = background)."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from anaus_core.errors import UserInputError
from anaus_core.evaluate.backbones import ResNetBackbone, ViTBackbone
from anaus_core.evaluate.encoders import EncoderWeights
from anaus_core.models.resnet_fpn import ResNetFPN


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class LightFPNDecoder(nn.Module):
    """Panoptic-FPN-style semantic head: P2..P4 (``fpn_channels`` each) and C5 (``c5_channels``,
    through a 1x1 conv) upsampled to P2's stride-4 grid, summed, one 3x3 conv, a 1x1 classifier.
    Input ``{56: P2, 28: P3, 14: P4, 7: C5}``; output (B, num_classes, H/4, W/4)."""

    def __init__(self, *, fpn_channels: int, c5_channels: int, num_classes: int, hidden: int = 64) -> None:
        super().__init__()
        self.lateral = nn.ModuleDict({
            "56": nn.Conv2d(fpn_channels, hidden, 1), "28": nn.Conv2d(fpn_channels, hidden, 1),
            "14": nn.Conv2d(fpn_channels, hidden, 1), "7": nn.Conv2d(c5_channels, hidden, 1),
        })
        self.fuse = _conv_bn_relu(hidden, hidden)
        self.classifier = nn.Conv2d(hidden, num_classes, 1)

    def forward(self, pyramid: dict[int, Tensor]) -> Tensor:
        size = pyramid[56].shape[-2:]
        total = self.lateral["56"](pyramid[56])
        for scale in (28, 14, 7):
            total = total + F.interpolate(self.lateral[str(scale)](pyramid[scale]), size=size, mode="bilinear", align_corners=False)
        return self.classifier(self.fuse(total))


class ResNetFPNSegmenter(nn.Module):
    """Our ResNet-FPN (``backbone`` = the evaluated ResNet; FPN from ``fpn.pt`` when present)
    with ``LightFPNDecoder``. (B, 3, H, W) -> (B, num_classes, H, W)."""

    def __init__(self, *, backbone: ResNetBackbone, arch: str, num_classes: int, fpn_channels: int) -> None:
        super().__init__()
        self.backbone = backbone  # kept so set_trainable/stages work on the same modules
        self.encoder = ResNetFPN(backbone=backbone.resnet, arch=arch, scales=(7, 14, 28, 56), fpn_channels=fpn_channels)
        self.decoder = LightFPNDecoder(fpn_channels=fpn_channels, c5_channels=self.encoder.channels(7), num_classes=num_classes)

    def forward(self, images: Tensor) -> Tensor:
        logits = self.decoder(self.encoder(images))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


class ViTSegmenter(nn.Module):
    """Patch tokens (B, D, H/p, W/p) -> 1x1 conv -> two (2x upsample, 3x3 conv) stages ->
    classifier, upsampled to the input. (B, 3, H, W) -> (B, num_classes, H, W)."""

    def __init__(self, *, backbone: ViTBackbone, num_classes: int, hidden: int = 64) -> None:
        super().__init__()
        self.backbone = backbone
        self.project = nn.Conv2d(backbone.feature_dim, hidden, 1)
        self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), _conv_bn_relu(hidden, hidden),
                                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), _conv_bn_relu(hidden, hidden))
        self.classifier = nn.Conv2d(hidden, num_classes, 1)

    def forward(self, images: Tensor) -> Tensor:
        logits = self.classifier(self.up(self.project(self.backbone.tokens(images))))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def fpn_channels_of(state: dict[str, Tensor] | None) -> int | None:
    """Output channels of a saved ``FeaturePyramidNetwork`` state dict (None for None)."""
    if not state:
        return None
    for key, value in state.items():
        if key.startswith("inner_blocks.") and key.endswith("weight") and value.ndim == 4:
            return int(value.shape[0])
    return None


def build_segmenter(weights: EncoderWeights, backbone: ResNetBackbone | ViTBackbone, *, num_classes: int,
                    default_fpn_channels: int = 256) -> nn.Module:
    """The light segmentation network for ``weights``; loads ``weights.fpn_state`` into the FPN."""
    if isinstance(backbone, ViTBackbone):
        return ViTSegmenter(backbone=backbone, num_classes=num_classes)
    channels = fpn_channels_of(weights.fpn_state) or default_fpn_channels
    model = ResNetFPNSegmenter(backbone=backbone, arch=weights.arch, num_classes=num_classes, fpn_channels=channels)
    if weights.fpn_state is not None:
        try:
            model.encoder.fpn.load_state_dict(weights.fpn_state, strict=True)
        except RuntimeError as exc:
            line = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), str(exc))
            raise UserInputError(f"{weights.fpn_path}: not an AnaUS FPN state dict for {weights.arch} ({line})") from None
    return model
