"""Evaluation backbones built from ``EncoderWeights``: one interface over torchvision ResNets and
timm ViTs (pooled features, trainable last stages)."""

from __future__ import annotations

from torch import Tensor, nn

from anaus_core.errors import UserInputError
from anaus_core.evaluate.encoders import EncoderWeights
from anaus_core.models.resnet_fpn import build_torchvision_resnet


class ResNetBackbone(nn.Module):
    """torchvision ResNet without ``fc``. ``features``: (B, 3, H, W) -> (B, C5) global average
    pooled ``layer4`` output; ``stages``: ``[layer1, layer2, layer3, layer4]``."""

    kind = "resnet"

    def __init__(self, *, resnet: nn.Module) -> None:
        super().__init__()
        resnet.fc = nn.Identity()
        self.resnet = resnet
        last = resnet.layer4[-1]
        self.feature_dim = (last.conv3 if hasattr(last, "conv3") else last.conv2).out_channels

    @property
    def stages(self) -> list[nn.Module]:
        return [self.resnet.layer1, self.resnet.layer2, self.resnet.layer3, self.resnet.layer4]

    def features(self, images: Tensor) -> Tensor:
        return self.resnet(images)  # fc = Identity: the pooled, flattened layer4 output


class ViTBackbone(nn.Module):
    """timm VisionTransformer without a head. ``features``: (B, 3, H, W) -> (B, D) (class token,
    or mean patch token when the model has none); ``tokens``: (B, D, H/p, W/p) patch tokens;
    ``stages``: the transformer blocks."""

    kind = "vit"

    def __init__(self, *, vit: nn.Module, in_chans: int) -> None:
        super().__init__()
        self.vit = vit
        self.in_chans = in_chans
        self.feature_dim = vit.embed_dim
        self.patch_size = vit.patch_embed.patch_size[0]

    @property
    def stages(self) -> list[nn.Module]:
        return list(self.vit.blocks) + [self.vit.norm]

    def _input(self, images: Tensor) -> Tensor:
        return images[:, :1] if self.in_chans == 1 else images

    def features(self, images: Tensor) -> Tensor:
        tokens = self.vit.forward_features(self._input(images))
        return self.vit.forward_head(tokens, pre_logits=True)

    def tokens(self, images: Tensor) -> Tensor:
        images = self._input(images)
        out = self.vit.forward_features(images)[:, self.vit.num_prefix_tokens:]
        h, w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], h, w)


def _load_checked(module: nn.Module, state: dict, *, head: str, problem: str) -> None:
    """``load_state_dict`` that allows only the classifier (keys starting with ``head``) to be missing;
    any other mismatch is a ``UserInputError`` starting with ``problem``."""
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        line = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), str(exc))
        raise UserInputError(f"{problem} ({line})") from None
    missing = [k for k in result.missing_keys if not k.startswith(head)]
    if missing or result.unexpected_keys:
        raise UserInputError(f"{problem} (missing {missing[:3]}, unexpected {list(result.unexpected_keys)[:3]})")


def build_backbone(weights: EncoderWeights) -> ResNetBackbone | ViTBackbone:
    """A fresh backbone with ``weights`` loaded (random initialisation from the current torch
    seed when ``weights.state`` is None). Shape mismatches raise ``UserInputError`` naming the file."""
    where = weights.path or weights.name
    if weights.kind == "resnet":
        resnet = build_torchvision_resnet(weights.arch)
        if weights.state is not None:
            _load_checked(resnet, weights.state, head="fc.", problem=f"{where}: not a torchvision {weights.arch} state dict")
        return ResNetBackbone(resnet=resnet)
    if weights.kind == "vit":
        from timm.models.vision_transformer import VisionTransformer

        kwargs = dict(weights.vit_kwargs)
        vit = VisionTransformer(**kwargs)
        _load_checked(vit, weights.state, head="head.", problem=f"{where}: ViT weights do not fit the detected size {weights.arch}")
        return ViTBackbone(vit=vit, in_chans=kwargs["in_chans"])
    raise ValueError(f"unknown encoder kind {weights.kind!r}")


def set_trainable(backbone: ResNetBackbone | ViTBackbone, *, last_stages: int | None) -> None:
    """Freeze the backbone except its last ``last_stages`` stages (None: everything trains).
    Frozen BatchNorm layers stay in eval mode via ``freeze_norm_stats``."""
    for parameter in backbone.parameters():
        parameter.requires_grad = last_stages is None
    if last_stages is not None and last_stages > 0:
        for stage in backbone.stages[-last_stages:]:
            for parameter in stage.parameters():
                parameter.requires_grad = True


def freeze_norm_stats(module: nn.Module) -> None:
    """Put BatchNorm layers whose parameters are frozen in eval mode (their running statistics
    stay the pre-trained ones); call after ``module.train()``."""
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in layer.parameters()):
            layer.eval()


def check_input_size(backbone: nn.Module, image_size: int) -> None:
    if isinstance(backbone, ViTBackbone) and image_size % backbone.patch_size:
        raise UserInputError(f"image_size {image_size} is not a multiple of the ViT patch size {backbone.patch_size}")


__all__ = ["ResNetBackbone", "ViTBackbone", "build_backbone", "check_input_size", "freeze_norm_stats", "set_trainable"]
