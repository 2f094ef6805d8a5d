"""Fine-tuning protocols for classification: ``finetune`` (the paper's: the last
``trainable_stages`` stages + a new linear head train, Adam lr 0.01, cosine schedule, 30 epochs)
and ``finetune-full`` (everything trains). The epoch kept is the one with the best accuracy on
the selection split (the inner validation split; the test fold only under ``--select-on-test``)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from anaus_core.evaluate.backbones import freeze_norm_stats, set_trainable
from anaus_core.evaluate.config import FinetuneConfig
from anaus_core.evaluate.tensors import autocast, batches, network_input, seeded_generator


class Classifier(nn.Module):
    """backbone features (B, D) -> new linear head -> logits (B, num_classes)."""

    def __init__(self, *, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.feature_dim, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.backbone.features(images))


@dataclass
class FinetuneResult:
    selected_epoch: int            # 1-based
    selection_curve: list[float]   # selection-split accuracy per epoch
    probabilities: np.ndarray      # (N_test, K) at the selected epoch


@torch.no_grad()
def predict_probabilities(model: nn.Module, images: np.ndarray, *, device: torch.device, batch_size: int) -> np.ndarray:
    model.eval()
    out = []
    for positions in batches(len(images), batch_size):
        with autocast(device):
            out.append(F.softmax(model(network_input(images[positions.numpy()], device)).float(), -1).cpu())
    return torch.cat(out).numpy()


def random_hflip(batch: Tensor, generator: torch.Generator) -> Tensor:
    """Flip each (B, ...) image left-right with probability 0.5 (seeded)."""
    flip = torch.rand(batch.shape[0], generator=generator) < 0.5
    batch = batch.clone()
    batch[flip] = batch[flip].flip(-1)
    return batch


def finetune_classifier(backbone: nn.Module, *, images: np.ndarray, labels: np.ndarray, train: np.ndarray,
                        select: np.ndarray, test: np.ndarray, num_classes: int, config: FinetuneConfig, full: bool,
                        seed: int, device: torch.device, progress: Callable | None = None) -> FinetuneResult:
    """Fine-tune ``backbone`` (modified in place) + a new head on ``images[train]``; keep the
    epoch with the best accuracy on ``images[select]``; return test probabilities of that epoch."""
    torch.manual_seed(seed)
    model = Classifier(backbone=backbone, num_classes=num_classes)
    set_trainable(backbone, last_stages=None if full else config.trainable_stages)
    model.to(device)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, config.epochs))
    generator = seeded_generator(seed)
    train_images = torch.from_numpy(images[train])
    train_labels = torch.from_numpy(labels[train]).long()
    best_accuracy, best_state, best_epoch, curve = -1.0, None, 0, []
    epochs = range(1, config.epochs + 1)
    for epoch in (progress(epochs) if progress else epochs):
        model.train()
        freeze_norm_stats(model)
        for positions in batches(len(train_images), config.batch_size, generator=generator):
            if len(positions) < 2:  # BatchNorm cannot train on a single image
                continue
            batch = random_hflip(train_images[positions], generator)
            with autocast(device):
                loss = F.cross_entropy(model(network_input(batch, device)).float(), train_labels[positions].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
        accuracy = float((predict_probabilities(model, images[select], device=device, batch_size=config.batch_size)
                          .argmax(1) == labels[select]).mean())
        curve.append(accuracy)
        if accuracy > best_accuracy:
            best_accuracy, best_epoch = accuracy, epoch
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
    model.load_state_dict(best_state)
    probabilities = predict_probabilities(model, images[test], device=device, batch_size=config.batch_size)
    return FinetuneResult(best_epoch, curve, probabilities)
