"""DINO self-distillation: lightly's projection head and loss, plus the step-based schedules.

``lightly.models.modules.DINOProjectionHead`` (3-layer MLP -> L2-normalised bottleneck ->
weight-normalised prototypes) and ``lightly.loss.DINOLoss`` (centred, sharpened teacher
softmax; cross-entropy over every (teacher global view, student view) pair except a view with
itself; centre EMA with ``center_momentum``, all-reduced under DDP) are used as they are; the
tests hold the loss against a hand-computed case. lightly's own temperature warm-up is per
epoch; this project's runs are counted in optimiser steps, so ``teacher_temperature`` is the
same linear warm-up per step and is passed to the loss explicitly.
"""

from __future__ import annotations

import warnings

from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead


def build_dino_head(*, input_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                    output_dim: int = 65536, norm_last_layer: bool = True) -> DINOProjectionHead:
    """(B, input_dim) CLS features -> (B, output_dim) prototype logits.

    lightly builds the prototype layer with the legacy ``torch.nn.utils.weight_norm`` (its
    deprecation warning is silenced here); such a module cannot be deep-copied, so a teacher
    head is a second ``build_dino_head`` loaded with the student's state dict.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*weight_norm.*", category=FutureWarning)
        return DINOProjectionHead(input_dim=input_dim, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim,
                                  output_dim=output_dim, norm_last_layer=norm_last_layer)


def build_dino_loss(*, output_dim: int, teacher_temp: float = 0.04, student_temp: float = 0.1,
                    center_momentum: float = 0.9) -> DINOLoss:
    """``loss(teacher_out: list of (B, K), student_out: list of (B, K), teacher_temp=...)`` -> scalar.

    The teacher list holds the global views; the student list starts with the same global views
    (view i of both lists is the same crop: that pair is skipped) followed by the local views.
    """
    return DINOLoss(output_dim=output_dim, warmup_teacher_temp=teacher_temp, teacher_temp=teacher_temp,
                    warmup_teacher_temp_epochs=1, student_temp=student_temp, center_momentum=center_momentum)


def teacher_temperature(step: int, *, total_steps: int, warmup_fraction: float, start: float, end: float) -> float:
    """DINO's teacher temperature: linear from ``start`` to ``end`` over the first
    ``warmup_fraction`` of the run, then ``end``."""
    warmup = int(round(warmup_fraction * total_steps))
    if warmup <= 0 or step >= warmup:
        return float(end)
    return float(start + (end - start) * step / warmup)
