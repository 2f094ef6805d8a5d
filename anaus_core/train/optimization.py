"""The optimiser and its schedules, shared by every pre-training method: the step bookkeeping
of a run (``Schedule``), the optimiser over a method's parameter groups (LARS or AdamW), the
learning-rate warm-up + cosine and ``optim.final_weight_decay``'s cosine decay schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from anaus_core.errors import UserInputError
from anaus_core.train.config import PretrainConfig, effective_base_lr, micro_batch_size


def unwrap(model):
    """The method inside a DDP wrapper (or the method itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


@dataclass(frozen=True)
class Schedule:
    """Optimiser-step bookkeeping derived from the data size and the config."""

    micro_batch: int             # images per rank per micro-step
    batches_per_epoch: int       # micro-batches per rank per epoch (drop_last)
    steps_per_epoch: int         # optimiser steps per epoch
    total_steps: int
    warmup_steps: int
    peak_lr: float


def make_schedule(config: PretrainConfig, num_samples: int, world_size: int) -> Schedule:
    """Steps per epoch, total steps and warm-up steps; errors if an epoch is shorter than a step."""
    micro = micro_batch_size(config, world_size)
    batches_per_epoch = num_samples // (micro * world_size)
    steps_per_epoch = batches_per_epoch // config.optim.accumulation_steps
    if steps_per_epoch < 1:
        raise UserInputError(
            f"{config.data.shards or 'data'}: {num_samples} samples are fewer than one global batch "
            f"of {config.data.batch_size}; lower --batch-size")
    if config.run.steps is not None:
        total = int(config.run.steps)
    else:
        epochs = 300.0 if config.run.epochs is None else float(config.run.epochs)
        total = max(1, int(round(epochs * steps_per_epoch)))
    if config.optim.warmup_steps is not None:
        warmup = int(config.optim.warmup_steps)
    else:
        warmup = int(round(config.optim.warmup_epochs * steps_per_epoch))
    warmup = max(0, min(warmup, total - 1)) if total > 1 else 0
    return Schedule(micro, batches_per_epoch, steps_per_epoch, total, warmup, effective_base_lr(config))


def build_optimizer(method, config: PretrainConfig, peak_lr: float):
    """LARS over the method's parameter groups; a group with ``lars_exclude`` (biases, norm
    parameters) gets no weight decay and no LARS adaptation (SPEC §6)."""
    from anaus_core.optim import build_lars

    groups = []
    for group in unwrap(method).optimizer_param_groups():
        group = dict(group)
        exclude = bool(group.pop("lars_exclude", False))
        group["lars_adaptation"] = not exclude
        group.setdefault("weight_decay", 0.0 if exclude else config.optim.weight_decay)
        group["base_weight_decay"] = group["weight_decay"]  # where optim.final_weight_decay's schedule starts
        groups.append(group)
    if config.optim.name == "adamw":
        # ViT recipe (DINO, iBOT, MAE): AdamW; the groups keep their weight decay, the LARS flag is dropped
        return torch.optim.AdamW([{k: v for k, v in g.items() if k != "lars_adaptation"} for g in groups],
                                 lr=peak_lr, betas=(0.9, 0.999), weight_decay=config.optim.weight_decay)
    return build_lars(groups, lr=peak_lr, momentum=config.optim.sgd_momentum,
                      weight_decay=config.optim.weight_decay, eta=config.optim.lars_eta,
                      foreach=config.optim.foreach)


def learning_rate(step: int, schedule: Schedule, config: PretrainConfig) -> float:
    from anaus_core.optim import cosine_schedule_with_warmup

    return float(cosine_schedule_with_warmup(step, schedule.total_steps, schedule.warmup_steps,
                                             schedule.peak_lr, config.optim.final_lr))


def weight_decay_at(step: int, schedule: Schedule, base: float, final: float) -> float:
    """``optim.final_weight_decay``'s schedule (DINO's ``cosine_scheduler`` for the decay): a cosine
    over the run's optimiser steps from ``base`` at step 0 to ``final`` at the last step, no warm-up."""
    progress = step / max(1, schedule.total_steps - 1)
    return float(final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * min(1.0, progress))))


__all__ = ["Schedule", "build_optimizer", "learning_rate", "make_schedule", "unwrap", "weight_decay_at"]
