"""Collation of per-sample view dicts into the CONTRACTS.md pre-training batch (dict of CPU tensors)."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

# Field -> dtype of the collated tensor (CONTRACTS.md, "Pre-training batch").
BATCH_FIELDS: dict[str, torch.dtype] = {
    "view1": torch.uint8,
    "view2": torch.uint8,
    "masks1": torch.uint8,
    "masks2": torch.uint8,
    "mask_ids": torch.int64,
    "mask_valid1": torch.bool,
    "mask_valid2": torch.bool,
    "core": torch.uint8,
    "core_valid": torch.bool,
    "crop1": torch.float32,
    "crop2": torch.float32,
    "flip1": torch.bool,
    "flip2": torch.bool,
    "index": torch.int64,
}


def collate_views(samples: Sequence[Mapping[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack B per-sample dicts (numpy) into one dict of tensors with the contract dtypes."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    batch = {}
    for name, dtype in BATCH_FIELDS.items():
        if name not in samples[0]:
            continue
        stacked = np.stack([np.asarray(sample[name]) for sample in samples])
        batch[name] = torch.from_numpy(stacked).to(dtype)
    return batch
