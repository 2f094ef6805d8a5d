"""``SamSpec``: the sizes that define a SAM architecture, and the named specs."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Mapping

import torch


@dataclass(frozen=True)
class SamSpec:
    """Sizes of a SAM model (image encoder ViT, prompt encoder, mask decoder).

    ``image_size`` is the input size the checkpoint was trained at (1024 for the official ones);
    ``build_sam(..., image_size=256)`` builds the same weights for another input size.
    """

    name: str
    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    mlp_ratio: float = 4.0
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_num_heads: int = 8
    decoder_mlp_dim: int = 2048
    iou_head_hidden_dim: int = 256
    num_multimask_outputs: int = 3

    def embedding_grid(self, image_size: int | None = None) -> int:
        """Side of the image-embedding grid for an input of ``image_size`` (default: native)."""
        size = self.image_size if image_size is None else image_size
        return size // self.patch_size

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["encoder_global_attn_indexes"] = list(self.encoder_global_attn_indexes)
        return data

    @classmethod
    def from_dict(cls, data: Mapping) -> "SamSpec":
        data = dict(data)
        data["encoder_global_attn_indexes"] = tuple(int(i) for i in data["encoder_global_attn_indexes"])
        return cls(**data)


# Official sizes from segment_anything/build_sam.py.
SAM_SPECS: dict[str, SamSpec] = {
    "vit_b": SamSpec(name="vit_b", encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12, encoder_global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": SamSpec(name="vit_l", encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16, encoder_global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": SamSpec(name="vit_h", encoder_embed_dim=1280, encoder_depth=32, encoder_num_heads=16, encoder_global_attn_indexes=(7, 15, 23, 31)),
    # A CPU-sized model with the same structure, for tests, demos and benchmarks of the code path.
    "tiny": SamSpec(
        name="tiny",
        encoder_embed_dim=64,
        encoder_depth=2,
        encoder_num_heads=2,
        encoder_global_attn_indexes=(1,),
        prompt_embed_dim=32,
        decoder_num_heads=2,
        decoder_mlp_dim=64,
        iou_head_hidden_dim=32,
    ),
}


def resolve_spec(spec: "SamSpec | str") -> SamSpec:
    if isinstance(spec, SamSpec):
        return spec
    if spec not in SAM_SPECS:
        raise ValueError(f"unknown SAM spec {spec!r}; choose one of {sorted(SAM_SPECS)}")
    return SAM_SPECS[spec]


def spec_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> SamSpec:
    """Infer the architecture of an official-format SAM ``state_dict`` from its tensor shapes.

    Returns the matching entry of ``SAM_SPECS`` when one fits; otherwise a spec named
    ``"custom"`` (attention head counts cannot be read from shapes: the encoder's come from the
    relative-position table width, the decoder's default to one head per 32 channels).
    """
    try:
        patch = state_dict["image_encoder.patch_embed.proj.weight"]
        pos_embed = state_dict["image_encoder.pos_embed"]
        no_mask = state_dict["prompt_encoder.no_mask_embed.weight"]
    except KeyError as exc:
        raise ValueError(f"not a SAM state_dict: missing key {exc.args[0]}") from None
    embed_dim, patch_size = int(patch.shape[0]), int(patch.shape[-1])
    grid = int(pos_embed.shape[1])
    block_ids = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))})
    depth = len(block_ids)
    global_blocks, window_size, head_dim = [], 14, None
    for i in block_ids:
        rel = state_dict.get(f"image_encoder.blocks.{i}.attn.rel_pos_h")
        if rel is None:
            continue
        head_dim = int(rel.shape[1])
        length = int(rel.shape[0])
        if length == 2 * grid - 1:
            global_blocks.append(i)
        else:
            window_size = (length + 1) // 2
    num_heads = embed_dim // head_dim if head_dim else max(1, embed_dim // 64)
    prompt_dim = int(no_mask.shape[1])
    decoder_layers = {int(m.group(1)) for k in state_dict if (m := re.match(r"mask_decoder\.transformer\.layers\.(\d+)\.", k))}
    mlp_dim = int(state_dict["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0])
    iou_hidden = int(state_dict["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0])
    mask_in = int(state_dict["prompt_encoder.mask_downscaling.3.weight"].shape[0])
    num_mask_tokens = int(state_dict["mask_decoder.mask_tokens.weight"].shape[0])
    shape_fields = dict(
        encoder_embed_dim=embed_dim,
        encoder_depth=depth,
        encoder_num_heads=num_heads,
        encoder_global_attn_indexes=tuple(global_blocks),
        image_size=grid * patch_size,
        patch_size=patch_size,
        window_size=window_size,
        prompt_embed_dim=prompt_dim,
        mask_in_chans=mask_in,
        decoder_depth=len(decoder_layers),
        decoder_mlp_dim=mlp_dim,
        iou_head_hidden_dim=iou_hidden,
        num_multimask_outputs=num_mask_tokens - 1,
    )
    for known in SAM_SPECS.values():
        if all(getattr(known, k) == v for k, v in shape_fields.items()):
            return known
    return SamSpec(name="custom", decoder_num_heads=max(1, prompt_dim // 32), **shape_fields)
