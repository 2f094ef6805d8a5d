"""Region probes: features pooled inside labelled regions of an image, one sample per (image,
class present in its label map).

Whole-image pooled features mix every structure of a scan with the tissue around it; the question
an anatomy-anchored encoder should answer is whether the features *of a structure* say what the
structure is (a cyst, a hypo- or hyperechoic lesion, a layer, plain tissue). The region probe pools
each feature map over each class's pixels, weighting every feature-map cell by the share of its
area the class covers (the label map is area-pooled to the cell grid at its full resolution, so a
region smaller than one cell still contributes where it lies), and concatenates the levels:

* torchvision ResNets (an AnaUS ``encoder.pt``, the online network of a run): ``layer2``,
  ``layer3``, ``layer4`` (C3, C4, C5; strides 8, 16, 32);
* ViTs (``ViTBackbone`` or a timm ``VisionTransformer``): the last block's patch tokens.

Folds are drawn over images (grouped like every other protocol), so all regions of one image are
on the same side of every split.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anaus_core.evaluate.tensors import autocast, batches, network_input


def _resnet(encoder: nn.Module) -> nn.Module | None:
    for candidate in (encoder, getattr(encoder, "resnet", None)):
        if candidate is not None and all(hasattr(candidate, n) for n in ("conv1", "layer1", "layer4")):
            return candidate
    return None


def feature_maps(encoder: nn.Module, images: Tensor) -> list[Tensor]:
    """(B, 3, H, W) -> the maps the region probe pools: ``[C3, C4, C5]`` of a torchvision ResNet
    (or a module holding one as ``.resnet``), ``[(B, D, H/p, W/p) patch tokens]`` of a ViT
    (a module with ``tokens``, or a timm ``VisionTransformer``)."""
    resnet = _resnet(encoder)
    if resnet is not None:
        x = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(images))))
        c2 = resnet.layer1(x)
        c3 = resnet.layer2(c2)
        c4 = resnet.layer3(c3)
        return [c3, c4, resnet.layer4(c4)]
    if hasattr(encoder, "tokens"):
        return [encoder.tokens(images)]
    if hasattr(encoder, "patch_embed") and hasattr(encoder, "forward_features"):
        out = encoder.forward_features(images)[:, getattr(encoder, "num_prefix_tokens", 1):]
        patch = encoder.patch_embed.patch_size[0]
        h, w = images.shape[-2] // patch, images.shape[-1] // patch
        return [out.transpose(1, 2).reshape(out.shape[0], out.shape[2], h, w)]
    raise TypeError(f"{type(encoder).__name__}: the region probe needs a torchvision ResNet or a ViT (patch tokens)")


def region_weights(label: np.ndarray, classes: np.ndarray, size: tuple[int, int]) -> Tensor:
    """int (H0, W0) label map, class values (M,) -> float (M, h, w): the share of each cell of an
    h x w grid laid over the whole map that each class covers."""
    masks = torch.from_numpy(np.stack([label == c for c in classes])).float()[None]
    return F.adaptive_avg_pool2d(masks, size)[0]


@torch.no_grad()
def region_features(encoder: nn.Module, images: np.ndarray, labels: list[np.ndarray], *, device: torch.device,
                    batch_size: int = 64, progress: Callable | None = None) -> tuple[Tensor, np.ndarray, np.ndarray]:
    """uint8 (N, H, W) images and their int label maps (any size; 0 = no region) ->
    (float32 (R, D) pooled features on the CPU, int64 (R,) class values, int64 (R,) image
    positions), one row per (image, class value > 0 present), images in order, classes ascending.
    The encoder runs in eval mode; pooling is done in float32."""
    encoder.eval().to(device)
    rows: list[Tensor] = []
    classes: list[int] = []
    owners: list[int] = []
    groups = batches(len(images), batch_size)
    for positions in (progress(groups) if progress else groups):
        with autocast(device):
            levels = [m.float() for m in feature_maps(encoder, network_input(images[positions.numpy()], device))]
        for row, position in enumerate(positions.tolist()):
            label = np.asarray(labels[position])
            present = np.unique(label)
            present = present[present > 0]
            if not len(present):
                continue
            pooled = []
            for level in levels:
                weights = region_weights(label, present, tuple(level.shape[-2:])).to(level.device)  # (M, h, w)
                sums = torch.einsum("mhw,chw->mc", weights, level[row])
                pooled.append(sums / weights.sum((1, 2)).clamp_min(1e-12)[:, None])
            rows.append(torch.cat(pooled, 1).cpu())
            classes += present.tolist()
            owners += [position] * len(present)
    if not rows:
        return torch.zeros(0, 0), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return torch.cat(rows), np.asarray(classes, np.int64), np.asarray(owners, np.int64)


__all__ = ["feature_maps", "region_features", "region_weights"]
