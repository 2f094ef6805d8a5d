"""The linear protocol: a grid of linear classifiers (one per learning rate x weight decay) on
cached frozen features, trained together in one pass over the same batches (as DINOv2's linear
evaluation does), the best one chosen on the inner validation split."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from anaus_core.evaluate.config import LinearConfig
from anaus_core.evaluate.tensors import batches, seeded_generator


class LinearHeadGrid(nn.Module):
    """``num_heads`` independent linear classifiers on the same features.
    Input (B, D); output (num_heads, B, num_classes)."""

    def __init__(self, *, in_dim: int, num_classes: int, num_heads: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(in_dim, num_classes) for _ in range(num_heads))
        for head in self.heads:
            nn.init.normal_(head.weight, std=0.01)
            nn.init.zeros_(head.bias)

    def forward(self, features: Tensor) -> Tensor:
        return torch.stack([head(features) for head in self.heads])


@dataclass
class LinearResult:
    grid: list[dict]              # [{"lr", "weight_decay", "selection_accuracy"}] per head
    selected: int                 # index into grid
    probabilities: np.ndarray     # (N_test, K) of the selected head


def _standardise(train: Tensor, *others: Tensor) -> list[Tensor]:
    """Centre and scale every feature with statistics of the training part only."""
    mean, std = train.mean(0, keepdim=True), train.std(0, keepdim=True).clamp_min(1e-6)
    return [(t - mean) / std for t in (train, *others)]


def train_linear_grid(train_x: Tensor, train_y: Tensor, select_x: Tensor, select_y: Tensor, test_x: Tensor, *,
                      num_classes: int, config: LinearConfig, seed: int, device: torch.device) -> LinearResult:
    """Train the grid on (train_x, train_y), pick the head with the best accuracy on
    (select_x, select_y) (the inner validation split; the test fold only under
    ``--select-on-test``), return its test-set probabilities. Ties go to the earlier head."""
    train_x, select_x, test_x = (t.to(device) for t in _standardise(train_x, select_x, test_x))
    train_y, select_y = train_y.to(device), select_y.to(device)
    combos = list(product(config.learning_rates, config.weight_decays))
    torch.manual_seed(seed)
    grid = LinearHeadGrid(in_dim=train_x.shape[1], num_classes=num_classes, num_heads=len(combos)).to(device)
    optimizer = torch.optim.SGD([{"params": head.parameters(), "lr": lr, "weight_decay": wd}
                                 for head, (lr, wd) in zip(grid.heads, combos)], momentum=0.9)
    generator = seeded_generator(seed)
    steps_per_epoch = len(batches(len(train_x), config.batch_size))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, config.epochs * steps_per_epoch))
    grid.train()
    for _ in range(config.epochs):
        for positions in batches(len(train_x), config.batch_size, generator=generator):
            positions = positions.to(device)
            logits = grid(train_x[positions])  # (heads, B, K)
            target = train_y[positions].expand(len(combos), -1)
            # the sum of the heads' losses: each head's gradient is its own loss's gradient
            loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="mean") * len(combos)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    grid.eval()
    with torch.no_grad():
        accuracy = (grid(select_x).argmax(-1) == select_y).float().mean(1).cpu().numpy()
        selected = int(np.argmax(accuracy))
        probabilities = F.softmax(grid(test_x)[selected].float(), dim=-1).cpu().numpy()
    records = [{"lr": lr, "weight_decay": wd, "selection_accuracy": float(a)} for (lr, wd), a in zip(combos, accuracy)]
    return LinearResult(records, selected, probabilities)
