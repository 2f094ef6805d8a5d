"""``AViTConfig``: every setting of the A-ViT method (``anaus pretrain --method avit``).

One YAML section (``avit:`` in the pretrain config); the choices the poster leaves open are
explained in docs/avit.md. Defaults follow DINO (heads, temperatures, multi-crop), iBOT/SimMIM
(masking with a mask token inside the student), MAE (light pixel decoder) and VQGAN (hinge patch
discriminator, adaptive λ).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from anaus_core.config import ConfigError

ACDT_VARIANTS = ("acdt", "none", "cross_attention", "film", "lora")
VIT_SIZES = ("micro", "tiny", "small", "base")


@dataclass
class MultiCropConfig:
    """DINO multi-crop: 2 global + ``num_local`` local crops per image (scales are area fractions)."""

    global_size: int = 224
    local_size: int = 96
    num_local: int = 6
    global_scale: tuple[float, float] = (0.4, 1.0)   # DINO's default for ViT-S/B
    local_scale: tuple[float, float] = (0.05, 0.4)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5


@dataclass
class AViTConfig:
    """Model, objectives and schedules of A-ViT.

    ``categories``: the anatomy vocabulary (from the store's manifest; the CLI fills it). Index 0
    of the anatomy embedding is always ``unknown``; category ``i`` of the list is index ``i + 1``.
    """

    size: Literal["micro", "tiny", "small", "base"] = "base"
    patch_size: int = 16
    categories: list[str] = field(default_factory=list)
    acdt: Literal["acdt", "none", "cross_attention", "film", "lora"] = "acdt"
    acdt_after: Optional[list[int]] = None    # ViT block indices followed by a conditioning block; None = last block
    acdt_kernel: int = 3
    acdt_offset_groups: int = 4
    lora_rank: int = 8
    anatomy_embedding: bool = True            # one-hot category -> learned embedding added to the patch tokens
    crops: MultiCropConfig = field(default_factory=MultiCropConfig)
    # DINO
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_output_dim: int = 65536
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_fraction: float = 0.1  # of the run's optimiser steps (DINO: 30 of 300 epochs)
    center_momentum: float = 0.9
    ema_base: float = 0.996                    # teacher EMA decay, cosine to 1 (DINO)
    freeze_last_layer_steps: int = 0           # DINO: the head's prototype layer gets no update for its first epoch
    # MIM
    mask_ratio: float = 0.4                    # fraction of a global crop's patches replaced by the mask token
    decoder_dim: int = 256
    decoder_depth: int = 2
    decoder_heads: int = 8
    norm_pix_loss: bool = False                # MAE's per-patch normalised target (off: the adversary sees pixels)
    # adversarial
    disc_channels: int = 64
    disc_layers: int = 3
    adv_start_step: int = 0                    # VQGAN's disc_start: adversarial terms off before this step
    adv_weight: float = 1.0                    # VQGAN's disc_weight, multiplies the adaptive λ
    adaptive_lambda_max: float = 1e4           # VQGAN clamps λ to [0, 1e4]
    # loss weights (0 removes a term: the ablations)
    weight_dino: float = 1.0
    weight_mim: float = 1.0
    weight_adv: float = 1.0
    weight_disc: float = 1.0

    def validate(self) -> None:
        if self.acdt not in ACDT_VARIANTS:
            raise ConfigError(f"avit.acdt: must be one of {list(ACDT_VARIANTS)}, got {self.acdt!r}")
        crops = self.crops
        for name in ("global_size", "local_size"):
            value = getattr(crops, name)
            if value < self.patch_size or value % self.patch_size:
                raise ConfigError(f"avit.crops.{name}: must be a positive multiple of patch_size {self.patch_size}, got {value}")
        if crops.num_local < 0:
            raise ConfigError(f"avit.crops.num_local: must be >= 0, got {crops.num_local}")
        if self.freeze_last_layer_steps < 0:
            raise ConfigError(f"avit.freeze_last_layer_steps: must be >= 0, got {self.freeze_last_layer_steps}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ConfigError(f"avit.mask_ratio: must be in [0, 1), got {self.mask_ratio}")
        if not 0.0 <= self.ema_base <= 1.0:
            raise ConfigError(f"avit.ema_base: must be in [0, 1], got {self.ema_base}")
        if len(set(self.categories)) != len(self.categories) or "unknown" in self.categories:
            raise ConfigError("avit.categories: names must be unique and must not include 'unknown' (index 0)")
        for name in ("weight_dino", "weight_mim", "weight_adv", "weight_disc", "adv_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"avit.{name}: must be >= 0, got {getattr(self, name)}")
        if self.weight_dino == 0 and self.weight_mim == 0:
            raise ConfigError("avit: weight_dino and weight_mim are both 0: nothing trains the encoder")

    @property
    def num_categories(self) -> int:
        """Rows of the anatomy embedding: ``unknown`` + the vocabulary."""
        return len(self.categories) + 1
