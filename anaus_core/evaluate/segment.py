"""Segmentation training and scoring. Networks train at the evaluation size (labels resized with
nearest neighbour); predictions are upsampled to each label's original size and scored there,
per image and per class, with the metrics of ``anaus_core.evaluate.metrics``. The epoch kept is
the one with the best mean foreground Dice on the selection split."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.metrics import compute_dice
from PIL import Image
from torch import Tensor, nn
from torch.nn import functional as F

from anaus_core.evaluate.backbones import freeze_norm_stats
from anaus_core.evaluate.metrics.hausdorff import hausdorff_distances
from anaus_core.evaluate.metrics.overlap import overlap_metrics
from anaus_core.evaluate.tensors import autocast, batches, network_input, seeded_generator

SEGMENTATION_METRICS = ("dice", "ppv", "sensitivity", "hd95", "hd")


def resize_label(label: np.ndarray, size: int) -> np.ndarray:
    """int label map (H, W) -> (size, size), nearest neighbour."""
    if label.shape == (size, size):
        return label.astype(np.int64)
    return np.asarray(Image.fromarray(label.astype(np.int32), "I").resize((size, size), Image.Resampling.NEAREST)).astype(np.int64)


@dataclass
class SegmentationTraining:
    selected_epoch: int
    selection_curve: list[float]


class BestEpoch:
    """Keeps the weights (a CPU copy) of the epoch with the highest selection score; ``finish``
    loads them into the model and returns the ``SegmentationTraining`` record."""

    def __init__(self) -> None:
        self.score, self.epoch, self.state, self.curve = -1.0, 0, None, []

    def update(self, model: nn.Module, epoch: int, score: float) -> None:
        self.curve.append(score)
        if score > self.score:
            self.score, self.epoch = score, epoch
            self.state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})

    def finish(self, model: nn.Module) -> SegmentationTraining:
        model.load_state_dict(self.state)
        return SegmentationTraining(self.epoch, self.curve)


@torch.no_grad()
def predict_logits(model: nn.Module, images: np.ndarray, *, device: torch.device, batch_size: int) -> Tensor:
    """(N, K+1, S, S) float32 logits on the CPU."""
    model.eval()
    out = []
    for positions in batches(len(images), batch_size):
        with autocast(device):
            out.append(model(network_input(images[positions.numpy()], device)).float().cpu())
    return torch.cat(out)


def mean_foreground_dice(logits: Tensor, targets: Tensor, num_classes: int) -> float:
    """Mean over images and foreground classes of MONAI's Dice (empty vs empty = 1)."""
    pred = F.one_hot(logits.argmax(1), num_classes).permute(0, 3, 1, 2).float()
    gt = F.one_hot(targets, num_classes).permute(0, 3, 1, 2).float()
    return float(compute_dice(pred, gt, include_background=False, ignore_empty=False).mean())


def train_segmenter(model: nn.Module, *, images: np.ndarray, targets: np.ndarray, train: np.ndarray, select: np.ndarray,
                    num_classes: int, epochs: int, lr: float, weight_decay: float, batch_size: int, seed: int,
                    device: torch.device, progress: Callable | None = None) -> SegmentationTraining:
    """Train ``model`` (in place; its trainable parameters set by the caller) with Dice + cross
    entropy on ``images[train]``/``targets[train]`` (uint8 (N, S, S) / int64 (N, S, S)), keep
    the weights of the epoch with the best selection Dice (loaded into ``model`` at the end)."""
    model.to(device)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
    generator = seeded_generator(seed)
    train_images, train_targets = torch.from_numpy(images[train]), torch.from_numpy(targets[train])
    select_targets = torch.from_numpy(targets[select])
    best = BestEpoch()
    for epoch in (progress(range(1, epochs + 1)) if progress else range(1, epochs + 1)):
        model.train()
        freeze_norm_stats(model)
        for positions in batches(len(train_images), batch_size, generator=generator):
            if len(positions) < 2:
                continue
            batch, target = train_images[positions].clone(), train_targets[positions].clone()
            flip = torch.rand(len(positions), generator=generator) < 0.5
            batch[flip], target[flip] = batch[flip].flip(-1), target[flip].flip(-1)
            with autocast(device):
                logits = model(network_input(batch, device)).float()
            loss = loss_fn(logits, target[:, None].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
        best.update(model, epoch, mean_foreground_dice(predict_logits(model, images[select], device=device,
                                                                    batch_size=batch_size), select_targets, num_classes))
    return best.finish(model)


def upsample_prediction(logits: Tensor, size: tuple[int, int]) -> np.ndarray:
    """(K+1, S, S) logits -> int64 (H, W) label map at the original size (bilinear logits, argmax)."""
    up = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
    return up.argmax(0).numpy()


def score_segmentation(prediction: np.ndarray, target: np.ndarray, *, class_names: Sequence[str],
                       spacing: tuple[float, float] | None) -> dict:
    """Per-class metrics of one image (class indices 1..K) and their mean over classes.
    Distances in pixels; ``hd_mm``/``hd95_mm`` too when ``spacing`` is known."""
    per_class = {}
    for index, name in enumerate(class_names, start=1):
        pred_mask, gt_mask = prediction == index, target == index
        scores = overlap_metrics(pred_mask, gt_mask) | hausdorff_distances(pred_mask, gt_mask)
        if spacing is not None:
            mm = hausdorff_distances(pred_mask, gt_mask, spacing=spacing)
            scores |= {"hd_mm": mm["hd"], "hd95_mm": mm["hd95"]}
        per_class[name] = scores
    keys = list(next(iter(per_class.values())))
    mean = {key: float(np.mean([c[key] for c in per_class.values()])) for key in keys}
    return {"mean": mean, "per_class": per_class}
