"""Adapting a SAM ``state_dict`` to another encoder input size.

The absolute position embedding ``(1, G, G, C)`` is resized to the new grid and the relative
position tables of the global-attention blocks ``(2G - 1, head_dim)`` to ``2G' - 1`` rows;
windowed blocks keep their window, so their tables stay as they are. This is what the official
LP-SAM/SAMUS code does for its 256-px encoder (there with bilinear resizing).
"""

from __future__ import annotations

import re
from typing import Mapping

import torch
import torch.nn.functional as F


def _resize_pos_embed(pos_embed: torch.Tensor, grid: int, mode: str) -> torch.Tensor:
    grid_map = pos_embed.permute(0, 3, 1, 2).float()  # (1, C, G, G)
    grid_map = F.interpolate(grid_map, size=(grid, grid), mode=mode, align_corners=False)
    return grid_map.permute(0, 2, 3, 1).to(pos_embed.dtype).contiguous()


def _resize_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    # Same as segment_anything's get_rel_pos resizing: linear along the offset axis.
    resized = F.interpolate(table.float().T[None], size=length, mode="linear", align_corners=False)
    return resized[0].T.to(table.dtype).contiguous()


def resize_sam_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    *,
    grid: int,
    global_attn_indexes: tuple[int, ...],
    pos_embed_mode: str = "bicubic",
) -> dict[str, torch.Tensor]:
    """Return a copy of ``state_dict`` whose position embeddings fit an embedding ``grid``."""
    out = dict(state_dict)
    pos_embed = out.get("image_encoder.pos_embed")
    if pos_embed is not None and pos_embed.shape[1] != grid:
        out["image_encoder.pos_embed"] = _resize_pos_embed(pos_embed, grid, pos_embed_mode)
    rel_len = 2 * grid - 1
    for key, value in state_dict.items():
        match = re.match(r"image_encoder\.blocks\.(\d+)\.attn\.rel_pos_[hw]$", key)
        if match and int(match.group(1)) in global_attn_indexes and value.shape[0] != rel_len:
            out[key] = _resize_rel_pos(value, rel_len)
    return out
