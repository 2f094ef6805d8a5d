"""ResNet + FPN encoder that returns one feature map per AnaUS scale.

Scales are named by their grid size at a 224 px input, as in the paper: 7 = C5 (raw ``layer4``
output, stride 32), 14 = P4 (stride 16), 28 = P3 (stride 8), 56 = P2 (stride 4). The key is the
*level*, not the actual size, so a 64 px input still returns keys 7/14/28/56 with 2/4/8/16 grids.

The backbone is a stock ``torchvision.models.resnet18`` / ``resnet50`` whose ``fc`` is replaced
by ``Identity`` (it is never used, and a parameter without gradient breaks DDP); its state dict
therefore loads into ``torchvision.models.resnet18()`` with only ``fc.*`` missing. The FPN is a
stock ``torchvision.ops.FeaturePyramidNetwork`` over C_lowest..C5; smoothing convs of levels no
scale uses (P5 always: scale 7 reads C5 raw, as in the official code) are replaced by
``Identity`` for the same DDP reason.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork

from anaus_core.config import ConfigError
from anaus_core.errors import UserInputError
from anaus_core.safe_load import describe_load_error

#: scale (grid size at 224 px) -> ResNet stage feeding it (2 = layer1 ... 5 = layer4)
SCALE_TO_STAGE: dict[int, int] = {7: 5, 14: 4, 28: 3, 56: 2}
#: output channels of layer1..layer4 (stages 2..5)
ARCH_STAGE_CHANNELS: dict[str, dict[int, int]] = {
    "resnet18": {2: 64, 3: 128, 4: 256, 5: 512},
    "resnet50": {2: 256, 3: 512, 4: 1024, 5: 2048},
}


def check_scales(scales: tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """Validate a scale list (subset of 7/14/28/56, no repeats) and return it as a tuple."""
    scales = tuple(int(s) for s in scales)
    if not scales:
        raise ConfigError("scales: at least one scale is needed")
    bad = [s for s in scales if s not in SCALE_TO_STAGE]
    if bad:
        raise ConfigError(f"scales: {bad} not supported; choose from {sorted(SCALE_TO_STAGE)}")
    if len(set(scales)) != len(scales):
        raise ConfigError(f"scales: repeated entries in {list(scales)}")
    return scales


def build_torchvision_resnet(arch: str) -> torchvision.models.ResNet:
    """A randomly initialised torchvision ResNet (``resnet18`` or ``resnet50``), never downloaded."""
    if arch not in ARCH_STAGE_CHANNELS:
        raise ConfigError(f"arch: {arch!r} not supported; choose from {sorted(ARCH_STAGE_CHANNELS)}")
    return getattr(torchvision.models, arch)(weights=None)


def load_torchvision_weights(backbone: nn.Module, path: str | Path, *, arch: str) -> None:
    """Load a local torchvision-format ResNet state dict (``fc.*`` ignored) into ``backbone``.

    Accepts a plain state dict or one nested under ``state_dict``/``model``; a ``module.`` prefix
    (DDP) is stripped. Anything else raises ``UserInputError`` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: pretrained weights file not found")
    from anaus_core.safe_load import torch_load_weights_only

    try:
        state = torch_load_weights_only(path)
    except Exception as exc:  # torch raises several unrelated types for a bad file
        raise UserInputError(f"{path}: cannot read as a torch state dict ({describe_load_error(exc)})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UserInputError(f"{path}: expected a state dict, got {type(state).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}
    try:
        result = backbone.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches are raised even with strict=False
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise UserInputError(f"{path}: not a torchvision {arch} state dict ({first})") from None
    missing = [key for key in result.missing_keys if not key.startswith("fc.")]
    if missing or result.unexpected_keys:
        raise UserInputError(
            f"{path}: not a torchvision {arch} state dict (missing {missing[:4]}, "
            f"unexpected {list(result.unexpected_keys)[:4]})"
        )


class ResNetFPN(nn.Module):
    """ResNet backbone + FPN returning ``{scale: feature map}`` for the configured scales.

    Input: float (B, 3, H, W), normalised. Output for scale s: (B, C_s, H/stride_s, W/stride_s)
    with C_7 = 512 (resnet18) / 2048 (resnet50) and C_s = ``fpn_channels`` for s in 14/28/56.
    """

    def __init__(
        self,
        *,
        backbone: torchvision.models.ResNet,
        arch: str,
        scales: tuple[int, ...],
        fpn_channels: int = 256,
    ) -> None:
        super().__init__()
        self.arch = arch
        self.scales = check_scales(scales)
        backbone.fc = nn.Identity()
        self.backbone = backbone
        stage_channels = ARCH_STAGE_CHANNELS[arch]
        fpn_scales = [s for s in self.scales if s != 7]
        self.fpn_channels = fpn_channels
        if fpn_scales:
            # top-down path always starts at C5, so the FPN spans the lowest needed stage .. C5
            self.fpn_stages = list(range(min(SCALE_TO_STAGE[s] for s in fpn_scales), 6))
            self.fpn: FeaturePyramidNetwork | None = FeaturePyramidNetwork(
                [stage_channels[stage] for stage in self.fpn_stages], fpn_channels
            )
            used_stages = {SCALE_TO_STAGE[s] for s in fpn_scales}
            for index, stage in enumerate(self.fpn_stages):
                if stage not in used_stages:
                    self.fpn.layer_blocks[index] = nn.Identity()
        else:
            self.fpn_stages = []
            self.fpn = None

    def channels(self, scale: int) -> int:
        """Feature channels at ``scale``."""
        return ARCH_STAGE_CHANNELS[self.arch][5] if scale == 7 else self.fpn_channels

    def forward(self, images: Tensor) -> dict[int, Tensor]:
        net = self.backbone
        x = net.maxpool(net.relu(net.bn1(net.conv1(images))))
        stages: dict[int, Tensor] = {}
        for stage, layer in zip((2, 3, 4, 5), (net.layer1, net.layer2, net.layer3, net.layer4)):
            x = layer(x)
            stages[stage] = x
        out: dict[int, Tensor] = {}
        if 7 in self.scales:
            out[7] = stages[5]
        if self.fpn is not None:
            pyramid = self.fpn(OrderedDict((str(stage), stages[stage]) for stage in self.fpn_stages))
            for scale in self.scales:
                if scale != 7:
                    out[scale] = pyramid[str(SCALE_TO_STAGE[scale])]
        return {scale: out[scale] for scale in self.scales}


def build_resnet_fpn(
    *,
    arch: str = "resnet18",
    scales: tuple[int, ...] = (7, 14, 28, 56),
    fpn_channels: int = 256,
    pretrained_weights: str | Path | None = None,
) -> ResNetFPN:
    """Build the encoder; ``pretrained_weights`` is a local torchvision-format file (or None)."""
    backbone = build_torchvision_resnet(arch)
    if pretrained_weights:
        load_torchvision_weights(backbone, pretrained_weights, arch=arch)
    return ResNetFPN(backbone=backbone, arch=arch, scales=scales, fpn_channels=fpn_channels)
