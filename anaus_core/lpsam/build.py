"""``build_lpsam``: LP-SAM from a base SAM checkpoint and a ``LPSAMModelConfig``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from anaus_core.errors import UserInputError
from anaus_core.lpsam.image_encoder import AdaptedImageEncoder
from anaus_core.lpsam.model import LPSAM
from anaus_core.lpsam.prompt_engine import LatentPromptEngine
from anaus_core.sam import SamSpec, build_sam, resolve_spec

# Small settings for the tiny SAM spec (tests, CPU benchmarks).
TINY_ENGINE = dict(engine_heads=2, engine_mlp_dim=64, engine_cnn_channels=[8, 16, 16, 32])


@dataclass
class LPSAMModelConfig:
    """Architecture of LP-SAM (everything except the classes, which come from the data)."""

    spec: str = "vit_b"  # name in anaus_core.sam.SAM_SPECS
    image_size: int = 256  # encoder input side; 1024 is SAM's native size
    in_chans: int = 1
    adapter_placement: str = "all"  # "all" blocks (paper) or "global" attention blocks only (official code)
    bottleneck_ratio: float = 0.25  # d'/d (official: 0.25 -> d' = 192 for ViT-B)
    attention_adapter: bool = True
    mlp_adapter: bool = True
    mlp_adapter_scale: float = 0.5
    tokens_per_class: int = 2
    engine_rounds: int = 4
    engine_heads: int = 8
    engine_mlp_dim: int = 1024
    engine_cnn_channels: list[int] = field(default_factory=lambda: [32, 64, 128, 256])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> "LPSAMModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (list(v) if isinstance(v, tuple) else v) for k, v in data.items() if k in known})


def tiny_model_config(**overrides) -> LPSAMModelConfig:
    """The CPU-sized configuration used by tests and benchmarks."""
    values = dict(spec="tiny", image_size=64, **TINY_ENGINE)
    values.update(overrides)
    return LPSAMModelConfig(**values)


def build_lpsam(
    config: LPSAMModelConfig,
    *,
    class_names: list[str],
    sam_checkpoint: str | Path | Mapping[str, torch.Tensor] | None = None,
    spec: SamSpec | None = None,
    fast: bool = True,
) -> LPSAM:
    """Build LP-SAM: base SAM (random when ``sam_checkpoint`` is None) at ``config.image_size``,
    zero-initialised adapters, a fresh prompt engine with one token group per class. Eval mode.

    ``fast`` (default): SDPA attention everywhere and the batched mask decoder
    (``LPSAM.set_fast_path``); ``False`` keeps segment_anything's attention and per-image decoder
    (the reference the fast path is tested against). Weights and outputs are the same."""
    if not class_names:
        raise ValueError("LP-SAM needs at least one class name")
    spec = spec or resolve_spec(config.spec)
    sam = build_sam(spec, checkpoint=sam_checkpoint, image_size=config.image_size)
    patch_factor = 2 ** len(config.engine_cnn_channels)
    if patch_factor != spec.patch_size:
        raise UserInputError(
            f"engine_cnn_channels has {len(config.engine_cnn_channels)} stride-2 stages (x{patch_factor}); "
            f"SAM's patch size is {spec.patch_size}"
        )
    encoder = AdaptedImageEncoder(
        vit=sam.image_encoder,
        in_chans=config.in_chans,
        adapter_placement=config.adapter_placement,
        bottleneck_ratio=config.bottleneck_ratio,
        attention_adapter=config.attention_adapter,
        mlp_adapter=config.mlp_adapter,
        mlp_adapter_scale=config.mlp_adapter_scale,
    )
    engine = LatentPromptEngine(
        dim=spec.prompt_embed_dim,
        num_classes=len(class_names),
        tokens_per_class=config.tokens_per_class,
        num_rounds=config.engine_rounds,
        num_heads=config.engine_heads,
        mlp_dim=config.engine_mlp_dim,
        cnn_channels=tuple(config.engine_cnn_channels),
    )
    model = LPSAM(
        image_encoder=encoder,
        prompt_encoder=sam.prompt_encoder,
        mask_decoder=sam.mask_decoder,
        prompt_engine=engine,
        class_names=list(class_names),
    )
    return model.set_fast_path(fast).eval()


def load_partial_state(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], *, source: str, what: str) -> None:
    """Copy ``tensors`` (a subset of ``model``'s state) into ``model``; any unknown name or shape
    mismatch is a one-line ``UserInputError`` naming ``source``."""
    own = model.state_dict()
    for key, value in tensors.items():
        if key not in own:
            raise UserInputError(f"{source}: {what} tensor {key} does not exist in this LP-SAM (different adapter/engine settings?)")
        if tuple(own[key].shape) != tuple(value.shape):
            raise UserInputError(
                f"{source}: {what} tensor {key} has shape {tuple(value.shape)}, this LP-SAM expects {tuple(own[key].shape)} "
                "(different SAM spec, input size or engine settings?)"
            )
    with torch.no_grad():
        for key, value in tensors.items():
            own[key].copy_(value)
