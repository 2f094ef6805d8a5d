"""``--head maskrcnn``: torchvision Mask R-CNN on the evaluated ResNet, as in the paper's
segmentation protocol (SGD, weight decay 1e-4). The backbone's FPN is torchvision's
``BackboneWithFPN`` over layer1..layer4; our ``fpn.pt`` loads into it (its P5 smoothing conv,
which AnaUS never trains, stays freshly initialised). Instances are the connected components of
each class in the label map; predictions are turned back into a per-pixel class score map
(detections scoring >= 0.5, mask probability > 0.5 wins over background)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from anaus_core.augment.device import IMAGENET_MEAN, IMAGENET_STD
from anaus_core.errors import UserInputError
from anaus_core.evaluate.backbones import ResNetBackbone, set_trainable
from anaus_core.evaluate.config import FinetuneConfig
from anaus_core.evaluate.encoders import EncoderWeights
from anaus_core.evaluate.seg_heads import fpn_channels_of
from anaus_core.evaluate.segment import BestEpoch, SegmentationTraining, mean_foreground_dice
from anaus_core.evaluate.tensors import autocast, batches, seeded_generator
from anaus_core.models.resnet_fpn import ARCH_STAGE_CHANNELS

DETECTION_SCORE = 0.5


def build_maskrcnn(weights: EncoderWeights, backbone: ResNetBackbone, *, num_classes: int, image_size: int,
                   trainable_stages: int | None, default_fpn_channels: int = 256) -> MaskRCNN:
    """Mask R-CNN (``num_classes`` including background) on ``backbone``; ``trainable_stages``
    as in ``set_trainable`` (None: all). BatchNorm keeps the pre-trained statistics."""
    if not isinstance(backbone, ResNetBackbone):
        raise UserInputError(f"{weights.path or weights.name}: --head maskrcnn needs a ResNet encoder (use --head fpn for ViTs)")
    channels = fpn_channels_of(weights.fpn_state) or default_fpn_channels
    set_trainable(backbone, last_stages=trainable_stages)
    stage_channels = ARCH_STAGE_CHANNELS[weights.arch]
    body = BackboneWithFPN(backbone.resnet, return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
                           in_channels_list=[stage_channels[s] for s in (2, 3, 4, 5)], out_channels=channels,
                           extra_blocks=LastLevelMaxPool())
    if weights.fpn_state is not None:
        result = body.fpn.load_state_dict(weights.fpn_state, strict=False)
        if result.unexpected_keys or any(not k.startswith("layer_blocks.3.") for k in result.missing_keys):
            raise UserInputError(f"{weights.fpn_path}: does not fit a {channels}-channel FPN over layer1..layer4 "
                                 f"(missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})")
    return MaskRCNN(body, num_classes=num_classes, min_size=image_size, max_size=image_size,
                    image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))


def instance_targets(label: np.ndarray, num_classes: int) -> dict[str, Tensor]:
    """int (S, S) class map -> Mask R-CNN target: one instance per connected component per class."""
    boxes, labels, masks = [], [], []
    for cls in range(1, num_classes):
        components, count = ndimage.label(label == cls)
        for index, window in enumerate(ndimage.find_objects(components), start=1):
            if window is None:
                continue
            rows, cols = window
            boxes.append([cols.start, rows.start, cols.stop, rows.stop])
            labels.append(cls)
            masks.append(components == index)
    size = label.shape
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "masks": torch.from_numpy(np.stack(masks)).to(torch.uint8) if masks else torch.zeros((0, *size), dtype=torch.uint8),
    }


def _images(batch: np.ndarray, device: torch.device) -> list[Tensor]:
    """uint8 (B, S, S) -> list of float (3, S, S) in [0, 1] (Mask R-CNN normalises itself)."""
    return [torch.from_numpy(image).to(device).float().div(255.0).expand(3, -1, -1) for image in batch]


def _eval_batchnorm(model: nn.Module) -> None:
    for layer in model.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.eval()


@torch.no_grad()
def predict_maskrcnn_scores(model: MaskRCNN, images: np.ndarray, *, num_classes: int, device: torch.device,
                            batch_size: int = 8) -> Tensor:
    """(N, num_classes, S, S) per-pixel class scores on the CPU (background fixed at 0.5)."""
    model.eval()
    out = []
    for positions in batches(len(images), batch_size):
        with autocast(device):
            detections = model(_images(images[positions.numpy()], device))
        for det in detections:
            size = images.shape[1:]
            scores = torch.zeros((num_classes, *size))
            scores[0] = 0.5
            keep = det["scores"].float().cpu() >= DETECTION_SCORE
            for mask, cls in zip(det["masks"][keep].float().cpu(), det["labels"][keep].cpu()):
                scores[int(cls)] = torch.maximum(scores[int(cls)], mask[0])
            out.append(scores)
    return torch.stack(out)


def train_maskrcnn(model: MaskRCNN, *, images: np.ndarray, targets: np.ndarray, train: np.ndarray, select: np.ndarray,
                   num_classes: int, config: FinetuneConfig, seed: int, device: torch.device,
                   progress: Callable | None = None) -> SegmentationTraining:
    """SGD (momentum 0.9, weight decay ``config.weight_decay``, lr ``config.maskrcnn_lr``, cosine)
    for ``config.epochs``; keeps the epoch with the best selection Dice (loaded at the end)."""
    model.to(device)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=config.maskrcnn_lr,
                                momentum=0.9, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, config.epochs))
    generator = seeded_generator(seed)
    instance = [instance_targets(targets[p], num_classes) for p in train]
    select_targets = torch.from_numpy(targets[select])
    best = BestEpoch()
    for epoch in (progress(range(1, config.epochs + 1)) if progress else range(1, config.epochs + 1)):
        model.train()
        _eval_batchnorm(model)
        for positions in batches(len(train), config.batch_size, generator=generator):
            batch_targets = [{k: v.to(device) for k, v in instance[int(p)].items()} for p in positions]
            with autocast(device):
                losses = model(_images(images[train[positions.numpy()]], device), batch_targets)
            loss = sum(v.float() for v in losses.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
        scores = predict_maskrcnn_scores(model, images[select], num_classes=num_classes, device=device)
        best.update(model, epoch, mean_foreground_dice(scores, select_targets, num_classes))
    return best.finish(model)
