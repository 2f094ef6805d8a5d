"""Export the online encoder for downstream use (the target, heads and predictor are discarded).

``export_encoder_state_dict`` gives a plain torchvision ResNet state dict: it loads into
``torchvision.models.resnet18()`` (or ``resnet50()``) with ``strict=True`` once the model's own
``fc.*`` entries are ignored, e.g. ``model.load_state_dict(sd, strict=False)`` reports only
``fc.weight``/``fc.bias`` missing. ``export_fpn_state_dict`` gives the online FPN's state dict,
loadable into ``build_export_fpn(arch, scales, fpn_channels)``.
"""

from __future__ import annotations

from torch import Tensor, nn

from anaus_core.models.resnet_fpn import ResNetFPN, build_torchvision_resnet


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DistributedDataParallel keeps the model in .module


def _online_encoder(model: nn.Module) -> ResNetFPN:
    model = _unwrap(model)
    encoder = getattr(model, "online_encoder", model)
    if not isinstance(encoder, ResNetFPN):
        raise TypeError(f"expected an AnaUSModel or ResNetFPN, got {type(model).__name__}")
    return encoder


def export_encoder_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Online ResNet weights with torchvision key names (``conv1.weight`` ... ``layer4.*``), CPU copies."""
    encoder = _online_encoder(model)
    return {key: value.detach().cpu().clone() for key, value in encoder.backbone.state_dict().items()}


def export_fpn_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Online FPN weights (torchvision ``FeaturePyramidNetwork`` keys); empty when no FPN is built."""
    encoder = _online_encoder(model)
    if encoder.fpn is None:
        return {}
    return {key: value.detach().cpu().clone() for key, value in encoder.fpn.state_dict().items()}


def build_export_encoder(
    arch: str = "resnet18", *, scales: tuple[int, ...] = (7, 14, 28, 56), fpn_channels: int = 256
) -> ResNetFPN:
    """An empty ResNetFPN with the layout ``export_*_state_dict`` wrote (load both dicts into it)."""
    return ResNetFPN(backbone=build_torchvision_resnet(arch), arch=arch, scales=scales, fpn_channels=fpn_channels)
