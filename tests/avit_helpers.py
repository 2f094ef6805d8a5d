"""Tiny A-ViT configs for the tests (micro ViT, 32 px global / 16 px local crops)."""

from __future__ import annotations

from anaus_core.avit.config import AViTConfig, MultiCropConfig


def tiny_avit_config(**overrides) -> AViTConfig:
    settings = dict(size="micro", patch_size=8, categories=["liver", "thyroid"],
                    crops=MultiCropConfig(global_size=32, local_size=16, num_local=2),
                    head_hidden_dim=64, head_bottleneck_dim=32, head_output_dim=128,
                    decoder_dim=32, decoder_heads=2, decoder_depth=1, disc_channels=8, disc_layers=2)
    settings.update(overrides)
    return AViTConfig(**settings)
