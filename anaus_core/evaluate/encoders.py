"""Encoders to evaluate: ``NAME=PATH`` state dicts (architecture detected from their keys and
shapes) and the built-in ``random`` baseline.

Accepted files (loaded with ``torch.load(weights_only=True)``, never unpickling code):

* a torchvision ResNet-18/50 state dict (our ``encoder.pt``, ImageNet weights from a local file,
  another SSL library's export); ``fc.*`` is ignored, a ``module.``/``backbone.``/``encoder.``
  prefix shared by every key is stripped, ``{"state_dict": ...}``/``{"model": ...}`` is unwrapped.
  Our ``fpn.pt`` in the same folder is picked up for segmentation;
* a timm ViT state dict (``cls_token``, ``pos_embed``, ``patch_embed.proj.weight``,
  ``blocks.N.*``), e.g. an A-ViT export; its size (width, depth, patch, MLP ratio, input
  channels) is read from the shapes and the model built with timm.

A missing, unreadable or unrecognised file raises a one-line ``UserInputError`` naming it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from anaus_core.errors import UserInputError
from anaus_core.safe_load import torch_load_weights_only

RANDOM = "random"
_PREFIXES = ("module.", "backbone.", "encoder.", "model.")
#: attention heads of the usual ViT widths (timm's tiny/small/base/large/huge)
VIT_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}


@dataclass
class EncoderSpec:
    name: str
    path: Path | None  # None for the built-in random baseline


@dataclass
class EncoderWeights:
    """A recognised encoder: ``kind`` "resnet" or "vit", ``arch`` (resnet18/resnet50 or a ViT
    description), its backbone ``state`` (None = random initialisation), ``fpn_state`` (our
    ``fpn.pt``, ResNet only, or None) and, for ViTs, the timm constructor arguments."""

    name: str
    kind: str
    arch: str
    state: dict[str, Tensor] | None
    path: Path | None = None
    fpn_state: dict[str, Tensor] | None = None
    fpn_path: Path | None = None
    vit_kwargs: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "arch": self.arch,
                "path": None if self.path is None else str(self.path),
                "fpn": None if self.fpn_path is None else str(self.fpn_path)}


def parse_encoder_option(text: str) -> EncoderSpec:
    """``NAME=PATH`` or ``random`` -> ``EncoderSpec``."""
    if text.strip() == RANDOM:
        return EncoderSpec(RANDOM, None)
    if "=" not in text:
        raise UserInputError(f"--encoder {text!r}: expected NAME=PATH (or 'random')")
    name, path = text.split("=", 1)
    name = name.strip()
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
        raise UserInputError(f"--encoder {text!r}: the name may use letters, digits and _ . + - only")
    if name == RANDOM:
        raise UserInputError(f"--encoder {text!r}: 'random' is the built-in baseline; name the file otherwise")
    return EncoderSpec(name, Path(path.strip()))


def read_state_dict(path: Path, what: str = "encoder") -> dict[str, Tensor]:
    if not path.is_file():
        raise UserInputError(f"{path}: {what} file not found")
    try:
        state = torch_load_weights_only(path)
    except Exception as exc:  # torch raises many unrelated types for a bad or foreign file
        from anaus_core.safe_load import describe_load_error  # never passes on torch's weights_only=False advice

        raise UserInputError(f"{path}: cannot read as a torch state dict ({describe_load_error(exc)})") from None
    for key in ("state_dict", "model", "encoder"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserInputError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _resnet_arch(state: dict[str, Tensor], path: Path) -> str:
    blocks = {stage: len({k.split(".")[1] for k in state if k.startswith(f"layer{stage}.")}) for stage in (1, 2, 3, 4)}
    bottleneck = "layer1.0.conv3.weight" in state
    if not bottleneck and [blocks[s] for s in (1, 2, 3, 4)] == [2, 2, 2, 2]:
        return "resnet18"
    if bottleneck and [blocks[s] for s in (1, 2, 3, 4)] == [3, 4, 6, 3]:
        return "resnet50"
    raise UserInputError(f"{path}: a ResNet with blocks {list(blocks.values())} "
                         f"({'bottleneck' if bottleneck else 'basic'}); only ResNet-18 and ResNet-50 are supported")


def _vit_kwargs(state: dict[str, Tensor], path: Path) -> dict:
    try:
        proj = state["patch_embed.proj.weight"]
        embed_dim, in_chans, patch, _ = proj.shape
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        mlp_hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    except (KeyError, ValueError, IndexError):
        raise UserInputError(f"{path}: looks like a ViT but lacks patch_embed.proj / blocks.N.mlp weights") from None
    class_token = "cls_token" in state
    reg_tokens = int(state["reg_token"].shape[1]) if "reg_token" in state else 0
    grid_tokens = None
    if "pos_embed" in state:
        tokens = state["pos_embed"].shape[1] - (1 if class_token else 0) - reg_tokens
        grid_tokens = tokens if tokens > 0 else None
    side = int(round(math.sqrt(grid_tokens))) if grid_tokens else 14
    return {
        "img_size": side * int(patch), "patch_size": int(patch), "in_chans": int(in_chans), "embed_dim": int(embed_dim),
        "depth": int(depth), "num_heads": VIT_HEADS.get(int(embed_dim), max(1, int(embed_dim) // 64)),
        "mlp_ratio": mlp_hidden / embed_dim, "qkv_bias": "blocks.0.attn.qkv.bias" in state,
        "class_token": class_token, "reg_tokens": reg_tokens, "global_pool": "token" if class_token else "avg",
        "no_embed_class": False, "num_classes": 0, "dynamic_img_size": True,
        "fc_norm": False if "fc_norm.weight" not in state else True,
    }


def load_encoder(spec: EncoderSpec, *, random_arch: str = "resnet18") -> EncoderWeights:
    """Read and recognise one encoder (the weights are checked by building the network once)."""
    if spec.path is None:
        if random_arch not in ("resnet18", "resnet50"):
            raise UserInputError(f"random_arch {random_arch!r}: choose resnet18 or resnet50")
        return EncoderWeights(spec.name, "resnet", random_arch, None)
    path = spec.path
    state = read_state_dict(path)
    state = {k: v for k, v in state.items() if not k.startswith("fc.") and not k.startswith("head.")}
    if "conv1.weight" in state and any(k.startswith("layer4.") for k in state):
        arch = _resnet_arch(state, path)
        weights = EncoderWeights(spec.name, "resnet", arch, state, path)
        fpn_path = path.parent / "fpn.pt"
        if fpn_path.is_file():
            weights.fpn_state, weights.fpn_path = read_state_dict(fpn_path, "FPN"), fpn_path
    elif "patch_embed.proj.weight" in state or "cls_token" in state:
        kwargs = _vit_kwargs(state, path)
        desc = f"vit d{kwargs['embed_dim']} x{kwargs['depth']} p{kwargs['patch_size']}"
        weights = EncoderWeights(spec.name, "vit", desc, state, path, vit_kwargs=kwargs)
    else:
        raise UserInputError(f"{path}: not a torchvision ResNet-18/50 or timm ViT state dict "
                             f"(first keys: {list(state)[:3]})")
    from anaus_core.evaluate.backbones import build_backbone

    build_backbone(weights)  # fails here, naming the file, if a shape does not fit
    return weights
