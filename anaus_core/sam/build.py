"""``build_sam``: segment_anything's ``Sam`` from a ``SamSpec``, optionally loading a checkpoint."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Mapping

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from anaus_core.errors import UserInputError
from anaus_core.sam.checkpoint import read_sam_state_dict
from anaus_core.sam.fast import set_attention
from anaus_core.sam.resize import resize_sam_state_dict
from anaus_core.sam.spec import SamSpec, resolve_spec, spec_from_state_dict

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def _build_modules(spec: SamSpec, image_size: int) -> Sam:
    if image_size % spec.patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of the patch size {spec.patch_size}")
    grid = image_size // spec.patch_size
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=spec.encoder_depth,
            embed_dim=spec.encoder_embed_dim,
            img_size=image_size,
            mlp_ratio=spec.mlp_ratio,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=spec.encoder_num_heads,
            patch_size=spec.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=tuple(spec.encoder_global_attn_indexes),
            window_size=spec.window_size,
            out_chans=spec.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=spec.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(image_size, image_size),
            mask_in_chans=spec.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=spec.num_multimask_outputs,
            transformer=TwoWayTransformer(
                depth=spec.decoder_depth,
                embedding_dim=spec.prompt_embed_dim,
                mlp_dim=spec.decoder_mlp_dim,
                num_heads=spec.decoder_num_heads,
            ),
            transformer_dim=spec.prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=spec.iou_head_hidden_dim,
        ),
        pixel_mean=list(PIXEL_MEAN),
        pixel_std=list(PIXEL_STD),
    )


def load_sam_state_dict(sam: Sam, state_dict: Mapping[str, torch.Tensor], *, spec: SamSpec, source: str = "checkpoint") -> None:
    """Load an official-format ``state_dict`` into ``sam`` (built at any input size).

    Position embeddings are resized to the model's grid first. Any missing/unexpected key or
    shape mismatch raises ``UserInputError`` with one line naming the first offending tensor.
    """
    grid = sam.image_encoder.pos_embed.shape[1]
    state_dict = resize_sam_state_dict(state_dict, grid=grid, global_attn_indexes=tuple(spec.encoder_global_attn_indexes))
    own = sam.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [k for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        try:
            guess = spec_from_state_dict(state_dict).name
        except (ValueError, KeyError):
            guess = "not a SAM checkpoint"
        if mismatched:
            key = mismatched[0]
            detail = f"{key} has shape {tuple(state_dict[key].shape)}, model expects {tuple(own[key].shape)}"
        elif missing:
            detail = f"{len(missing)} tensors missing, e.g. {missing[0]}"
        else:
            detail = f"{len(unexpected)} unexpected tensors, e.g. {unexpected[0]}"
        raise UserInputError(f"{source}: does not match SAM spec {spec.name!r} ({detail}; checkpoint looks like {guess!r})")
    sam.load_state_dict(state_dict, strict=True)


def build_sam(
    spec: SamSpec | str,
    *,
    checkpoint: str | Path | Mapping[str, torch.Tensor] | None = None,
    image_size: int | None = None,
    attention: str = "sdpa",
) -> Sam:
    """Build ``segment_anything.modeling.Sam`` for ``spec`` at ``image_size`` (default: native).

    Args:
        spec: a ``SamSpec`` or a name in ``SAM_SPECS``.
        checkpoint: path of an official-format checkpoint (plain ``state_dict``), or the
            ``state_dict`` itself. ``None`` leaves segment_anything's random initialisation.
        image_size: encoder input side; position embeddings are interpolated when it differs
            from the checkpoint's. The image embedding is ``(prompt_embed_dim, S/16, S/16)``.
        attention: ``"sdpa"`` (default: ``scaled_dot_product_attention`` with the relative
            positions as an additive bias, see ``anaus_core.sam.fast``) or ``"reference"``
            (segment_anything's own attention). Same weights and outputs either way.

    Returns the model in eval mode on the CPU.
    """
    spec = resolve_spec(spec)
    sam = _build_modules(spec, spec.image_size if image_size is None else int(image_size))
    if checkpoint is not None:
        if isinstance(checkpoint, (str, Path)):
            load_sam_state_dict(sam, read_sam_state_dict(checkpoint), spec=spec, source=str(checkpoint))
        else:
            load_sam_state_dict(sam, checkpoint, spec=spec)
    set_attention(sam, attention)
    return sam.eval()


def save_random_sam_checkpoint(path: str | Path, spec: SamSpec | str, seed: int = 0) -> Path:
    """Write a randomly initialised SAM of ``spec`` in the official format (plain ``state_dict``
    at the native input size). Position embeddings, which segment_anything initialises to
    zero, get small random values so that resizing them is exercised."""
    spec = resolve_spec(spec)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # segment_anything's module initialisers draw from the global RNG
    sam = _build_modules(spec, spec.image_size)
    state = sam.state_dict()
    for key, value in state.items():
        if key.endswith("pos_embed") or ".rel_pos_" in key:
            state[key] = torch.randn(value.shape, generator=generator) * 0.02
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.contiguous() for k, v in state.items()}, path)
    return path
